//! Model families: what a pod serves. Each family owns its folder: its routes and request
//! types, its scheduling (the dynamic batcher, the continuous scheduler) and the handle to its
//! loaded models. The server is generic over [`ModelFamily`]; [`serve`] is the registry, the
//! one place a family is named. Adding a family is its folder and one line there.

pub mod batcher;
pub mod embedding;
pub mod face_detection;
pub mod image_text_embedding;
pub mod speech_to_text;
pub mod text_embedding;
pub mod text_generation;

use std::path::Path;
use std::sync::Arc;

use axum::Router;

use crate::device::ComputeDevice;
use crate::manifest::{Batching, Family, ModelRef};
use crate::metrics::Metrics;
use crate::models::ModelError;
use crate::queue::{FailureHook, RequestQueue, Weigh};
use crate::serve::{ServeOptions, ServePlan};
use crate::state::AppState;

/// The state every handler of a family's pod shares.
pub type Shared<F> = Arc<AppState<F>>;

/// What a family provides; everything around it (loading with progress, readiness, fallback,
/// status, metrics, draining) is the same for every family.
pub trait ModelFamily: Sized + Send + Sync + 'static {
    const FAMILY: Family;
    /// A model version as loaded from its directory (weights, tokenizer, settings).
    type Model: Send + Sync + 'static;
    /// The model with its worker running: what requests go to.
    type Serving: Serving;

    /// Load `dir` to compute on `device`: the architecture comes from what the checkpoint
    /// declares, through the table in [`crate::models`]; one with no path on `device` is
    /// refused by name.
    fn load(dir: &Path, device: &ComputeDevice) -> Result<Self::Model, ModelError>;
    /// A few words for the log line that says the model loaded.
    fn summary(model: &Self::Model) -> String;
    /// One warmup pass over `inputs`.
    fn warm(model: &Self::Model, inputs: &[String]) -> Result<(), ModelError>;
    /// Start the model's worker.
    fn start(id: &ModelRef, model: Arc<Self::Model>, ctx: StartContext) -> std::io::Result<Self::Serving>;
    /// The family's inference routes.
    fn routes() -> Router<Shared<Self>>;
}

/// What a worker starts with.
pub struct StartContext {
    pub batching: Batching,
    /// Tokens that may wait in the model's queue.
    pub max_queued_tokens: usize,
    /// Memory the model may use for per-request state (text generation's KV cache): the plan's,
    /// else what the pod can spare once loaded (`loader::spare_memory`).
    pub memory_for_requests: u64,
    pub metrics: Arc<Metrics>,
    pub on_failure: FailureHook,
}

impl StartContext {
    /// The bounded queue a model's worker takes its jobs from.
    pub fn queue<J: Weigh>(&self, id: &ModelRef) -> Arc<RequestQueue<J>> {
        Arc::new(RequestQueue::new(
            id.clone(),
            self.batching.max_queue_depth as usize,
            self.max_queued_tokens,
            self.metrics.clone(),
        ))
    }
}

/// A model being served: its queue and worker.
pub trait Serving: Send + Sync + 'static {
    /// Requests waiting in its queue for the worker.
    fn waiting(&self) -> usize;
    /// Requests waiting or running: what `kiln_queue_depth` counts.
    fn in_flight(&self) -> usize;
    /// Why its worker died, once it has.
    fn failure(&self) -> Option<String>;
    /// Refuse new requests; queued and running ones finish.
    fn close(&self);
    /// Close and wait for the worker to return: it holds the model's weights until then.
    fn stop(&self);
    /// Its own fields of `/status` (dimension, context length, KV cache...).
    fn status(&self) -> serde_json::Map<String, serde_json::Value>;
}

/// The registry: each family this build serves, by its `Family` value. Adding a family is its
/// folder and one line here (and its `Family` value, which the CRD then accepts).
macro_rules! registry {
    ($($family:ident => $module:ident::$implementation:ident,)*) => {
        /// The endpoints of a family, as `METHOD /path`: for the 404 a request to another
        /// family's endpoint gets, naming the family this pod serves.
        pub fn endpoints(family: Family) -> &'static [&'static str] {
            match family {
                $(Family::$family => $module::ENDPOINTS,)*
            }
        }

        /// Serve `plan` until `shutdown`, as the family it names.
        pub async fn serve(
            plan: ServePlan,
            listener: tokio::net::TcpListener,
            options: ServeOptions,
            shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        ) -> anyhow::Result<()> {
            match plan.family {
                $(Family::$family => {
                    crate::serve::run::<$module::$implementation>(plan, listener, options, shutdown).await
                })*
            }
        }
    };
}

registry! {
    TextEmbedding => text_embedding::TextEmbedding,
    TextGeneration => text_generation::TextGeneration,
    SpeechToText => speech_to_text::SpeechToText,
    ImageTextEmbedding => image_text_embedding::ImageTextEmbedding,
    FaceDetection => face_detection::FaceDetection,
}
