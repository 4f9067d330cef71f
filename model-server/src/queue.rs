//! What every family's scheduling shares: the bounded request queue each model's worker takes
//! from, and the thread that worker runs on, which turns a panic into a failed model instead of
//! callers waiting forever. The embedding batcher and the generation scheduler are built on
//! these (`families/*/batcher.rs`, `families/*/scheduler.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::manifest::ModelRef;
use crate::metrics::Metrics;

/// A bounded FIFO of requests for one model. Shared by the embedding batcher and the
/// generation scheduler: a full queue refuses at once, and what is in it counts as waiting until
/// a worker takes it (`kiln_queue_waiting`). Every accepted job carries an [`InFlight`] guard
/// until its worker is done with it, so `kiln_queue_depth` counts requests waiting *or running*:
/// a generation pod with every slot busy and nothing waiting shows its load, and the HPA adds a
/// pod before requests start to wait.
///
/// Two bounds: requests (`capacity`, counting places reserved by requests still tokenizing, so
/// a full queue refuses before any tokenization work) and tokens waiting (`max_tokens`, so the
/// memory a queue holds does not depend on how long its requests are).
pub struct RequestQueue<J> {
    state: Mutex<QueueState<J>>,
    /// Jobs accepted and not finished (waiting or running).
    in_flight: Arc<AtomicUsize>,
    wake: Condvar,
    /// The reason, once the worker died: callers whose reply channel closed wait on this.
    failure: tokio::sync::watch::Sender<Option<String>>,
    capacity: usize,
    max_tokens: usize,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

/// How many tokens a queued job holds.
pub trait Weigh {
    fn tokens(&self) -> usize;
}

/// A queued job and the guard that counts it in flight until its worker drops it.
pub struct Tracked<J> {
    pub job: J,
    pub in_flight: InFlight,
}

/// Counts one request as in flight (`kiln_queue_depth`) for as long as it lives.
pub struct InFlight {
    count: Arc<AtomicUsize>,
    pod: prometheus::IntGauge,
    model: prometheus::IntGauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.pod.dec();
        self.model.dec();
    }
}

pub struct QueueState<J> {
    jobs: VecDeque<Tracked<J>>,
    /// Places promised to requests that are still being tokenized.
    reserved: usize,
    /// Tokens held by `jobs`.
    tokens: usize,
    pub closed: bool,
    /// Set when the worker died: why, for every later request.
    pub failed: Option<String>,
}

impl<J: Weigh> QueueState<J> {
    /// The oldest job, with its in-flight guard: keep the guard until the job is done.
    pub fn pop_front(&mut self) -> Option<Tracked<J>> {
        let tracked = self.jobs.pop_front()?;
        self.tokens = self.tokens.saturating_sub(tracked.job.tokens());
        Some(tracked)
    }

    pub fn front(&self) -> Option<&J> {
        self.jobs.front().map(|t| &t.job)
    }

    pub fn iter(&self) -> impl Iterator<Item = &J> {
        self.jobs.iter().map(|t| &t.job)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Keep the jobs for which `keep` is true; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&J) -> bool) -> usize {
        let before = self.jobs.len();
        self.jobs.retain(|t| keep(&t.job));
        self.tokens = self.jobs.iter().map(|t| t.job.tokens()).sum();
        before - self.jobs.len()
    }

    /// Take out the jobs `pick` chooses, visited oldest first; the rest keep their order.
    pub fn take_where(&mut self, mut pick: impl FnMut(&J) -> bool) -> Vec<Tracked<J>> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.jobs.len());
        for tracked in self.jobs.drain(..) {
            if pick(&tracked.job) {
                self.tokens = self.tokens.saturating_sub(tracked.job.tokens());
                taken.push(tracked);
            } else {
                kept.push_back(tracked);
            }
        }
        self.jobs = kept;
        taken
    }

    /// Everything still queued, for a worker that is going away.
    pub fn drain(&mut self) -> Vec<Tracked<J>> {
        self.tokens = 0;
        self.jobs.drain(..).collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("queue for {model} is full ({depth} requests waiting)")]
    Full { model: String, depth: usize },
    #[error("queue for {model} holds {waiting} tokens; {tokens} more would pass its limit of {limit}")]
    TokensFull { model: String, waiting: usize, tokens: usize, limit: usize },
    #[error("a request of {tokens} tokens can never fit the queue of {model}, whose limit is {limit} tokens")]
    TooLarge { model: String, tokens: usize, limit: usize },
    #[error("model {0} is shutting down")]
    Closed(String),
    #[error("model {model} stopped serving: {reason}")]
    Failed { model: String, reason: String },
}

/// A place in the queue, held while the request is tokenized; released if never used.
pub struct Reservation<J: Weigh> {
    queue: Arc<RequestQueue<J>>,
    used: bool,
}

impl<J: Weigh> Reservation<J> {
    /// Queue `job` in the reserved place, if its tokens fit what the queue may hold.
    pub fn push(mut self, job: J) -> Result<(), SubmitError> {
        self.used = true;
        self.queue.push_reserved(job)
    }
}

