//! Puts models in memory and takes them out. Preloaded models load once, before readiness, and
//! a failed one is replaced by its fallback; a lazy model loads on its first request, while
//! every concurrent first request waits on that one load; under the pod's memory budget, idle
//! lazy models are unloaded least recently used first to make room (`residency` decides which),
//! and after `idleUnloadSeconds` without requests. Loads and unloads run on blocking threads
//! (disk and CPU work), one at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::families::{ModelFamily, Serving, StartContext};
use crate::manifest::{Batching, Load, ModelRef, SHARED_KV_CACHE_BYTES, Warmup};
use crate::metrics::Metrics;
use crate::queue::FailureHook;
use crate::residency::{self, NoRoom, Resident};
use crate::state::{AppState, LAZY_RETRY, LoadState, Slot};

/// Where each model's files are, by id.
pub type ModelDirs = std::collections::BTreeMap<ModelRef, ModelDir>;

pub struct ModelDir {
    pub path: PathBuf,
    /// Set for models from a manifest: the directory must be a complete `pull` cache entry
    /// whose marker agrees with these pinned digests, or the model is refused.
    pub pinned: Option<std::collections::BTreeMap<String, String>>,
    /// Set for models from a manifest: the source the entry must have been pulled from.
    pub source: Option<String>,
}

/// What loading a model needs besides its slot: its files, and how to warm and serve it.
pub struct LoadPlan {
    pub dirs: ModelDirs,
    pub warmup: Warmup,
    pub batching: Batching,
    /// Where every model of the pod computes.
    pub device: crate::device::ComputeDevice,
}

/// Load every preloaded served model, in manifest order, before readiness; a model that fails
/// is replaced by its fallback. Holds the load lock throughout, so lazy loads wait for it.
pub fn preload_all<F: ModelFamily>(state: &Arc<AppState<F>>) {
    let plan = state.plan.clone();
    let plan = plan.as_ref();
    let _loading = lock_loads(state);
    for id in &state.served {
        let Some(slot) = state.slots.get(id) else { continue };
        if slot.load == Load::Lazy {
            continue;
        }
        match load_one(state, plan, id) {
            Ok(()) => {
                let _ = slot.route.set(id.clone());
            }
            Err(error) => {
                tracing::error!(model = %id.name, version = %id.version, %error, "model failed to load");
                let fallback = slot.fallback.clone();
                let rescued = fallback.as_ref().and_then(|fb| {
                    let ready = state.slots.get(fb).is_some_and(|s| s.current().is_some());
                    if ready || load_one(state, plan, fb).is_ok() { Some(fb.clone()) } else { None }
                });
                match rescued {
                    Some(fb) => {
                        tracing::warn!(model = %id.name, version = %id.version, fallback = %fb, "serving the fallback in its place");
                        let _ = slot.route.set(fb.clone());
                        slot.update(|p| {
                            p.state = LoadState::FallenBack;
                            p.step = format!("failed; {fb} answers in its place");
                            p.error = Some(error.clone());
                            p.served_by = Some(fb.to_string());
                            p.since = None;
                        });
                    }
                    None => slot.update(|p| {
                        p.state = LoadState::Failed;
                        p.step = "failed".to_string();
                        p.error = Some(match &fallback {
                            Some(fb) => format!("{error}; fallback {fb} failed too"),
                            None => error.clone(),
                        });
                        p.since = None;
                    }),
                }
            }
        }
    }
    if state.is_ready() {
        tracing::info!(
            seconds = state.started.elapsed().as_secs_f64(),
            "all preloaded models loaded and warm: ready"
        );
    }
}

fn lock_loads<F: ModelFamily>(state: &AppState<F>) -> std::sync::MutexGuard<'_, ()> {
    state.loading.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a request finds no model to answer it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotServing {
    #[error("model {id} is still loading ({step}); retry shortly")]
    Loading { id: ModelRef, step: String, retry_after: u64 },
    #[error("model {id} failed to load: {error}")]
    Failed { id: ModelRef, error: String },
    #[error("model {id} stopped serving: {reason}")]
    Died { id: ModelRef, reason: String },
    #[error("{0}")]
    NoRoom(NoRoom),
}

