//! Loads every served model once, before readiness, then warms it; on failure loads the
//! model's fallback and routes to it. Runs on a blocking thread: loading is CPU and disk work.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::batching::Batcher;
use crate::batching::continuous::Scheduler;
use crate::engine::EmbeddingModel;
use crate::engine::generation::{ChatMessage, GenerationModel, SamplingParams};
use crate::manifest::{Batching, Family, ModelRef, Warmup};
use crate::state::{AppState, ModelState, Runtime};

/// Where each model's files are, by id.
pub type ModelDirs = std::collections::BTreeMap<ModelRef, ModelDir>;

pub struct ModelDir {
    pub path: PathBuf,
    /// Set for models from a manifest: the directory must be a complete `pull` cache entry
    /// whose marker agrees with these pinned digests, or the model is refused.
    pub pinned: Option<std::collections::BTreeMap<String, String>>,
}

pub fn load_all(state: &Arc<AppState>, dirs: &ModelDirs, warmup: &Warmup, batching: &Batching) {
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
                    let ready = state.slots.get(fb).is_some_and(|s| s.runtime.get().is_some());
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
                            p.state = ModelState::FallenBack;
                            p.step = format!("failed; {fb} answers in its place");
                            p.error = Some(error.clone());
                            p.served_by = Some(fb.to_string());
                            p.since = None;
                        });
                        let _ = slot.route.set(fb);
                    }
                    None => slot.update(|p| {
                        p.state = ModelState::Failed;
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

fn load_one(
    state: &AppState,
    id: &ModelRef,
    dirs: &ModelDirs,
    warmup: &Warmup,
    batching: &Batching,
) -> Result<(), String> {
    let slot = state.slots.get(id).ok_or_else(|| format!("{id} is not in the manifest"))?;
    if slot.runtime.get().is_some() {
        return Ok(());
    }
    let entry = dirs.get(id).ok_or_else(|| format!("no directory for {id}"))?;
    let dir = &entry.path;
    let span = tracing::info_span!("load", model = %id.name, version = %id.version);
    let _enter = span.enter();
    if let Some(pinned) = &entry.pinned {
        crate::pull::cache::check(dir, pinned).map_err(|e| e.to_string())?;
    }
    let bytes = weight_bytes(dir);
    let t0 = Instant::now();
    slot.update(|p| {
        p.state = ModelState::Loading;
        p.step = format!("reading weights from {}", dir.display());
        p.weight_bytes = bytes;
        p.since = Some(t0);
    });
    tracing::info!(dir = %dir.display(), weight_bytes = bytes, "loading");
    let rss_before = rss_bytes();
    let loaded = |what: String| {
        let load_seconds = t0.elapsed().as_secs_f64();
        tracing::info!(load_seconds, model = %what, "loaded");
        slot.update(|p| {
            p.state = ModelState::Warming;
            p.load_seconds = Some(load_seconds);
            p.since = Some(Instant::now());
        });
        load_seconds
    };
    let warm = |pass: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        let t1 = Instant::now();
        for i in 0..warmup.iterations {
            slot.update(|p| p.step = format!("warmup {}/{}", i + 1, warmup.iterations));
            pass()?;
            tracing::info!(pass = i + 1, of = warmup.iterations, "warmup");
        }
        Ok(t1.elapsed().as_secs_f64())
    };
    let inputs: Vec<&str> = warmup.inputs.iter().map(String::as_str).collect();
    let (runtime, load_seconds, warmup_seconds) = match state.family {
        Family::TextGeneration => {
            let model = Arc::new(GenerationModel::load(dir).map_err(|e| e.to_string())?);
            let load_seconds =
                loaded(format!("{} ({} layers)", model.file().display(), model.llama().config().layers));
            let warmup_seconds = warm(&mut || {
                for input in &inputs {
                    warm_generation(&model, input).map_err(|e| format!("warmup failed: {e}"))?;
                }
                Ok(())
            })?;
            let scheduler =
                Scheduler::spawn(id.clone(), model.clone(), batching.clone(), state.metrics.clone())
                    .map_err(|e| format!("cannot start the scheduler thread: {e}"))?;
            (Runtime::Generation { model, scheduler }, load_seconds, warmup_seconds)
        }
        Family::SpeechToText => return Err("the speech-to-text family is not served by this build".into()),
        Family::TextEmbedding => {
            let model = Arc::new(EmbeddingModel::load(dir).map_err(|e| e.to_string())?);
            let load_seconds = loaded(format!("dimension {}", model.dimension()));
            let warmup_seconds = warm(&mut || {
                if !inputs.is_empty() {
                    model.embed(&inputs).map_err(|e| format!("warmup failed: {e}"))?;
                }
                Ok(())
            })?;
            let batcher = Batcher::spawn(id.clone(), model.clone(), batching.clone(), state.metrics.clone())
                .map_err(|e| format!("cannot start the batcher thread: {e}"))?;
            (Runtime::Embedding { model, batcher }, load_seconds, warmup_seconds)
        }
    };
    let resident = rss_bytes().saturating_sub(rss_before);
    let _ = slot.runtime.set(runtime);
    slot.update(|p| {
        p.state = ModelState::Ready;
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

/// Tokens each warmup input generates: enough to run prefill and the decode path.
const WARMUP_TOKENS: usize = 8;

/// One warmup input as a user message (raw text when the model has no chat template), greedy.
fn warm_generation(model: &GenerationModel, input: &str) -> Result<(), crate::engine::EngineError> {
    let prompt = if model.has_chat_template() {
        model.render_chat(&[ChatMessage { role: "user".into(), content: input.to_string() }])?
    } else {
        input.to_string()
    };
    let ids = model.encode(&prompt)?;
    model.generate(&ids, &SamplingParams::greedy(), WARMUP_TOKENS)?;
    Ok(())
}
