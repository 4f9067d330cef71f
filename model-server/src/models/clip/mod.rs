//! CLIP (`model_type: clip`): two towers trained contrastively into one space.
//! - vision: patch embedding (no bias) after a learned class token, positions, `pre_layrnorm`,
//!   the pre-LayerNorm encoder, the class token through `post_layernorm` and
//!   `visual_projection`;
//! - text: token + position embeddings, the encoder with a causal mask, `final_layer_norm`, the
//!   end-of-text token through `text_projection`. With the causal mask nothing after that token
//!   changes it, so texts run unpadded.
//!
//! Features come out unnormalised; the family normalises them as CLIP's forward does.
//!
//! This is the CPU path; [`candle`] is candle-transformers' CLIP towers on any candle device,
//! the path a GPU runs.

pub mod candle;

use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;

use crate::images::preprocess::PixelValues;
use crate::kernels::Norm;
use crate::kernels::encoder::{
    self as enc, EncoderDims, PatchEmbedding, PreNormEncoder, Span, TokenEmbedding, load_linear, load_norm,
};
use crate::kernels::gemm::Linear;
use crate::models::{ImageTextEncoder, ModelError, TowerShape};
use crate::weights::read_json;
use crate::weights::tensors::{Scope, Tensors};

/// `config.json`, with transformers' defaults for what a checkpoint leaves out.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
}

fn default_projection() -> usize {
    512
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub eos_token_id: Option<u32>,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: Some(49407),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipConfig {
    /// `dir/config.json`, refused where the vision tower's patches do not fit its image.
    pub fn read(dir: &Path) -> Result<ClipConfig, ModelError> {
        let path = dir.join("config.json");
        let config: ClipConfig = read_json(&path)?;
        let v = &config.vision_config;
        // A convolution whose stride is its kernel: the border past the last whole patch is
        // dropped (so400m: 384 pixels in patches of 14 is 27 patches a side).
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(ModelError::Files {
                path: path.display().to_string(),
                message: format!("image_size {} is smaller than patch_size {}", v.image_size, v.patch_size),
            });
        }
        Ok(config)
    }
}

/// Which token's output is the text's feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndOfText {
    /// The first occurrence of this id (position 0 when absent, as transformers' argmax gives).
    Id(u32),
    /// The largest id: checkpoints that declare `eos_token_id: 2` predate the id being set, and
    /// transformers then pools at the argmax, which is `<|endoftext|>` in CLIP's vocabulary.
    LargestId,
}

impl EndOfText {
    fn of(text: &TextConfig) -> Self {
        match text.eos_token_id {
            None | Some(2) => EndOfText::LargestId,
            Some(id) => EndOfText::Id(id),
        }
    }

    pub(crate) fn position(self, ids: &[u32]) -> usize {
        match self {
            EndOfText::Id(eos) => ids.iter().position(|&t| t == eos).unwrap_or(0),
            // The first of equal maxima, as torch's argmax.
            EndOfText::LargestId => {
                ids.iter()
                    .enumerate()
                    .fold((0, 0), |(bp, bv), (p, &v)| if v > bv { (p, v) } else { (bp, bv) })
                    .0
            }
        }
    }
}

struct TextTower {
    embeddings: TokenEmbedding,
    encoder: PreNormEncoder,
    final_norm: Norm,
    projection: Linear,
    end: EndOfText,
}

struct VisionTower {
    class: Vec<f32>,
    patches: PatchEmbedding,
    position: Vec<f32>,
    pre_norm: Norm,
    encoder: PreNormEncoder,
    post_norm: Norm,
    projection: Linear,
    image_size: usize,
}

pub struct Clip {
    text: TextTower,
    vision: VisionTower,
    dimension: usize,
}

impl Clip {
    pub fn load(dir: &Path) -> Result<Clip, ModelError> {
        let path = dir.join("config.json");
        let config = ClipConfig::read(dir)?;
        let (t, v) = (&config.text_config, &config.vision_config);
        let dims =
            |hidden, heads, intermediate, layers, eps: f64, act: &str| -> Result<EncoderDims, ModelError> {
                Ok(EncoderDims {
                    hidden,
                    heads,
                    intermediate,
                    layers,
                    eps: eps as f32,
                    activation: enc::activation(&path, act)?,
                })
            };
        let text_dims = dims(
            t.hidden_size,
            t.num_attention_heads,
            t.intermediate_size,
            t.num_hidden_layers,
            t.layer_norm_eps,
            &t.hidden_act,
        )?;
        let vision_dims = dims(
            v.hidden_size,
            v.num_attention_heads,
            v.intermediate_size,
            v.num_hidden_layers,
            v.layer_norm_eps,
            &v.hidden_act,
        )?;
        let end = EndOfText::of(t);
        let p = config.projection_dim;
        let tensors = Tensors::open(dir)?;
        let root = tensors.scope("");
        let (text, vision) =
            rayon::join(|| load_text(&root, t, text_dims, p, end), || load_vision(&root, v, vision_dims, p));
        Ok(Clip { text: text?, vision: vision?, dimension: p })
    }
}

