//! Continuous batching for text generation, one scheduler thread per model.
//!
//! Requests wait in the same bounded [`RequestQueue`] as embeddings (its length is
//! `kiln_queue_depth`). Between decode steps the scheduler admits waiting requests up to
//! `maxBatchSize` active sequences; each step is one [`Llama::forward`](crate::engine::llama::Llama::forward)
//! over every active sequence: one token for each sequence that is decoding, plus prompt chunks
//! for sequences still in prefill, capped so a long prompt delays running streams by one
//! bounded chunk and never by a whole prefill. A sequence leaves as soon as it ends or its
//! caller goes away (the event channel closes), so a disconnected client frees its slot before
//! the next step.

use std::sync::Arc;
use std::time::Instant;

use candle_transformers::generation::LogitsProcessor;
use tokio::sync::mpsc;

use super::{RequestQueue, SubmitError};
use crate::engine::EngineError;
use crate::engine::generation::{Delta, FinishReason, GenerationModel, SamplingParams, TextStream};
use crate::engine::llama::{SequenceCache, Step};
use crate::manifest::{Batching, ModelRef};
use crate::metrics::Metrics;

/// Prompt tokens a step may prefill while other sequences are decoding. At 135M parameters on
/// 2 cores a chunk this size costs running streams about three decode steps' time (90 ms).
const PREFILL_CHUNK_SHARED: usize = 32;
/// Prompt tokens per step when nothing else is decoding.
const PREFILL_CHUNK_ALONE: usize = 256;

/// One generation request, already tokenized and checked against the context window.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Final text; may be empty (e.g. after a token that completes nothing yet).
    Text(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Handle to one generation model's scheduler; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    queue: Arc<RequestQueue<(Request, Instant)>>,
}

struct Active {
    request: Request,
    arrived: Instant,
    cache: SequenceCache,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token to feed next once the prompt is in.
    last: [u32; 1],
    generated: usize,
    first_token: bool,
    processor: LogitsProcessor,
    text: TextStream,
}

impl Scheduler {
    pub fn spawn(
        id: ModelRef,
        model: Arc<GenerationModel>,
        config: Batching,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(RequestQueue::new(id.clone(), config.max_queue_depth as usize, metrics.clone()));
        let worker = Worker {
            queue: queue.clone(),
            model,
            metrics,
            id: id.clone(),
            max_active: config.max_batch_size.max(1) as usize,
        };
        std::thread::Builder::new().name(format!("generate-{id}")).spawn(move || worker.run())?;
        Ok(Scheduler { queue })
    }

    /// Queue a request; its events arrive on the request's channel.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.queue.push((request, Instant::now()))
    }

    /// Requests waiting to join the running batch.
    pub fn depth(&self) -> usize {
        self.queue.depth()
    }

    /// Finish the queued and running generations, then stop.
    pub fn close(&self) {
        self.queue.close();
    }
}

struct Worker {
    queue: Arc<RequestQueue<(Request, Instant)>>,
    model: Arc<GenerationModel>,
    metrics: Arc<Metrics>,
    id: ModelRef,
    max_active: usize,
}

impl Worker {
    fn labels(&self) -> [&str; 2] {
        [self.id.name.as_str(), self.id.version.as_str()]
    }

    fn run(&self) {
        let mut active: Vec<Active> = Vec::new();
        loop {
            if !self.admit(&mut active) {
                return;
            }
            // A caller that went away frees its slot (and cache) before the next step.
            active.retain(|a| !a.request.events.is_closed());
            if active.is_empty() {
                continue;
            }
            if let Err(e) = self.step(&mut active) {
                tracing::error!(model = %self.id, error = %e, "generation step failed");
                for a in active.drain(..) {
                    let _ = a.request.events.send(Event::Failed(e.to_string()));
                }
            }
        }
    }