/// A request's hold on a loaded model: while any lease exists the model is not unloaded. A
/// lease whose request waited for a lazy load records the request's latency when dropped.
pub struct Lease<F: ModelFamily> {
    serving: Arc<F::Serving>,
    first: Option<FirstRequest>,
}

struct FirstRequest {
    metrics: Arc<Metrics>,
    id: ModelRef,
    arrived: Instant,
}

impl<F: ModelFamily> std::ops::Deref for Lease<F> {
    type Target = F::Serving;
    fn deref(&self) -> &F::Serving {
        &self.serving
    }
}

impl<F: ModelFamily> Drop for Lease<F> {
    fn drop(&mut self) {
        if let Some(f) = self.first.take() {
            let seconds = f.arrived.elapsed().as_secs_f64();
            f.metrics.lazy_first_request.with_label_values(&[&f.id.name, &f.id.version]).observe(seconds);
        }
    }
}

/// The model answering for served `id`, loading it first when it is lazy and not in memory.
/// Concurrent callers share one load; a caller waits at most `limits.load_wait`
/// (`--lazy-load-wait-seconds`), then gets `Loading` (the load goes on).
pub async fn acquire<F: ModelFamily>(
    state: &Arc<AppState<F>>,
    id: &ModelRef,
) -> Result<Lease<F>, NotServing> {
    let arrived = Instant::now();
    let deadline = tokio::time::Instant::now() + state.limits.load_wait;
    let mut waited = false;
    loop {
        let slot = match state.target(id) {
            Some(slot) => slot,
            // A preloaded model whose route is not decided yet: its load has not finished.
            None => match state.slots.get(id) {
                Some(slot) => slot,
                None => {
                    return Err(NotServing::Failed { id: id.clone(), error: "not in the manifest".into() });
                }
            },
        };
        let mut changed = slot.changed.subscribe();
        if let Some(serving) = slot.lease(state.now_ms()) {
            if let Some(reason) = serving.failure() {
                return Err(NotServing::Died { id: id.clone(), reason });
            }
            let first = (waited && slot.load == Load::Lazy).then(|| FirstRequest {
                metrics: state.metrics.clone(),
                id: slot.id.clone(),
                arrived,
            });
            return Ok(Lease { serving, first });
        }
        let now = Instant::now();
        // Under the progress lock: exactly one request claims the load.
        let decision = slot.decide(|p| match p.state {
            // Ready but not leased: installed or taken out just now; the change that says so is
            // on its way, and this request sees it.
            LoadState::Loading | LoadState::Warming | LoadState::Ready if slot.load == Load::Lazy => {
                Next::Wait
            }
            LoadState::Failed | LoadState::FallenBack
                if slot.load == Load::Preload || p.failed_at.is_some_and(|t| now - t < LAZY_RETRY) =>
            {
                Next::Fail(p.error.clone().unwrap_or_else(|| "unknown error".into()))
            }
            // A lazy model whose last attempt found no room: that request was told; this one
            // tries again.
            LoadState::Unloaded | LoadState::Evicted | LoadState::Failed | LoadState::FallenBack
                if slot.load == Load::Lazy =>
            {
                p.state = LoadState::Loading;
                p.step = "waiting for the loader".to_string();
                p.error = None;
                p.since = Some(now);
                Next::Load
            }
            // A preloaded model still loading: readiness keeps traffic away until it is in,
            // so whoever asks anyway is told at once.
            _ => Next::Refuse(p.step.clone()),
        });
        match decision {
            Next::Fail(error) => return Err(NotServing::Failed { id: slot.id.clone(), error }),
            Next::Refuse(step) => {
                return Err(NotServing::Loading { id: slot.id.clone(), step, retry_after: 1 });
            }
            Next::Load => {
                let (state, target) = (state.clone(), slot.id.clone());
                tokio::task::spawn_blocking(move || load_lazy(&state, &target));
            }
            Next::Wait => {}
        }
        waited = true;
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(_) => {}
            Err(_) => {
                let p = slot.progress();
                return Err(NotServing::Loading {
                    id: slot.id.clone(),
                    step: p.step.clone(),
                    retry_after: retry_after(&p),
                });
            }
        }
        // The load this request waited on ended without a model: say why.
        let p = slot.progress();
        if matches!(p.state, LoadState::Unloaded | LoadState::Evicted | LoadState::Failed)
            && let Some(error) = p.error
        {
            return Err(match p.no_room {
                Some(no_room) => NotServing::NoRoom(no_room),
                None => NotServing::Failed { id: slot.id.clone(), error },
            });
        }
    }
}

