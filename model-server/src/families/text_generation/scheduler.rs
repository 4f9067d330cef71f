//! Continuous batching for text generation, one scheduler thread per model.
//!
//! Requests wait in the same bounded [`RequestQueue`] as embeddings (its length is
//! `kiln_queue_depth`). Between decode steps the scheduler admits waiting requests, in order, up
//! to `maxBatchSize` active sequences and while the model's KV-cache budget has room for the
//! next one's whole reservation (its prompt plus `max_tokens`, at most the context window), so
//! the caches of admitted sequences can never outgrow the memory set aside for them. Each step is
//! one [`Decoder::forward`](crate::models::llama::Decoder::forward) over every active sequence: one
//! token for each sequence that is decoding, plus prompt chunks for sequences still in prefill,
//! capped so a long prompt delays running streams by one bounded chunk and never by a whole
//! prefill. A sequence leaves as soon as it ends, fails or its caller goes away (the event channel
//! closes), and its reservation returns to the budget.
//!
//! A step that fails is retried one sequence at a time, so a sequence that cannot run fails
//! alone and the others continue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use tokio::sync::mpsc;

use super::model::{Delta, FinishReason, GenerationModel, SamplingParams, TextStream};
use crate::families::StartContext;
use crate::manifest::ModelRef;
use crate::metrics::Metrics;
use crate::models::ModelError;
use crate::models::llama::{SequenceCache, Step};
use crate::queue::{
    InFlight, RequestQueue, Reservation, SubmitError, Tracked, Weigh, WorkerThread, spawn_worker,
};

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

struct Queued {
    request: Request,
    arrived: Instant,
}

impl Weigh for Queued {
    fn tokens(&self) -> usize {
        self.request.prompt.len()
    }
}

/// One model's KV-cache budget and what its sequences hold of it.
pub struct KvCache {
    pub budget_bytes: u64,
    pub bytes_per_token: u64,
    /// Positions promised to admitted sequences (prompt + max_tokens each).
    reserved_tokens: AtomicU64,
    /// Positions actually in the admitted sequences' caches.
    used_tokens: AtomicU64,
}

impl KvCache {
    pub fn new(budget_bytes: u64, bytes_per_token: u64) -> Self {
        KvCache {
            budget_bytes,
            bytes_per_token: bytes_per_token.max(1),
            reserved_tokens: AtomicU64::new(0),
            used_tokens: AtomicU64::new(0),
        }
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_tokens.load(Ordering::SeqCst).saturating_mul(self.bytes_per_token)
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_tokens.load(Ordering::SeqCst).saturating_mul(self.bytes_per_token)
    }

    /// Bytes a sequence of `tokens` positions needs.
    pub fn bytes_for(&self, tokens: usize) -> u64 {
        (tokens as u64).saturating_mul(self.bytes_per_token)
    }

    /// Take `tokens` positions from the budget if they fit what is left.
    fn try_reserve(&self, tokens: usize) -> bool {
        let want = tokens as u64;
        self.reserved_tokens
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                let after = held.checked_add(want)?;
                (after.saturating_mul(self.bytes_per_token) <= self.budget_bytes).then_some(after)
            })
            .is_ok()
    }

    fn release(&self, tokens: usize) {
        let _ = self.reserved_tokens.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            Some(held.saturating_sub(tokens as u64))
        });
    }
}

/// Why a request can never be admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "this request may need {needed} bytes of KV cache ({tokens} tokens: prompt plus max_tokens) but model {model} has a budget of {budget} bytes; lower max_tokens or shorten the prompt"
)]
pub struct OverBudget {
    pub model: String,
    pub tokens: usize,
    pub needed: u64,
    pub budget: u64,
}

/// Handle to one generation model's scheduler; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    queue: Arc<RequestQueue<Queued>>,
    kv: Arc<KvCache>,
    context: usize,
}

/// A place in a generation model's queue, taken before tokenization.
pub struct GenerationSlot(Reservation<Queued>);

impl GenerationSlot {
    /// Queue a request; its events arrive on the request's channel.
    pub fn submit(self, request: Request) -> Result<(), SubmitError> {
        self.0.push(Queued { request, arrived: Instant::now() })
    }
}

/// The cache positions a request may fill: its prompt and `max_tokens`, at most the window.
pub fn reservation(prompt: usize, max_tokens: usize, context: usize) -> usize {
    prompt.saturating_add(max_tokens).min(context)
}

