//! What both embedding families (text, image-text) share: one input's token ids, the text
//! path from request to vectors, OpenAI's `/v1/embeddings`, and the vector arithmetic on their
//! output.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::batcher::{BatchInput, Batcher};
use super::{ModelFamily, Shared};
use crate::api::embeddings::{Embedded, EmbeddingsRequest};
use crate::api::{self, ApiError, Inference, counted, worker_answer};
use crate::loader::Lease;
use crate::manifest::ModelRef;
use crate::models::ModelError;
use crate::state::AppState;

/// A family whose models embed text: what the shared text routes need of it.
pub trait EmbedsText: ModelFamily {
    /// Width of the leased model's vectors.
    fn dimension(lease: &Lease<Self>) -> usize;

    /// `texts` through the leased model's batcher.
    fn embed_texts(
        state: &Shared<Self>,
        lease: &Lease<Self>,
        id: &ModelRef,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Embedded, ApiError>> + Send;
}

/// `POST /v1/embeddings` (OpenAI's) for any family that embeds text.
pub async fn embeddings<F: EmbedsText>(
    State(state): State<Shared<F>>,
    request: Result<Inference<F, EmbeddingsRequest>, ApiError>,
) -> Response {
    let Inference { body: mut req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let texts = req.texts(&id, F::dimension(&lease), state.limits.max_inputs)?;
        let out = F::embed_texts(&state, &lease, &id, texts).await?;
        Ok(req.response(&id, &out))
    })
    .await
}

/// `dir`'s `tokenizer.json` for embedding: its own padding removed (returned: the id it padded
/// with) and truncation at `max_tokens`, special tokens kept. tokenizer.json files often carry
/// fixed padding/truncation (MiniLM: 128) that would pad every input and cut long ones short.
pub fn load_tokenizer(
    dir: &std::path::Path,
    max_tokens: usize,
) -> Result<(tokenizers::Tokenizer, Option<u32>), ModelError> {
    let path = dir.join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Files { path: path.display().to_string(), message: e.to_string() })?;
    let declared_pad = tokenizer.get_padding().map(|p| p.pad_id);
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok((tokenizer, declared_pad))
}

/// One text's ids (with special tokens, cut at the tokenizer's limit), and whether it was cut.
pub fn tokenize(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Tokens, ModelError> {
    let enc = tokenizer.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(Tokens { ids: enc.get_ids().to_vec(), truncated: !enc.get_overflowing().is_empty() })
}

/// Take a queue place (so a full queue refuses before any tokenizing), tokenize off the async
/// workers with `tokenize`, queue each text as `input(ids)`, and wait for the batch.
pub async fn embed_texts<F: ModelFamily, I: BatchInput<Output = Vec<f32>>>(
    state: &AppState<F>,
    batcher: &Batcher<I>,
    id: &ModelRef,
    texts: Vec<String>,
    tokenize_one: impl Fn(&str) -> Result<Tokens, ModelError> + Send + 'static,
    input: fn(Vec<u32>) -> I,
) -> Result<Embedded, ApiError> {
    let place = batcher.reserve().map_err(ApiError::from)?;
    let tokens =
        api::tokenize(state, move || texts.iter().map(|t| tokenize_one(t)).collect::<Result<Vec<_>, _>>())
            .await?
            .map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
    let counts = tokens.iter().map(|t| t.ids.len()).collect();
    let truncated = tokens.iter().map(|t| t.truncated).collect();
    let rx = place.submit(tokens.into_iter().map(|t| input(t.ids)).collect()).map_err(ApiError::from)?;
    let vectors = worker_answer(rx, batcher.queue(), id).await?;
    Ok(Embedded { vectors, tokens: counts, truncated })
}

/// Token ids of one input, with special tokens, already truncated to the model's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// True when the input was longer than the limit and was cut.
    pub truncated: bool,
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
