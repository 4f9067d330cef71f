//! The pre-LayerNorm transformer encoder of CLIP's towers, which SigLIP's copy (transformers'
//! `SiglipEncoderLayer` is `CLIPEncoderLayer`): per layer `x += attn(LN1(x))·Wo + bo`, then
//! `x += act(LN2(x)·W1 + b1)·W2 + b2`, on sequences packed into one `[tokens, hidden]` matrix
//! (no padding computed). Loaded from the Hugging Face names those towers share
//! (`layers.N.self_attn.{q,k,v,out}_proj`, `layer_norm1`, `mlp.fc1`, `mlp.fc2`, `layer_norm2`).
//!
//! As in the packed BERT encoder: Q, K and V fused into one matrix with 1/√d folded into Q,
//! matmuls accumulating onto the residual, attention per (sequence, head) on strided views.

use rayon::prelude::*;

use super::attention::{Mask, attend_head};
use super::gemm::{self as matmul, Linear, SharedOut, View, Weight};
use super::{Activation, HeadView, Isa, Norm};
use crate::models::ModelError;
use crate::weights::tensors::Scope;

/// Tokens per feed-forward block: bounds the `[block, intermediate]` buffer whatever the batch.
const FFN_BLOCK: usize = 1024;
/// Sequences up to this many tokens without a mask get attention computed directly.
const SMALL_ATTENTION_TOKENS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderDims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub eps: f32,
    pub activation: Activation,
}

impl EncoderDims {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }
}

/// Where one sequence's tokens sit in the packed matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    /// Consecutive spans of the given lengths, and the total.
    pub fn pack(lens: impl IntoIterator<Item = usize>) -> (Vec<Span>, usize) {
        let mut total = 0;
        let spans = lens
            .into_iter()
            .map(|len| {
                let span = Span { start: total, len };
                total += len;
                span
            })
            .collect();
        (spans, total)
    }
}

struct Layer {
    norm1: Norm,
    /// `[hidden, 3·hidden]`: columns Q·(1/√d) | K | V.
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

pub struct PreNormEncoder {
    dims: EncoderDims,
    layers: Vec<Layer>,
    isa: Isa,
}

/// A linear layer from `weight` (`[out, in]`) and `bias` (zeros when `bias` is false).
pub fn load_linear(s: &Scope, out: usize, inp: usize, bias: bool) -> Result<Linear, ModelError> {
    let w = s.get("weight", &[out, inp])?;
    let bias = if bias { s.get("bias", &[out])?.to_vec() } else { vec![0.0; out] };
    Ok(Linear { weight: Weight::from_output_rows(inp, out, |o, row| w.read_row(o, row)), bias })
}

pub fn load_norm(s: &Scope, h: usize) -> Result<Norm, ModelError> {
    Ok(Norm { gamma: s.get("weight", &[h])?.to_vec(), beta: s.get("bias", &[h])?.to_vec() })
}

/// Q, K and V projections as one `[hidden, 3·hidden]` layer, 1/√d folded into Q.
fn load_qkv(s: &Scope, d: &EncoderDims) -> Result<Linear, ModelError> {
    let h = d.hidden;
    let scale = (1.0 / (d.head_dim() as f64).sqrt()) as f32;
    let parts = ["q_proj", "k_proj", "v_proj"].map(|p| s.scope(p));
    let mut weights = Vec::with_capacity(3);
    let mut bias = Vec::with_capacity(3 * h);
    for (i, part) in parts.iter().enumerate() {
        weights.push(part.get("weight", &[h, h])?);
        let k = if i == 0 { scale } else { 1.0 };
        bias.extend(part.get("bias", &[h])?.to_vec().into_iter().map(|b| b * k));
    }
    let weight = Weight::from_output_rows(h, 3 * h, |o, row| {
        weights[o / h].read_row(o % h, row);
        if o < h {
            row.iter_mut().for_each(|w| *w *= scale);
        }
    });
    Ok(Linear { weight, bias })
}

fn load_layer(s: &Scope, d: &EncoderDims) -> Result<Layer, ModelError> {
    let (h, i) = (d.hidden, d.intermediate);
    Ok(Layer {
        norm1: load_norm(&s.scope("layer_norm1"), h)?,
        qkv: load_qkv(&s.scope("self_attn"), d)?,
        out: load_linear(&s.scope("self_attn.out_proj"), h, h, true)?,
        norm2: load_norm(&s.scope("layer_norm2"), h)?,
        fc1: load_linear(&s.scope("mlp.fc1"), i, h, true)?,
        fc2: load_linear(&s.scope("mlp.fc2"), h, i, true)?,
    })
}

impl PreNormEncoder {
    /// The layers under `scope` (`text_model.encoder`), in parallel on the current pool.
    pub fn load(scope: &Scope, dims: EncoderDims) -> Result<Self, ModelError> {
        if dims.heads == 0 || !dims.hidden.is_multiple_of(dims.heads) {
            return Err(ModelError::Inference(format!(
                "hidden size {} is not a multiple of {} attention heads",
                dims.hidden, dims.heads
            )));
        }
        let layers = (0..dims.layers)
            .into_par_iter()
            .map(|l| load_layer(&scope.scope(&format!("layers.{l}")), &dims))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreNormEncoder { dims, layers, isa: Isa::chosen() })
    }

