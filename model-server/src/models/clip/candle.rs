//! candle-transformers' CLIP towers on any candle device: on a CUDA device they are CLIP's GPU
//! path (cuBLAS and candle's kernels), float32 throughout. candle's towers are OpenAI's CLIP:
//! quick GELU and LayerNorm epsilon 1e-5 are built in, so checkpoints that differ are refused
//! here by name rather than computed wrongly. The end-of-text token is chosen as the CPU path
//! chooses it ([`EndOfText`]), not by candle's argmax.

use std::path::Path;

use candle_core::{Device, IndexOp, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};

use super::{ClipConfig, EndOfText};
use crate::images::preprocess::PixelValues;
use crate::models::{ImageTextEncoder, ModelError, TowerShape};
use crate::weights::candle_weights;

pub struct CandleClip {
    text: ClipTextTransformer,
    text_projection: Linear,
    vision: ClipVisionTransformer,
    visual_projection: Linear,
    end: EndOfText,
    shape: TowerShape,
    device: Device,
}

/// What candle's towers compute, or why this checkpoint is not that.
fn supported(tower: &str, act: &str, eps: f64) -> Result<(), ModelError> {
    if act != "quick_gelu" || (eps - 1e-5).abs() > 1e-12 {
        return Err(ModelError::Unsupported(format!(
            "a CLIP {tower} tower with hidden_act {act:?} and layer_norm_eps {eps} has no GPU path (candle's CLIP is quick_gelu with 1e-5; serve it on the CPU)"
        )));
    }
    Ok(())
}

impl CandleClip {
    /// The model in `dir` with float32 weights on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = ClipConfig::read(dir)?;
        let (t, v, p) = (&config.text_config, &config.vision_config, config.projection_dim);
        supported("text", &t.hidden_act, t.layer_norm_eps)?;
        supported("vision", &v.hidden_act, v.layer_norm_eps)?;
        let text_config = ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim: p,
        };
        let vision_config = ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: p,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        };
        let (vb, failed) = candle_weights(dir, device, candle_core::DType::F32)?;
        // candle would invent a random class embedding where the checkpoint has none.
        if !vb.contains_tensor("vision_model.embeddings.class_embedding") {
            return Err(ModelError::Files {
                path: dir.display().to_string(),
                message: "the weights have no vision_model.embeddings.class_embedding".into(),
            });
        }
        Ok(CandleClip {
            text: ClipTextTransformer::new(vb.pp("text_model"), &text_config).map_err(&failed)?,
            text_projection: candle_nn::linear_no_bias(t.hidden_size, p, vb.pp("text_projection"))
                .map_err(&failed)?,
            vision: ClipVisionTransformer::new(vb.pp("vision_model"), &vision_config).map_err(&failed)?,
            visual_projection: candle_nn::linear_no_bias(v.hidden_size, p, vb.pp("visual_projection"))
                .map_err(&failed)?,
            end: EndOfText::of(t),
            shape: TowerShape {
                dimension: p,
                image_size: v.image_size,
                max_text_tokens: t.max_position_embeddings,
                pads_text: false,
            },
            device: device.clone(),
        })
    }
}

impl ImageTextEncoder for CandleClip {
    fn embed_images(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        let pixels = PixelValues::batch(images, self.shape.image_size, &self.device)?;
        let pooled = self.vision.forward(&pixels)?;
        Ok(self.visual_projection.forward(&pooled)?.to_vec2::<f32>()?)
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        if texts.is_empty() || len == 0 || len > self.shape.max_text_tokens {
            return Err(ModelError::Inference(format!(
                "texts of 1 to {} tokens, not {len}",
                self.shape.max_text_tokens
            )));
        }
        // Padded to the longest: under the causal mask nothing after a text's end-of-text
        // token changes it, so the padding's value does not matter.
        let mut ids = vec![0u32; texts.len() * len];
        for (row, text) in ids.chunks_exact_mut(len).zip(texts) {
            row[..text.len()].copy_from_slice(text);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        let hidden = self.text.forward_with_mask(&ids, usize::MAX)?; // (b, len, h)
        let rows = texts
            .iter()
            .enumerate()
            .map(|(i, text)| hidden.i((i, self.end.position(text))))
            .collect::<Result<Vec<_>, _>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        Ok(self.text_projection.forward(&pooled)?.to_vec2::<f32>()?)
    }

    fn shape(&self) -> TowerShape {
        self.shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn towers_candle_does_not_compute_are_refused_by_name() {
        assert!(supported("text", "quick_gelu", 1e-5).is_ok());
        for (act, eps) in [("gelu", 1e-5), ("quick_gelu", 1e-6)] {
            let err = supported("vision", act, eps).expect_err("not candle's CLIP").to_string();
            assert!(err.contains("CLIP vision tower") && err.contains("no GPU path"), "{err}");
        }
    }
}
