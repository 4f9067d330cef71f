//! The GPU path of the Llama decoder: the packed CPU decoder's network on candle's tensor ops
//! and quantized matmuls (on a CUDA device: candle's quantized kernels and cuBLAS), from the same
//! weights ([`Weights`]: a GGUF file's blocks as stored, or a checkpoint quantized as on the CPU).
//! A step runs the rows of all its sequences through each projection at once, so the weights
//! are read once per step however many sequences step; attention runs per sequence against its
//! own cache. (candle-transformers' quantized Llama keeps one sequence's cache inside the model,
//! so sequences could only step one after another, each reading all the weights.)
//!
//! A step is all-or-nothing: each sequence's new keys and values are kept aside and replace its
//! cache only when the whole step has succeeded, so a failed step leaves every cache as it was.

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope_i;

use super::{FromWeights, LlamaConfig, Step, WeightSource, Weights, rotary_tables};
use crate::models::{ModelError, causal_mask};

struct Layer {
    attn_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct CandleLlama {
    cfg: LlamaConfig,
    device: Device,
    /// The token table dequantized, `[vocab, hidden]`: lookups of exact rows, as on the CPU.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// `[context, head_dim / 2]`, the CPU path's tables.
    cos: Tensor,
    sin: Tensor,
}

/// One sequence's keys and values on the device, per layer `[kv_heads, positions, head_dim]`.
pub struct CandleCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl FromWeights for CandleLlama {
    /// float16, as checkpoints are stored: cuBLAS's half-precision matmuls, no requantizing.
    const CHECKPOINT_MATRICES: GgmlDType = GgmlDType::F16;

    /// The model on `device`; its weights stay as stored (GGUF blocks for candle's quantized
    /// matmuls), the token table dequantized for lookups.
    fn from_weights(
        cfg: LlamaConfig,
        weights: &mut WeightSource<'_>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let w = Weights::read(&cfg, weights, device)?;
        let vector = |v: Vec<f32>| Tensor::from_vec(v, cfg.hidden, device);
        let q = QMatMul::from_qtensor;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in w.layers {
            layers.push(Layer {
                attn_norm: vector(l.attn_norm)?,
                q: q(l.q)?,
                k: q(l.k)?,
                v: q(l.v)?,
                o: q(l.o)?,
                ffn_norm: vector(l.ffn_norm)?,
                gate: q(l.gate)?,
                up: q(l.up)?,
                down: q(l.down)?,
            });
        }
        let embed = w.embed.dequantize(device)?;
        // Some files pad the table past the tokenizer's tokens, as the CPU path allows.
        if !matches!(embed.dims(), &[rows, cols] if rows >= cfg.vocab_size && cols == cfg.hidden) {
            return Err(ModelError::Unsupported(format!(
                "token_embd.weight is {:?}; expected at least {} rows of {}",
                embed.dims(),
                cfg.vocab_size,
                cfg.hidden
            )));
        }
        // Tied embeddings (SmolLM2 and most small models) reuse the token table as the head.
        let output = q(w.head.unwrap_or(w.embed))?;
        let (cos, sin) = rotary_tables(&cfg, w.rope_factors.as_deref());
        let half = cfg.head_dim / 2;
        let table = |v: Vec<f32>| Tensor::from_vec(v, (cfg.context_length, half), device);
        Ok(CandleLlama {
            embed,
            layers,
            norm: vector(w.norm)?,
            output,
            cos: table(cos)?,
            sin: table(sin)?,
            device: device.clone(),
            cfg,
        })
    }
}

impl CandleLlama {
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> CandleCache {
        CandleCache { layers: vec![None; self.cfg.layers] }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, self.cfg.rms_eps as f32)
    }

