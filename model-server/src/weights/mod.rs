//! Reading checkpoints, for every architecture: safetensors files, JSON configs, GGUF
//! metadata and the tokenizer a GGUF file carries.

pub mod ctranslate2;
pub mod gguf;
pub mod onnx;
pub mod tensors;

/// Weight bytes read by the checkpoint readers, process-wide: what the loader reports as a
/// load's progress (loads run one at a time, so the difference over a load is that load's).
pub mod progress {
    use std::sync::atomic::{AtomicU64, Ordering};

    static READ: AtomicU64 = AtomicU64::new(0);

    /// A reader took `bytes` of weights out of a checkpoint.
    pub fn read(bytes: usize) {
        READ.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Weight bytes read so far by this process.
    pub fn total() -> u64 {
        READ.load(Ordering::Relaxed)
    }
}

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::models::ModelError;

/// The safetensors files of a model directory: `model.safetensors`, or every shard listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let json: serde_json::Value = read_json(&index).map_err(|_| ModelError::Files {
        path: dir.display().to_string(),
        message: "neither model.safetensors nor a readable model.safetensors.index.json".to_string(),
    })?;
    let mut files: Vec<PathBuf> = json["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Files {
            path: index.display().to_string(),
            message: "no weight_map object".to_string(),
        })?
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// A model directory's safetensors weights for candle's models, in `dtype` on `device` (the
/// GPU paths), and the error that names the directory for what building the model then reports.
pub fn candle_weights(
    dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<(candle_nn::VarBuilder<'static>, impl Fn(candle_core::Error) -> ModelError), ModelError> {
    let path = dir.display().to_string();
    let failed =
        move |e: candle_core::Error| ModelError::Files { path: path.clone(), message: e.to_string() };
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; the cache is written atomically by `pull`
    // and never modified in place afterwards.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(&failed)?;
    Ok((vb, failed))
}

/// A JSON file read into `T`; errors name the file (and, through serde, the field).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let files_err = |message: String| ModelError::Files { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| files_err(e.to_string()))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        if at == "." { files_err(e.inner().to_string()) } else { files_err(format!("{at}: {}", e.inner())) }
    })
}

/// As [`read_json`], but a missing file is `None`.
pub fn read_json_if_present<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// `model_type` of a Hugging Face `config.json`, if it says.
pub fn model_type(config: &Path) -> Result<Option<String>, ModelError> {
    let json: serde_json::Value = read_json(config)?;
    Ok(json.get("model_type").and_then(|v| v.as_str()).map(str::to_string))
}