    pub fn dims(&self) -> &EncoderDims {
        &self.dims
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Run every layer over `x` (`[tokens, hidden]`, the sequences at `spans`); each sequence
    /// attends within itself, causally when `causal`.
    pub fn forward(&self, x: &mut [f32], spans: &[Span], causal: bool) {
        let h = self.dims.hidden;
        let tokens = x.len() / h;
        let threads = rayon::current_num_threads();
        let mut normed = vec![0.0; tokens * h];
        let mut qkv = vec![0.0; tokens * 3 * h];
        let mut ctx = vec![0.0; tokens * h];
        let mut up = vec![0.0; tokens.min(FFN_BLOCK) * self.dims.intermediate];
        for layer in &self.layers {
            self.norm_into(x, &mut normed, &layer.norm1);
            fill_rows(&mut qkv, &layer.qkv.bias);
            matmul::linear(&mut qkv, &normed, &layer.qkv.weight, true, threads);
            self.attention(&qkv, &mut ctx, spans, causal);
            add_rows(x, &layer.out.bias);
            matmul::linear(x, &ctx, &layer.out.weight, true, threads);
            self.norm_into(x, &mut normed, &layer.norm2);
            for (xb, nb) in x.chunks_mut(FFN_BLOCK * h).zip(normed.chunks(FFN_BLOCK * h)) {
                let rows = xb.len() / h;
                let up = &mut up[..rows * self.dims.intermediate];
                matmul::linear(up, nb, &layer.fc1.weight, false, threads);
                super::par_rows(up, self.dims.intermediate, |r| {
                    super::bias_activation(r, &layer.fc1.bias, self.dims.activation, self.isa)
                });
                add_rows(xb, &layer.fc2.bias);
                matmul::linear(xb, up, &layer.fc2.weight, true, threads);
            }
        }
    }

    /// `ctx = softmax(Q·Kᵀ)·V` for every (sequence, head), in parallel over those pairs.
    fn attention(&self, qkv: &[f32], ctx: &mut [f32], spans: &[Span], causal: bool) {
        let (h, heads, d) = (self.dims.hidden, self.dims.heads, self.dims.head_dim());
        let out = SharedOut::new(ctx);
        super::team::for_each(spans.len() * heads, &|item| {
            let (span, head) = (spans[item / heads], item % heads);
            let n = span.len;
            if n == 0 {
                return;
            }
            let stride = 3 * h;
            let base = span.start * stride + head * d;
            let rows = |offset| View { offset, rows: n, cols: d, row_stride: stride, col_stride: 1 };
            let o =
                View { offset: span.start * h + head * d, rows: n, cols: d, row_stride: h, col_stride: 1 };
            if !causal && n <= SMALL_ATTENTION_TOKENS {
                let view = HeadView { q: base, k: base + h, v: base + 2 * h, stride, out_stride: h, n, d };
                // SAFETY: item ↦ (sequence, head) is one-to-one, so this task alone writes the n
                // rows of d floats at `o.offset`, h apart; `ctx` outlives the loop.
                unsafe { super::small_attention(qkv, view, out.at(o.offset), self.isa) };
                return;
            }
            let mask = if causal { Mask::Causal { first: 0 } } else { Mask::None };
            // SAFETY: as above, each task writes its own block of `ctx`.
            unsafe {
                attend_head(
                    (qkv, rows(base)),
                    (qkv, rows(base + h), rows(base + 2 * h)),
                    (&out, o),
                    mask,
                    self.isa,
                )
            };
        });
    }

    /// A tower's output: the pooled rows through a LayerNorm and a projection, one vector each.
    pub fn project_pooled(&self, mut pooled: Vec<f32>, norm: &Norm, projection: &Linear) -> Vec<Vec<f32>> {
        self.norm_in_place(&mut pooled, norm);
        let width = projection.bias.len();
        let mut out = vec![0.0; pooled.len() / self.dims.hidden * width];
        project(&mut out, &pooled, projection);
        out.chunks_exact(width).map(<[f32]>::to_vec).collect()
    }

    /// `out = LayerNorm(x)`, row by row.
    pub fn norm_into(&self, x: &[f32], out: &mut [f32], norm: &Norm) {
        let out = &mut out[..x.len()];
        out.copy_from_slice(x);
        self.norm_in_place(out, norm);
    }

    pub fn norm_in_place(&self, x: &mut [f32], norm: &Norm) {
        let zero = vec![0.0; norm.gamma.len()];
        let eps = self.dims.eps;
        super::par_rows(x, norm.gamma.len(), |r| {
            super::bias_layer_norm(r, &zero, &norm.gamma, &norm.beta, eps, self.isa)
        });
    }
}

/// Every row of `dst` set to `row`.
pub fn fill_rows(dst: &mut [f32], row: &[f32]) {
    dst.chunks_exact_mut(row.len()).for_each(|r| r.copy_from_slice(row));
}

/// `row` added to every row of `dst`.
pub fn add_rows(dst: &mut [f32], row: &[f32]) {
    dst.chunks_exact_mut(row.len()).for_each(|r| r.iter_mut().zip(row).for_each(|(d, b)| *d += b));
}

/// `dst[t] = x[t]·W + b` for every row.
pub fn project(dst: &mut [f32], x: &[f32], w: &Linear) {
    fill_rows(dst, &w.bias);
    matmul::linear(dst, x, &w.weight, true, rayon::current_num_threads());
}

/// A vision transformer's patch embedding: a convolution whose stride is its kernel size, run
/// as a linear layer over each patch's pixels, in the order the `[hidden, channels, p, p]`
/// kernel flattens them (channel, row, column).
pub struct PatchEmbedding {
    linear: Linear,
    patch: usize,
    channels: usize,
}

impl PatchEmbedding {
    /// The convolution under `s` (`vision_model.embeddings.patch_embedding`).
    pub fn load(
        s: &Scope,
        hidden: usize,
        channels: usize,
        patch: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let w = s.get("weight", &[hidden, channels, patch, patch])?;
        let inp = channels * patch * patch;
        // The tensor's rows are its last dimension: one kernel is `channels·patch` of them.
        let weight = Weight::from_output_rows(inp, hidden, |o, row| w.read_rows(o * channels * patch, row));
        let bias = if bias { s.get("bias", &[hidden])?.to_vec() } else { vec![0.0; hidden] };
        Ok(PatchEmbedding { linear: Linear { weight, bias }, patch, channels })
    }

