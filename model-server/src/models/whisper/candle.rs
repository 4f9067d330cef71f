//! Whisper on candle's ops, Whisper's GPU path: the network of `network.rs` (pre-LayerNorm
//! blocks, exact GELU, the two convolutions, per-sequence self-attention caches, per-window
//! cross-attention keys and values) read from the same checkpoints through `layout`. Matrices
//! and activations in the chosen float type (float16 on a GPU, as faster-whisper and Whisper
//! compute there); LayerNorm and softmax in float32, as Whisper's reference does under float16.
//! candle-transformers' Whisper is not used: it approximates GELU with tanh and recomputes the
//! whole prefix at every step.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::ops::{layer_norm, softmax_last_dim};

use super::layout::{self, Dims, Layout, Reads, Source};
use crate::models::{ModelError, causal_mask};

/// Whisper's LayerNorm epsilon.
const EPS: f32 = 1e-5;

/// `x·Wᵀ + b`, `W` as `[outputs, inputs]`.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `x` is `[rows, inputs]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// LayerNorm with float32 parameters, computed in float32 whatever the activations' type.
struct Norm {
    gamma: Tensor,
    beta: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let normed = layer_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.gamma, &self.beta, EPS)?;
        normed.to_dtype(x.dtype())
    }
}

/// A kernel-3 convolution over time, PyTorch's `[hidden, channels, 3]` weight.
struct Conv {
    weight: Tensor,
    /// `[1, hidden, 1]`, to add across the frames.
    bias: Tensor,
}

type EncoderLayer = layout::EncoderLayer<Norm, Linear>;
type DecoderLayer = layout::DecoderLayer<Norm, Linear>;

pub struct CandleNetwork {
    pub dims: Dims,
    device: Device,
    dtype: DType,
    conv1: Conv,
    conv2: Conv,
    encoder_positions: Tensor,
    encoder_layers: Vec<EncoderLayer>,
    encoder_norm: Norm,
    /// `[vocab × hidden]`: the token lookups and the tied output projection.
    embeddings: Tensor,
    decoder_positions: Tensor,
    decoder_layers: Vec<DecoderLayer>,
    decoder_norm: Norm,
}

/// One window's cross-attention keys and values, per decoder layer, each `[heads, positions,
/// head width]` on the device.
pub struct Audio {
    cross: Vec<(Tensor, Tensor)>,
}

/// One sequence's self-attention keys and values so far, per decoder layer, as [`Audio`]'s.
pub struct Sequence {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

/// One sequence's part of a decoder step.
pub type Step<'a> = layout::Step<'a, Audio, Sequence>;

/// Reads one layout's weights onto the device.
struct Reader<'a> {
    source: &'a dyn Source,
    layout: Layout,
    device: &'a Device,
    dtype: DType,
}

impl Reader<'_> {
    /// The tensor `name` of `shape` in `dtype` on the device; float16 files go up as stored.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        let t = self.source.get(name, shape)?;
        let host = match t.to_f16() {
            Some(halves) if dtype == DType::F16 => Tensor::from_vec(halves, shape, &Device::Cpu)?,
            _ => Tensor::from_vec(t.to_vec(), shape, &Device::Cpu)?.to_dtype(dtype)?,
        };
        Ok(host.to_device(self.device)?)
    }

    fn conv(&self, prefix: &str, channels: usize, hidden: usize) -> Result<Conv, ModelError> {
        Ok(Conv {
            weight: self.tensor(&self.layout.weight(prefix), &[hidden, channels, 3], self.dtype)?,
            bias: self.tensor(&self.layout.bias(prefix), &[hidden], self.dtype)?.reshape((1, hidden, 1))?,
        })
    }
}

impl Reads for Reader<'_> {
    type Norm = Norm;
    type Linear = Linear;

    fn norm(&self, prefix: &str, hidden: usize) -> Result<Norm, ModelError> {
        let (gamma, beta) = self.layout.gamma_beta(prefix);
        Ok(Norm {
            gamma: self.tensor(&gamma, &[hidden], DType::F32)?,
            beta: self.tensor(&beta, &[hidden], DType::F32)?,
        })
    }

    fn linear(
        &self,
        parts: &[String],
        inputs: usize,
        outputs: usize,
        scaled: usize,
        scale: f32,
    ) -> Result<Linear, ModelError> {
        let each = outputs / parts.len().max(1);
        let mut weight = Vec::with_capacity(outputs * inputs);
        for p in parts {
            weight.extend(self.source.get(&self.layout.weight(p), &[each, inputs])?.to_vec());
        }
        weight[..scaled * inputs].iter_mut().for_each(|v| *v *= scale);
        let bias = self.layout.stacked_bias(self.source, parts, each, scaled, scale)?;
        let upload = |values: Vec<f32>, shape: &[usize]| -> Result<Tensor, ModelError> {
            Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_device(self.device)?)
        };
        Ok(Linear { weight: upload(weight, &[outputs, inputs])?, bias: upload(bias, &[outputs])? })
    }
}

