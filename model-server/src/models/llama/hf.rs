//! Hugging Face Llama checkpoints: `config.json` and `*.safetensors` in the layout
//! `transformers` saves, served by the same decoder as GGUF files.
//!
//! Weights are renamed to their GGUF names, the rows of Q and K are permuted from Hugging
//! Face's rotary order (rotate_half) to the interleaved one the decoder uses (the permutation
//! llama.cpp's converter applies), and matrices are stored as the decoder asks
//! ([`FromWeights::CHECKPOINT_MATRICES`]): Q8_0 for the CPU path, whose fast matmuls read
//! 8-bit blocks (Q8_0 keeps a float16 or bfloat16 weight to within half a step of 1/127 of its
//! block's largest value); float16 on the GPU path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{FromWeights, LlamaConfig};
use crate::models::ModelError;
use crate::weights::read_json;

/// The checkpoint's files in `dir`: config.json and at least one .safetensors file.
pub fn find(dir: &Path) -> Option<(PathBuf, Vec<PathBuf>)> {
    let config = dir.join("config.json");
    if !config.is_file() {
        return None;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    (!files.is_empty()).then_some((config, files))
}

/// What `config.json` says: the decoder's shape, Llama 3 rotary factors, tied embeddings.
struct Checkpoint {
    cfg: LlamaConfig,
    rope_factors: Option<Vec<f32>>,
    tied: bool,
}

/// Reads `config.json` once. Refuses what the decoder does not do (rotary scaling other than
/// Llama 3's, odd attention shapes) rather than serving wrong text.
fn config(path: &Path) -> Result<Checkpoint, ModelError> {
    let json: Value = read_json(path)?;
    let unsupported = |message: String| ModelError::Files { path: path.display().to_string(), message };
    // The table in `models` chose this decoder for the checkpoint's model_type.
    let arch = json.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
    let uint = |key: &str| -> Result<usize, ModelError> {
        json.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| unsupported(format!("{key} is missing or not a whole number")))
    };
    let float = |key: &str, default: f64| -> Result<f64, ModelError> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| unsupported(format!("{key} is not a number"))),
        }
    };
    let hidden = uint("hidden_size")?;
    let heads = uint("num_attention_heads")?;
    let kv_heads = json.get("num_key_value_heads").and_then(Value::as_u64).map_or(heads, |v| v as usize);
    let head_dim = LlamaConfig::head_dim_of(hidden, heads, kv_heads).map_err(unsupported)?;
    if let Some(d) = json.get("head_dim").and_then(Value::as_u64)
        && d as usize != head_dim
    {
        return Err(unsupported(format!("head_dim {d} differs from hidden_size / num_attention_heads")));
    }
    let rope_base = float("rope_theta", 10_000.0)? as f32;
    let rope_factors = rope_factors(&json, head_dim, rope_base).map_err(unsupported)?;
    let tied = json.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
    let cfg = LlamaConfig {
        architecture: arch,
        layers: uint("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads,
        head_dim,
        context_length: uint("max_position_embeddings")?,
        rms_eps: float("rms_norm_eps", 1e-6)?,
        rope_base,
        vocab_size: uint("vocab_size")?,
    };
    Ok(Checkpoint { cfg, rope_factors, tied })
}

