//! What both embedding families (text, image-text) share: one input's token ids, the text
//! path from request to vectors, and the vector arithmetic on their output.

use super::ModelFamily;
use super::batcher::{BatchInput, Batcher};
use crate::api::embeddings::Embedded;
use crate::api::{ApiError, tokenize, worker_answer};
use crate::manifest::ModelRef;
use crate::models::ModelError;
use crate::state::AppState;

/// Take a queue place (so a full queue refuses before any tokenizing), tokenize off the async
/// workers with `tokenize`, queue each text as `input(ids)`, and wait for the batch.
pub async fn embed_texts<F: ModelFamily, I: BatchInput>(
    state: &AppState<F>,
    batcher: &Batcher<I>,
    id: &ModelRef,
    texts: Vec<String>,
    tokenize_one: impl Fn(&str) -> Result<Tokens, ModelError> + Send + 'static,
    input: fn(Vec<u32>) -> I,
) -> Result<Embedded, ApiError> {
    let place = batcher.reserve().map_err(ApiError::from)?;
    let tokens =
        tokenize(state, move || texts.iter().map(|t| tokenize_one(t)).collect::<Result<Vec<_>, _>>())
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
