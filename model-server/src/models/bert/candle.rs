//! candle-transformers' stock BERT and XLM-RoBERTa over a padded batch, on any candle device: on
//! a CUDA device they are these architectures' GPU path (cuBLAS and candle's kernels); on the CPU
//! they are slow but simple, and BERT is the yardstick the packed encoder is checked against.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config as CandleBertConfig};
use candle_transformers::models::xlm_roberta::{Config as XlmRobertaConfig, XLMRobertaModel};
use serde_json::{Value, json};

use super::BertConfig;
use crate::models::{Architecture, Encoder, ModelError, Pooling};
use crate::weights::{candle_weights, read_json};

enum Network {
    Bert(BertModel),
    XlmRoberta(XLMRobertaModel),
}

pub struct CandleBert {
    network: Network,
    hidden_size: usize,
    max_positions: usize,
    /// The id padding positions get: XLM-RoBERTa numbers positions from the non-padding tokens,
    /// so its padding must be its padding token.
    pad_id: u32,
    device: Device,
}

impl CandleBert {
    /// `architecture` (BERT or XLM-RoBERTa) from `dir`, float32 weights on `device`.
    pub fn load(dir: &Path, architecture: Architecture, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let mut config: Value = read_json(&config_path)?;
        let invalid = |e: serde_json::Error| ModelError::Files {
            path: config_path.display().to_string(),
            message: format!("not a config candle's {architecture:?} reads: {e}"),
        };
        // The packed encoder's reading of the same file decides padding and positions, so both
        // paths agree on them.
        let mut ours: BertConfig = serde_json::from_value(config.clone()).map_err(invalid)?;
        ours.architecture = architecture;
        let first = ours.first_position();
        let pad_id = match architecture {
            Architecture::XlmRoberta => first - 1,
            _ => 0,
        };
        // Fields candle requires that newer transformers no longer write (inference ignores the
        // dropouts; "absolute" is the only position type these checkpoints use).
        if let Value::Object(fields) = &mut config {
            for (key, default) in [
                ("position_embedding_type", json!("absolute")),
                ("hidden_dropout_prob", json!(0.0)),
                ("attention_probs_dropout_prob", json!(0.0)),
                ("initializer_range", json!(0.02)),
                ("classifier_dropout", Value::Null),
                ("pad_token_id", json!(pad_id)),
            ] {
                fields.entry(key).or_insert(default);
            }
        }
        let (vb, failed) = candle_weights(dir, device, candle_core::DType::F32)?;
        let network = match architecture {
            Architecture::Bert => {
                let c: CandleBertConfig = serde_json::from_value(config).map_err(invalid)?;
                Network::Bert(BertModel::load(vb, &c).map_err(&failed)?)
            }
            Architecture::XlmRoberta => {
                let c: XlmRobertaConfig = serde_json::from_value(config).map_err(invalid)?;
                Network::XlmRoberta(XLMRobertaModel::new(&c, vb).map_err(&failed)?)
            }
            other => return Err(ModelError::Unsupported(format!("{other:?} is not a BERT-family encoder"))),
        };
        let max_positions = ours.max_position_embeddings.saturating_sub(first);
        let pad_id = u32::try_from(pad_id).map_err(|_| ModelError::Files {
            path: config_path.display().to_string(),
            message: format!("pad_token_id {pad_id} is not a token id"),
        })?;
        Ok(CandleBert {
            network,
            hidden_size: ours.hidden_size,
            max_positions,
            pad_id,
            device: device.clone(),
        })
    }
}

impl Encoder for CandleBert {
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, ModelError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let len = inputs.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; inputs.len() * len];
        let mut mask = vec![0f32; inputs.len() * len];
        for (row, input) in inputs.iter().enumerate() {
            ids[row * len..row * len + input.len()].copy_from_slice(input);
            mask[row * len..row * len + input.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let dev = &self.device;
        let ids = Tensor::from_vec(ids, (inputs.len(), len), dev)?;
        let mask = Tensor::from_vec(mask, (inputs.len(), len), dev)?;
        let types = ids.zeros_like()?;
        let hidden = match &self.network {
            Network::Bert(m) => m.forward(&ids, &types, Some(&mask))?,
            Network::XlmRoberta(m) => m.forward(&ids, &mask, &types, None, None, None)?,
        }; // (b, len, h)
        let pooled = match pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?; // (b, len, 1)
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
        };
        Ok(pooled.to_vec2::<f32>()?)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }
}