impl<J: Weigh> Drop for Reservation<J> {
    fn drop(&mut self) {
        if !self.used {
            let mut q = self.queue.lock();
            q.reserved = q.reserved.saturating_sub(1);
        }
    }
}

impl<J: Weigh> RequestQueue<J> {
    pub fn new(id: ModelRef, capacity: usize, max_tokens: usize, metrics: Arc<Metrics>) -> Self {
        RequestQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                reserved: 0,
                tokens: 0,
                closed: false,
                failed: None,
            }),
            wake: Condvar::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            failure: tokio::sync::watch::channel(None).0,
            capacity: capacity.max(1),
            max_tokens: max_tokens.max(1),
            id,
            metrics,
        }
    }

    pub fn id(&self) -> &ModelRef {
        &self.id
    }

    fn refusal(&self, q: &QueueState<J>) -> Option<SubmitError> {
        if let Some(reason) = &q.failed {
            return Some(SubmitError::Failed { model: self.id.to_string(), reason: reason.clone() });
        }
        if q.closed {
            return Some(SubmitError::Closed(self.id.to_string()));
        }
        None
    }

    /// Promise a place before the (costly) tokenization; a full queue refuses here.
    pub fn reserve(self: &Arc<Self>) -> Result<Reservation<J>, SubmitError> {
        let mut q = self.lock();
        if let Some(refused) = self.refusal(&q) {
            return Err(refused);
        }
        if q.jobs.len() + q.reserved >= self.capacity {
            return Err(SubmitError::Full { model: self.id.to_string(), depth: q.jobs.len() + q.reserved });
        }
        q.reserved += 1;
        Ok(Reservation { queue: self.clone(), used: false })
    }

    /// Queue a job without a prior reservation.
    pub fn push(self: &Arc<Self>, job: J) -> Result<(), SubmitError> {
        self.reserve()?.push(job)
    }

    fn push_reserved(&self, job: J) -> Result<(), SubmitError> {
        let mut q = self.lock();
        q.reserved = q.reserved.saturating_sub(1);
        if let Some(refused) = self.refusal(&q) {
            return Err(refused);
        }
        let tokens = job.tokens();
        if tokens > self.max_tokens {
            return Err(SubmitError::TooLarge { model: self.id.to_string(), tokens, limit: self.max_tokens });
        }
        // The one job of an empty queue always fits, whatever its size below the limit.
        if !q.jobs.is_empty() && q.tokens.saturating_add(tokens) > self.max_tokens {
            return Err(SubmitError::TokensFull {
                model: self.id.to_string(),
                waiting: q.tokens,
                tokens,
                limit: self.max_tokens,
            });
        }
        q.tokens += tokens;
        let in_flight = self.in_flight_guard();
        q.jobs.push_back(Tracked { job, in_flight });
        self.depth_changed(1);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    fn in_flight_guard(&self) -> InFlight {
        let labels = [self.id.name.as_str(), self.id.version.as_str()];
        let guard = InFlight {
            count: self.in_flight.clone(),
            pod: self.metrics.queue_depth.clone(),
            model: self.metrics.model_queue_depth.with_label_values(&labels),
        };
        guard.count.fetch_add(1, Ordering::SeqCst);
        guard.pod.inc();
        guard.model.inc();
        guard
    }

    /// Requests waiting, not yet taken by the worker.
    pub fn waiting(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Requests waiting or running: accepted, and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Tokens held by the waiting requests.
    pub fn tokens_waiting(&self) -> usize {
        self.lock().tokens
    }

    /// Refuse new requests; the worker finishes what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The worker died: refuse everything from now on with `reason`, and hand back what was
    /// queued so its callers can be told.
    pub fn fail(&self, reason: &str) -> Vec<Tracked<J>> {
        let mut q = self.lock();
        q.failed = Some(reason.to_string());
        q.closed = true;
        let dropped = q.drain();
        self.taken(dropped.len());
        drop(q);
        self.failure.send_replace(Some(reason.to_string()));
        self.wake.notify_all();
        dropped
    }

    /// Why the worker died. A caller whose reply channel closed without an answer (the worker
    /// unwound past it) waits up to `within` for the reason to be recorded, which happens
    /// right after the unwinding.
    pub async fn failure_within(&self, within: Duration) -> Option<String> {
        let mut rx = self.failure.subscribe();
        let reason = tokio::time::timeout(within, rx.wait_for(Option::is_some)).await;
        reason.ok().and_then(|r| r.ok().and_then(|v| v.clone()))
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
        self.metrics.queue_waiting.add(delta);
        self.metrics.model_queue_waiting.with_label_values(&[&self.id.name, &self.id.version]).add(delta);
    }
}

/// Called once when a model's worker thread dies, with the reason.
pub type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// A model's worker thread, to wait for when the model is unloaded: the thread holds the
/// model's weights until it returns.
#[derive(Clone, Default)]
pub struct WorkerThread(Arc<Mutex<Option<std::thread::JoinHandle<()>>>>);

impl WorkerThread {
    /// Wait for the thread to return (its queue must be closed); at once if it has, or if
    /// another caller already waited.
    pub fn join(&self) {
        let handle = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // A panic was already reported through the failure hook.
            let _ = handle.join();
        }
    }
}

