//! Reference encoder: candle-transformers' stock `BertModel` over a padded batch (BERT only).
//! Slow but simple; it is the yardstick the packed encoder is checked against.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use crate::models::{Encoder, ModelError, Pooling};
use crate::weights::{read_json, safetensors_files};

pub struct CandleBert {
    model: BertModel,
    config: Config,
}

impl CandleBert {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let config: Config = read_json(&dir.join("config.json"))?;
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; the cache is written atomically by
        // `pull` and never modified in place afterwards.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .map_err(|e| ModelError::Files { path: dir.display().to_string(), message: e.to_string() })?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| ModelError::Files { path: dir.display().to_string(), message: e.to_string() })?;
        Ok(CandleBert { model, config })
    }
}

impl Encoder for CandleBert {
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, ModelError> {
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
