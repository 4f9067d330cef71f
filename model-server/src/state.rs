//! What the server knows about its models: per-model progress (for `/readyz` and `/status`),
//! the model being served, and where requests for each model are routed (itself or its
//! fallback). Generic over the pod's family.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::families::{ModelFamily, Serving};
use crate::manifest::ModelRef;
use crate::metrics::Metrics;

/// Where a model version stands in this process's loader (the cluster-wide state of a model
/// is the resource's `status.models[].state`, another thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LoadState {
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
    pub state: LoadState,
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
            state: LoadState::Pending,
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

pub struct Slot<F: ModelFamily> {
    pub id: ModelRef,
    /// Listed to serve (false: present only as another model's fallback).
    pub serve: bool,
    pub fallback: Option<ModelRef>,
    /// Text generation: the KV-cache budget the plan gives, if any.
    pub kv_cache_bytes: Option<u64>,
    pub progress: Mutex<Progress>,
    pub serving: OnceLock<F::Serving>,
    /// Where requests for this model go once decided: itself, or its fallback.
    pub route: OnceLock<ModelRef>,
}

impl<F: ModelFamily> Slot<F> {
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

/// One model of the plan: a served model, or one present only as another's fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedModel {
    pub id: ModelRef,
    /// Listed to serve (false: present only as another model's fallback).
    pub serve: bool,
    pub fallback: Option<ModelRef>,
    /// Text generation: bytes its sequences' KV caches may take; None derives it from the
    /// memory the pod has left after loading.
    pub kv_cache_bytes: Option<u64>,
}

pub struct AppState<F: ModelFamily> {
    /// Every model of the manifest, fallbacks included, by id.
    pub slots: BTreeMap<ModelRef, Slot<F>>,
    /// Served ids in manifest order; a bare `name` resolves to the first match here.
    pub served: Vec<ModelRef>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    draining: AtomicBool,
    pub started: Instant,
    /// Bounds the requests tokenizing at once (tokenizing runs on the blocking pool).
    pub tokenizing: tokio::sync::Semaphore,
    /// Set when a model's worker died: the process drains and exits non-zero.
    pub fatal: tokio::sync::watch::Sender<Option<String>>,
}

/// Request bounds, configurable from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_inputs: usize,
    /// A request body must have fully arrived this long after its headers.
    pub body_read_timeout: std::time::Duration,
    /// Tokens waiting per model, over all queued requests.
    pub max_queued_tokens: usize,
    /// Requests tokenizing at once.
    pub tokenize_concurrency: usize,
    /// Largest uploaded file (multipart `file`, or base64 in JSON, decoded).
    pub max_upload_bytes: usize,
    /// Longest audio a speech-to-text request may carry.
    pub max_audio_seconds: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 << 20,
            max_inputs: 2048,
            body_read_timeout: std::time::Duration::from_secs(30),
            max_queued_tokens: 1 << 20,
            tokenize_concurrency: 8,
            max_upload_bytes: 25 << 20,
            max_audio_seconds: 3600.0,
        }
    }
}

impl<F: ModelFamily> AppState<F> {
    pub fn new(models: &[PlannedModel], metrics: Arc<Metrics>, limits: Limits) -> Self {
        let served = models.iter().filter(|m| m.serve).map(|m| m.id.clone()).collect();
        let slots = models
            .iter()
            .map(|m| {
                let id = m.id.clone();
                metrics.register_model(&id);
                let slot = Slot {
                    id: id.clone(),
                    serve: m.serve,
                    fallback: m.fallback.clone(),
                    kv_cache_bytes: m.kv_cache_bytes,
                    progress: Mutex::new(Progress::default()),
                    serving: OnceLock::new(),
                    route: OnceLock::new(),
                };
                (id, slot)
            })
            .collect();
        AppState {
            slots,
            served,
            metrics,
            tokenizing: tokio::sync::Semaphore::new(limits.tokenize_concurrency.max(1)),
            limits,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            fatal: tokio::sync::watch::channel(None).0,
        }
    }

    /// Resolve `name` or `name:version` among the served models.
    pub fn resolve(&self, requested: &str) -> Option<&ModelRef> {
        match requested.split_once(':') {
            Some((name, version)) => self.served.iter().find(|id| id.name == name && id.version == version),
            None => self.served.iter().find(|id| id.name == requested),
        }
    }

    /// The model answering for a served one, once it is ready (directly or via fallback).
    pub fn serving(&self, id: &ModelRef) -> Option<&F::Serving> {
        let target = self.slots.get(id)?.route.get()?;
        self.slots.get(target)?.serving.get()
    }

    /// Ready when every served model answers (itself or through its fallback) and not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.served.iter().all(|id| self.serving(id).is_some_and(|s| s.failure().is_none()))
    }

    /// A model's worker died: mark it Failed and ask the process to drain and exit.
    pub fn model_died(&self, id: &ModelRef, reason: &str) {
        if let Some(slot) = self.slots.get(id) {
            slot.update(|p| {
                p.state = LoadState::Failed;
                p.step = "failed".to_string();
                p.error = Some(reason.to_string());
                p.since = None;
            });
        }
        self.metrics.model_ready.with_label_values(&[&id.name, &id.version]).set(0);
        self.fatal.send_replace(Some(format!("model {id} stopped serving: {reason}")));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests waiting or running, all models.
    pub fn queue_depth(&self) -> usize {
        self.slots.values().filter_map(|s| s.serving.get()).map(Serving::in_flight).sum()
    }

    /// Requests waiting for a worker, all models.
    pub fn queue_waiting(&self) -> usize {
        self.slots.values().filter_map(|s| s.serving.get()).map(Serving::waiting).sum()
    }
}