/// Run `body` as a model's worker on a thread of its own. A panic does not leave callers
/// waiting forever: the queue refuses every later request with the reason, the callers still
/// queued are told through `tell`, and `on_failure` marks the model failed.
pub fn spawn_worker<J: Weigh + Send + 'static>(
    name: String,
    queue: Arc<RequestQueue<J>>,
    on_failure: FailureHook,
    tell: impl Fn(J, &str) + Send + 'static,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<WorkerThread> {
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) else { return };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let reason = format!("its worker thread panicked: {what}");
        tracing::error!(model = %queue.id(), %reason, "model worker died");
        for tracked in queue.fail(&reason) {
            tell(tracked.job, &reason);
        }
        on_failure(&reason);
    })?;
    Ok(WorkerThread(Arc::new(Mutex::new(Some(handle)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tokens(usize);
    impl Weigh for Tokens {
        fn tokens(&self) -> usize {
            self.0
        }
    }

    fn queue(capacity: usize, max_tokens: usize) -> Arc<RequestQueue<Tokens>> {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        Arc::new(RequestQueue::new(ModelRef::new("m", "v1"), capacity, max_tokens, metrics))
    }

    #[test]
    fn a_place_is_reserved_before_tokenizing_and_a_full_queue_refuses_there() {
        let q = queue(2, 1000);
        let a = q.reserve().expect("first place");
        let _b = q.reserve().expect("second place");
        // Both places are promised: a third request is refused before any tokenizing.
        assert!(matches!(q.reserve(), Err(SubmitError::Full { depth: 2, .. })));
        a.push(Tokens(10)).expect("push");
        assert_eq!((q.waiting(), q.in_flight()), (1, 1));
        // An unused reservation gives its place back when dropped.
        drop(_b);
        q.reserve().expect("the released place").push(Tokens(10)).expect("push");
        assert!(q.reserve().is_err(), "two queued");
    }

    #[test]
    fn waiting_tokens_are_bounded_and_an_oversized_request_is_named() {
        let q = queue(100, 1000);
        q.push(Tokens(600)).expect("fits");
        assert!(matches!(
            q.push(Tokens(500)),
            Err(SubmitError::TokensFull { waiting: 600, tokens: 500, .. })
        ));
        assert!(matches!(q.push(Tokens(1001)), Err(SubmitError::TooLarge { tokens: 1001, limit: 1000, .. })));
        q.push(Tokens(400)).expect("fits exactly");
        assert_eq!(q.tokens_waiting(), 1000);
        let taken = q.lock().pop_front();
        assert_eq!(taken.as_ref().map(|t| t.job.0), Some(600));
        assert_eq!(q.tokens_waiting(), 400);
        // Taken by the worker: no longer waiting, still in flight until the worker drops it.
        assert_eq!((q.waiting(), q.in_flight()), (1, 2));
        drop(taken);
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn a_failed_queue_refuses_with_the_reason_and_hands_back_its_jobs() {
        let q = queue(10, 1000);
        q.push(Tokens(1)).expect("push");
        q.push(Tokens(2)).expect("push");
        let dropped = q.fail("its worker thread panicked: boom");
        assert_eq!(dropped.len(), 2);
        match q.reserve() {
            Err(SubmitError::Failed { reason, .. }) => assert!(reason.contains("boom")),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a failed queue gave a place"),
        }
    }

    #[test]
    fn a_panicking_worker_tells_its_callers_and_calls_the_failure_hook() {
        let q = queue(10, 1000);
        q.push(Tokens(7)).expect("push");
        let (told_tx, told_rx) = std::sync::mpsc::channel();
        let (hook_tx, hook_rx) = std::sync::mpsc::channel();
        let hook_tx = Mutex::new(hook_tx);
        let on_failure: FailureHook = Arc::new(move |reason: &str| {
            let _ = hook_tx.lock().map(|tx| tx.send(reason.to_string()));
        });
        spawn_worker(
            "test-worker".into(),
            q.clone(),
            on_failure,
            move |job: Tokens, reason: &str| {
                let _ = told_tx.send((job.0, reason.to_string()));
            },
            || panic!("kaboom"),
        )
        .expect("spawn");
        let reason = hook_rx.recv_timeout(Duration::from_secs(10)).expect("the hook ran");
        assert!(reason.contains("kaboom"), "{reason}");
        let (tokens, told) = told_rx.recv_timeout(Duration::from_secs(10)).expect("the caller was told");
        assert_eq!(tokens, 7);
        assert!(told.contains("kaboom"));
        assert!(matches!(q.reserve(), Err(SubmitError::Failed { .. })));
    }
}
