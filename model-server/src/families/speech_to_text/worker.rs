//! One queue and one OS thread per Whisper model: requests are transcribed whole, in arrival
//! order, each window's matmuls spread over the inference threads. A request weighs its audio
//! seconds, so the queue bounds the audio (and memory) waiting, not only the request count.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::families::StartContext;
use crate::manifest::ModelRef;
use crate::metrics::Metrics;
use crate::models::ModelError;
use crate::models::whisper::Whisper;
use crate::models::whisper::transcribe::{Options, Transcript};
use crate::queue::{RequestQueue, Reservation, SubmitError, Tracked, Weigh, spawn_worker};

use super::audio::RATE;

pub type TranscriptResult = Result<Transcript, ModelError>;

/// A transcription waiting for the worker.
pub struct Job {
    samples: Vec<f32>,
    options: Options,
    reply: oneshot::Sender<TranscriptResult>,
}

impl Weigh for Job {
    /// Seconds of audio, rounded up.
    fn tokens(&self) -> usize {
        self.samples.len().div_ceil(RATE as usize)
    }
}

/// A place in a Whisper model's queue.
pub struct Slot(Reservation<Job>);

impl Slot {
    /// Queue 16 kHz mono `samples`; the receiver yields the transcript.
    pub fn submit(
        self,
        samples: Vec<f32>,
        options: Options,
    ) -> Result<oneshot::Receiver<TranscriptResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.0.push(Job { samples, options, reply })?;
        Ok(rx)
    }
}

#[derive(Clone)]
pub struct Worker {
    queue: Arc<RequestQueue<Job>>,
    id: ModelRef,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub fn spawn(id: ModelRef, model: Arc<Whisper>, ctx: StartContext) -> std::io::Result<Self> {
        let queue = ctx.queue(&id);
        let StartContext { metrics, on_failure, .. } = ctx;
        let worker = Worker { queue: queue.clone(), id: id.clone(), metrics };
        let run = worker.clone();
        let tell = |job: Job, reason: &str| {
            let _ = job.reply.send(Err(ModelError::Inference(reason.to_string())));
        };
        spawn_worker(format!("whisper-{id}"), queue, on_failure, tell, move || run.run(&model))?;
        Ok(worker)
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

    fn run(&self, model: &Whisper) {
        while let Some(Tracked { job, in_flight: _in_flight }) = self.next() {
            if crate::failpoint::hit("batch-panic", &self.id) {
                panic!("failpoint batch-panic");
            }
            let started = Instant::now();
            let seconds = job.samples.len() as f64 / f64::from(RATE);
            let span = tracing::info_span!("transcribe", model = %self.id, audio_seconds = seconds);
            let _enter = span.enter();
            let result = model.transcribe(&job.samples, &job.options, |done| {
                tracing::debug!(done_seconds = done, "window transcribed");
            });
            let labels = [self.id.name.as_str(), self.id.version.as_str()];
            match &result {
                Ok(_) => {
                    let elapsed = started.elapsed().as_secs_f64();
                    self.metrics.audio_seconds.with_label_values(&labels).inc_by(seconds);
                    if seconds > 0.0 {
                        self.metrics.real_time_factor.with_label_values(&labels).observe(elapsed / seconds);
                    }
                }
                Err(e) => tracing::error!(error = %e, "transcription failed"),
            }
            let _ = job.reply.send(result);
        }
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
