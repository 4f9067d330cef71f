//! The speech-to-text family: Whisper (CTranslate2's layout, the one faster-whisper loads, or a
//! Hugging Face checkpoint)
//! behind OpenAI's `/v1/audio/transcriptions` and `/v1/audio/translations` (multipart uploads)
//! and the product's `/asr/transcribe` (JSON with base64 audio). Audio is decoded, resampled
//! and turned into log-mel features on the request's side (`audio`), transcribed whole by the
//! model's worker (`worker`).

pub mod audio;
mod routes;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use candle_core::DType;
use serde_json::{Value, json};

use super::{ModelFamily, Serving, Shared, StartContext};
use crate::device::ComputeDevice;
use crate::manifest::{Family, ModelRef};
use crate::models::whisper::Whisper;
use crate::models::whisper::engine::Placement;
use crate::models::whisper::transcribe::Options;
use crate::models::{ModelError, architecture};
use crate::queue::WorkerThread;
use crate::weights::ctranslate2::Ct2Model;
use crate::weights::model_type;
use worker::Worker;

/// This family's endpoints.
pub const ENDPOINTS: &[&str] =
    &["POST /v1/audio/transcriptions", "POST /v1/audio/translations", "POST /asr/transcribe"];

pub struct SpeechToText;

impl ModelFamily for SpeechToText {
    const FAMILY: Family = Family::SpeechToText;
    type Model = Whisper;
    type Serving = SpeechServing;

    /// A CTranslate2 directory (the architecture from `model.bin`'s spec name) or a Hugging
    /// Face checkpoint (from `config.json`'s `model_type`). On a GPU the network computes in
    /// float16 (as faster-whisper does on CUDA), on the CPU in float32 on the packed kernels.
    fn load(dir: &Path, device: &ComputeDevice) -> Result<Whisper, ModelError> {
        let placement = if device.is_cpu() {
            Placement::Packed
        } else {
            Placement::Candle { device: device.candle().clone(), dtype: DType::F16 }
        };
        let check = |declared: Option<&str>, kind, file: &Path| {
            architecture(Family::SpeechToText, declared, kind, file)
                .map_err(|e| ModelError::Unsupported(e.to_string()))
        };
        let bin = dir.join("model.bin");
        if bin.is_file() {
            // Opened once: the spec name picks the architecture, the same file gives the weights.
            let model = Ct2Model::open(&bin)?;
            check(Some(model.spec()), "a CTranslate2 spec", &bin)?;
            Whisper::from_ctranslate2(dir, &model, &placement)
        } else {
            let config = dir.join("config.json");
            check(model_type(&config)?.as_deref(), "model_type", &config)?;
            Whisper::from_hugging_face(dir, &placement)
        }
    }

    fn summary(model: &Whisper) -> String {
        let d = model.engine().dims();
        let kind = if model.is_multilingual() { "multilingual" } else { "English-only" };
        format!(
            "Whisper {kind}, {} encoder and {} decoder layers of {}, {}",
            d.encoder_layers,
            d.decoder_layers,
            d.hidden,
            model.engine().describe()
        )
    }

    /// One window through encoder and decoder: two seconds of a quiet tone (the inputs are
    /// text, which this family has no use for).
    fn warm(model: &Whisper, _inputs: &[String]) -> Result<(), ModelError> {
        let tone: Vec<f32> = (0..2 * audio::RATE as usize)
            .map(|i| 0.05 * (2.0 * std::f32::consts::PI * 220.0 * i as f32 / audio::RATE as f32).sin())
            .collect();
        let options = Options { temperatures: vec![0.0], ..Options::transcribe() };
        model.transcribe(&tone, &options, |_| {})?;
        Ok(())
    }

    fn start(id: &ModelRef, model: Arc<Whisper>, ctx: StartContext) -> std::io::Result<SpeechServing> {
        let (worker, thread) = Worker::spawn(id.clone(), model.clone(), ctx)?;
        Ok(SpeechServing { model, worker, thread })
    }

    fn routes() -> Router<Shared<Self>> {
        routes::routes()
    }
}

/// A Whisper model with its worker running.
pub struct SpeechServing {
    pub model: Arc<Whisper>,
    pub worker: Worker,
    thread: WorkerThread,
}

impl Serving for SpeechServing {
    fn waiting(&self) -> usize {
        self.worker.waiting()
    }

    fn in_flight(&self) -> usize {
        self.worker.in_flight()
    }

    fn failure(&self) -> Option<String> {
        self.worker.queue().lock().failed.clone()
    }

    fn close(&self) {
        self.worker.queue().close();
    }

    fn stop(&self) {
        self.worker.queue().close();
        self.thread.join();
    }

    fn status(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("multilingual".into(), json!(self.model.is_multilingual()));
        m.insert("melBins".into(), json!(self.model.engine().dims().mels));
        m.insert("queuedAudioSeconds".into(), json!(self.worker.seconds_waiting()));
        m
    }
}
