//! Inference engines. One [`EmbeddingModel`] per loaded model version: tokenizer, encoder and the
//! sentence-transformers post-processing (pooling, normalisation, sequence limit); for the
//! text-generation family, one [`generation::GenerationModel`] (GGUF Llama, tokenizer, chat
//! template).
//!
//! Encoders run on the batcher's dedicated OS threads, never on the async runtime.

pub mod candle_bert;
pub mod generation;
pub mod gguf_tokenizer;
pub mod hf;
pub mod llama;
pub mod packed_bert;
pub mod quant;
pub mod settings;

use std::path::Path;
use std::sync::Arc;

pub use settings::{EncoderSettings, Pooling};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    Files { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Inference(e.to_string())
    }
}

/// Token ids of one input, with special tokens, already truncated to the model's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// True when the input was longer than the limit and was cut.
    pub truncated: bool,
}

/// The part that turns token ids into pooled vectors. Implementations must be thread-safe and
/// deterministic; the batcher calls them from its own threads.
pub trait Encoder: Send + Sync {
    /// One pooled (not normalised) vector per input, in input order.
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, EngineError>;
    fn hidden_size(&self) -> usize;
    /// Position embeddings available; inputs longer than this cannot be encoded.
    fn max_positions(&self) -> usize;
}

/// A loaded text-embedding model.
pub struct EmbeddingModel {
    tokenizer: tokenizers::Tokenizer,
    encoder: Arc<dyn Encoder>,
    settings: EncoderSettings,
}

impl EmbeddingModel {
    /// Load from a Hugging Face style directory (config.json, tokenizer.json, safetensors),
    /// with the fast packed encoder ([`candle_bert`] stays as the reference).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let encoder = packed_bert::PackedBert::load(dir)?;
        let settings = EncoderSettings::read(dir, encoder.max_positions())?;
        Self::with_encoder(dir, Arc::new(encoder), settings)
    }

    pub fn with_encoder(
        dir: &Path,
        encoder: Arc<dyn Encoder>,
        settings: EncoderSettings,
    ) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Files { path: path.display().to_string(), message: e.to_string() })?;
        // tokenizer.json files often carry fixed padding/truncation (MiniLM: 128) that would
        // pad every input and cut long ones short; we pad nothing and cut at max_seq_length.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: settings.max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(EmbeddingModel { tokenizer, encoder, settings })
    }

    pub fn dimension(&self) -> usize {
        self.encoder.hidden_size()
    }

    pub fn settings(&self) -> &EncoderSettings {
        &self.settings
    }

    pub fn tokenize(&self, text: &str) -> Result<Tokens, EngineError> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Tokens { ids: enc.get_ids().to_vec(), truncated: !enc.get_overflowing().is_empty() })
    }

    /// Embeddings for already tokenized inputs, normalised when the model asks for it.
    pub fn embed_tokens(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = self.encoder.encode(inputs, self.settings.pooling)?;
        if self.settings.normalize {
            out.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok(out)
    }

    /// Tokenize and embed; the convenience path for warmup and tests.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        let tokens = texts.iter().map(|t| self.tokenize(t)).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = tokens.iter().map(|t| t.ids.as_slice()).collect();
        self.embed_tokens(&ids)
    }
}

pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(f32::MIN_POSITIVE)
}