    /// Next-token logits, `[k, vocab]` on the CPU, one row per step with `logits: true`.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, ModelError> {
        let cfg = &self.cfg;
        let (hd, heads, kv_heads) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for step in steps.iter() {
            let cache = step.cache.candle.as_ref().filter(|c| c.layers.len() == cfg.layers);
            if cache.is_none() {
                return Err(ModelError::Inference("sequence cache is not from this model".into()));
            }
            let end = step.cache.len.saturating_add(step.tokens.len());
            if end > cfg.context_length {
                return Err(ModelError::Inference(format!(
                    "sequence of {end} tokens exceeds the context window of {}",
                    cfg.context_length
                )));
            }
            if let Some(id) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Inference(format!("token id {id} is outside the vocabulary")));
            }
            ids.extend_from_slice(step.tokens);
            positions.extend((step.cache.len..end).map(|p| p as u32));
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(None);
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let (cos, sin) = (self.cos.index_select(&positions, 0)?, self.sin.index_select(&positions, 0)?);
        let mut x = self.embed.index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?;
        // `[rows, heads * hd]` into `[1, heads, rows, hd]`, rotated at each row's position.
        let rotated = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let t = t.reshape((1, rows, heads, hd))?.transpose(1, 2)?.contiguous()?;
            rope_i(&t, &cos, &sin)
        };
        let mut next: Vec<Vec<(Tensor, Tensor)>> = steps.iter().map(|_| Vec::new()).collect();
        // Each sequence's causal mask, once for every layer.
        let masks = steps
            .iter()
            .map(|s| match s.tokens.len() {
                n if n > 1 => causal_mask(n, s.cache.len, &self.device).map(Some),
                _ => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let q = rotated(layer.q.forward(&h)?, heads)?;
            let k = rotated(layer.k.forward(&h)?, kv_heads)?;
            let v = layer.v.forward(&h)?.reshape((1, rows, kv_heads, hd))?.transpose(1, 2)?;
            let mut ctx = Vec::with_capacity(steps.len());
            let mut first = 0;
            for ((step, kept), mask) in steps.iter().zip(next.iter_mut()).zip(&masks) {
                let n = step.tokens.len();
                if n == 0 {
                    continue;
                }
                let part = |t: &Tensor| -> candle_core::Result<Tensor> {
                    t.narrow(2, first, n)?.squeeze(0)?.contiguous()
                };
                let (kn, vn) = (part(&k)?, part(&v)?);
                let (ks, vs) = match step.cache.candle.as_ref().and_then(|c| c.layers[li].as_ref()) {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &kn], 1)?, Tensor::cat(&[pv, &vn], 1)?),
                    None => (kn, vn),
                };
                ctx.push(self.attend(&part(&q)?, &ks, &vs, mask.as_ref())?);
                kept.push((ks, vs));
                first += n;
            }
            x = (x + layer.o.forward(&Tensor::cat(&ctx, 0)?)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        let mut last = Vec::new();
        let mut end = 0;
        for step in steps.iter() {
            end += step.tokens.len();
            if step.logits && !step.tokens.is_empty() {
                last.push((end - 1) as u32);
            }
        }
        let logits = if last.is_empty() {
            None
        } else {
            let rows = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
            Some(self.output.forward(&self.rms_norm(&rows, &self.norm)?)?.to_device(&Device::Cpu)?)
        };
        for (step, kept) in steps.iter_mut().zip(next) {
            if step.tokens.is_empty() {
                continue;
            }
            step.cache.len += step.tokens.len();
            step.cache.candle = Some(CandleCache { layers: kept.into_iter().map(Some).collect() });
        }
        Ok(logits)
    }

    /// Causal attention of one sequence's `[heads, n, hd]` queries at positions `pos..pos + n`
    /// over its `[kv_heads, pos + n, hd]` keys and values; `[n, heads * hd]`.
    /// `mask`: [`causal_mask`] for more than one query row.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (heads, n, hd) = q.dims3()?;
        let group = cfg.heads / cfg.kv_heads;
        // Each key/value head serves `group` query heads: their rows side by side.
        let q = q.reshape((cfg.kv_heads, group * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            let m = scores.dim(2)?;
            let grouped = scores.reshape((cfg.kv_heads, group, n, m))?.broadcast_add(mask)?;
            scores = grouped.reshape((cfg.kv_heads, group * n, m))?;
        }
        let out = softmax_last_dim(&scores)?.matmul(v)?; // [kv_heads, group * n, hd]
        out.reshape((heads, n, hd))?.transpose(0, 1)?.reshape((n, heads * hd))
    }
}
