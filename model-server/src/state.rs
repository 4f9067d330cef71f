//! What the server knows about its models: per-model progress (for `/readyz` and `/status`),
//! the model being served, and where requests for each model are routed (itself or its
//! fallback). Generic over the pod's family.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::families::{ModelFamily, Serving};
use crate::loader::LoadPlan;
use crate::manifest::{Load, ModelRef};
use crate::metrics::Metrics;

/// Where a model version stands in this process (the cluster-wide state of a model is the
/// resource's `status.models[].state`, another thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LoadState {
    /// Not in memory: a preloaded model waiting its turn, or a lazy model never asked for.
    Unloaded,
    Loading,
    Warming,
    Ready,
    Failed,
    /// A lazy model unloaded (to make room, or idle); its next request loads it again.
    Evicted,
    /// Failed to load; its fallback answers in its place.
    FallenBack,
}

/// Progress of one model version, as `/readyz`, `/status` and `/v1/models` report it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub state: LoadState,
    /// What it is doing now, e.g. "reading weights" or "warmup 2/3".
    pub step: String,
    pub load: Load,
    /// Bytes of weights on disk for this model.
    pub weight_bytes: u64,
    /// Loading: weight bytes read so far, and that as a percentage of `weightBytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// What the model is charged against the pod's memory budget.
    pub charge_bytes: u64,
    /// Seconds in the current state so far (loading or warming).
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_seconds: Option<f64>,
    /// Growth of the process's resident memory over the last load.
    pub resident_bytes: u64,
    /// Times loaded, and unloaded, since the process started.
    pub loads: u32,
    pub unloads: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For FallenBack: the version answering in this one's place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    #[serde(skip)]
    pub since: Option<Instant>,
    /// When the last load failed (a lazy model retries no sooner than [`LAZY_RETRY`] after).
    #[serde(skip)]
    pub failed_at: Option<Instant>,
    /// `weights::progress::total()` when the current load began.
    #[serde(skip)]
    pub read_base: u64,
    /// Set when the last lazy load found no room in the budget.
    #[serde(skip)]
    pub no_room: Option<crate::residency::NoRoom>,
}

/// A lazy model whose load failed is tried again by a request at least this long after.
pub const LAZY_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl Progress {
    fn new(load: Load, weight_bytes: u64) -> Self {
        Progress {
            state: LoadState::Unloaded,
            step: match load {
                Load::Preload => "waiting to load".to_string(),
                Load::Lazy => "loads on its first request".to_string(),
            },
            load,
            weight_bytes,
            bytes_read: None,
            percent: None,
            charge_bytes: 0,
            seconds: 0.0,
            load_seconds: None,
            warmup_seconds: None,
            resident_bytes: 0,
            loads: 0,
            unloads: 0,
            error: None,
            served_by: None,
            since: None,
            failed_at: None,
            read_base: 0,
            no_room: None,
        }
    }
}

pub struct Slot<F: ModelFamily> {
    pub id: ModelRef,
    /// Listed to serve (false: present only as another model's fallback).
    pub serve: bool,
    pub load: Load,
    pub fallback: Option<ModelRef>,
    /// Text generation: the KV-cache budget the plan gives, if any.
    pub kv_cache_bytes: Option<u64>,
    /// The plan's memory hint for the model, if any.
    pub memory_bytes: Option<u64>,
    /// Bytes of its weight files on disk, read once at start.
    pub weight_bytes: u64,
    pub progress: Mutex<Progress>,
    /// The model with its worker, while loaded. Requests hold a clone (a lease) until they are
    /// answered, so a model is unloaded only when this is the last one.
    serving: Mutex<Option<Arc<F::Serving>>>,
    /// Milliseconds after the server started when a request last took a lease (0: never).
    last_used: AtomicU64,
    /// Bumped on every state change, for requests waiting on a load.
    pub changed: tokio::sync::watch::Sender<u64>,
    /// Where requests for this model go once decided: itself, or its fallback.
    pub route: OnceLock<ModelRef>,
}

impl<F: ModelFamily> Slot<F> {
    pub fn progress(&self) -> Progress {
        let mut p = self.lock().clone();
        if let Some(since) = p.since {
            p.seconds = since.elapsed().as_secs_f64();
        }
        if p.state == LoadState::Loading && p.weight_bytes > 0 {
            let read = crate::weights::progress::total().saturating_sub(p.read_base).min(p.weight_bytes);
            p.bytes_read = Some(read);
            p.percent = Some((read as f64 * 1000.0 / p.weight_bytes as f64).round() / 10.0);
        }
        p
    }

    /// Change the progress and wake the requests waiting on this model.
    pub fn update<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

