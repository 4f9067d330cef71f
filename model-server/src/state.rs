//! What the server knows about its models: per-model progress (for `/readyz` and `/status`),
//! the loaded runtime, and where requests for each model are routed (itself or its fallback).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::batching::Batcher;
use crate::batching::continuous::Scheduler;
use crate::engine::EmbeddingModel;
use crate::engine::generation::GenerationModel;
use crate::manifest::{Family, ModelRef};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModelState {
    Pending,
    Loading,
    Warming,
    Ready,
    Failed,
    FallenBack,
}

/// Progress of one model version, as `/readyz` and `/status` report it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub state: ModelState,
    /// What it is doing now, e.g. "reading weights" or "warmup 2/3".
    pub step: String,
    /// Bytes of weights on disk for this model.
    pub weight_bytes: u64,
    /// Seconds in the current state so far (loading or warming).
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_seconds: Option<f64>,
    pub resident_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For FallenBack: the version answering in this one's place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    #[serde(skip)]
    pub since: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            state: ModelState::Pending,
            step: "waiting to load".to_string(),
            weight_bytes: 0,
            seconds: 0.0,
            load_seconds: None,
            warmup_seconds: None,
            resident_bytes: 0,
            error: None,
            served_by: None,
            since: None,
        }
    }
}

/// A loaded, warm model and the worker that serves it.
pub enum Runtime {
    Embedding { model: Arc<EmbeddingModel>, batcher: Batcher },
    Generation { model: Arc<GenerationModel>, scheduler: Scheduler },
}

impl Runtime {
    /// Requests waiting in this model's queue.
    pub fn depth(&self) -> usize {
        match self {
            Runtime::Embedding { batcher, .. } => batcher.depth(),
            Runtime::Generation { scheduler, .. } => scheduler.depth(),
        }
    }

    /// Refuse new requests; queued and running ones finish.
    pub fn close(&self) {
        match self {
            Runtime::Embedding { batcher, .. } => batcher.close(),
            Runtime::Generation { scheduler, .. } => scheduler.close(),
        }
    }
}

pub struct Slot {
    pub id: ModelRef,
    /// Listed to serve (false: present only as another model's fallback).
    pub serve: bool,
    pub fallback: Option<ModelRef>,
    pub progress: Mutex<Progress>,
    pub runtime: OnceLock<Runtime>,
    /// Where requests for this model go once decided: itself, or its fallback.
    pub route: OnceLock<ModelRef>,
}

impl Slot {
    pub fn progress(&self) -> Progress {
        let mut p = self.lock().clone();
        if let Some(since) = p.since {
            p.seconds = since.elapsed().as_secs_f64();
        }
        p
    }

    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct AppState {
    pub family: Family,
    /// Every model of the manifest, fallbacks included, by id.
    pub slots: BTreeMap<ModelRef, Slot>,
    /// Served ids in manifest order; a bare `name` resolves to the first match here.
    pub served: Vec<ModelRef>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    draining: AtomicBool,
    pub started: Instant,
}

/// Request bounds, configurable from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_inputs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 8 << 20, max_inputs: 2048 }
    }
}

impl AppState {
    pub fn new(
        family: Family,
        models: Vec<(ModelRef, bool, Option<ModelRef>)>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        let served = models.iter().filter(|(_, serve, _)| *serve).map(|(id, _, _)| id.clone()).collect();
        let slots = models
            .into_iter()
            .map(|(id, serve, fallback)| {
                metrics.register_model(&id);
                let slot = Slot {
                    id: id.clone(),
                    serve,
                    fallback,
                    progress: Mutex::new(Progress::default()),
                    runtime: OnceLock::new(),
                    route: OnceLock::new(),
                };
                (id, slot)
            })
            .collect();
        AppState {
            family,
            slots,
            served,
            metrics,
            limits,
            draining: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Resolve `name` or `name:version` among the served models.
    pub fn resolve(&self, requested: &str) -> Option<&ModelRef> {
        match requested.split_once(':') {
            Some((name, version)) => self.served.iter().find(|id| id.name == name && id.version == version),
            None => self.served.iter().find(|id| id.name == requested),
        }
    }

    /// The runtime answering for a served model, once it is ready (directly or via fallback).
    pub fn runtime_for(&self, id: &ModelRef) -> Option<&Runtime> {
        let target = self.slots.get(id)?.route.get()?;
        self.slots.get(target)?.runtime.get()
    }

    /// Ready when every served model answers (itself or through its fallback) and not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.served.iter().all(|id| self.runtime_for(id).is_some())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn queue_depth(&self) -> usize {
        self.slots.values().filter_map(|s| s.runtime.get()).map(Runtime::depth).sum()
    }
}
