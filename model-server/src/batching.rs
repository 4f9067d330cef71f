//! Dynamic batching, one queue and one dedicated OS thread per model.
//!
//! Requests are tokenized before they get here; the worker closes a batch at `maxBatchSize`
//! inputs or `maxDelayMilliseconds` after its oldest request arrived, orders the inputs by
//! length (padding-based encoders waste less), runs the encoder and scatters results back in
//! the caller's order. The queue is bounded in requests: a full queue is refused at once.
//!
//! [`continuous`] is the text-generation counterpart: the same bounded queue, but requests join
//! and leave a running decode loop between steps.

pub mod continuous;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::{EmbeddingModel, EngineError};
use crate::manifest::{Batching, ModelRef};
use crate::metrics::Metrics;

pub type BatchResult = Result<Vec<Vec<f32>>, EngineError>;

/// A bounded FIFO of requests for one model, its length mirrored into `kiln_queue_depth` and
/// `kiln_model_queue_depth`. Shared by the embedding batcher and the generation scheduler: a
/// full queue refuses at once, and what is in it counts as waiting until a worker takes it.
pub struct RequestQueue<J> {
    state: Mutex<QueueState<J>>,
    wake: Condvar,
    capacity: usize,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

pub struct QueueState<J> {
    pub jobs: VecDeque<J>,
    pub closed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("queue for {model} is full ({depth} requests waiting)")]
    Full { model: String, depth: usize },
    #[error("model {0} is shutting down")]
    Closed(String),
}

impl<J> RequestQueue<J> {
    pub fn new(id: ModelRef, capacity: usize, metrics: Arc<Metrics>) -> Self {
        RequestQueue {
            state: Mutex::new(QueueState { jobs: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
            capacity,
            id,
            metrics,
        }
    }

    pub fn id(&self) -> &ModelRef {
        &self.id
    }

    pub fn push(&self, job: J) -> Result<(), SubmitError> {
        let mut q = self.lock();
        if q.closed {
            return Err(SubmitError::Closed(self.id.to_string()));
        }
        if q.jobs.len() >= self.capacity {
            return Err(SubmitError::Full { model: self.id.to_string(), depth: q.jobs.len() });
        }
        q.jobs.push_back(job);
        self.depth_changed(1);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Requests waiting, not yet taken by the worker.
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Refuse new requests; the worker finishes what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    pub fn lock(&self) -> MutexGuard<'_, QueueState<J>> {
        // A panic while holding this lock cannot leave the queue inconsistent (push/pop only).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a push or close.
    pub fn wait<'a>(&self, guard: MutexGuard<'a, QueueState<J>>) -> MutexGuard<'a, QueueState<J>> {
        self.wake.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    pub fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, QueueState<J>>,
        timeout: Duration,
    ) -> MutexGuard<'a, QueueState<J>> {
        self.wake.wait_timeout(guard, timeout).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0)
    }

    /// Record that the worker took (or dropped) `n` requests out of the queue.
    pub fn taken(&self, n: usize) {
        if n > 0 {
            self.depth_changed(-(n as i64));
        }
    }

    fn depth_changed(&self, delta: i64) {
        self.metrics.queue_depth.add(delta);
        self.metrics.model_queue_depth.with_label_values(&[&self.id.name, &self.id.version]).add(delta);
    }
}

struct Job {
    inputs: Vec<Vec<u32>>,
    arrived: Instant,
    reply: oneshot::Sender<BatchResult>,
}

/// Handle to one embedding model's queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    queue: Arc<RequestQueue<Job>>,
    config: Batching,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Start the worker thread for `model`.
    pub fn spawn(
        id: ModelRef,
        model: Arc<EmbeddingModel>,
        config: Batching,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(RequestQueue::new(id.clone(), config.max_queue_depth as usize, metrics.clone()));
        let batcher = Batcher { queue, config, id: id.clone(), metrics };
        let worker = batcher.clone();
        std::thread::Builder::new().name(format!("batcher-{id}")).spawn(move || worker.run(&model))?;
        Ok(batcher)
    }

    /// Queue tokenized inputs; the receiver yields one embedding per input, in order.
    pub fn submit(&self, inputs: Vec<Vec<u32>>) -> Result<oneshot::Receiver<BatchResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.queue.push(Job { inputs, arrived: Instant::now(), reply })?;
        Ok(rx)
    }

    /// Requests waiting, not yet in a batch.
    pub fn depth(&self) -> usize {
        self.queue.depth()
    }

    /// Finish what is queued, then stop the worker.
    pub fn close(&self) {
        self.queue.close();
    }

    fn run(&self, model: &EmbeddingModel) {
        while let Some(batch) = self.next_batch() {
            self.execute(model, batch);
        }
    }

    /// Block until a batch is due; None once closed and drained.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let max_inputs = self.config.max_batch_size.max(1) as usize;
        let max_delay = Duration::from_millis(u64::from(self.config.max_delay_milliseconds));
        let mut q = self.queue.lock();
        loop {
            // Drop requests whose caller went away before they cost a batch slot.
            let before = q.jobs.len();
            q.jobs.retain(|j| !j.reply.is_closed());
            self.queue.taken(before - q.jobs.len());
            if let Some(oldest) = q.jobs.front() {
                let waiting: usize = q.jobs.iter().map(|j| j.inputs.len()).sum();
                let due = oldest.arrived + max_delay;
                let now = Instant::now();
                if waiting >= max_inputs || now >= due || q.closed {
                    let mut batch = Vec::new();
                    let mut n = 0;
                    while let Some(job) = q.jobs.front() {
                        // Always take at least one job, even one larger than a batch.
                        if !batch.is_empty() && n + job.inputs.len() > max_inputs {
                            break;
                        }
                        n += job.inputs.len();
                        if let Some(job) = q.jobs.pop_front() {
                            batch.push(job);
                        }
                    }
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

    fn execute(&self, model: &EmbeddingModel, batch: Vec<Job>) {
        let max_inputs = self.config.max_batch_size.max(1) as usize;
        // Flatten, remembering where each input goes, and order by length.
        let mut order: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.inputs.len()).map(move |i| (j, i)))
            .collect();
        order.sort_by_key(|&(j, i)| batch[j].inputs[i].len());
        let mut results: Vec<Vec<Option<Vec<f32>>>> =
            batch.iter().map(|job| vec![None; job.inputs.len()]).collect();
        let mut failure: Option<EngineError> = None;
        for chunk in order.chunks(max_inputs) {
            let inputs: Vec<&[u32]> = chunk.iter().map(|&(j, i)| batch[j].inputs[i].as_slice()).collect();
            self.metrics
                .batch_size
                .with_label_values(&[&self.id.name, &self.id.version])
                .observe(inputs.len() as f64);
            match model.embed_tokens(&inputs) {
                Ok(vectors) => {
                    for (&(j, i), v) in chunk.iter().zip(vectors) {
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
        for (job, slots) in batch.into_iter().zip(results) {
            let reply = match (&failure, slots.into_iter().collect::<Option<Vec<_>>>()) {
                (None, Some(vectors)) => Ok(vectors),
                (Some(e), _) => Err(EngineError::Inference(e.to_string())),
                (None, None) => Err(EngineError::Inference("batch produced no result".to_string())),
            };
            // The caller may have gone away; nothing to do then.
            let _ = job.reply.send(reply);
        }
    }
}
