//! One queue and one OS thread per Whisper model. Up to eight requests (fewer for large models,
//! whose windows and caches take more memory) are transcribed together, admitted in arrival order as others finish: their windows share encoder batches
//! and their hypotheses step through the decoder together, so the weights are read once per
//! step for all of them; each batch's matmuls spread over the inference threads. A request weighs its audio
//! seconds, so the queue bounds the audio (and memory) waiting, not only the request count.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::families::StartContext;
use crate::manifest::ModelRef;
use crate::metrics::Metrics;
use crate::models::ModelError;
use crate::models::whisper::transcribe::{Options, Transcript, Transcription};
use crate::models::whisper::{AudioFeatures, Whisper};
use crate::queue::{
    InFlight, RequestQueue, Reservation, SubmitError, Tracked, Weigh, WorkerThread, spawn_worker,
};

pub type TranscriptResult = Result<Transcript, ModelError>;

/// A transcription waiting for the worker.
pub struct Job {
    clip: AudioFeatures,
    options: Options,
    reply: oneshot::Sender<TranscriptResult>,
}

impl Weigh for Job {
    /// Seconds of audio, rounded up.
    fn tokens(&self) -> usize {
        self.clip.seconds().ceil() as usize
    }
}

/// A place in a Whisper model's queue.
pub struct Slot(Reservation<Job>);

impl Slot {
    /// Queue 16 kHz mono `samples`; the receiver yields the transcript.
    pub fn submit(
        self,
        clip: AudioFeatures,
        options: Options,
    ) -> Result<oneshot::Receiver<TranscriptResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.0.push(Job { clip, options, reply })?;
        Ok(rx)
    }
}

/// Transcriptions in progress together at most: enough to fill a decoder batch on a few cores.
const MAX_ACTIVE: usize = 8;
/// Working memory the transcriptions in progress may hold together (windows' cross-attention
/// keys and values, decoder caches) when the weights are smaller: at most as much as the
/// weights take, and at least this, so small models fill a batch and large ones take fewer.
const ACTIVE_BYTES: usize = 1 << 30;

/// The caller's side of a transcription in progress.
struct Request {
    reply: oneshot::Sender<TranscriptResult>,
    _in_flight: InFlight,
    started: Instant,
    span: tracing::Span,
    /// Seconds done when progress was last reported.
    reported: f64,
}

#[derive(Clone)]
pub struct Worker {
    queue: Arc<RequestQueue<Job>>,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub fn spawn(
        id: ModelRef,
        model: Arc<Whisper>,
        ctx: StartContext,
    ) -> std::io::Result<(Self, WorkerThread)> {
        let queue = ctx.queue(&id);
        let StartContext { metrics, on_failure, .. } = ctx;
        let worker = Worker { queue: queue.clone(), id: id.clone(), metrics };
        let run = worker.clone();
        let tell = |job: Job, reason: &str| {
            let _ = job.reply.send(Err(ModelError::Inference(reason.to_string())));
        };
        let thread = spawn_worker(format!("whisper-{id}"), queue, on_failure, tell, move || run.run(&model))?;
        Ok((worker, thread))
    }

    /// A place in the queue, taken before the audio is decoded, or why there is none.
    pub fn reserve(&self) -> Result<Slot, SubmitError> {
        self.queue.reserve().map(Slot)
    }

    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Audio seconds waiting in the queue.
    pub fn seconds_waiting(&self) -> usize {
        self.queue.tokens_waiting()
    }

    /// The queue: its failure, closing it, and callers waiting on an answer
    /// ([`crate::api::worker_answer`]).
    pub fn queue(&self) -> &RequestQueue<Job> {
        &self.queue
    }

    /// Transcribes every admitted request together: each pass either encodes the windows that
    /// wait for the encoder (in one batch) or steps every decoding hypothesis once (in one
    /// batch), and requests join and leave between passes.
    fn run(&self, model: &Whisper) {
        let budget = ACTIVE_BYTES.max(model.engine().dims().weight_bytes());
        let max_active = (budget / model.transcription_bytes().max(1)).clamp(1, MAX_ACTIVE);
        tracing::info!(model = %self.id, max_active, "transcriptions in progress together at most");
        let mut transcriptions: Vec<Transcription> = Vec::new();
        let mut requests: Vec<Request> = Vec::new();
        loop {
            while transcriptions.len() < max_active {
                // Block for work only when nothing is in progress.
                let next = if transcriptions.is_empty() { self.next() } else { self.try_next() };
                let Some(Tracked { job, in_flight }) = next else { break };
                if crate::failpoint::hit("batch-panic", &self.id) {
                    panic!("failpoint batch-panic");
                }
                let seconds = job.clip.seconds();
                let span = tracing::info_span!("transcribe", model = %self.id, audio_seconds = seconds);
                match span.in_scope(|| Transcription::of_features(model, job.clip, job.options)) {
                    Ok(t) => {
                        transcriptions.push(t);
                        requests.push(Request {
                            reply: job.reply,
                            _in_flight: in_flight,
                            started: Instant::now(),
                            span,
                            reported: 0.0,
                        });
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
            if transcriptions.is_empty() {
                return;
            }
            model.advance(&mut transcriptions);
            // Answer the finished, drop those whose caller left, newest first so indices hold.
            for i in (0..transcriptions.len()).rev() {
                let request = &mut requests[i];
                let done = transcriptions[i].seconds_done();
                if done > request.reported {
                    request.reported = done;
                    request.span.in_scope(|| tracing::debug!(done_seconds = done, "window transcribed"));
                }
                if !transcriptions[i].is_done() && !request.reply.is_closed() {
                    continue;
                }
                let t = transcriptions.swap_remove(i);
                let request = requests.swap_remove(i);
                self.answer(t, request);
            }
        }
    }

    fn answer(&self, t: Transcription, request: Request) {
        let _enter = request.span.enter();
        if !t.is_done() {
            tracing::info!(done_seconds = t.seconds_done(), "the caller left; transcription stopped");
            return;
        }
        let seconds = t.duration();
        let result = t.finish();
        let labels = [self.id.name.as_str(), self.id.version.as_str()];
        match &result {
            Ok(_) => {
                let elapsed = request.started.elapsed().as_secs_f64();
                self.metrics.audio_seconds.with_label_values(&labels).inc_by(seconds);
                if seconds > 0.0 {
                    self.metrics.real_time_factor.with_label_values(&labels).observe(elapsed / seconds);
                }
            }
            Err(e) => tracing::error!(error = %e, "transcription failed"),
        }
        let _ = request.reply.send(result);
    }

    /// The oldest job whose caller still waits, if one is queued now.
    fn try_next(&self) -> Option<Tracked<Job>> {
        let mut q = self.queue.lock();
        let dropped = q.retain(|j| !j.reply.is_closed());
        self.queue.taken(dropped);
        let job = q.pop_front()?;
        self.queue.taken(1);
        Some(job)
    }

    /// The oldest job whose caller still waits; None once closed and drained.
    fn next(&self) -> Option<Tracked<Job>> {
        let mut q = self.queue.lock();
        loop {
            let dropped = q.retain(|j| !j.reply.is_closed());
            self.queue.taken(dropped);
            if let Some(job) = q.pop_front() {
                self.queue.taken(1);
                return Some(job);
            }
            if q.closed {
                return None;
            }
            q = self.queue.wait(q);
        }
    }
}
