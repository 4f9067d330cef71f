//! Whisper (speech to text): an encoder over 30-second windows of log-mel features and a
//! decoder that writes text and timestamp tokens. Read from CTranslate2's layout (`model.bin`,
//! `config.json`, `tokenizer.json`), the one faster-whisper loads and the package registries
//! ship, or from a Hugging Face checkpoint (`config.json` with `model_type` whisper,
//! `model.safetensors`, `generation_config.json`, `tokenizer.json`).

pub mod candle;
pub mod decoding;
pub mod engine;
pub mod layout;
pub mod mel;
pub mod network;
pub mod transcribe;

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use self::decoding::{Decoded, Rules, Specials};
use self::engine::{Audio, Engine, Placement};
use self::layout::{Dims, Layout};
use self::mel::MelExtractor;
use crate::models::ModelError;
use crate::weights::ctranslate2::Ct2Model;
use crate::weights::tensors::Tensors;
use crate::weights::{read_json, read_json_if_present};

/// The spec name CTranslate2 writes for Whisper.
pub const CT2_SPEC: &str = "WhisperSpec";

/// Frames per 30-second window.
pub const WINDOW_FRAMES: usize = 3000;

/// CTranslate2's `config.json` beside a Whisper `model.bin`.
#[derive(Debug, Default, Deserialize)]
struct Ct2Config {
    #[serde(default)]
    suppress_ids: Vec<u32>,
    #[serde(default)]
    suppress_ids_begin: Vec<u32>,
    #[serde(default)]
    lang_ids: Vec<u32>,
}

/// A Hugging Face Whisper `config.json` (the fields that give the shape).
#[derive(Debug, Deserialize)]
struct HfConfig {
    d_model: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_attention_heads: usize,
    decoder_attention_heads: usize,
    encoder_ffn_dim: usize,
    decoder_ffn_dim: usize,
    num_mel_bins: usize,
    vocab_size: usize,
    max_source_positions: usize,
    max_target_positions: usize,
}

/// Its `generation_config.json`: the same token lists CTranslate2 keeps in its config.
#[derive(Debug, Default, Deserialize)]
struct HfGeneration {
    #[serde(default)]
    suppress_tokens: Vec<u32>,
    #[serde(default)]
    begin_suppress_tokens: Vec<u32>,
    #[serde(default)]
    lang_to_id: std::collections::BTreeMap<String, u32>,
}

/// A clip's features (`[mels × frames]`) and length: computed where the audio is decoded, so
/// the model's worker spends its time on the network only.
pub struct AudioFeatures {
    features: Vec<f32>,
    frames: usize,
    seconds: f64,
}

impl AudioFeatures {
    pub fn seconds(&self) -> f64 {
        self.seconds
    }
}

/// What a multilingual model is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Transcribe,
    /// Into English.
    Translate,
}

pub struct Whisper {
    engine: Engine,
    mel: MelExtractor,
    tokenizer: Tokenizer,
    rules: Rules,
    lang_ids: Vec<u32>,
}

impl Whisper {
    /// Loads a CTranslate2 Whisper directory (`model.bin`) or a Hugging Face checkpoint onto
    /// the packed CPU kernels.
    pub fn load(dir: &Path) -> Result<Whisper, ModelError> {
        Self::load_on(dir, &Placement::Packed)
    }

    /// As [`Whisper::load`], the network placed as asked.
    pub fn load_on(dir: &Path, placement: &Placement) -> Result<Whisper, ModelError> {
        let bin = dir.join("model.bin");
        if bin.is_file() {
            Self::from_ctranslate2(dir, &Ct2Model::open(&bin)?, placement)
        } else {
            Self::from_hugging_face(dir, placement)
        }
    }

    /// The model of a CTranslate2 directory whose `model.bin` the caller opened.
    pub fn from_ctranslate2(
        dir: &Path,
        model: &Ct2Model,
        placement: &Placement,
    ) -> Result<Whisper, ModelError> {
        if model.spec() != CT2_SPEC {
            return Err(ModelError::Unsupported(format!(
                "{} holds a {:?}; the speech-to-text family runs {CT2_SPEC}",
                dir.join("model.bin").display(),
                model.spec()
            )));
        }
        let engine = Engine::load(model, Layout::Ctranslate2, Dims::of_ctranslate2(model)?, placement)?;
        let config: Ct2Config = read_json_if_present(&dir.join("config.json"))?.unwrap_or_default();
        Self::assemble(dir, engine, config)
    }

