//! candle-transformers' SigLIP on any candle device: on a CUDA device it is SigLIP's GPU path
//! (cuBLAS and candle's kernels), float32 throughout; on the CPU it is slower than the packed
//! towers and is checked against transformers' features like them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::siglip;
use serde_json::Value;

use super::SiglipConfig;
use crate::images::preprocess::PixelValues;
use crate::models::{ImageTextEncoder, ModelError, TowerShape};
use crate::weights::{candle_weights, read_json};

pub struct CandleSiglip {
    model: siglip::Model,
    shape: TowerShape,
    device: Device,
    dtype: DType,
}

impl CandleSiglip {
    /// The model in `dir` with `dtype` weights and activations on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        // Our reading decides what is refused, so both paths refuse the same checkpoints.
        let ours = SiglipConfig::read(dir)?;
        let (t, v) = (&ours.text_config, &ours.vision_config);
        if t.projection_size.is_some_and(|p| p != t.hidden_size) {
            return Err(ModelError::Unsupported(format!(
                "a SigLIP text head from {} to {} features has no GPU path (candle's head keeps the hidden size)",
                t.hidden_size,
                t.projection_size.unwrap_or_default()
            )));
        }
        // candle's config takes a missing field's default but not a null (transformers writes
        // `bos_token_id: null`): drop the nulls so the defaults apply.
        let mut raw: Value = read_json(&path)?;
        for tower in ["text_config", "vision_config"] {
            if let Some(Value::Object(fields)) = raw.get_mut(tower) {
                fields.retain(|_, v| !v.is_null());
            }
        }
        let config: siglip::Config = serde_json::from_value(raw).map_err(|e| ModelError::Files {
            path: path.display().to_string(),
            message: format!("not a config candle's SigLIP reads: {e}"),
        })?;
        let (vb, failed) = candle_weights(dir, device, dtype)?;
        let model = siglip::Model::new(&config, vb).map_err(&failed)?;
        Ok(CandleSiglip {
            model,
            shape: TowerShape {
                dimension: v.hidden_size,
                image_size: v.image_size,
                max_text_tokens: t.max_position_embeddings,
                pads_text: true,
            },
            device: device.clone(),
            dtype,
        })
    }
}

impl ImageTextEncoder for CandleSiglip {
    fn embed_images(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        let pixels = PixelValues::batch(images, self.shape.image_size, &self.device)?.to_dtype(self.dtype)?;
        Ok(self.model.get_image_features(&pixels)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        // The family pads every text to the tower's length before it comes here.
        let len = texts.first().map_or(0, |t| t.len());
        if len == 0 || len > self.shape.max_text_tokens || texts.iter().any(|t| t.len() != len) {
            return Err(ModelError::Inference(format!(
                "texts must be padded to one length of at most {} tokens",
                self.shape.max_text_tokens
            )));
        }
        let ids: Vec<u32> = texts.iter().flat_map(|t| t.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        Ok(self.model.get_text_features(&ids)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn shape(&self) -> TowerShape {
        self.shape
    }
}
