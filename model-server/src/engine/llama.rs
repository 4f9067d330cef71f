//! Llama-family decoder over GGUF weights, built for continuous batching.
//!
//! One [`Llama::forward`] runs any mix of sequences, each a run of new tokens (a prefill chunk or
//! a single decode token) against its own [`SequenceCache`]. Every projection and MLP matmul sees
//! all tokens of the step at once, so a decode step over eight streams reads the weights once;
//! only attention, which depends on each sequence's history, runs per sequence.
//!
//! The matmuls are candle's quantized ones (`QMatMul`, the GGUF block formats as stored); the
//! layout follows llama.cpp's GGUF conventions: `blk.N.attn_q/k/v/output`, `ffn_gate/up/down`,
//! interleaved ("normal") rotary embeddings, output weights tied to the token embeddings when
//! `output.weight` is absent.

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use candle_nn::kv_cache::KvCache;
use candle_transformers::quantized_nn::RmsNorm;

use super::EngineError;

/// Shape of a Llama-family model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, EngineError> {
        let arch = metadata_string(ct, "general.architecture")?;
        // llama.cpp's other interleaved-rope Llama variants share this tensor layout.
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {arch:?}; this server runs the Llama family (llama, mistral)"
            )));
        }
        let u = |key: &str| metadata_u32(ct, &format!("{arch}.{key}")).map(|v| v as usize);
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(EngineError::Unsupported(format!(
                "attention shape: {heads} heads, {kv_heads} key/value heads, hidden size {hidden}"
            )));
        }
        let head_dim = hidden / heads;
        if let Ok(rope_dim) = u("rope.dimension_count")
            && rope_dim != head_dim
        {
            return Err(EngineError::Unsupported(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions)"
            )));
        }
        let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => u("vocab_size")?,
        };
        Ok(LlamaConfig {
            layers: u("block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            context_length: u("context_length")?,
            rms_eps: metadata_f32(ct, &format!("{arch}.attention.layer_norm_rms_epsilon"))? as f64,
            rope_base: metadata_f32(ct, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
            vocab_size,
            architecture: arch,
        })
    }
}

pub(crate) fn metadata_string(ct: &gguf_file::Content, key: &str) -> Result<String, EngineError> {
    match ct.metadata.get(key) {
        Some(gguf_file::Value::String(s)) => Ok(s.clone()),
        Some(other) => {
            Err(EngineError::Unsupported(format!("GGUF metadata {key} is {other:?}, not a string")))
        }
        None => Err(EngineError::Unsupported(format!("GGUF metadata has no {key}"))),
    }
}

pub(crate) fn metadata_u32(ct: &gguf_file::Content, key: &str) -> Result<u32, EngineError> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::Unsupported(format!("GGUF metadata has no {key}")))?;
    v.to_u32()
        .or_else(|_| v.to_i32().map(|i| i.max(0) as u32))
        .or_else(|_| v.to_u64().map(|i| i.min(u64::from(u32::MAX)) as u32))
        .map_err(|_| EngineError::Unsupported(format!("GGUF metadata {key} is {v:?}, not an integer")))
}

fn metadata_f32(ct: &gguf_file::Content, key: &str) -> Result<f32, EngineError> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::Unsupported(format!("GGUF metadata has no {key}")))?;
    v.to_f32()
        .or_else(|_| v.to_f64().map(|f| f as f32))
        .map_err(|_| EngineError::Unsupported(format!("GGUF metadata {key} is {v:?}, not a number")))
}

fn tensor<R: std::io::Read + std::io::Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    name: &str,
) -> Result<QTensor, EngineError> {
    ct.tensor(reader, name, device).map_err(|e| EngineError::Unsupported(format!("GGUF tensor {name}: {e}")))
}