enum Next {
    Wait,
    Load,
    Fail(String),
    Refuse(String),
}

/// Seconds a client should wait before retrying a model still loading: what the load has left
/// by its bytes so far, at least 1, at most 30.
fn retry_after(p: &crate::state::Progress) -> u64 {
    let left = match (p.percent, p.seconds) {
        (Some(pct), s) if pct > 0.0 => s * (100.0 - pct) / pct,
        _ => 1.0,
    };
    (left.ceil() as u64).clamp(1, 30)
}

/// Load lazy model `id` (claimed by a request): make room under the budget, load, warm, start.
fn load_lazy<F: ModelFamily>(state: &Arc<AppState<F>>, id: &ModelRef) {
    let plan = state.plan.clone();
    let plan = plan.as_ref();
    let _loading = lock_loads(state);
    let Some(slot) = state.slots.get(id) else { return };
    let span = tracing::info_span!("lazy_load", model = %id.name, version = %id.version);
    let _enter = span.enter();
    let need = charge(state, slot);
    if let Err(no_room) = make_room(state, id, need) {
        tracing::warn!(error = %no_room, "no room to load");
        slot.update(|p| {
            p.state = if p.loads > 0 { LoadState::Evicted } else { LoadState::Unloaded };
            p.step = "not loaded: no room in the memory budget".to_string();
            p.error = Some(no_room.to_string());
            p.no_room = Some(no_room.clone());
            p.since = None;
        });
        return;
    }
    if let Err(error) = load_one(state, plan, id) {
        tracing::error!(%error, "lazy model failed to load");
        slot.update(|p| {
            p.state = LoadState::Failed;
            p.step = "failed".to_string();
            p.error = Some(error);
            p.no_room = None;
            p.failed_at = Some(Instant::now());
            p.since = None;
        });
    }
}

/// What `slot` is charged against the budget: its memory hint, else its weight files, plus its
/// KV-cache budget.
fn charge<F: ModelFamily>(state: &AppState<F>, slot: &Slot<F>) -> u64 {
    let weights = slot.memory_bytes.unwrap_or(slot.weight_bytes);
    weights.saturating_add(kv_cache_bytes(state, slot).unwrap_or(0))
}

/// The KV budget a text-generation model gets when the plan fixes it (or lazy models share the
/// pod); None: derived from what the pod has left once loaded.
fn kv_cache_bytes<F: ModelFamily>(state: &AppState<F>, slot: &Slot<F>) -> Option<u64> {
    if F::FAMILY != crate::manifest::Family::TextGeneration {
        return None;
    }
    let shares = state.slots.values().any(|s| s.load == Load::Lazy);
    slot.kv_cache_bytes.or(shares.then_some(SHARED_KV_CACHE_BYTES))
}

/// Unload idle lazy models, least recently used first, until `need` more bytes fit the budget.
/// Called with the load lock held. A model leased between the decision and its unload stays;
/// the decision is then made again on fresh figures.
fn make_room<F: ModelFamily>(state: &AppState<F>, id: &ModelRef, need: u64) -> Result<(), NoRoom> {
    let Some(budget) = state.residency.budget_bytes else { return Ok(()) };
    for _ in 0..4 {
        let victims = residency::make_room(&residents(state), budget, id, need)?;
        if victims.is_empty() {
            return Ok(());
        }
        let mut all = true;
        for victim in &victims {
            all &= unload(state, victim, "lru");
        }
        if all {
            return Ok(());
        }
    }
    residency::make_room(&residents(state), budget, id, need).and_then(|v| {
        if v.is_empty() {
            Ok(())
        } else {
            // Still racing with requests after four tries: report what holds the memory.
            Err(NoRoom::Held {
                model: id.clone(),
                need,
                budget,
                held: residents(state).iter().map(|r| r.bytes).sum(),
                holders: v.iter().map(|m| format!("{m} in use")).collect(),
            })
        }
    })
}