/// `softmax(q·kᵀ + mask)·v` over the last two dimensions (`q` pre-scaled), the scores and
/// softmax in float32.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.to_dtype(v.dtype())?.matmul(v)
}

impl CandleNetwork {
    /// The network in `source`, laid out as `layout`, of shape `dims`, in `dtype` (float32,
    /// float16 or bfloat16) on `device`.
    pub fn load(
        source: &dyn Source,
        layout: Layout,
        dims: Dims,
        device: &Device,
        dtype: DType,
    ) -> Result<CandleNetwork, ModelError> {
        dims.check()?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Unsupported(format!(
                "Whisper computes in float32, float16 or bfloat16, not {dtype:?}"
            )));
        }
        let r = Reader { source, layout, device, dtype };
        let (h, l) = (dims.hidden, layout);
        let encoder_layers = (0..dims.encoder_layers)
            .map(|i| EncoderLayer::read(&r, l, &dims, i))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let decoder_layers = (0..dims.decoder_layers)
            .map(|i| DecoderLayer::read(&r, l, &dims, i))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(CandleNetwork {
            dims,
            device: device.clone(),
            dtype,
            conv1: r.conv(&l.top("encoder", "conv1"), dims.mels, h)?,
            conv2: r.conv(&l.top("encoder", "conv2"), h, h)?,
            encoder_positions: r.tensor(&l.top("encoder", "positions"), &[dims.audio_ctx, h], dtype)?,
            encoder_layers,
            encoder_norm: r.norm(&l.top("encoder", "layer_norm"), h)?,
            embeddings: r.tensor(&l.top("decoder", "embeddings"), &[dims.vocab, h], dtype)?,
            decoder_positions: r.tensor(&l.top("decoder", "positions"), &[dims.text_ctx, h], dtype)?,
            decoder_layers,
            decoder_norm: r.norm(&l.top("decoder", "layer_norm"), h)?,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[rows, hidden]` into `[batch, heads, rows / batch, head width]`, contiguous.
    fn split_heads(&self, x: &Tensor, batch: usize, heads: usize) -> candle_core::Result<Tensor> {
        let (rows, h) = x.dims2()?;
        x.reshape((batch, rows / batch, heads, h / heads))?.transpose(1, 2)?.contiguous()
    }

    /// The inverse of [`Self::split_heads`].
    fn merge_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, heads, n, hd) = x.dims4()?;
        x.transpose(1, 2)?.reshape((batch * n, heads * hd))
    }

    /// `x + fc2(GELU(fc1(LN(x))))`.
    fn ffn(&self, x: &Tensor, norm: &Norm, fc1: &Linear, fc2: &Linear) -> candle_core::Result<Tensor> {
        x + fc2.forward(&fc1.forward(&norm.forward(x)?)?.gelu_erf()?)?
    }

    /// Encodes windows of log-mel features (each `[mels × frames]`, bin-major) together and
    /// projects each decoder layer's cross-attention keys and values of each.
    pub fn encode_batch(&self, mels: &[&[f32]]) -> Result<Vec<Audio>, ModelError> {
        let d = self.dims;
        let (frames, h, n, w) = (d.frames(), d.hidden, d.audio_ctx, mels.len());
        if let Some(mel) = mels.iter().find(|m| m.len() != d.mels * frames) {
            return Err(ModelError::Inference(format!(
                "{} mel values; the encoder takes {} bins × {frames} frames",
                mel.len(),
                d.mels
            )));
        }
        if w == 0 {
            return Ok(Vec::new());
        }
        let input =
            Tensor::from_vec(mels.concat(), (w, d.mels, frames), &self.device)?.to_dtype(self.dtype)?;
        let conv = |x: &Tensor, c: &Conv, stride| {
            x.conv1d(&c.weight, 1, stride, 1, 1)?.broadcast_add(&c.bias)?.gelu_erf()
        };
        let x = conv(&conv(&input, &self.conv1, 1)?, &self.conv2, 2)?;
        let mut x = x.transpose(1, 2)?.broadcast_add(&self.encoder_positions)?.reshape((w * n, h))?;
        let heads = d.encoder_heads;
        for layer in &self.encoder_layers {
            let qkv = layer.qkv.forward(&layer.attn_norm.forward(&x)?)?;
            let part = |i: usize| self.split_heads(&qkv.narrow(1, i * h, h)?, w, heads);
            let ctx = attend(&part(0)?, &part(1)?, &part(2)?, None)?;
            x = (&x + layer.attn_out.forward(&self.merge_heads(&ctx)?)?)?;
            x = self.ffn(&x, &layer.ffn_norm, &layer.fc1, &layer.fc2)?;
        }
        let x = self.encoder_norm.forward(&x)?;
        let mut cross: Vec<Vec<(Tensor, Tensor)>> = (0..w).map(|_| Vec::new()).collect();
        for layer in &self.decoder_layers {
            let kv = layer.cross_kv.forward(&x)?;
            let k = self.split_heads(&kv.narrow(1, 0, h)?, w, d.decoder_heads)?;
            let v = self.split_heads(&kv.narrow(1, h, h)?, w, d.decoder_heads)?;
            for (i, audio) in cross.iter_mut().enumerate() {
                audio.push((k.i(i)?, v.i(i)?));
            }
        }
        Ok(cross.into_iter().map(|cross| Audio { cross }).collect())
    }

    /// A sequence with nothing decoded yet.
    pub fn sequence(&self) -> Sequence {
        Sequence { self_kv: vec![None; self.dims.decoder_layers], len: 0 }
    }

    /// One decoder step of several sequences together, each against its own window: the
    /// projections and feed-forwards run once over the rows of all of them, attention per
    /// sequence. Returns, per step, the logits after its last token. No cache changes unless
    /// every step succeeded.
    pub fn decode_batch(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.dims;
        let (h, heads) = (d.hidden, d.decoder_heads);
        for step in steps.iter() {
            d.check_step(step.seq.len, step.tokens)?;
            if step.audio.cross.len() != d.decoder_layers || step.seq.self_kv.len() != d.decoder_layers {
                return Err(ModelError::Inference("a window or sequence of another model".to_string()));
            }
        }
        let mut starts = Vec::with_capacity(steps.len());
        let (mut ids, mut positions, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for step in steps.iter() {
            starts.push(ids.len());
            ids.extend_from_slice(step.tokens);
            positions.extend((step.seq.len..step.seq.len + step.tokens.len()).map(|p| p as u32));
            last.push((ids.len() - 1) as u32);
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let pos_t = Tensor::new(positions.as_slice(), &self.device)?;
        let mut x =
            (self.embeddings.index_select(&ids_t, 0)? + self.decoder_positions.index_select(&pos_t, 0)?)?;
        // The caches each step will hold once every step has succeeded.
        let mut caches: Vec<Vec<(Tensor, Tensor)>> = steps.iter().map(|_| Vec::new()).collect();
        // Each sequence's causal mask, once for every layer.
        let masks = steps
            .iter()
            .map(|s| match s.tokens.len() {
                n if n > 1 => causal_mask(n, s.seq.len, &self.device).map(Some),
                _ => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (l, layer) in self.decoder_layers.iter().enumerate() {
            let qkv = layer.self_qkv.forward(&layer.self_norm.forward(&x)?)?;
            let mut ctx = Vec::with_capacity(steps.len());
            for (((step, &start), cache), mask) in
                steps.iter().zip(&starts).zip(caches.iter_mut()).zip(&masks)
            {
                let n = step.tokens.len();
                let rows = qkv.narrow(0, start, n)?;
                let part = |i: usize| -> candle_core::Result<Tensor> {
                    self.split_heads(&rows.narrow(1, i * h, h)?, 1, heads)?.squeeze(0)
                };
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                let (k, v) = match &step.seq.self_kv[l] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
                    None => (k, v),
                };
                ctx.push(self.merge_heads(&attend(&q, &k, &v, mask.as_ref())?.unsqueeze(0)?)?);
                cache.push((k, v));
            }
            x = (&x + layer.self_out.forward(&Tensor::cat(&ctx, 0)?)?)?;
            let q = layer.cross_q.forward(&layer.cross_norm.forward(&x)?)?;
            let mut ctx = Vec::with_capacity(steps.len());
            for (step, &start) in steps.iter().zip(&starts) {
                let q = self.split_heads(&q.narrow(0, start, step.tokens.len())?, 1, heads)?.squeeze(0)?;
                let (k, v) = &step.audio.cross[l];
                ctx.push(self.merge_heads(&attend(&q, k, v, None)?.unsqueeze(0)?)?);
            }
            x = (&x + layer.cross_out.forward(&Tensor::cat(&ctx, 0)?)?)?;
            x = self.ffn(&x, &layer.ffn_norm, &layer.fc1, &layer.fc2)?;
        }
        let last =
            self.decoder_norm.forward(&x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?)?;
        let logits = last.matmul(&self.embeddings.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (step, cache) in steps.iter_mut().zip(caches) {
            step.seq.self_kv = cache.into_iter().map(Some).collect();
            step.seq.len += step.tokens.len();
        }
        Ok(logits)
    }
}
