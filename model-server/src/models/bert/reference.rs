//! Reference encoder: candle-transformers' stock `BertModel` over a padded batch.
//! Slow but simple; it is the yardstick the fast encoder is checked against.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use super::{Encoder, EngineError, Pooling};

pub struct CandleBert {
    model: BertModel,
    config: Config,
}

/// The safetensors files of a model directory: `model.safetensors`, or every shard listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| EngineError::Files {
        path: dir.display().to_string(),
        message: format!("neither model.safetensors nor model.safetensors.index.json is readable: {e}"),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Files { path: index.display().to_string(), message: e.to_string() })?;
    let mut files: Vec<PathBuf> = json["weight_map"]
        .as_object()
        .ok_or_else(|| EngineError::Files {
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

pub fn read_config(dir: &Path) -> Result<Config, EngineError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EngineError::Files { path: path.display().to_string(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Files {
        path: path.display().to_string(),
        message: format!("not a BERT-family config: {e}"),
    })
}

impl CandleBert {
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let config = read_config(dir)?;
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; the cache is written atomically by
        // `pull` and never modified in place afterwards.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .map_err(|e| EngineError::Files { path: dir.display().to_string(), message: e.to_string() })?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| EngineError::Files { path: dir.display().to_string(), message: e.to_string() })?;
        Ok(CandleBert { model, config })
    }
}

impl Encoder for CandleBert {
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, EngineError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let len = inputs.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; inputs.len() * len];
        let mut mask = vec![0f32; inputs.len() * len];
        for (row, input) in inputs.iter().enumerate() {
            ids[row * len..row * len + input.len()].copy_from_slice(input);
            mask[row * len..row * len + input.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, (inputs.len(), len), &dev)?;
        let mask = Tensor::from_vec(mask, (inputs.len(), len), &dev)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (b, len, h)
        let pooled = match pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?; // (b, len, 1)
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
        };
        Ok(pooled.to_vec2::<f32>()?)
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }
}