/// The loaded models as the policy sees them.
fn residents<F: ModelFamily>(state: &AppState<F>) -> Vec<Resident> {
    state
        .slots
        .values()
        .filter(|s| s.current().is_some())
        .map(|s| Resident {
            id: s.id.clone(),
            bytes: s.progress().charge_bytes,
            pinned: s.load == Load::Preload,
            busy: s.busy(),
            last_used: s.last_used(),
        })
        .collect()
}

/// Unload lazy model `id` if nothing uses it: stop its worker (which holds the weights), drop
/// it, and hand the freed memory back to the system. False when it is in use or not loaded.
pub fn unload<F: ModelFamily>(state: &AppState<F>, id: &ModelRef, reason: &'static str) -> bool {
    let Some(slot) = state.slots.get(id) else { return false };
    if slot.load != Load::Lazy {
        return false;
    }
    let Some(serving) = slot.take_if_unused() else { return false };
    let rss_before = rss_bytes();
    serving.stop();
    drop(serving);
    release_freed_memory();
    let freed = rss_before.saturating_sub(rss_bytes());
    slot.update(|p| {
        p.state = LoadState::Evicted;
        p.step = format!("unloaded ({reason}); loads again on its next request");
        p.unloads = p.unloads.saturating_add(1);
        p.resident_bytes = 0;
        p.since = None;
    });
    let l = [id.name.as_str(), id.version.as_str()];
    state.metrics.model_ready.with_label_values(&l).set(0);
    state.metrics.resident_bytes.with_label_values(&l).set(0);
    state.metrics.model_unloads.with_label_values(&[&id.name, &id.version, reason]).inc();
    tracing::info!(model = %id.name, version = %id.version, reason, freed_bytes = freed, "unloaded");
    true
}

/// Unload the lazy models idle longer than `idle_unload`; skipped while a load runs.
pub fn unload_idle<F: ModelFamily>(state: &AppState<F>, idle_unload: Duration) {
    let Ok(_loading) = state.loading.try_lock() else { return };
    let idle_ms = u64::try_from(idle_unload.as_millis()).unwrap_or(u64::MAX);
    for id in residency::idle(&residents(state), state.now_ms(), idle_ms) {
        unload(state, &id, "idle");
    }
}

/// Return freed heap pages to the system: glibc keeps freed memory in its arenas (a model's
/// buffers are many mid-sized allocations), so without this RSS would not fall on unload.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of the weight files in `dir`.
pub(crate) fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    // safetensors and GGUF checkpoints, and CTranslate2's model.bin.
                    name.ends_with(".safetensors") || name.ends_with(".gguf") || name == "model.bin"
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Resident set size of this process, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Load, warm and start `id`. Called with the load lock held.
fn load_one<F: ModelFamily>(state: &Arc<AppState<F>>, plan: &LoadPlan, id: &ModelRef) -> Result<(), String> {
    let slot = state.slots.get(id).ok_or_else(|| format!("{id} is not in the manifest"))?;
    if slot.current().is_some() {
        return Ok(());
    }
    let entry = plan.dirs.get(id).ok_or_else(|| format!("no directory for {id}"))?;
    let dir = &entry.path;
    let span = tracing::info_span!("load", model = %id.name, version = %id.version);
    let _enter = span.enter();
    if let Some(pinned) = &entry.pinned {
        crate::pull::cache::check(dir, pinned, entry.source.as_deref()).map_err(|e| e.to_string())?;
    }
    let bytes = slot.weight_bytes;
    let charge = charge(state, slot);
    let t0 = Instant::now();
    slot.update(|p| {
        p.state = LoadState::Loading;
        p.step = format!("reading weights from {}", dir.display());
        p.charge_bytes = charge;
        p.read_base = crate::weights::progress::total();
        p.since = Some(t0);
    });
    tracing::info!(dir = %dir.display(), weight_bytes = bytes, charge_bytes = charge, "loading");
    let rss_before = rss_bytes();
    let model = Arc::new(F::load(dir, &plan.device).map_err(|e| e.to_string())?);
    let load_seconds = t0.elapsed().as_secs_f64();
    tracing::info!(load_seconds, model = %F::summary(&model), "loaded");
    slot.update(|p| {
        p.state = LoadState::Warming;
        p.load_seconds = Some(load_seconds);
        p.since = Some(Instant::now());
    });
    let t1 = Instant::now();
    // A lazy load has a request waiting on it: one pass over the first input proves the model
    // runs and touches its kernels; the full warmup would only delay that request.
    let (passes, inputs) = match slot.load {
        Load::Preload => (plan.warmup.iterations, &plan.warmup.inputs[..]),
        Load::Lazy => (plan.warmup.iterations.min(1), &plan.warmup.inputs[..plan.warmup.inputs.len().min(1)]),
    };
    for i in 0..passes {
        slot.update(|p| p.step = format!("warmup {}/{passes}", i + 1));
        F::warm(&model, inputs).map_err(|e| format!("warmup failed: {e}"))?;
        tracing::info!(pass = i + 1, of = passes, "warmup");
    }
    let warmup_seconds = t1.elapsed().as_secs_f64();
    let memory_for_requests = kv_cache_bytes(state, slot).unwrap_or_else(|| spare_memory(state, id));
    let ctx = StartContext {
        batching: plan.batching.clone(),
        max_queued_tokens: state.limits.max_queued_tokens,
        memory_for_requests,
        metrics: state.metrics.clone(),
        on_failure: failure_hook(state, id),
    };
    let serving =
        F::start(id, model, ctx).map_err(|e| format!("cannot start the model's worker thread: {e}"))?;
    let resident = rss_bytes().saturating_sub(rss_before);
    slot.install(serving);
    slot.update(|p| {
        p.state = LoadState::Ready;
        p.step = "ready".to_string();
        p.warmup_seconds = Some(warmup_seconds);
        p.resident_bytes = resident;
        p.loads = p.loads.saturating_add(1);
        p.error = None;
        p.no_room = None;
        p.since = None;
    });
    let l = [id.name.as_str(), id.version.as_str()];
    state.metrics.model_ready.with_label_values(&l).set(1);
    state.metrics.load_seconds.with_label_values(&l).set(load_seconds);
    state.metrics.warmup_seconds.with_label_values(&l).set(warmup_seconds);
    state.metrics.resident_bytes.with_label_values(&l).set(i64::try_from(resident).unwrap_or(i64::MAX));
    state.metrics.model_loads.with_label_values(&l).inc();
    state.metrics.model_load_duration.with_label_values(&l).observe(load_seconds + warmup_seconds);
    tracing::info!(warmup_seconds, resident_bytes = resident, "warm");
    Ok(())
}