    /// Patches per image of `height × width` pixels.
    pub fn grid(&self, height: usize, width: usize) -> usize {
        (height / self.patch) * (width / self.patch)
    }

    /// `[images · grid, hidden]`: each image's patches, row by row of the patch grid. Images
    /// must be `channels × height × width` with sides multiples of the patch.
    pub fn embed(&self, images: &[&crate::images::preprocess::PixelValues]) -> Vec<f32> {
        let (p, c) = (self.patch, self.channels);
        let inp = c * p * p;
        let rows: usize = images.iter().map(|i| self.grid(i.height, i.width)).sum();
        let mut cols = vec![0.0; rows * inp];
        let mut at = 0;
        for image in images {
            let (h, w) = (image.height, image.width);
            for gy in 0..h / p {
                for gx in 0..w / p {
                    let dst = &mut cols[at * inp..][..inp];
                    for ch in 0..c {
                        for ky in 0..p {
                            let src = ch * h * w + (gy * p + ky) * w + gx * p;
                            dst[(ch * p + ky) * p..][..p].copy_from_slice(&image.data[src..src + p]);
                        }
                    }
                    at += 1;
                }
            }
        }
        let mut out = vec![0.0; rows * self.linear.bias.len()];
        project(&mut out, &cols, &self.linear);
        out
    }
}

/// A text tower's input: token plus position embeddings (CLIP's and SigLIP's, no norm after).
pub struct TokenEmbedding {
    token: Vec<f32>,
    position: Vec<f32>,
    hidden: usize,
    vocab: usize,
    positions: usize,
}

impl TokenEmbedding {
    /// `token_embedding.weight` and `position_embedding.weight` under `s` (`text_model.embeddings`).
    pub fn load(s: &Scope, vocab: usize, positions: usize, hidden: usize) -> Result<Self, ModelError> {
        Ok(TokenEmbedding {
            token: s.get("token_embedding.weight", &[vocab, hidden])?.to_vec(),
            position: s.get("position_embedding.weight", &[positions, hidden])?.to_vec(),
            hidden,
            vocab,
            positions,
        })
    }