    /// Move waiting requests into free slots; block while there is nothing to do. False once
    /// the queue is closed and everything is done.
    fn admit(&self, active: &mut Vec<Active>) -> bool {
        let mut q = self.queue.lock();
        loop {
            while active.len() < self.max_active {
                let Some((request, arrived)) = q.jobs.pop_front() else { break };
                self.queue.taken(1);
                if request.events.is_closed() {
                    continue;
                }
                active.push(Active {
                    processor: request.sampling.processor(),
                    text: TextStream::new(request.stop.clone()),
                    cache: self.model.llama().new_cache(),
                    fed: 0,
                    last: [0],
                    generated: 0,
                    first_token: true,
                    arrived,
                    request,
                });
            }
            if !active.is_empty() {
                return true;
            }
            if q.closed {
                return false;
            }
            q = self.queue.wait(q);
        }
    }

    fn step(&self, active: &mut Vec<Active>) -> Result<(), EngineError> {
        let decoding = active.iter().filter(|a| a.fed == a.request.prompt.len()).count();
        let mut budget = if decoding > 0 { PREFILL_CHUNK_SHARED } else { PREFILL_CHUNK_ALONE };
        // Which active sequences take part, and whether each yields a token this step.
        let mut plan: Vec<(usize, usize, bool)> = Vec::with_capacity(active.len());
        let logits = {
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(active.len());
            for (i, a) in active.iter_mut().enumerate() {
                let prompt_len = a.request.prompt.len();
                if a.fed < prompt_len {
                    if budget == 0 {
                        continue;
                    }
                    let n = (prompt_len - a.fed).min(budget);
                    budget -= n;
                    let last = a.fed + n == prompt_len;
                    plan.push((i, n, last));
                    steps.push(Step {
                        tokens: &a.request.prompt[a.fed..a.fed + n],
                        cache: &mut a.cache,
                        logits: last,
                    });
                } else {
                    plan.push((i, 1, true));
                    steps.push(Step { tokens: &a.last, cache: &mut a.cache, logits: true });
                }
            }
            self.metrics.batch_size.with_label_values(&self.labels()).observe(steps.len() as f64);
            self.model.llama().forward(&mut steps)?
        };
        let mut row = 0;
        let mut finished: Vec<usize> = Vec::new();
        for (i, n, yields) in plan {
            let Some(a) = active.get_mut(i) else { continue };
            if a.fed < a.request.prompt.len() {
                a.fed += n;
            }
            if !yields {
                continue;
            }
            let Some(logits) = &logits else { continue };
            let token = a.processor.sample(&logits.get(row)?)?;
            row += 1;
            if a.first_token {
                a.first_token = false;
                self.metrics
                    .time_to_first_token
                    .with_label_values(&self.labels())
                    .observe(a.arrived.elapsed().as_secs_f64());
            }
            a.generated += 1;
            self.metrics.generated_tokens.with_label_values(&self.labels()).inc();
            a.last = [token];
            if let Some(finish) = self.advance(a, token)? {
                let _ = a.request.events.send(Event::Done {
                    finish,
                    prompt_tokens: a.request.prompt.len(),
                    completion_tokens: a.generated,
                });
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            active.swap_remove(i);
        }
        Ok(())
    }

    /// Send the text `token` completes; Some when the generation ends here.
    fn advance(&self, a: &mut Active, token: u32) -> Result<Option<FinishReason>, EngineError> {
        if self.model.is_end(token) {
            let rest = a.text.flush(&self.model)?;
            if !rest.is_empty() {
                let _ = a.request.events.send(Event::Text(rest));
            }
            return Ok(Some(FinishReason::Stop));
        }
        match a.text.push(&self.model, token)? {
            Delta::Stopped(text) => {
                if !text.is_empty() {
                    let _ = a.request.events.send(Event::Text(text));
                }
                Ok(Some(FinishReason::Stop))
            }
            Delta::Text(text) => {
                let out_of_room =
                    a.generated >= a.request.max_tokens || a.cache.len() + 1 > self.model.context_length();
                let text = if out_of_room { text + &a.text.flush(&self.model)? } else { text };
                if !text.is_empty() {
                    let _ = a.request.events.send(Event::Text(text));
                }
                Ok(out_of_room.then_some(FinishReason::Length))
            }
        }
    }
}