impl Scheduler {
    /// Start the scheduler thread for `model`, with `ctx.memory_for_requests` as its KV-cache
    /// budget.
    pub fn spawn(
        id: ModelRef,
        model: Arc<GenerationModel>,
        ctx: StartContext,
    ) -> std::io::Result<(Self, WorkerThread)> {
        let queue = ctx.queue(&id);
        let StartContext {
            batching: config, metrics, on_failure, memory_for_requests: kv_budget_bytes, ..
        } = ctx;
        let kv = Arc::new(KvCache::new(kv_budget_bytes, model.decoder().kv_bytes_per_token()));
        let labels = [id.name.as_str(), id.version.as_str()];
        metrics.kv_cache_budget_bytes.with_label_values(&labels).set(saturating_i64(kv_budget_bytes));
        let context = model.context_length();
        let worker = Worker {
            queue: queue.clone(),
            kv: kv.clone(),
            model,
            metrics,
            id: id.clone(),
            max_active: config.max_batch_size.max(1) as usize,
        };
        let tell = |queued: Queued, reason: &str| {
            let _ = queued.request.events.send(Event::Failed(reason.to_string()));
        };
        let thread =
            spawn_worker(format!("generate-{id}"), queue.clone(), on_failure, tell, move || worker.run())?;
        Ok((Scheduler { queue, kv, context }, thread))
    }

    /// A place in the queue, or why there is none (full, closed, failed).
    pub fn reserve(&self) -> Result<GenerationSlot, SubmitError> {
        self.queue.reserve().map(GenerationSlot)
    }

    /// Queue a request without a prior reservation.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.reserve()?.submit(request)
    }

    /// Refuses a request whose reservation exceeds the whole budget: it would wait forever.
    pub fn check_budget(&self, prompt: usize, max_tokens: usize) -> Result<(), OverBudget> {
        let tokens = reservation(prompt, max_tokens, self.context);
        let needed = self.kv.bytes_for(tokens);
        if needed > self.kv.budget_bytes {
            return Err(OverBudget {
                model: self.queue.id().to_string(),
                tokens,
                needed,
                budget: self.kv.budget_bytes,
            });
        }
        Ok(())
    }

    /// Positions one sequence may hold: the whole budget, in tokens.
    pub fn kv_capacity_tokens(&self) -> usize {
        usize::try_from(self.kv.budget_bytes / self.kv.bytes_per_token).unwrap_or(usize::MAX)
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Requests waiting to join the running batch.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    /// Requests waiting or generating.
    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Why the worker died, once it has.
    pub fn failure(&self) -> Option<String> {
        self.queue.lock().failed.clone()
    }

    /// Why the worker died, waiting up to `within` for the reason to be recorded.
    pub async fn failure_within(&self, within: std::time::Duration) -> Option<String> {
        self.queue.failure_within(within).await
    }

    /// Finish the queued and running generations, then stop.
    pub fn close(&self) {
        self.queue.close();
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
    /// Positions taken from the budget, given back when the sequence leaves.
    reserved: usize,
    kv: Arc<KvCache>,
    /// Counts the request in `kiln_queue_depth` until the sequence leaves.
    _in_flight: InFlight,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.kv.release(self.reserved);
    }
}

/// What one active sequence does in a step.
#[derive(Clone, Copy)]
struct Part {
    /// Index in `active`.
    seq: usize,
    /// Tokens fed: a prompt chunk, or 1 when decoding.
    tokens: usize,
    /// Whether it yields a token (decoding, or the prompt's last chunk).
    yields: bool,
}

/// How a sequence fared in a step.
enum Outcome {
    Running,
    Finished,
    Failed(String),
}

