//! SigLIP (`model_type: siglip`): two towers trained with a sigmoid loss into one space.
//! - vision: patch embedding + positions, the pre-LayerNorm encoder, `post_layernorm`, then the
//!   attention-pooling head (a learned probe attends over the patches, `nn.MultiheadAttention`
//!   with one fused in-projection, then `x + MLP(LayerNorm(x))`);
//! - text: token + position embeddings over texts padded to `max_position_embeddings` (as the
//!   model was trained, so padding is attended), the encoder, `final_layer_norm`, and the last
//!   token through `head`.
//!
//! Features come out unnormalised; the family normalises them as SigLIP's forward does.
//!
//! This is the CPU path; [`candle`] is candle-transformers' SigLIP on any candle device, the
//! path a GPU runs.

pub mod candle;

use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;

use crate::images::preprocess::PixelValues;
use crate::kernels::Norm;
use crate::kernels::attention::{Mask, attend_head};
use crate::kernels::encoder::{
    self as enc, EncoderDims, PatchEmbedding, PreNormEncoder, Span, TokenEmbedding, load_linear, load_norm,
};
use crate::kernels::gemm::{Linear, SharedOut, View};
use crate::models::{ImageTextEncoder, ModelError, TowerShape};
use crate::weights::read_json;
use crate::weights::tensors::{Scope, Tensors};

/// `config.json`, with transformers' defaults for what a checkpoint leaves out.
#[derive(Debug, Clone, Deserialize)]
pub struct SiglipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
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
    /// The head's output width; the hidden size when absent.
    pub projection_size: Option<usize>,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 32000,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 64,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
            projection_size: None,
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
    pub vision_use_head: bool,
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
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
            vision_use_head: true,
        }
    }
}

