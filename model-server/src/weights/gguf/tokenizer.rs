//! A Hugging Face `tokenizers` tokenizer rebuilt from GGUF metadata, for GGUF files that come
//! without their tokenizer.json.
//!
//! Vocabulary and merges alone are not enough: a byte-level BPE splits text into words first,
//! and that pre-tokenizer is named only by `tokenizer.ggml.pre`. Building it with the plain
//! GPT-2 split for every model would tokenize digits (and more) differently from the model's own
//! tokenizer, so each supported name maps to the pre-tokenizer the original tokenizer.json has,
//! and an unknown name is refused rather than guessed.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use candle_core::quantized::gguf_file::{self, Value};

use super::metadata_string;
use crate::models::ModelError;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// A tokenizer rebuilt from GGUF metadata, with the ids of its control tokens.
pub struct GgufVocab {
    pub tokenizer: Tokenizer,
    /// Control tokens (special: never part of generated text).
    pub control: Vec<u32>,
}

/// Token strings by id.
pub fn tokens(ct: &gguf_file::Content) -> Result<Vec<String>, ModelError> {
    strings(ct, "tokenizer.ggml.tokens")
}

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, ModelError> {
    match ct.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ModelError::Unsupported(format!("GGUF {key} holds {other:?}, not strings"))),
            })
            .collect(),
        Some(other) => Err(ModelError::Unsupported(format!("GGUF {key} is {other:?}, not an array"))),
        None => Err(ModelError::Unsupported(format!("GGUF metadata has no {key}"))),
    }
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true));
    match pre {
        // SmolLM/SmolLM2's tokenizer.json: each digit on its own, then the GPT-2 byte-level split.
        "smollm" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(),
        ]))),
        "gpt2" | "gpt-2" => Ok(byte_level()),
        other => Err(ModelError::Unsupported(format!(
            "GGUF pre-tokenizer {other:?} cannot be rebuilt from metadata here (supported: smollm, gpt2); \
             put the model's tokenizer.json beside the GGUF file"
        ))),
    }
}

pub fn from_gguf(ct: &gguf_file::Content) -> Result<GgufVocab, ModelError> {
    let model = metadata_string(ct, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model {model:?}: only byte-level BPE (\"gpt2\") is rebuilt from metadata; \
             put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let pre = metadata_string(ct, "tokenizer.ggml.pre").unwrap_or_else(|_| "gpt2".to_string());
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let merges = strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Unsupported(format!("GGUF merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("building BPE from GGUF: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let mut control = Vec::new();
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (id, kind) in types.iter().enumerate() {
        let Some(text) = tokens.get(id) else { continue };
        if *kind == TOKEN_CONTROL {
            special.push(AddedToken::from(text.clone(), true));
            control.push(id as u32);
        } else if *kind == TOKEN_USER_DEFINED {
            user.push(AddedToken::from(text.clone(), false));
        }
    }
    // Matched as whole strings before BPE, so a chat template's <|im_start|> is one token.
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);
    Ok(GgufVocab { tokenizer, control })
}