/// Marks the model Failed and starts the process's drain when its worker dies.
fn failure_hook<F: ModelFamily>(state: &Arc<AppState<F>>, id: &ModelRef) -> FailureHook {
    let state = Arc::downgrade(state);
    let id = id.clone();
    Arc::new(move |reason: &str| {
        if let Some(state) = state.upgrade() {
            state.model_died(&id, reason);
        }
    })
}

/// Memory a model may take for per-request state when its plan names none (text generation's
/// KV cache): what the container's memory limit (or, without one, the machine's available
/// memory) leaves after what the process holds now, the weights still to load and a margin,
/// shared among the served models still to start that name no budget (this one included).
fn spare_memory<F: ModelFamily>(state: &AppState<F>, id: &ModelRef) -> u64 {
    let rss = rss_bytes();
    let limit = memory_limit().unwrap_or_else(|| available_memory().saturating_add(rss));
    let pending: Vec<&ModelRef> = state
        .served
        .iter()
        .filter(|m| *m != id)
        .filter(|m| state.slots.get(*m).is_some_and(|s| s.current().is_none()))
        .collect();
    let weights_to_load: u64 =
        pending.iter().filter_map(|m| state.slots.get(*m)).map(|s| s.weight_bytes).sum();
    let sharing = 1 + pending
        .iter()
        .filter(|m| state.slots.get(**m).is_some_and(|s| s.kv_cache_bytes.is_none()))
        .count() as u64;
    let left = limit
        .saturating_sub(rss)
        .saturating_sub(weights_to_load)
        .saturating_sub(residency::runtime_margin(limit));
    left / sharing
}

/// The cgroup's memory limit (v2 `memory.max`, else v1), None when unlimited.
pub fn memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    let text = v2.or_else(v1)?;
    // v1 writes a huge number for "no limit".
    text.trim().parse::<u64>().ok().filter(|&b| b < (1 << 60))
}

/// `MemAvailable` of /proc/meminfo, in bytes (0 where unknown).
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib.saturating_mul(1024))
        .unwrap_or(0)
}
