//! What sentence-transformers writes next to the weights: pooling mode, normalisation and the
//! sequence limit. Without those files: mean pooling, no normalisation, the model's own limit.

use std::path::Path;

use serde::Deserialize;

use crate::models::{ModelError, Pooling};
use crate::weights::read_json_if_present;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderSettings {
    pub pooling: Pooling,
    pub normalize: bool,
    /// Longest input in tokens, special tokens included; longer inputs are truncated.
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl EncoderSettings {
    /// `model_limit` is the encoder's position-embedding count.
    pub fn read(dir: &Path, model_limit: usize) -> Result<Self, ModelError> {
        let modules: Vec<Module> = read_json_if_present(&dir.join("modules.json"))?.unwrap_or_default();
        let pooling_dir = modules
            .iter()
            .find(|m| m.kind.ends_with(".Pooling"))
            .map(|m| m.path.clone())
            .unwrap_or_else(|| "1_Pooling".to_string());
        let pooling =
            match read_json_if_present::<PoolingConfig>(&dir.join(&pooling_dir).join("config.json"))? {
                None => Pooling::Mean,
                Some(p) if p.pooling_mode_cls_token => Pooling::Cls,
                Some(p) if p.pooling_mode_mean_tokens => Pooling::Mean,
                Some(p) if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens => {
                    return Err(ModelError::Files {
                        path: dir.join(&pooling_dir).display().to_string(),
                        message: "only mean and CLS pooling are supported".to_string(),
                    });
                }
                Some(_) => Pooling::Mean,
            };
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
        let st: Option<SentenceBertConfig> = read_json_if_present(&dir.join("sentence_bert_config.json"))?;
        let max_seq_length = st.and_then(|c| c.max_seq_length).unwrap_or(model_limit).min(model_limit);
        Ok(EncoderSettings { pooling, normalize, max_seq_length })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model directory holding `files`, removed when dropped.
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix("kiln-settings-").tempdir().expect("tempdir");
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        dir
    }

    #[test]
    fn defaults_without_sentence_transformers_files() {
        let dir = dir_with(&[]);
        let s = EncoderSettings::read(dir.path(), 512).expect("settings");
        assert_eq!(s, EncoderSettings { pooling: Pooling::Mean, normalize: false, max_seq_length: 512 });
    }

    #[test]
    fn reads_cls_pooling_normalize_and_limit() {
        let dir = dir_with(&[
            (
                "modules.json",
                r#"[{"type":"sentence_transformers.models.Transformer","path":""},
                {"type":"sentence_transformers.models.Pooling","path":"1_Pooling"},
                {"type":"sentence_transformers.models.Normalize","path":"2_Normalize"}]"#,
            ),
            ("1_Pooling/config.json", r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":false}"#),
            ("sentence_bert_config.json", r#"{"max_seq_length":1024}"#),
        ]);
        let s = EncoderSettings::read(dir.path(), 512).expect("settings");
        // The limit never exceeds the position embeddings.
        assert_eq!(s, EncoderSettings { pooling: Pooling::Cls, normalize: true, max_seq_length: 512 });
    }
}
