//! The text-embedding family: a tokenizer, an encoder architecture (BERT or XLM-RoBERTa, from
//! `config.json`'s `model_type`) and the sentence-transformers post-processing (pooling,
//! normalisation, sequence limit), served through a dynamic batcher at `/v1/embeddings` and
//! `/embed/text`.

pub mod pooling;
mod routes;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use serde_json::{Value, json};

use super::batcher::{BatchModel, BatchResult, BatchServing, BatchStatus};
pub use super::embedding::{Tokens, cosine, l2_normalize};
use super::{ModelFamily, Shared, StartContext};
use crate::device::ComputeDevice;
use crate::manifest::{Family, ModelRef};
use crate::models::bert::BertConfig;
use crate::models::bert::candle::CandleBert;
use crate::models::bert::packed::PackedBert;
use crate::models::{Architecture, Encoder, ModelError, architecture};
use crate::weights::model_type;
pub use pooling::EncoderSettings;

/// This family's endpoints.
pub const ENDPOINTS: &[&str] = &["POST /v1/embeddings", "POST /embed/text"];

pub struct TextEmbedding;

impl ModelFamily for TextEmbedding {
    const FAMILY: Family = Family::TextEmbedding;
    type Model = EmbeddingModel;
    type Serving = BatchServing<EmbeddingModel, Vec<u32>>;

    fn load(dir: &Path, device: &ComputeDevice) -> Result<EmbeddingModel, ModelError> {
        EmbeddingModel::load_on(dir, device)
    }

    fn summary(model: &EmbeddingModel) -> String {
        format!("dimension {}", model.dimension())
    }

    fn warm(model: &EmbeddingModel, inputs: &[String]) -> Result<(), ModelError> {
        if !inputs.is_empty() {
            let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            model.embed(&inputs)?;
        }
        Ok(())
    }

    fn start(id: &ModelRef, model: Arc<EmbeddingModel>, ctx: StartContext) -> std::io::Result<Self::Serving> {
        BatchServing::start(id, model, ctx)
    }

    fn routes() -> Router<Shared<Self>> {
        routes::routes()
    }
}

/// A loaded text-embedding model.
pub struct EmbeddingModel {
    tokenizer: tokenizers::Tokenizer,
    encoder: Arc<dyn Encoder>,
    settings: EncoderSettings,
}

impl EmbeddingModel {
    /// Load from a Hugging Face directory (config.json, tokenizer.json, safetensors and the
    /// sentence-transformers files) for the CPU: the architecture from `model_type`, on the
    /// packed encoder.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_on(dir, &ComputeDevice::cpu())
    }

    /// [`Self::load`] for `device`. On a GPU, BERT and XLM-RoBERTa run candle's models on that
    /// device (cuBLAS and candle's kernels).
    pub fn load_on(dir: &Path, device: &ComputeDevice) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let declared = model_type(&config_path)?;
        let arch = architecture(Family::TextEmbedding, declared.as_deref(), "model_type", &config_path)
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        let encoder: Arc<dyn Encoder> = match arch {
            Architecture::Bert | Architecture::XlmRoberta if !device.is_cpu() => {
                Arc::new(CandleBert::load(dir, arch, device.candle())?)
            }
            Architecture::Bert | Architecture::XlmRoberta => {
                Arc::new(PackedBert::load(dir, &BertConfig::read(dir, arch)?)?)
            }
            Architecture::Llama
            | Architecture::Whisper
            | Architecture::Siglip
            | Architecture::Clip
            | Architecture::Yunet => {
                return Err(ModelError::Unsupported(format!("{arch:?} is not an encoder")));
            }
        };
        let settings = EncoderSettings::read(dir, encoder.max_positions())?;
        Self::with_encoder(dir, encoder, settings)
    }

    pub fn with_encoder(
        dir: &Path,
        encoder: Arc<dyn Encoder>,
        settings: EncoderSettings,
    ) -> Result<Self, ModelError> {
        let (tokenizer, _) = super::embedding::load_tokenizer(dir, settings.max_seq_length)?;
        Ok(EmbeddingModel { tokenizer, encoder, settings })
    }

    pub fn dimension(&self) -> usize {
        self.encoder.hidden_size()
    }

    pub fn settings(&self) -> &EncoderSettings {
        &self.settings
    }

    pub fn tokenize(&self, text: &str) -> Result<Tokens, ModelError> {
        super::embedding::tokenize(&self.tokenizer, text)
    }

    /// Embeddings for already tokenized inputs, normalised when the model asks for it.
    pub fn embed_tokens(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = self.encoder.encode(inputs, self.settings.pooling)?;
        if self.settings.normalize {
            out.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok(out)
    }

    /// Tokenize and embed; the convenience path for warmup and tests.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let tokens = texts.iter().map(|t| self.tokenize(t)).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = tokens.iter().map(|t| t.ids.as_slice()).collect();
        self.embed_tokens(&ids)
    }
}

impl BatchStatus for EmbeddingModel {
    fn status(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("dimension".into(), json!(self.dimension()));
        m.insert("maxSeqLength".into(), json!(self.settings().max_seq_length));
        m
    }
}

impl BatchModel<Vec<u32>> for EmbeddingModel {
    fn run(&self, inputs: &[&Vec<u32>]) -> BatchResult {
        let ids: Vec<&[u32]> = inputs.iter().map(|i| i.as_slice()).collect();
        self.embed_tokens(&ids)
    }
}