    /// The model of a Hugging Face checkpoint directory.
    pub fn from_hugging_face(dir: &Path, placement: &Placement) -> Result<Whisper, ModelError> {
        let (engine, config) = Self::load_hugging_face(dir, placement)?;
        Self::assemble(dir, engine, config)
    }

    /// The tokenizer and decoding rules around a loaded network.
    fn assemble(dir: &Path, engine: Engine, config: Ct2Config) -> Result<Whisper, ModelError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "{} has no {token}; not a Whisper tokenizer",
                    tokenizer_path.display()
                ))
            })
        };
        let no_timestamps = id("<|notimestamps|>")?;
        let specials = Specials {
            eot: id("<|endoftext|>")?,
            sot: id("<|startoftranscript|>")?,
            transcribe: id("<|transcribe|>")?,
            translate: id("<|translate|>")?,
            sot_prev: id("<|startofprev|>")?,
            no_timestamps,
            timestamp_begin: no_timestamps + 1,
        };
        let vocab = engine.dims().vocab as u32;
        if specials.timestamp_begin >= vocab {
            return Err(ModelError::Tokenizer(format!(
                "<|notimestamps|> is token {no_timestamps} but the model has {vocab}; tokenizer and weights differ"
            )));
        }
        let no_speech =
            tokenizer.token_to_id("<|nospeech|>").or_else(|| tokenizer.token_to_id("<|nocaptions|>"));
        let suppress_begin = if config.suppress_ids_begin.is_empty() {
            vec![id("Ġ")?, specials.eot]
        } else {
            config.suppress_ids_begin
        };
        let rules =
            Rules { specials, suppress: config.suppress_ids, suppress_begin, no_speech, timestamps: true };
        let mel = MelExtractor::new(engine.dims().mels);
        Ok(Whisper { engine, mel, tokenizer, rules, lang_ids: config.lang_ids })
    }

    fn load_hugging_face(dir: &Path, placement: &Placement) -> Result<(Engine, Ct2Config), ModelError> {
        let c: HfConfig = read_json(&dir.join("config.json"))?;
        if c.encoder_ffn_dim != c.decoder_ffn_dim {
            return Err(ModelError::Unsupported(format!(
                "encoder_ffn_dim {} differs from decoder_ffn_dim {}; Whisper uses one width",
                c.encoder_ffn_dim, c.decoder_ffn_dim
            )));
        }
        let dims = Dims {
            mels: c.num_mel_bins,
            audio_ctx: c.max_source_positions,
            hidden: c.d_model,
            encoder_heads: c.encoder_attention_heads,
            encoder_layers: c.encoder_layers,
            ffn: c.encoder_ffn_dim,
            vocab: c.vocab_size,
            text_ctx: c.max_target_positions,
            decoder_heads: c.decoder_attention_heads,
            decoder_layers: c.decoder_layers,
        };
        let tensors = Tensors::open(dir)?;
        let engine = Engine::load(&tensors, Layout::HuggingFace, dims, placement)?;
        let g: HfGeneration = read_json_if_present(&dir.join("generation_config.json"))?.unwrap_or_default();
        let config = Ct2Config {
            suppress_ids: g.suppress_tokens,
            suppress_ids_begin: g.begin_suppress_tokens,
            lang_ids: g.lang_to_id.into_values().collect(),
        };
        Ok((engine, config))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether the model knows languages other than English (and can translate). English-only
    /// vocabularies have 51864 tokens, multilingual ones at least 51865 (as CTranslate2 tells).
    pub fn is_multilingual(&self) -> bool {
        self.engine.dims().vocab >= 51_865
    }

    /// Features of a whole clip of 16 kHz mono samples: `[mels × frames]`.
    pub fn features(&self, samples: &[f32]) -> Vec<f32> {
        self.mel.features(samples)
    }

    /// A clip of 16 kHz mono samples as a transcription takes it: its features and length.
    pub fn audio_features(&self, samples: &[f32]) -> AudioFeatures {
        let features = self.features(samples);
        let frames = features.len() / self.mel.mels().max(1);
        AudioFeatures { features, frames, seconds: samples.len() as f64 / mel::SAMPLE_RATE as f64 }
    }

    /// The window of `frames_total`-frame features starting at frame `seek`, `content` frames
    /// of it real, zero-padded to 3000 (as faster-whisper pads).
    pub fn window(&self, features: &[f32], frames_total: usize, seek: usize, content: usize) -> Vec<f32> {
        let mels = self.mel.mels();
        let mut out = vec![0.0; mels * WINDOW_FRAMES];
        let take = content.min(WINDOW_FRAMES).min(frames_total.saturating_sub(seek));
        for (dst, src) in out.chunks_exact_mut(WINDOW_FRAMES).zip(features.chunks_exact(frames_total)) {
            dst[..take].copy_from_slice(&src[seek..seek + take]);
        }
        out
    }

    /// The start-of-transcript sequence: `<|startoftranscript|>`, then for multilingual models
    /// the language and the task.
    pub fn sot_sequence(&self, language: Option<u32>, task: Task) -> Vec<u32> {
        let s = self.rules.specials;
        let mut out = vec![s.sot];
        if self.is_multilingual() {
            if let Some(lang) = language {
                out.push(lang);
            }
            out.push(match task {
                Task::Transcribe => s.transcribe,
                Task::Translate => s.translate,
            });
        }
        out
    }

    /// Runs the encoder over one window (`[mels × 3000]`).
    pub fn encode(&self, window: &[f32]) -> Result<Audio, ModelError> {
        self.engine.encode(window)
    }

    /// Greedy decoding of an encoded window after `prompt`.
    pub fn decode(&self, audio: &Audio, prompt: &[u32]) -> Result<Decoded, ModelError> {
        decoding::greedy(&self.engine, audio, &self.rules, prompt)
    }

    /// The likeliest spoken language of an encoded window and its probability among the
    /// languages: the decoder's next token after `<|startoftranscript|>`, restricted to the
    /// language tokens (as Whisper and CTranslate2 detect it).
    pub fn detect_language(&self, audio: &Audio) -> Result<(u32, f32), ModelError> {
        if !self.is_multilingual() || self.lang_ids.is_empty() {
            return Err(ModelError::Unsupported(
                "an English-only model does not detect languages".to_string(),
            ));
        }
        let mut seq = self.engine.sequence();
        let logits = self.engine.decode(audio, &mut seq, &[self.rules.specials.sot])?;
        Ok(self.language_from_logits(&logits))
    }

    /// The likeliest language token among the logits after `<|startoftranscript|>`, and its
    /// probability among the languages.
    pub fn language_from_logits(&self, logits: &[f32]) -> (u32, f32) {
        let langs: Vec<(u32, f32)> =
            self.lang_ids.iter().filter_map(|&t| logits.get(t as usize).map(|&l| (t, l))).collect();
        let max = langs.iter().map(|&(_, l)| l).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = langs.iter().map(|&(_, l)| (l - max).exp()).sum();
        let (token, best) = langs
            .iter()
            .copied()
            .fold((0, f32::NEG_INFINITY), |(bt, bl), (t, l)| if l > bl { (t, l) } else { (bt, bl) });
        (token, (best - max).exp() / total)
    }

    /// The language token for a code (`de` → `<|de|>`), if this model knows it.
    pub fn language_token(&self, code: &str) -> Option<u32> {
        let token = self.tokenizer.token_to_id(&format!("<|{code}|>"))?;
        self.lang_ids.contains(&token).then_some(token)
    }

    /// The code of a language token (`<|de|>` → `de`).
    pub fn language_code(&self, token: u32) -> Option<String> {
        let text = self.tokenizer.id_to_token(token)?;
        Some(text.strip_prefix("<|")?.strip_suffix("|>")?.to_string())
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn specials(&self) -> Specials {
        self.rules.specials
    }

    /// Token ids of plain text (no special tokens), as a prompt is fed.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `tokens`, timestamps and other special tokens left out.
    pub fn text(&self, tokens: &[u32]) -> Result<String, ModelError> {
        let eot = self.rules.specials.eot;
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < eot).collect();
        self.tokenizer.decode(&text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}
