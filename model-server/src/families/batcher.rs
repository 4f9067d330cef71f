//! Dynamic batching for the embedding families, one queue and one dedicated OS thread per
//! model.
//!
//! Requests are tokenized (or decoded) before they get here. A request that reaches an idle
//! worker with an empty queue runs at once: waiting for company would only add latency. What
//! arrives while a batch runs forms the next one, closed at `maxBatchSize` inputs or
//! `maxDelayMilliseconds` after its oldest request arrived, whichever comes first once the
//! worker is free. The worker orders a batch's inputs by length, runs the model and scatters
//! results back in the caller's order. Inputs
//! batch only with their own group: an image-text model's image and text requests share one
//! queue and worker (one forward pass at a time on the pod's cores) and form separate batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::families::{Serving, StartContext};
use crate::manifest::{Batching, ModelRef};
use crate::metrics::Metrics;
use crate::models::ModelError;
use crate::queue::{RequestQueue, Reservation, SubmitError, Tracked, Weigh, WorkerThread, spawn_worker};

/// One output per input (an embedding, a list of faces), in input order.
pub type BatchResult<O = Vec<f32>> = Result<Vec<O>, ModelError>;

/// A model served through a batcher: what both embedding families' requests go to.
pub struct BatchServing<M, I: BatchInput> {
    pub model: Arc<M>,
    pub batcher: Batcher<I>,
    thread: WorkerThread,
}

/// A batched model's own fields of `/status` (its dimension, its input limits).
pub trait BatchStatus {
    fn status(&self) -> serde_json::Map<String, serde_json::Value>;
}

impl<M: BatchModel<I>, I: BatchInput> BatchServing<M, I> {
    /// Start `model`'s batcher.
    pub fn start(id: &ModelRef, model: Arc<M>, ctx: StartContext) -> std::io::Result<Self> {
        let (batcher, thread) = Batcher::spawn(id.clone(), model.clone(), ctx)?;
        Ok(BatchServing { model, batcher, thread })
    }
}

impl<M: BatchModel<I> + BatchStatus, I: BatchInput> Serving for BatchServing<M, I> {
    fn waiting(&self) -> usize {
        self.batcher.waiting()
    }

    fn in_flight(&self) -> usize {
        self.batcher.in_flight()
    }

    fn failure(&self) -> Option<String> {
        self.batcher.failure()
    }

    fn close(&self) {
        self.batcher.close();
    }

    fn stop(&self) {
        self.batcher.close();
        self.thread.join();
    }

    fn status(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.model.status();
        m.insert("queuedTokens".into(), serde_json::json!(self.batcher.tokens_waiting()));
        m
    }
}

/// An input a batcher queues.
pub trait BatchInput: Send + 'static {
    /// What the model gives back for it.
    type Output: Send + 'static;
    /// What it weighs in the queue's token bound, and orders a batch by.
    fn tokens(&self) -> usize;
    /// Inputs batch only with inputs of the same group (a kind of input, an image size).
    fn group(&self) -> u64 {
        0
    }
}

impl BatchInput for Vec<u32> {
    type Output = Vec<f32>;

    fn tokens(&self) -> usize {
        self.len()
    }
}

/// What runs a batch: one output per input, in input order.
pub trait BatchModel<I: BatchInput>: Send + Sync + 'static {
    fn run(&self, inputs: &[&I]) -> BatchResult<I::Output>;
}

pub struct Job<I: BatchInput> {
    inputs: Vec<I>,
    group: u64,
    tokens: usize,
    arrived: Instant,
    reply: oneshot::Sender<BatchResult<I::Output>>,
}

impl<I: BatchInput> Weigh for Job<I> {
    fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Handle to one model's queue; cheap to clone.
pub struct Batcher<I: BatchInput> {
    queue: Arc<RequestQueue<Job<I>>>,
    config: Batching,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

impl<I: BatchInput> Clone for Batcher<I> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
            config: self.config.clone(),
            id: self.id.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// A place in a model's queue, taken before tokenization.
pub struct BatchSlot<I: BatchInput>(Reservation<Job<I>>);

impl<I: BatchInput> BatchSlot<I> {
    /// Queue inputs (of one group); the receiver yields one vector per input, in order.
    pub fn submit(self, inputs: Vec<I>) -> Result<oneshot::Receiver<BatchResult<I::Output>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let group = inputs.first().map_or(0, BatchInput::group);
        let tokens = inputs.iter().map(BatchInput::tokens).sum();
        self.0.push(Job { inputs, group, tokens, arrived: Instant::now(), reply })?;
        Ok(rx)
    }
}

impl<I: BatchInput> Batcher<I> {
    /// Start the worker thread for `model`.
    pub fn spawn<M: BatchModel<I>>(
        id: ModelRef,
        model: Arc<M>,
        ctx: StartContext,
    ) -> std::io::Result<(Self, WorkerThread)> {
        let queue = ctx.queue(&id);
        let StartContext { batching: config, metrics, on_failure, .. } = ctx;
        let batcher = Batcher { queue: queue.clone(), config, id: id.clone(), metrics };
        let worker = batcher.clone();
        let tell = |job: Job<I>, reason: &str| {
            let _ = job.reply.send(Err(ModelError::Inference(reason.to_string())));
        };
        // Idle from before the first request can arrive, whenever the thread gets going.
        let idle_since = Instant::now();
        let thread = spawn_worker(format!("batcher-{id}"), queue, on_failure, tell, move || {
            worker.run(model.as_ref(), idle_since)
        })?;
        Ok((batcher, thread))
    }