struct Worker {
    queue: Arc<RequestQueue<Queued>>,
    kv: Arc<KvCache>,
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
            if !active.is_empty() {
                if crate::failpoint::hit("step-panic", &self.id) {
                    panic!("failpoint step-panic");
                }
                self.step(&mut active);
            }
            self.publish(&active);
        }
    }

    /// Report what the caches hold now.
    fn publish(&self, active: &[Active]) {
        let used: usize = active.iter().map(|a| a.cache.len()).sum();
        self.kv.used_tokens.store(used as u64, Ordering::SeqCst);
        let l = self.labels();
        self.metrics.kv_cache_used_bytes.with_label_values(&l).set(saturating_i64(self.kv.used_bytes()));
        self.metrics
            .kv_cache_reserved_bytes
            .with_label_values(&l)
            .set(saturating_i64(self.kv.reserved_bytes()));
    }

    /// Move waiting requests into free slots, in order, while the budget has room for the next
    /// one; block while there is nothing to do. False once the queue is closed and everything
    /// is done.
    fn admit(&self, active: &mut Vec<Active>) -> bool {
        let mut q = self.queue.lock();
        loop {
            while active.len() < self.max_active {
                let Some(next) = q.front() else { break };
                if next.request.events.is_closed() {
                    q.pop_front();
                    self.queue.taken(1);
                    continue;
                }
                let context = self.model.context_length();
                let tokens = reservation(next.request.prompt.len(), next.request.max_tokens, context);
                // The head of the queue waits for room; nothing overtakes it.
                if !self.kv.try_reserve(tokens) {
                    if active.is_empty() {
                        // Not even an idle model could hold it (callers check the budget
                        // first; this keeps one that did not from waiting forever).
                        if let Some(refused) = q.pop_front() {
                            self.queue.taken(1);
                            let needed = self.kv.bytes_for(tokens);
                            let message = format!(
                                "needs {needed} bytes of KV cache; the budget is {} bytes",
                                self.kv.budget_bytes
                            );
                            let _ = refused.job.request.events.send(Event::Failed(message));
                        }
                        continue;
                    }
                    break;
                }
                let Some(Tracked { job: Queued { request, arrived }, in_flight }) = q.pop_front() else {
                    self.kv.release(tokens);
                    break;
                };
                self.queue.taken(1);
                active.push(Active {
                    processor: request.sampling.processor(),
                    text: TextStream::new(request.stop.clone()),
                    cache: self.model.decoder().new_cache_for(tokens),
                    fed: 0,
                    last: [0],
                    generated: 0,
                    first_token: true,
                    arrived,
                    request,
                    reserved: tokens,
                    kv: self.kv.clone(),
                    _in_flight: in_flight,
                });
            }
            if !active.is_empty() {
                return true;
            }
            if q.closed && q.is_empty() {
                return false;
            }
            q = self.queue.wait(q);
        }
    }

    /// Which sequences take part in this step, and how.
    fn plan(active: &[Active]) -> Vec<Part> {
        let decoding = active.iter().filter(|a| a.fed == a.request.prompt.len()).count();
        let mut budget = if decoding > 0 { PREFILL_CHUNK_SHARED } else { PREFILL_CHUNK_ALONE };
        let mut parts = Vec::with_capacity(active.len());
        for (seq, a) in active.iter().enumerate() {
            let prompt_len = a.request.prompt.len();
            if a.fed < prompt_len {
                if budget == 0 {
                    continue;
                }
                let n = (prompt_len - a.fed).min(budget);
                budget -= n;
                parts.push(Part { seq, tokens: n, yields: a.fed + n == prompt_len });
            } else {
                parts.push(Part { seq, tokens: 1, yields: true });
            }
        }
        parts
    }

    /// One forward over `parts`: next-token logits, one row per yielding part, in order.
    fn forward(&self, active: &mut [Active], parts: &[Part]) -> Result<Option<Tensor>, ModelError> {
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(parts.len());
        let mut remaining: &mut [Active] = active;
        let mut offset = 0;
        for part in parts {
            // Parts are in increasing `seq` order: split off each one's sequence in turn.
            let (_, rest) = std::mem::take(&mut remaining).split_at_mut(part.seq - offset);
            let Some((a, rest)) = rest.split_first_mut() else {
                return Err(ModelError::Inference("step plan names a missing sequence".into()));
            };
            remaining = rest;
            offset = part.seq + 1;
            let tokens: &[u32] = if a.fed < a.request.prompt.len() {
                &a.request.prompt[a.fed..a.fed + part.tokens]
            } else {
                &a.last
            };
            steps.push(Step { tokens, cache: &mut a.cache, logits: part.yields });
        }
        self.metrics.batch_size.with_label_values(&self.labels()).observe(steps.len() as f64);
        self.model.decoder().forward(&mut steps)
    }

    fn step(&self, active: &mut Vec<Active>) {
        let parts = Self::plan(active);
        let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(parts.len());
        match self.forward(active, &parts) {
            Ok(logits) => {
                let mut row = 0;
                for part in &parts {
                    let outcome = self.advance_part(&mut active[part.seq], part, logits.as_ref(), &mut row);
                    outcomes.push((part.seq, outcome));
                }
            }
            Err(e) if parts.len() == 1 => {
                active[parts[0].seq].cache.rollback();
                outcomes.push((parts[0].seq, Outcome::Failed(e.to_string())));
            }
            // Retry each sequence alone: the one that cannot run fails, the others continue.
            Err(e) => {
                tracing::warn!(model = %self.id, error = %e, sequences = parts.len(), "batched step failed; running its sequences one by one");
                for part in &parts {
                    active[part.seq].cache.rollback();
                }
                for part in &parts {
                    let alone = [Part { seq: part.seq, ..*part }];
                    let outcome = match self.forward(active, &alone) {
                        Ok(logits) => {
                            let mut row = 0;
                            self.advance_part(&mut active[part.seq], part, logits.as_ref(), &mut row)
                        }
                        Err(e) => {
                            active[part.seq].cache.rollback();
                            Outcome::Failed(e.to_string())
                        }
                    };
                    outcomes.push((part.seq, outcome));
                }
            }
        }
        let mut leaving: Vec<usize> = Vec::new();
        for (seq, outcome) in outcomes {
            match outcome {
                Outcome::Running => {}
                Outcome::Finished => leaving.push(seq),
                Outcome::Failed(message) => {
                    tracing::error!(model = %self.id, error = %message, "sequence failed");
                    let _ = active[seq].request.events.send(Event::Failed(message));
                    leaving.push(seq);
                }
            }
        }
        leaving.sort_unstable();
        for seq in leaving.into_iter().rev() {
            active.swap_remove(seq);
        }
    }

    /// After a successful forward: feed bookkeeping, and the sampled token for a part that
    /// yields one (its logits are row `*row`).
    fn advance_part(&self, a: &mut Active, part: &Part, logits: Option<&Tensor>, row: &mut usize) -> Outcome {
        if a.fed < a.request.prompt.len() {
            a.fed += part.tokens;
        }
        if !part.yields {
            return Outcome::Running;
        }
        let Some(logits) = logits else { return Outcome::Failed("the step returned no logits".into()) };
        let sampled = logits.get(*row).map_err(ModelError::from).and_then(|l| Ok(a.processor.sample(&l)?));
        *row += 1;
        let token = match sampled {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
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
        match self.advance(a, token) {
            Ok(Some(finish)) => {
                let _ = a.request.events.send(Event::Done {
                    finish,
                    prompt_tokens: a.request.prompt.len(),
                    completion_tokens: a.generated,
                });
                Outcome::Finished
            }
            Ok(None) => Outcome::Running,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Send the text `token` completes; Some when the generation ends here.
    fn advance(&self, a: &mut Active, token: u32) -> Result<Option<FinishReason>, ModelError> {
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
                // The reservation is the hard limit: prompt + max_tokens, at most the window.
                let out_of_room = a.generated >= a.request.max_tokens || a.cache.len() + 1 > a.reserved;
                let text = if out_of_room { text + &a.text.flush(&self.model)? } else { text };
                if !text.is_empty() {
                    let _ = a.request.events.send(Event::Text(text));
                }
                Ok(out_of_room.then_some(FinishReason::Length))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_reservations_while_they_fit_and_takes_back_what_leaves() {
        let kv = KvCache::new(1000, 10); // 100 positions
        assert!(kv.try_reserve(60));
        assert!(!kv.try_reserve(41), "60 + 41 positions exceed the budget");
        assert!(kv.try_reserve(40));
        assert_eq!(kv.reserved_bytes(), 1000);
        kv.release(60);
        assert_eq!(kv.reserved_bytes(), 400);
        assert!(!kv.try_reserve(usize::MAX), "no overflow on a huge reservation");
        assert_eq!(kv.bytes_for(usize::MAX), u64::MAX);
    }

    #[test]
    fn a_reservation_is_the_prompt_and_max_tokens_within_the_window() {
        assert_eq!(reservation(10, 20, 100), 30);
        assert_eq!(reservation(10, usize::MAX, 100), 100);
        assert_eq!(reservation(usize::MAX, usize::MAX, 8192), 8192);
    }
}