/// Llama 3.1+ rotary frequency factors from `rope_scaling` (`rope_type: llama3`), one per
/// frequency: 1 for short wavelengths, `factor` for wavelengths longer than the original
/// context, smoothly between (the factors llama.cpp's converter writes as `rope_freqs`).
/// None without scaling; other scaling types are refused.
fn rope_factors(json: &Value, head_dim: usize, base: f32) -> Result<Option<Vec<f32>>, String> {
    let Some(scaling) = json.get("rope_scaling").filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("");
    if kind != "llama3" {
        return Err(format!("rope_scaling of type {kind:?}; only Llama 3 (\"llama3\") scaling is supported"));
    }
    let num = |key: &str, default: f64| scaling.get(key).and_then(Value::as_f64).unwrap_or(default);
    let (factor, low, high) = (num("factor", 8.0), num("low_freq_factor", 1.0), num("high_freq_factor", 4.0));
    let old_context = num("original_max_position_embeddings", 8192.0);
    if !(factor >= 1.0 && low > 0.0 && high > low && old_context > 0.0) {
        return Err(format!(
            "rope_scaling values: factor {factor}, low_freq_factor {low}, high_freq_factor {high}, \
             original_max_position_embeddings {old_context}"
        ));
    }
    let factors = (0..head_dim / 2)
        .map(|i| {
            let wavelen = 2.0 * std::f64::consts::PI * f64::from(base).powf((2 * i) as f64 / head_dim as f64);
            if wavelen < old_context / high {
                1.0
            } else if wavelen > old_context / low {
                factor as f32
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    Ok(Some(factors))
}

/// The Hugging Face name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, what) = rest.split_once('.')?;
    let part = match what.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.weight"))
}

/// Rows of a `[heads * head_dim, cols]` projection from rotate_half order to interleaved:
/// row `(h, j, i)` (half `j`, index `i`) moves to `(h, i, j)`.
fn interleave_rows(w: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// Load the model of a checkpoint.
pub fn load<M: FromWeights>(config_path: &Path, files: &[PathBuf], device: &Device) -> Result<M, ModelError> {
    let Checkpoint { cfg, rope_factors: factors, tied } = config(config_path)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in files {
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| ModelError::Files { path: f.display().to_string(), message: e.to_string() })?;
        tensors.extend(loaded);
    }
    let (heads, kv_heads) = (cfg.heads, cfg.kv_heads);
    let mut weights = |name: &str| -> Result<Option<QTensor>, ModelError> {
        // The decoder takes Llama 3 frequency factors as GGUF's rope_freqs tensor.
        if name == "rope_freqs.weight" {
            return match &factors {
                None => Ok(None),
                Some(f) => Ok(Some(QTensor::quantize(&Tensor::new(f.as_slice(), device)?, GgmlDType::F32)?)),
            };
        }
        let wanted = if name == "output.weight" && tied { None } else { hf_name(name) };
        let Some(t) = wanted.and_then(|n| tensors.remove(&n)) else { return Ok(None) };
        let mut t = t.to_dtype(DType::F32)?;
        if name.ends_with("attn_q.weight") {
            t = interleave_rows(&t, heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = interleave_rows(&t, kv_heads)?;
        }
        let blocks = M::CHECKPOINT_MATRICES;
        let matrix = t.rank() == 2 && t.dims().last().is_some_and(|c| c % blocks.block_size() == 0);
        let dtype = if matrix { blocks } else { GgmlDType::F32 };
        Ok(Some(QTensor::quantize(&t, dtype)?))
    };
    M::from_weights(cfg, &mut weights, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_factors_leave_fast_rotations_and_slow_down_long_ones() {
        // Llama 3.2's published scaling: factor 32, low 1, high 4, original context 8192.
        let json = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let f = rope_factors(&json, 64, 500_000.0).ok().flatten().unwrap_or_default();
        assert_eq!(f.len(), 32);
        // Wavelength 2π·base^(2i/64): under 8192/4 positions unchanged, over 8192 divided by 32,
        // strictly between in the band between.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[31], 32.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        assert!(f.iter().any(|v| *v > 1.0 && *v < 32.0), "{f:?}");
        assert_eq!(rope_factors(&serde_json::json!({"rope_scaling": null}), 64, 500_000.0), Ok(None));
    }

    #[test]
    fn names_map_to_transformers_layout() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
    }

    #[test]
    fn rotary_rows_are_interleaved_per_head() {
        // Two heads of four rows: halves [0 1][2 3] become pairs (0 2)(1 3).
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .and_then(|t| t.reshape((8, 1)))
            .unwrap_or_else(|e| panic!("{e}"));
        let got =
            interleave_rows(&w, 2).and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?)).unwrap_or_default();
        assert_eq!(got, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn configs_the_decoder_cannot_serve_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("kiln-hf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("config.json");
        let base = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 128, "vocab_size": 10, "rope_scaling": null
        });
        let write = |v: &Value| std::fs::write(&path, v.to_string()).unwrap_or_else(|e| panic!("{e}"));
        write(&base);
        let cfg = config(&path).unwrap_or_else(|e| panic!("{e}")).cfg;
        assert_eq!((cfg.head_dim, cfg.kv_heads, cfg.rope_base), (16, 2, 10_000.0));
        for (key, value, says) in [
            ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
            ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 0.5}), "rope_scaling"),
            ("num_key_value_heads", serde_json::json!(3), "attention shape"),
            ("hidden_size", serde_json::json!("wide"), "hidden_size"),
        ] {
            let mut v = base.clone();
            v[key] = value;
            write(&v);
            let err = config(&path).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(says), "{key}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