    /// A place in the queue, or why there is none (full, closed, failed).
    pub fn reserve(&self) -> Result<BatchSlot<I>, SubmitError> {
        self.queue.reserve().map(BatchSlot)
    }

    /// Queue inputs; the receiver yields one vector per input, in order.
    pub fn submit(&self, inputs: Vec<I>) -> Result<oneshot::Receiver<BatchResult<I::Output>>, SubmitError> {
        self.reserve()?.submit(inputs)
    }

    /// Requests waiting, not yet in a batch.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    /// Requests waiting or in the running batch.
    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Tokens held by the waiting requests.
    pub fn tokens_waiting(&self) -> usize {
        self.queue.tokens_waiting()
    }

    /// Why the worker died, once it has.
    pub fn failure(&self) -> Option<String> {
        self.queue.lock().failed.clone()
    }

    /// The queue, for callers waiting on an answer ([`crate::api::worker_answer`]).
    pub fn queue(&self) -> &RequestQueue<Job<I>> {
        &self.queue
    }

    /// Finish what is queued, then stop the worker.
    pub fn close(&self) {
        self.queue.close();
    }

    fn run<M: BatchModel<I>>(&self, model: &M, mut idle_since: Instant) {
        while let Some(batch) = self.next_batch(idle_since) {
            if crate::failpoint::hit("batch-panic", &self.id) {
                panic!("failpoint batch-panic");
            }
            idle_since = self.execute(model, batch);
        }
    }

    /// Block until a batch is due; None once closed and drained. `idle_since` is when the
    /// worker last became free: a request that arrived after it found the queue empty and the
    /// engine idle, so it is due at once.
    fn next_batch(&self, idle_since: Instant) -> Option<Vec<Tracked<Job<I>>>> {
        let max_inputs = self.config.max_batch_size.max(1) as usize;
        let max_delay = Duration::from_millis(u64::from(self.config.max_delay_milliseconds));
        let mut q = self.queue.lock();
        loop {
            // Drop requests whose caller went away before they cost a batch slot.
            let dropped = q.retain(|j| !j.reply.is_closed());
            self.queue.taken(dropped);
            if let Some(oldest) = q.front() {
                let group = oldest.group;
                let waiting: usize = q.iter().filter(|j| j.group == group).map(|j| j.inputs.len()).sum();
                let due =
                    if oldest.arrived >= idle_since { oldest.arrived } else { oldest.arrived + max_delay };
                let now = Instant::now();
                if waiting >= max_inputs || now >= due || q.closed {
                    // The oldest job's group, in arrival order, up to the first that would not
                    // fit; always at least one job, even one larger than a batch.
                    let (mut n, mut full) = (0, false);
                    let batch = q.take_where(|job| {
                        if full || job.group != group {
                            return false;
                        }
                        if n > 0 && n + job.inputs.len() > max_inputs {
                            full = true;
                            return false;
                        }
                        n += job.inputs.len();
                        true
                    });
                    self.queue.taken(batch.len());
                    return Some(batch);
                }
                q = self.queue.wait_timeout(q, due - now);
            } else if q.closed {
                return None;
            } else {
                q = self.queue.wait(q);
            }
        }
    }