    /// Read or change the progress without waking anyone: for a request deciding, under the
    /// lock, whether it is the one to start a load.
    pub fn decide<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        f(&mut self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serving_lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<F::Serving>>> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loaded model, without taking a lease (status, metrics).
    pub fn current(&self) -> Option<Arc<F::Serving>> {
        self.serving_lock().clone()
    }

    /// A lease on the loaded model for a request, marking it used at `now_ms`.
    pub fn lease(&self, now_ms: u64) -> Option<Arc<F::Serving>> {
        let lease = self.serving_lock().clone();
        if lease.is_some() {
            self.last_used.store(now_ms.max(1), Ordering::Relaxed);
        }
        lease
    }

    pub fn install(&self, serving: F::Serving) {
        *self.serving_lock() = Some(Arc::new(serving));
    }

    /// Take the model out if nothing uses it. Taken under the lock that leases take, so no
    /// request can lease it in between.
    pub fn take_if_unused(&self) -> Option<Arc<F::Serving>> {
        let mut guard = self.serving_lock();
        if guard.as_ref().is_some_and(|s| !in_use(s)) { guard.take() } else { None }
    }

    /// Whether the loaded model is in use.
    pub fn busy(&self) -> bool {
        self.serving_lock().as_ref().is_some_and(in_use)
    }

    /// Milliseconds after start of its last use (0: never used).
    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// A request holds a lease on the model (a clone beside the slot's own) or its queue has work.
fn in_use<S: Serving>(serving: &Arc<S>) -> bool {
    Arc::strong_count(serving) > 1 || serving.in_flight() > 0
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
    /// Loaded before readiness, or on the first request.
    pub load: Load,
    /// What the model is charged against the memory budget, when the plan says (the resource's
    /// `memory` hint); otherwise the size of its weight files.
    pub memory_bytes: Option<u64>,
}

impl PlannedModel {
    /// A preloaded, served model with nothing else set.
    pub fn served(id: ModelRef) -> Self {
        PlannedModel {
            id,
            serve: true,
            fallback: None,
            kv_cache_bytes: None,
            load: Load::Preload,
            memory_bytes: None,
        }
    }
}

/// The pod's memory budget and how long an idle lazy model stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residency {
    /// Bytes the models may hold at once; None: no budget (nothing is unloaded to make room).
    pub budget_bytes: Option<u64>,
    /// A lazy model unused this long is unloaded.
    pub idle_unload: Option<std::time::Duration>,
}

pub struct AppState<F: ModelFamily> {
    /// Every model of the manifest, fallbacks included, by id.
    pub slots: BTreeMap<ModelRef, Slot<F>>,
    /// Served ids in manifest order; a bare `name` resolves to the first match here.
    pub served: Vec<ModelRef>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub residency: Residency,
    draining: AtomicBool,
    pub started: Instant,
    /// Bounds the requests tokenizing at once (tokenizing runs on the blocking pool).
    pub tokenizing: tokio::sync::Semaphore,
    /// Set when a model's worker died: the process drains and exits non-zero.
    pub fatal: tokio::sync::watch::Sender<Option<String>>,
    /// Held by whoever loads or unloads: loads run one at a time, so the budget arithmetic
    /// and the resident-memory measurements see one change at a time. The preload phase holds
    /// it throughout, so lazy loads wait for the preloads.
    pub loading: Mutex<()>,
    /// Each model's files and how to warm and serve it, for loads after the preload phase.
    pub plan: Arc<LoadPlan>,
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
    /// How long a request waits for its lazy model to load before it gets 503 and Retry-After.
    pub load_wait: std::time::Duration,
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
            load_wait: std::time::Duration::from_secs(60),
        }
    }
}

impl<F: ModelFamily> AppState<F> {
    pub fn new(
        models: &[PlannedModel],
        plan: LoadPlan,
        metrics: Arc<Metrics>,
        limits: Limits,
        residency: Residency,
    ) -> Self {
        let served = models.iter().filter(|m| m.serve).map(|m| m.id.clone()).collect();
        let slots = models
            .iter()
            .map(|m| {
                let id = m.id.clone();
                metrics.register_model(&id);
                // A fallback is kept once loaded, like the model it stands in for.
                let load = if m.serve { m.load } else { Load::Preload };
                let weight_bytes =
                    plan.dirs.get(&id).map(|d| crate::loader::weight_bytes(&d.path)).unwrap_or(0);
                let slot = Slot {
                    id: id.clone(),
                    serve: m.serve,
                    load,
                    fallback: m.fallback.clone(),
                    kv_cache_bytes: m.kv_cache_bytes,
                    memory_bytes: m.memory_bytes,
                    weight_bytes,
                    progress: Mutex::new(Progress::new(load, weight_bytes)),
                    serving: Mutex::new(None),
                    last_used: AtomicU64::new(0),
                    changed: tokio::sync::watch::channel(0).0,
                    route: OnceLock::new(),
                };
                if load == Load::Lazy {
                    let _ = slot.route.set(id.clone());
                }
                (id, slot)
            })
            .collect();
        if let Some(budget) = residency.budget_bytes {
            metrics.memory_budget_bytes.set(i64::try_from(budget).unwrap_or(i64::MAX));
        }
        AppState {
            slots,
            served,
            metrics,
            tokenizing: tokio::sync::Semaphore::new(limits.tokenize_concurrency.max(1)),
            limits,
            residency,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            fatal: tokio::sync::watch::channel(None).0,
            loading: Mutex::new(()),
            plan: Arc::new(plan),
        }
    }

    /// Milliseconds since start: the clock of `last_used` (at least 1, so 0 means never).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Resolve `name` or `name:version` among the served models.
    pub fn resolve(&self, requested: &str) -> Option<&ModelRef> {
        match requested.split_once(':') {
            Some((name, version)) => self.served.iter().find(|id| id.name == name && id.version == version),
            None => self.served.iter().find(|id| id.name == requested),
        }
    }

    /// The slot answering for a served one: itself or its fallback, once decided.
    pub fn target(&self, id: &ModelRef) -> Option<&Slot<F>> {
        let target = self.slots.get(id)?.route.get()?;
        self.slots.get(target)
    }

    /// Ready when every preloaded served model answers (itself or through its fallback) and
    /// the server is not draining. Lazy models load on demand and do not hold readiness back.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.served.iter().all(|id| {
                let lazy = self.slots.get(id).is_some_and(|s| s.load == Load::Lazy);
                lazy || self.target(id).and_then(Slot::current).is_some_and(|s| s.failure().is_none())
            })
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
        self.slots.values().filter_map(Slot::current).map(|s| s.in_flight()).sum()
    }

    /// Requests waiting for a worker, all models.
    pub fn queue_waiting(&self) -> usize {
        self.slots.values().filter_map(Slot::current).map(|s| s.waiting()).sum()
    }
}
