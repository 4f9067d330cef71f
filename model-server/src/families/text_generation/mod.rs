//! The text-generation family: a decoder (Llama, from a GGUF file or a Hugging Face
//! checkpoint), its tokenizer and chat template, served through a continuous-batching scheduler
//! at OpenAI's `/v1/chat/completions` and `/v1/completions`.

pub mod model;
mod routes;
pub mod scheduler;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use serde_json::{Value, json};

use super::{ModelFamily, Serving, Shared, StartContext};
use crate::device::ComputeDevice;
use crate::manifest::{Family, ModelRef};
use crate::models::ModelError;
use crate::queue::WorkerThread;
use model::{ChatMessage, GenerationModel, SamplingParams};
use scheduler::Scheduler;

/// This family's endpoints.
pub const ENDPOINTS: &[&str] = &["POST /v1/chat/completions", "POST /v1/completions"];

/// Tokens each warmup input generates: enough to run prefill and the decode path.
const WARMUP_TOKENS: usize = 8;

pub struct TextGeneration;

impl ModelFamily for TextGeneration {
    const FAMILY: Family = Family::TextGeneration;
    type Model = GenerationModel;
    type Serving = GenerationServing;

    fn load(dir: &Path, device: &ComputeDevice) -> Result<GenerationModel, ModelError> {
        GenerationModel::load_on(dir, device)
    }

    fn summary(model: &GenerationModel) -> String {
        format!("{} ({} layers)", model.file().display(), model.decoder().config().layers)
    }

    /// Each input as a user message (raw text when the model has no chat template), greedy.
    fn warm(model: &GenerationModel, inputs: &[String]) -> Result<(), ModelError> {
        for input in inputs {
            let ids = if model.has_chat_template() {
                model.encode_chat(&[ChatMessage { role: "user".into(), content: input.clone() }])?
            } else {
                model.encode_plain(input)?
            };
            model.generate(&ids, &SamplingParams::greedy(), WARMUP_TOKENS)?;
        }
        Ok(())
    }

    fn start(
        id: &ModelRef,
        model: Arc<GenerationModel>,
        ctx: StartContext,
    ) -> std::io::Result<GenerationServing> {
        let kv_budget = ctx.memory_for_requests;
        let per_token = model.decoder().kv_bytes_per_token();
        tracing::info!(
            kv_budget_bytes = kv_budget,
            kv_bytes_per_token = per_token,
            full_context_sequences = kv_budget / (per_token * model.context_length() as u64).max(1),
            "KV-cache budget"
        );
        let (scheduler, thread) = Scheduler::spawn(id.clone(), model.clone(), ctx)?;
        Ok(GenerationServing { model, scheduler, thread })
    }

    fn routes() -> Router<Shared<Self>> {
        routes::routes()
    }
}

/// A generation model with its scheduler running.
pub struct GenerationServing {
    pub model: Arc<GenerationModel>,
    pub scheduler: Scheduler,
    thread: WorkerThread,
}

impl Serving for GenerationServing {
    fn waiting(&self) -> usize {
        self.scheduler.waiting()
    }

    fn in_flight(&self) -> usize {
        self.scheduler.in_flight()
    }

    fn failure(&self) -> Option<String> {
        self.scheduler.failure()
    }

    fn close(&self) {
        self.scheduler.close();
    }

    fn stop(&self) {
        self.scheduler.close();
        self.thread.join();
    }

    fn status(&self) -> serde_json::Map<String, Value> {
        let kv = self.scheduler.kv();
        let mut m = serde_json::Map::new();
        m.insert("contextLength".into(), json!(self.model.context_length()));
        m.insert(
            "kvCache".into(),
            json!({
                "budgetBytes": kv.budget_bytes,
                "reservedBytes": kv.reserved_bytes(),
                "usedBytes": kv.used_bytes(),
                "bytesPerToken": kv.bytes_per_token,
            }),
        );
        m
    }
}