fn load_text(
    root: &Scope,
    c: &TextConfig,
    dims: EncoderDims,
    p: usize,
    end: EndOfText,
) -> Result<TextTower, ModelError> {
    let h = c.hidden_size;
    let s = root.scope("text_model");
    Ok(TextTower {
        embeddings: TokenEmbedding::load(&s.scope("embeddings"), c.vocab_size, c.max_position_embeddings, h)?,
        encoder: PreNormEncoder::load(&s.scope("encoder"), dims)?,
        final_norm: load_norm(&s.scope("final_layer_norm"), h)?,
        projection: load_linear(&root.scope("text_projection"), p, h, false)?,
        end,
    })
}

fn load_vision(
    root: &Scope,
    c: &VisionConfig,
    dims: EncoderDims,
    p: usize,
) -> Result<VisionTower, ModelError> {
    let h = c.hidden_size;
    let s = root.scope("vision_model");
    let e = s.scope("embeddings");
    let patches = PatchEmbedding::load(&e.scope("patch_embedding"), h, c.num_channels, c.patch_size, false)?;
    let grid = patches.grid(c.image_size, c.image_size);
    Ok(VisionTower {
        class: e.get("class_embedding", &[h])?.to_vec(),
        patches,
        position: e.get("position_embedding.weight", &[grid + 1, h])?.to_vec(),
        pre_norm: load_norm(&s.scope("pre_layrnorm"), h)?,
        encoder: PreNormEncoder::load(&s.scope("encoder"), dims)?,
        post_norm: load_norm(&s.scope("post_layernorm"), h)?,
        projection: load_linear(&root.scope("visual_projection"), p, h, false)?,
        image_size: c.image_size,
    })
}

impl VisionTower {
    fn forward(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        enc::check_images(images, self.image_size)?;
        let h = self.encoder.dims().hidden;
        let seq = self.position.len() / h;
        let grid = seq - 1;
        let patches = self.patches.embed(images);
        // Each image: its class token, then its patches; positions over all of them.
        let mut x = vec![0.0; images.len() * seq * h];
        x.par_chunks_mut(seq * h).zip(patches.par_chunks(grid * h)).for_each(|(img, p)| {
            img[..h].copy_from_slice(&self.class);
            img[h..].copy_from_slice(p);
            enc::add_rows(img, &self.position);
        });
        self.encoder.norm_in_place(&mut x, &self.pre_norm);
        let (spans, _) = Span::pack(images.iter().map(|_| seq));
        self.encoder.forward(&mut x, &spans, false);
        let class = enc::gather_rows(&x, h, (0..images.len()).map(|i| i * seq));
        Ok(self.encoder.project_pooled(class, &self.post_norm, &self.projection))
    }
}

impl TextTower {
    fn forward(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.encoder.dims().hidden;
        let (mut x, spans) = self.embeddings.embed(texts)?;
        self.encoder.forward(&mut x, &spans, true);
        let ends = spans.iter().zip(texts).map(|(s, ids)| s.start + self.end.position(ids));
        let pooled = enc::gather_rows(&x, h, ends);
        Ok(self.encoder.project_pooled(pooled, &self.final_norm, &self.projection))
    }
}

impl ImageTextEncoder for Clip {
    fn embed_images(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.vision.forward(images)
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.text.forward(texts)
    }

    fn shape(&self) -> TowerShape {
        TowerShape {
            dimension: self.dimension,
            image_size: self.vision.image_size,
            max_text_tokens: self.text.embeddings.positions(),
            pads_text: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_text_token_is_found_as_transformers_finds_it() {
        assert_eq!(EndOfText::Id(7).position(&[0, 5, 7, 7, 7]), 2);
        assert_eq!(EndOfText::Id(7).position(&[0, 5, 6]), 0);
        assert_eq!(EndOfText::LargestId.position(&[49406, 320, 49407, 49407]), 2);
    }
}