    /// Tokens a text may have.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The packed `[tokens, hidden]` input of `texts`, and where each sits; a text too long or
    /// with an id outside the vocabulary is refused.
    pub fn embed(&self, texts: &[&[u32]]) -> Result<(Vec<f32>, Vec<Span>), ModelError> {
        for ids in texts {
            if ids.len() > self.positions {
                return Err(ModelError::Inference(format!(
                    "{} tokens; the text tower takes {}",
                    ids.len(),
                    self.positions
                )));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(ModelError::Inference(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
        }
        let h = self.hidden;
        let (spans, tokens) = Span::pack(texts.iter().map(|t| t.len()));
        let mut x = vec![0.0; tokens * h];
        for (ids, span) in texts.iter().zip(&spans) {
            for (pos, &id) in ids.iter().enumerate() {
                let row = &mut x[(span.start + pos) * h..][..h];
                let (tok, p) = (&self.token[id as usize * h..][..h], &self.position[pos * h..][..h]);
                row.iter_mut().zip(tok).zip(p).for_each(|((r, t), p)| *r = t + p);
            }
        }
        Ok((x, spans))
    }
}

/// The activation `config.json` at `path` names, or an error naming the ones the kernels have.
pub fn activation(path: &std::path::Path, name: &str) -> Result<Activation, ModelError> {
    Activation::from_name(name).ok_or_else(|| ModelError::Files {
        path: path.display().to_string(),
        message: format!(
            "hidden_act {name:?} is not one this build runs (gelu, gelu_pytorch_tanh, quick_gelu)"
        ),
    })
}

/// Every image must be `3 × size × size`, what the vision tower was built for.
pub fn check_images(
    images: &[&crate::images::preprocess::PixelValues],
    size: usize,
) -> Result<(), ModelError> {
    match images.iter().find(|i| i.height != size || i.width != size || i.data.len() != 3 * size * size) {
        Some(bad) => Err(ModelError::Inference(format!(
            "pixel values of {}x{}; the vision tower takes {size}x{size}",
            bad.width, bad.height
        ))),
        None => Ok(()),
    }
}

/// `rows` of `x` (rows of `hidden`), one after another: the tokens a tower pools.
pub fn gather_rows(x: &[f32], hidden: usize, rows: impl Iterator<Item = usize>) -> Vec<f32> {
    rows.flat_map(|r| x[r * hidden..][..hidden].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::preprocess::PixelValues;

    /// A 5 × 5 image in 2-pixel patches: four patches, the last row and column dropped, as a
    /// convolution of stride 2 drops them; each output is the patch's pixels through the kernel.
    #[test]
    fn patches_follow_the_kernel_layout_and_drop_the_border() {
        let (c, p, side) = (2, 2, 5);
        let data: Vec<f32> = (0..c * side * side).map(|i| i as f32).collect();
        let image = PixelValues { height: side, width: side, data: data.clone() };
        // Output 0 sums every pixel; output 1 reads channel 1's bottom-right pixel of the patch.
        let inp = c * p * p;
        let mut dense = vec![0.0; inp * 2];
        for i in 0..inp {
            dense[i * 2] = 1.0;
        }
        // Channel 1, kernel row 1, column 1: (channel·p + row)·p + column.
        let corner = (p + 1) * p + 1;
        dense[corner * 2 + 1] = 1.0;
        let embedding = PatchEmbedding {
            linear: Linear { weight: Weight::new(&dense, inp, 2), bias: vec![0.0, 0.5] },
            patch: p,
            channels: c,
        };
        assert_eq!(embedding.grid(side, side), 4);
        let out = embedding.embed(&[&image]);
        assert_eq!(out.len(), 4 * 2);
        let px = |ch: usize, y: usize, x: usize| data[ch * side * side + y * side + x];
        for (k, (gy, gx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
            let sum: f32 = (0..c)
                .flat_map(|ch| (0..p).flat_map(move |y| (0..p).map(move |x| (ch, gy * p + y, gx * p + x))))
                .map(|(ch, y, x)| px(ch, y, x))
                .sum();
            assert_eq!(out[k * 2], sum, "patch {k}");
            assert_eq!(out[k * 2 + 1], px(1, gy * p + 1, gx * p + 1) + 0.5, "patch {k}");
        }
    }
}