impl SiglipConfig {
    /// `dir/config.json`, refused where the towers would not share a space or a part either
    /// path needs is missing.
    pub fn read(dir: &Path) -> Result<SiglipConfig, ModelError> {
        let path = dir.join("config.json");
        let config: SiglipConfig = read_json(&path)?;
        let (t, v) = (&config.text_config, &config.vision_config);
        if t.projection_size.is_some_and(|p| p != v.hidden_size) {
            return Err(ModelError::Files {
                path: path.display().to_string(),
                message: format!(
                    "text projection_size {} differs from the vision hidden size {}: the towers would not share a space",
                    t.projection_size.unwrap_or_default(),
                    v.hidden_size
                ),
            });
        }
        if !v.vision_use_head {
            return Err(ModelError::Unsupported(
                "a SigLIP vision tower without its attention-pooling head (vision_use_head: false)".into(),
            ));
        }
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

struct TextTower {
    embeddings: TokenEmbedding,
    encoder: PreNormEncoder,
    final_norm: Norm,
    head: Linear,
}

/// The attention-pooling head: one query (the probe, projected once at load) per image.
struct PoolingHead {
    /// The probe through the query projection, 1/√d folded in: `[hidden]`.
    query: Vec<f32>,
    /// `[hidden, 2·hidden]`: K | V.
    kv: Linear,
    out: Linear,
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

struct VisionTower {
    patches: PatchEmbedding,
    position: Vec<f32>,
    encoder: PreNormEncoder,
    post_norm: Norm,
    head: PoolingHead,
    image_size: usize,
}

pub struct Siglip {
    text: TextTower,
    vision: VisionTower,
}

impl Siglip {
    pub fn load(dir: &Path) -> Result<Siglip, ModelError> {
        let path = dir.join("config.json");
        let config = SiglipConfig::read(dir)?;
        let (t, v) = (&config.text_config, &config.vision_config);
        let text_dims = EncoderDims {
            hidden: t.hidden_size,
            heads: t.num_attention_heads,
            intermediate: t.intermediate_size,
            layers: t.num_hidden_layers,
            eps: t.layer_norm_eps as f32,
            activation: enc::activation(&path, &t.hidden_act)?,
        };
        let vision_dims = EncoderDims {
            hidden: v.hidden_size,
            heads: v.num_attention_heads,
            intermediate: v.intermediate_size,
            layers: v.num_hidden_layers,
            eps: v.layer_norm_eps as f32,
            activation: enc::activation(&path, &v.hidden_act)?,
        };
        let tensors = Tensors::open(dir)?;
        let root = tensors.scope("");
        let (text, vision) = rayon::join(
            || load_text(&root.scope("text_model"), t, text_dims),
            || load_vision(&root.scope("vision_model"), v, vision_dims),
        );
        Ok(Siglip { text: text?, vision: vision? })
    }
}

fn load_text(s: &Scope, c: &TextConfig, dims: EncoderDims) -> Result<TextTower, ModelError> {
    let h = c.hidden_size;
    Ok(TextTower {
        embeddings: TokenEmbedding::load(&s.scope("embeddings"), c.vocab_size, c.max_position_embeddings, h)?,
        encoder: PreNormEncoder::load(&s.scope("encoder"), dims)?,
        final_norm: load_norm(&s.scope("final_layer_norm"), h)?,
        head: load_linear(&s.scope("head"), c.projection_size.unwrap_or(h), h, true)?,
    })
}

fn load_vision(s: &Scope, c: &VisionConfig, dims: EncoderDims) -> Result<VisionTower, ModelError> {
    let h = c.hidden_size;
    let patches =
        PatchEmbedding::load(&s.scope("embeddings.patch_embedding"), h, c.num_channels, c.patch_size, true)?;
    let grid = patches.grid(c.image_size, c.image_size);
    let head = s.scope("head");
    let probe = head.get("probe", &[1, 1, h])?.to_vec();
    let attention = head.scope("attention");
    let in_w = attention.get("in_proj_weight", &[3 * h, h])?;
    let in_b = attention.get("in_proj_bias", &[3 * h])?.to_vec();
    let scale = 1.0 / (dims.head_dim() as f32).sqrt();
    // The probe is a constant: its query is computed once here.
    let mut row = vec![0.0; h];
    let query = (0..h)
        .map(|o| {
            in_w.read_row(o, &mut row);
            (row.iter().zip(&probe).map(|(w, p)| w * p).sum::<f32>() + in_b[o]) * scale
        })
        .collect();
    let kv = Linear {
        weight: crate::kernels::gemm::Weight::from_output_rows(h, 2 * h, |o, r| in_w.read_row(h + o, r)),
        bias: in_b[h..].to_vec(),
    };
    Ok(VisionTower {
        patches,
        position: s.scope("embeddings").get("position_embedding.weight", &[grid, h])?.to_vec(),
        encoder: PreNormEncoder::load(&s.scope("encoder"), dims)?,
        post_norm: load_norm(&s.scope("post_layernorm"), h)?,
        head: PoolingHead {
            query,
            kv,
            out: load_linear(&attention.scope("out_proj"), h, h, true)?,
            norm: load_norm(&head.scope("layernorm"), h)?,
            fc1: load_linear(&head.scope("mlp.fc1"), dims.intermediate, h, true)?,
            fc2: load_linear(&head.scope("mlp.fc2"), h, dims.intermediate, true)?,
        },
        image_size: c.image_size,
    })
}

impl VisionTower {
    fn forward(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        enc::check_images(images, self.image_size)?;
        let d = *self.encoder.dims();
        let h = d.hidden;
        let grid = self.position.len() / h;
        let mut x = self.patches.embed(images);
        x.par_chunks_mut(grid * h).for_each(|img| enc::add_rows(img, &self.position));
        let (spans, _) = Span::pack(images.iter().map(|_| grid));
        self.encoder.forward(&mut x, &spans, false);
        self.encoder.norm_in_place(&mut x, &self.post_norm);
        // Attention pooling: the probe's query over each image's patches.
        let head = &self.head;
        let mut kv = vec![0.0; x.len() * 2];
        enc::project(&mut kv, &x, &head.kv);
        let n = images.len();
        let mut pooled = vec![0.0; n * h];
        let (heads, hd) = (d.heads, d.head_dim());
        let out = SharedOut::new(&mut pooled);
        (0..n * heads).into_par_iter().for_each(|item| {
            let (image, hh) = (item / heads, item % heads);
            let q = View { offset: hh * hd, rows: 1, cols: hd, row_stride: h, col_stride: 1 };
            let kvv = |offset| View {
                offset: image * grid * 2 * h + offset + hh * hd,
                rows: grid,
                cols: hd,
                row_stride: 2 * h,
                col_stride: 1,
            };
            let o = View { offset: image * h + hh * hd, rows: 1, cols: hd, row_stride: h, col_stride: 1 };
            // SAFETY: item ↦ (image, head) is one-to-one, so each task writes its own block of
            // `pooled`, which outlives the loop.
            unsafe {
                attend_head(
                    (&head.query, q),
                    (&kv, kvv(0), kvv(h)),
                    (&out, o),
                    Mask::None,
                    self.encoder.isa(),
                )
            };
        });
        let mut attended = vec![0.0; n * h];
        enc::project(&mut attended, &pooled, &head.out);
        // x + MLP(LayerNorm(x))
        let mut normed = vec![0.0; n * h];
        self.encoder.norm_into(&attended, &mut normed, &head.norm);
        let mut up = vec![0.0; n * d.intermediate];
        enc::project(&mut up, &normed, &head.fc1);
        crate::kernels::bias_activation(
            &mut up,
            &vec![0.0; d.intermediate],
            d.activation,
            self.encoder.isa(),
        );
        enc::add_rows(&mut attended, &head.fc2.bias);
        crate::kernels::gemm::linear(
            &mut attended,
            &up,
            &head.fc2.weight,
            true,
            rayon::current_num_threads(),
        );
        Ok(attended.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }
}

impl TextTower {
    fn forward(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.encoder.dims().hidden;
        let (mut x, spans) = self.embeddings.embed(texts)?;
        self.encoder.forward(&mut x, &spans, false);
        // Only each text's last token goes on: final LayerNorm and head on those rows alone.
        let last = enc::gather_rows(&x, h, spans.iter().map(|s| s.start + s.len.saturating_sub(1)));
        Ok(self.encoder.project_pooled(last, &self.final_norm, &self.head))
    }
}

impl ImageTextEncoder for Siglip {
    fn embed_images(&self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.vision.forward(images)
    }

    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.text.forward(texts)
    }

    fn shape(&self) -> TowerShape {
        TowerShape {
            dimension: self.vision.encoder.dims().hidden,
            image_size: self.vision.image_size,
            max_text_tokens: self.text.embeddings.positions(),
            pads_text: true,
        }
    }
}
