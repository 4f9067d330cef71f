//! The BERT architecture and XLM-RoBERTa, which differs from it only in where positions start
//! (after the padding index) and in having one token type: both run on the [`packed`] encoder.
//! [`candle`] is candle's stock BERT on any device: BERT's GPU path, and on the CPU the
//! yardstick the packed encoder is tested against.

pub mod candle;
pub mod packed;

use std::path::Path;

use serde::Deserialize;

use super::{Architecture, ModelError};
use crate::weights::read_json;

/// What the encoder reads from `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "bert_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// Which of the two this is: set from the architecture table, not read.
    #[serde(skip, default = "bert")]
    pub architecture: Architecture,
}

fn gelu() -> String {
    "gelu".to_string()
}
fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}
fn bert() -> Architecture {
    Architecture::Bert
}

impl BertConfig {
    pub fn read(dir: &Path, architecture: Architecture) -> Result<Self, ModelError> {
        let mut config: BertConfig = read_json(&dir.join("config.json"))?;
        config.architecture = architecture;
        Ok(config)
    }

    /// The row of the position table an input's first token takes: BERT counts from 0;
    /// RoBERTa models (XLM-RoBERTa) number positions from `pad_token_id + 1`, the padding
    /// index and those before it never being a real token's position.
    pub fn first_position(&self) -> usize {
        match self.architecture {
            Architecture::XlmRoberta => self.pad_token_id.unwrap_or(1).saturating_add(1),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlm_roberta_positions_start_after_the_padding_index() {
        let json = r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 1024,
            "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
            "max_position_embeddings": 8194, "type_vocab_size": 1, "pad_token_id": 1,
            "layer_norm_eps": 1e-05, "hidden_act": "gelu"}"#;
        let mut c: BertConfig = serde_json::from_str(json).expect("a BGE-M3 config");
        assert_eq!(c.first_position(), 0, "read alone it is BERT until the table says otherwise");
        c.architecture = Architecture::XlmRoberta;
        assert_eq!(c.first_position(), 2);
        assert_eq!(c.max_position_embeddings - c.first_position(), 8192, "BGE-M3 takes 8192 tokens");
    }
}