/// Block formats candle multiplies only with scalar code (no AVX2 kernel): Q4_1, Q5_0, Q5_1.
/// Their weights are re-blocked as Q8_0 once at load, which has one: about 5x faster decoding
/// for 60% more weight memory, and Q8_0 holds a 4- or 5-bit block's values almost exactly.
fn fast_layout(t: QTensor, device: &Device) -> Result<QTensor, EngineError> {
    use candle_core::quantized::GgmlDType;
    let slow = matches!(t.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
    let inner = t.shape().dims().last().copied().unwrap_or(0);
    if !slow || inner % GgmlDType::Q8_0.block_size() != 0 {
        return Ok(t);
    }
    Ok(QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?)
}

struct Layer {
    attn_norm: RmsNorm,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    /// Rotary tables, [context_length, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// The attention history of one sequence: keys and values per layer, and how many positions
/// they hold. Dropping it frees the memory.
pub struct SequenceCache {
    layers: Vec<KvCache>,
    len: usize,
}

impl SequenceCache {
    /// Positions already in the cache (prompt and generated tokens fed so far).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a forward step.
pub struct Step<'a> {
    /// New tokens: a prefill chunk, or the last sampled token.
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    /// Whether to return next-token logits for this sequence (false for a prefill chunk that
    /// is not the prompt's last).
    pub logits: bool,
}

/// Keys and values grow in blocks of this many positions.
const CACHE_BLOCK: usize = 128;

impl Llama {
    pub fn load<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let cfg = LlamaConfig::from_gguf(ct)?;
        let embed_q = tensor(ct, reader, device, "token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?, cfg.hidden);
        let norm = RmsNorm::from_qtensor(tensor(ct, reader, device, "output_norm.weight")?, cfg.rms_eps)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let name = |what: &str| format!("blk.{i}.{what}.weight");
            let attn_norm =
                RmsNorm::from_qtensor(tensor(ct, reader, device, &name("attn_norm"))?, cfg.rms_eps)?;
            let ffn_norm =
                RmsNorm::from_qtensor(tensor(ct, reader, device, &name("ffn_norm"))?, cfg.rms_eps)?;
            let mut q = |what: &str| -> Result<QMatMul, EngineError> {
                Ok(QMatMul::from_qtensor(fast_layout(tensor(ct, reader, device, &name(what))?, device)?)?)
            };
            layers.push(Layer {
                attn_norm,
                wq: q("attn_q")?,
                wk: q("attn_k")?,
                wv: q("attn_v")?,
                wo: q("attn_output")?,
                ffn_norm,
                gate: q("ffn_gate")?,
                up: q("ffn_up")?,
                down: q("ffn_down")?,
            });
        }
        // Tied embeddings (SmolLM2 and most small models) reuse the token table as the head.
        let output = if ct.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(fast_layout(tensor(ct, reader, device, "output.weight")?, device)?)?
        } else {
            QMatMul::from_qtensor(embed_q)?
        };
        let (cos, sin) = rotary_tables(&cfg, device)?;
        Ok(Llama { cfg, embed, layers, norm, output, cos, sin, device: device.clone() })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache { layers: (0..self.cfg.layers).map(|_| KvCache::new(2, CACHE_BLOCK)).collect(), len: 0 }
    }

    /// Run one step over several sequences. Returns next-token logits, `[k, vocab]`, one row per
    /// step with `logits: true`, in order; None when no step asked for logits.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, EngineError> {
        let cfg = &self.cfg;
        let all: Vec<u32> = steps.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if all.is_empty() {
            return Ok(None);
        }
        for s in steps.iter() {
            if s.cache.len + s.tokens.len() > cfg.context_length {
                return Err(EngineError::Inference(format!(
                    "sequence of {} tokens exceeds the context window of {}",
                    s.cache.len + s.tokens.len(),
                    cfg.context_length
                )));
            }
        }
        let ids = Tensor::new(all.as_slice(), &self.device)?;
        let mut x = self.embed.forward(&ids)?; // [T, hidden]
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let rep = cfg.heads / cfg.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let q = layer.wq.forward(&h)?;
            let k = layer.wk.forward(&h)?;
            let v = layer.wv.forward(&h)?;
            let mut outs = Vec::with_capacity(steps.len());
            let mut offset = 0;
            for step in steps.iter_mut() {
                let n = step.tokens.len();
                if n == 0 {
                    continue;
                }
                let pos = step.cache.len;
                let heads = |t: &Tensor, count: usize| -> candle_core::Result<Tensor> {
                    t.narrow(0, offset, n)?
                        .reshape((1, n, count, cfg.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let cos = self.cos.narrow(0, pos, n)?;
                let sin = self.sin.narrow(0, pos, n)?;
                let qs = candle_nn::rotary_emb::rope_i(&heads(&q, cfg.heads)?, &cos, &sin)?;
                let ks = candle_nn::rotary_emb::rope_i(&heads(&k, cfg.kv_heads)?, &cos, &sin)?;
                let vs = heads(&v, cfg.kv_heads)?;
                let Some(cache) = step.cache.layers.get_mut(li) else {
                    return Err(EngineError::Inference(
                        "sequence cache has fewer layers than the model".into(),
                    ));
                };
                let (k_all, v_all) = cache.append(&ks, &vs)?; // [1, kv_heads, pos + n, head_dim]
                let total = pos + n;
                // Grouped-query attention without copying keys: query heads that share a
                // key/value head are stacked as rows of one matmul.
                let qg = qs.reshape((cfg.kv_heads, rep * n, cfg.head_dim))?;
                let kg = k_all.squeeze(0)?.contiguous()?;
                let vg = v_all.squeeze(0)?.contiguous()?;
                let mut att = (qg.matmul(&kg.t()?)? * scale)?; // [kv_heads, rep * n, total]
                if n > 1 {
                    att = att.broadcast_add(&causal_mask(rep, n, pos, &self.device)?)?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&vg)?; // [kv_heads, rep * n, head_dim]
                let y = y.reshape((cfg.heads, n, cfg.head_dim))?.transpose(0, 1)?.reshape((n, cfg.hidden))?;
                debug_assert_eq!(total, cache.current_seq_len());
                outs.push(y);
                offset += n;
            }
            let y = Tensor::cat(&outs, 0)?;
            let x1 = (&x + layer.wo.forward(&y)?)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x1 + layer.down.forward(&act)?)?;
        }
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for step in steps.iter_mut() {
            let n = step.tokens.len();
            step.cache.len += n;
            offset += n as u32;
            if step.logits && n > 0 {
                rows.push(offset - 1);
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let last = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        Ok(Some(logits.to_dtype(DType::F32)?))
    }
}

/// Additive mask for a chunk of `n` new tokens at positions `pos..pos + n`, laid out as the
/// grouped rows above (`rep` copies of the chunk): row `r * n + i` may attend to `0..=pos + i`.
fn causal_mask(rep: usize, n: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = pos + n;
    let mut m = vec![0f32; rep * n * total];
    for r in 0..rep {
        for i in 0..n {
            let row = (r * n + i) * total;
            for v in &mut m[row + pos + i + 1..row + total] {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (rep * n, total), device)
}

fn rotary_tables(cfg: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> =
        (0..half).map(|i| 1.0 / cfg.rope_base.powf((2 * i) as f32 / cfg.head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(cfg.context_length * half);
    let mut sin = Vec::with_capacity(cfg.context_length * half);
    for p in 0..cfg.context_length {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (cfg.context_length, half), device)?,
        Tensor::from_vec(sin, (cfg.context_length, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_lets_each_row_see_its_prefix_only() {
        let m = causal_mask(2, 2, 3, &Device::Cpu).and_then(|t| t.to_vec2::<f32>()).unwrap_or_default();
        // Two repeats of a two-token chunk at positions 3 and 4 over 5 keys.
        let seen: Vec<usize> = m.iter().map(|r| r.iter().filter(|v| v.is_finite()).count()).collect();
        assert_eq!(seen, [4, 5, 4, 5]);
    }
}