    /// Run a batch and answer its requests; returns when the worker counted as free: just
    /// before the first answer went out, so a caller that sends its next request on an answer
    /// always finds the worker idle.
    fn execute<M: BatchModel<I>>(&self, model: &M, batch: Vec<Tracked<Job<I>>>) -> Instant {
        let max_inputs = self.config.max_batch_size.max(1) as usize;
        // Flatten, remembering where each input goes, and order by length.
        let mut order: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(j, t)| (0..t.job.inputs.len()).map(move |i| (j, i)))
            .collect();
        order.sort_by_key(|&(j, i)| batch[j].job.inputs[i].tokens());
        let mut results: Vec<Vec<Option<I::Output>>> =
            batch.iter().map(|t| t.job.inputs.iter().map(|_| None).collect()).collect();
        let mut failure: Option<ModelError> = None;
        for chunk in order.chunks(max_inputs) {
            let inputs: Vec<&I> = chunk.iter().map(|&(j, i)| &batch[j].job.inputs[i]).collect();
            self.metrics
                .batch_size
                .with_label_values(&[&self.id.name, &self.id.version])
                .observe(inputs.len() as f64);
            match model.run(&inputs) {
                Ok(outputs) => {
                    for (&(j, i), v) in chunk.iter().zip(outputs) {
                        results[j][i] = Some(v);
                    }
                }
                Err(e) => {
                    tracing::error!(model = %self.id, error = %e, "batch failed");
                    failure = Some(e);
                    break;
                }
            }
        }
        let free = Instant::now();
        // Each request leaves the in-flight count as its answer goes out.
        for (Tracked { job, in_flight: _in_flight }, slots) in batch.into_iter().zip(results) {
            let reply = match (&failure, slots.into_iter().collect::<Option<Vec<_>>>()) {
                (None, Some(outputs)) => Ok(outputs),
                (Some(e), _) => Err(ModelError::Inference(e.to_string())),
                (None, None) => Err(ModelError::Inference("batch produced no result".to_string())),
            };
            // The caller may have gone away; nothing to do then.
            let _ = job.reply.send(reply);
        }
        free
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc;

    use super::*;

    /// Records each batch's size; the first batch holds until the test lets it go.
    struct Recorder {
        sizes: Mutex<Vec<usize>>,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl BatchModel<Vec<u32>> for Recorder {
        fn run(&self, inputs: &[&Vec<u32>]) -> BatchResult {
            if let Some(gate) = self.gate.lock().expect("gate").take() {
                gate.recv().expect("released");
            }
            self.sizes.lock().expect("sizes").push(inputs.len());
            Ok(inputs.iter().map(|i| vec![i.len() as f32]).collect())
        }
    }

    fn start(
        batching: Batching,
        gate: Option<mpsc::Receiver<()>>,
    ) -> (Batcher<Vec<u32>>, WorkerThread, Arc<Recorder>) {
        let model = Arc::new(Recorder { sizes: Mutex::new(Vec::new()), gate: Mutex::new(gate) });
        let ctx = StartContext {
            batching,
            max_queued_tokens: 1 << 20,
            memory_for_requests: 0,
            metrics: Arc::new(Metrics::new().expect("metrics")),
            on_failure: Arc::new(|_: &str| {}),
        };
        let (batcher, thread) = Batcher::spawn(ModelRef::new("m", "1"), model.clone(), ctx).expect("spawn");
        (batcher, thread, model)
    }

    // A window of a minute: were it applied, these tests would hit their 30 s timeouts.
    const MINUTE: u32 = 60_000;

    #[tokio::test]
    async fn a_request_to_an_idle_worker_runs_at_once() {
        let (batcher, thread, model) =
            start(Batching { max_batch_size: 32, max_delay_milliseconds: MINUTE, max_queue_depth: 8 }, None);
        for round in 0..3 {
            let rx = batcher.submit(vec![vec![1, 2, 3]]).expect("submit");
            let out = tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a lone request waited for the batch window"))
                .expect("reply")
                .expect("run");
            assert_eq!(out, vec![vec![3.0]]);
        }
        assert_eq!(*model.sizes.lock().expect("sizes"), vec![1, 1, 1]);
        batcher.close();
        thread.join();
    }

    #[tokio::test]
    async fn what_arrives_during_a_batch_forms_the_next_one() {
        let (release, gate) = mpsc::channel();
        let (batcher, thread, model) = start(
            Batching { max_batch_size: 3, max_delay_milliseconds: MINUTE, max_queue_depth: 8 },
            Some(gate),
        );
        let first = batcher.submit(vec![vec![1]]).expect("submit");
        // The first batch is running (and held) once the queue has handed its job over.
        while batcher.waiting() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rest: Vec<_> = (2..5).map(|n| batcher.submit(vec![vec![0; n]]).expect("submit")).collect();
        release.send(()).expect("release");
        let wait = |rx: oneshot::Receiver<BatchResult>| async move {
            tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .expect("answered")
                .expect("reply")
                .expect("run")
        };
        assert_eq!(wait(first).await, vec![vec![1.0]]);
        for (n, rx) in (2..5).zip(rest) {
            assert_eq!(wait(rx).await, vec![vec![n as f32]]);
        }
        // The three that waited during the first pass filled one batch and ran as it ended.
        assert_eq!(*model.sizes.lock().expect("sizes"), vec![1, 3]);
        batcher.close();
        thread.join();
    }
}
