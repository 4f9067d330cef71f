//! Loads every served model once, before readiness, then warms it; on failure loads the
//! model's fallback and routes to it. Runs on a blocking thread: loading is CPU and disk work.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::families::{ModelFamily, StartContext};
use crate::manifest::{Batching, ModelRef, Warmup};
use crate::queue::FailureHook;
use crate::state::{AppState, LoadState};

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

pub fn load_all<F: ModelFamily>(
    state: &Arc<AppState<F>>,
    dirs: &ModelDirs,
    warmup: &Warmup,
    batching: &Batching,
) {
    for id in &state.served {
        let Some(slot) = state.slots.get(id) else { continue };
        match load_one(state, id, dirs, warmup, batching) {
            Ok(()) => {
                let _ = slot.route.set(id.clone());
            }
            Err(error) => {
                tracing::error!(model = %id.name, version = %id.version, %error, "model failed to load");
                let fallback = slot.fallback.clone();
                let rescued = fallback.as_ref().and_then(|fb| {
                    let ready = state.slots.get(fb).is_some_and(|s| s.serving.get().is_some());
                    if ready || load_one(state, fb, dirs, warmup, batching).is_ok() {
                        Some(fb.clone())
                    } else {
                        None
                    }
                });
                match rescued {
                    Some(fb) => {
                        tracing::warn!(model = %id.name, version = %id.version, fallback = %fb, "serving the fallback in its place");
                        slot.update(|p| {
                            p.state = LoadState::FallenBack;
                            p.step = format!("failed; {fb} answers in its place");
                            p.error = Some(error.clone());
                            p.served_by = Some(fb.to_string());
                            p.since = None;
                        });
                        let _ = slot.route.set(fb);
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
        tracing::info!(seconds = state.started.elapsed().as_secs_f64(), "all models loaded and warm: ready");
    }
}

fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.ends_with(".safetensors") || name.ends_with(".gguf")
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

fn load_one<F: ModelFamily>(
    state: &Arc<AppState<F>>,
    id: &ModelRef,
    dirs: &ModelDirs,
    warmup: &Warmup,
    batching: &Batching,
) -> Result<(), String> {
    let slot = state.slots.get(id).ok_or_else(|| format!("{id} is not in the manifest"))?;
    if slot.serving.get().is_some() {
        return Ok(());
    }
    let entry = dirs.get(id).ok_or_else(|| format!("no directory for {id}"))?;
    let dir = &entry.path;
    let span = tracing::info_span!("load", model = %id.name, version = %id.version);
    let _enter = span.enter();
    if let Some(pinned) = &entry.pinned {
        crate::pull::cache::check(dir, pinned, entry.source.as_deref()).map_err(|e| e.to_string())?;
    }
    let bytes = weight_bytes(dir);
    let t0 = Instant::now();
    slot.update(|p| {
        p.state = LoadState::Loading;
        p.step = format!("reading weights from {}", dir.display());
        p.weight_bytes = bytes;
        p.since = Some(t0);
    });
    tracing::info!(dir = %dir.display(), weight_bytes = bytes, "loading");
    let rss_before = rss_bytes();
    let model = Arc::new(F::load(dir).map_err(|e| e.to_string())?);
    let load_seconds = t0.elapsed().as_secs_f64();
    tracing::info!(load_seconds, model = %F::summary(&model), "loaded");
    slot.update(|p| {
        p.state = LoadState::Warming;
        p.load_seconds = Some(load_seconds);
        p.since = Some(Instant::now());
    });
    let t1 = Instant::now();
    for i in 0..warmup.iterations {
        slot.update(|p| p.step = format!("warmup {}/{}", i + 1, warmup.iterations));
        F::warm(&model, &warmup.inputs).map_err(|e| format!("warmup failed: {e}"))?;
        tracing::info!(pass = i + 1, of = warmup.iterations, "warmup");
    }
    let warmup_seconds = t1.elapsed().as_secs_f64();
    let ctx = StartContext {
        batching: batching.clone(),
        max_queued_tokens: state.limits.max_queued_tokens,
        memory_for_requests: slot.kv_cache_bytes.unwrap_or_else(|| spare_memory(state, id, dirs)),
        metrics: state.metrics.clone(),
        on_failure: failure_hook(state, id),
    };
    let serving =
        F::start(id, model, ctx).map_err(|e| format!("cannot start the model's worker thread: {e}"))?;
    let resident = rss_bytes().saturating_sub(rss_before);
    let _ = slot.serving.set(serving);
    slot.update(|p| {
        p.state = LoadState::Ready;
        p.step = "ready".to_string();
        p.warmup_seconds = Some(warmup_seconds);
        p.resident_bytes = resident;
        p.since = None;
    });
    let l = [id.name.as_str(), id.version.as_str()];
    state.metrics.model_ready.with_label_values(&l).set(1);
    state.metrics.load_seconds.with_label_values(&l).set(load_seconds);
    state.metrics.warmup_seconds.with_label_values(&l).set(warmup_seconds);
    state.metrics.resident_bytes.with_label_values(&l).set(resident as i64);
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

/// Memory margin kept for the runtime, tokenizers and request buffers when a KV budget is
/// derived from the pod's limit: a tenth of the limit, at least 64 MiB.
fn memory_margin(limit: u64) -> u64 {
    (limit / 10).max(64 << 20)
}

/// Memory a model may take for per-request state when its plan names none (text generation's
/// KV cache): what the container's memory limit (or, without one, the machine's available
/// memory) leaves after what the process holds now, the weights still to load and a margin,
/// shared among the served models still to start that name no budget (this one included).
fn spare_memory<F: ModelFamily>(state: &AppState<F>, id: &ModelRef, dirs: &ModelDirs) -> u64 {
    let rss = rss_bytes();
    let limit = memory_limit().unwrap_or_else(|| available_memory().saturating_add(rss));
    let pending: Vec<&ModelRef> = state
        .served
        .iter()
        .filter(|m| *m != id)
        .filter(|m| state.slots.get(*m).is_some_and(|s| s.serving.get().is_none()))
        .collect();
    let weights_to_load: u64 =
        pending.iter().filter_map(|m| dirs.get(*m)).map(|d| weight_bytes(&d.path)).sum();
    let sharing = 1 + pending
        .iter()
        .filter(|m| state.slots.get(**m).is_some_and(|s| s.kv_cache_bytes.is_none()))
        .count() as u64;
    let left = limit.saturating_sub(rss).saturating_sub(weights_to_load).saturating_sub(memory_margin(limit));
    left / sharing
}

/// The cgroup's memory limit (v2 `memory.max`, else v1), None when unlimited.
fn memory_limit() -> Option<u64> {
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
