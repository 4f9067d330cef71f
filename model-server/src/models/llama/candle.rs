//! The GPU path of the Llama decoder: candle-transformers' quantized Llama over the same GGUF
//! file, on any candle device (on a CUDA device: candle's quantized matmul kernels and cuBLAS).
//!
//! candle's model holds one sequence's keys and values inside itself, so each sequence gets
//! its own copy of the model (the weights are shared: a copy only clones reference-counted
//! tensors) and a step runs its sequences one after another. A step is all-or-nothing: each
//! sequence runs on a copy of its state, and the copies replace the states only when every
//! sequence of the step has run, so a failed step leaves every cache as it was.

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};

use super::{LlamaConfig, Step};
use crate::models::ModelError;

pub struct CandleLlama {
    /// The model with no sequence's cache: what each new sequence starts from.
    template: ModelWeights,
    cfg: LlamaConfig,
    device: Device,
}

/// One sequence's state on the GPU path.
pub struct CandleCache {
    model: ModelWeights,
}

/// Why candle's quantized Llama would compute this file differently from the CPU path, if it
/// would: such files are refused by name instead.
fn refusal(cfg: &LlamaConfig, ct: &gguf_file::Content) -> Option<String> {
    if cfg.architecture != "llama" {
        return Some(format!(
            "a {:?} GGUF has no GPU path (candle's quantized Llama reads llama.* metadata only)",
            cfg.architecture
        ));
    }
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        return Some("Llama 3 rotary frequency factors (rope_freqs) have no GPU path yet".into());
    }
    let experts = ct.metadata.get("llama.expert_count").and_then(|v| v.to_u32().ok()).unwrap_or(0);
    if experts > 1 {
        return Some(format!("a mixture of {experts} experts has no GPU path"));
    }
    None
}

impl CandleLlama {
    /// The GGUF file whose header is `ct` and which `reader` reads, its weights on `device`.
    pub fn load<R: Read + Seek>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self, ModelError> {
        // The CPU path's reading decides what is refused (shapes, rotary scaling), so both
        // paths take the same files, less the ones above.
        let mut cfg = LlamaConfig::from_gguf(&ct)?;
        if let Some(why) = refusal(&cfg, &ct) {
            return Err(ModelError::Unsupported(why));
        }
        // candle's rotary tables stop at MAX_SEQ_LEN positions.
        cfg.context_length = cfg.context_length.min(MAX_SEQ_LEN);
        let template = ModelWeights::from_gguf(ct, reader, device)?;
        Ok(CandleLlama { template, cfg, device: device.clone() })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> CandleCache {
        CandleCache { model: self.template.clone() }
    }

    /// Next-token logits, `[k, vocab]` on the CPU, one row per step with `logits: true`.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, ModelError> {
        let mut next: Vec<Option<ModelWeights>> = Vec::with_capacity(steps.len());
        let mut rows = Vec::new();
        for step in steps.iter() {
            if step.tokens.is_empty() {
                next.push(None);
                continue;
            }
            let state = step
                .cache
                .candle
                .as_ref()
                .ok_or_else(|| ModelError::Inference("sequence cache is not from this model".into()))?;
            let end = step.cache.len.saturating_add(step.tokens.len());
            if end > self.cfg.context_length {
                return Err(ModelError::Inference(format!(
                    "sequence of {end} tokens exceeds the context window of {}",
                    self.cfg.context_length
                )));
            }
            if let Some(id) = step.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::Inference(format!("token id {id} is outside the vocabulary")));
            }
            let mut model = state.model.clone();
            let ids = Tensor::new(step.tokens, &self.device)?.unsqueeze(0)?;
            // candle returns the last position's logits, (1, vocab).
            let logits = model.forward(&ids, step.cache.len)?;
            if step.logits {
                rows.push(logits.to_device(&Device::Cpu)?);
            }
            next.push(Some(model));
        }
        for (step, model) in steps.iter_mut().zip(next) {
            if let Some(model) = model {
                step.cache.candle = Some(CandleCache { model });
                step.cache.len += step.tokens.len();
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&rows, 0)?))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::GgmlDType;

    use super::*;

    fn file(
        arch: &str,
        extra: &[(&str, gguf_file::Value)],
        tensors: &[&str],
    ) -> (LlamaConfig, gguf_file::Content) {
        let cfg = LlamaConfig {
            architecture: arch.into(),
            layers: 1,
            hidden: 8,
            heads: 2,
            kv_heads: 2,
            head_dim: 4,
            context_length: 8192,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            vocab_size: 16,
        };
        let info = || gguf_file::TensorInfo {
            ggml_dtype: GgmlDType::F32,
            shape: candle_core::Shape::from(2),
            offset: 0,
        };
        let ct = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<HashMap<_, _>>(),
            tensor_infos: tensors.iter().map(|t| (t.to_string(), info())).collect(),
            tensor_data_offset: 0,
        };
        (cfg, ct)
    }

    #[test]
    fn what_candle_would_compute_differently_is_refused_by_name() {
        let (cfg, ct) = file("llama", &[], &["token_embd.weight"]);
        assert_eq!(refusal(&cfg, &ct), None);
        let (cfg, ct) = file("mistral", &[], &[]);
        assert!(refusal(&cfg, &ct).is_some_and(|w| w.contains("\"mistral\" GGUF has no GPU path")));
        let (cfg, ct) = file("llama", &[], &["rope_freqs.weight"]);
        assert!(refusal(&cfg, &ct).is_some_and(|w| w.contains("rope_freqs")));
        let (cfg, ct) = file("llama", &[("llama.expert_count", gguf_file::Value::U32(8))], &[]);
        assert!(refusal(&cfg, &ct).is_some_and(|w| w.contains("8 experts")));
    }
}
