//! Long-form transcription: Whisper's sequential 30-second windows, as faster-whisper walks
//! them. Each window is decoded after the text so far (`<|startofprev|>` and up to 223 earlier
//! tokens); its timestamp pairs cut it into segments; the next window starts at the last
//! closed timestamp, or after the window when the text ran to its end. A window the model
//! takes for silence (no-speech probability above 0.6 and average log-probability below -1)
//! is skipped.

use super::decoding::Decoded;
use super::mel::{HOP, SAMPLE_RATE};
use super::{Task, WINDOW_FRAMES, Whisper};
use crate::models::ModelError;

/// Seconds per mel frame.
const FRAME_SECONDS: f64 = HOP as f64 / SAMPLE_RATE as f64;
/// Seconds per timestamp step.
const TIMESTAMP_SECONDS: f64 = 0.02;
/// Mel frames per timestamp step (the encoder's stride).
const FRAMES_PER_TIMESTAMP: usize = 2;
const NO_SPEECH_THRESHOLD: f32 = 0.6;
const LOGPROB_THRESHOLD: f32 = -1.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// A language code (`en`, `de`); detected from the first window when absent.
    pub language: Option<String>,
    pub task: Task,
    /// Text that precedes the audio (names, spelling, style).
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    /// The window's average log-probability per token and no-speech probability.
    pub avg_logprob: f32,
    pub no_speech_prob: f32,
    /// The window's first frame.
    pub seek: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// The language code used (given or detected).
    pub language: String,
    /// Its probability when detected, 1 when given.
    pub language_probability: f32,
    pub duration: f64,
    pub segments: Vec<Segment>,
}

impl Transcript {
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect::<String>().trim().to_string()
    }
}

/// What a request asks that this model cannot do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    #[error("unknown language {0:?}; give an ISO 639-1 code such as \"en\" or \"de\" that this model knows")]
    UnknownLanguage(String),
    #[error("this model is English-only: it neither translates nor transcribes {0:?}")]
    EnglishOnly(String),
}

impl Whisper {
    /// Checks `options` against this model before any audio is decoded.
    pub fn check_options(&self, options: &Options) -> Result<(), OptionsError> {
        if !self.is_multilingual() {
            if options.task == Task::Translate {
                return Err(OptionsError::EnglishOnly("translate".to_string()));
            }
            if let Some(lang) = options.language.as_deref().filter(|l| *l != "en") {
                return Err(OptionsError::EnglishOnly(lang.to_string()));
            }
            return Ok(());
        }
        match options.language.as_deref() {
            Some(code) if self.language_token(code).is_none() => {
                Err(OptionsError::UnknownLanguage(code.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Transcribes (or translates) 16 kHz mono `samples` whole; `progress` hears the seconds
    /// done after each window.
    pub fn transcribe(
        &self,
        samples: &[f32],
        options: &Options,
        mut progress: impl FnMut(f64),
    ) -> Result<Transcript, ModelError> {
        self.check_options(options).map_err(|e| ModelError::Inference(e.to_string()))?;
        let mels = self.network().dims.mels;
        let features = self.features(samples);
        let frames = features.len() / mels;
        // The frame after the last hop is left out of the content, as faster-whisper does.
        let content = frames.saturating_sub(1);
        let duration = samples.len() as f64 / SAMPLE_RATE as f64;
        let (language, language_probability, lang_token) = if !self.is_multilingual() {
            ("en".to_string(), 1.0, None)
        } else if let Some(code) = &options.language {
            (code.clone(), 1.0, self.language_token(code))
        } else {
            let first = self.encode(&self.window(&features, frames, 0, frames.min(WINDOW_FRAMES)))?;
            let (token, p) = self.detect_language(&first)?;
            (self.language_code(token).unwrap_or_default(), p, Some(token))
        };
        let sot_sequence = self.sot_sequence(lang_token, options.task);
        let specials = self.specials();
        let mut history: Vec<u32> = match options.prompt.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
            Some(p) => self.encode_text(&format!(" {p}"))?,
            None => Vec::new(),
        };
        let mut segments = Vec::new();
        let mut seek = 0;
        while seek < content {
            let size = WINDOW_FRAMES.min(content - seek);
            let offset = seek as f64 * FRAME_SECONDS;
            let audio = self.encode(&self.window(&features, frames, seek, size))?;
            let mut prompt = Vec::new();
            if !history.is_empty() {
                let keep = self.network().dims.text_ctx / 2 - 1;
                prompt.push(specials.sot_prev);
                prompt.extend_from_slice(&history[history.len().saturating_sub(keep)..]);
            }
            prompt.extend_from_slice(&sot_sequence);
            let decoded = self.decode(&audio, &prompt)?;
            let avg_logprob = decoded.sum_logprob / (decoded.tokens.len() + 1) as f32;
            if decoded.no_speech_prob > NO_SPEECH_THRESHOLD && avg_logprob <= LOGPROB_THRESHOLD {
                seek += size;
                progress((seek as f64 * FRAME_SECONDS).min(duration));
                continue;
            }
            let (pieces, advance) = self.split(&decoded, size);
            for (tokens, start, end) in pieces {
                let text = self.text(&tokens)?;
                let (start, end) = (offset + start, offset + end);
                if start == end || text.trim().is_empty() {
                    continue;
                }
                history.extend_from_slice(&tokens);
                segments.push(Segment {
                    start,
                    end,
                    text,
                    tokens,
                    avg_logprob,
                    no_speech_prob: decoded.no_speech_prob,
                    seek,
                });
            }
            // A window always moves the walk forward.
            seek += advance.clamp(1, size);
            progress((seek as f64 * FRAME_SECONDS).min(duration));
        }
        Ok(Transcript { language, language_probability, duration, segments })
    }

    /// A window's tokens as (tokens, start, end) segments in seconds from the window's start,
    /// and the frames to advance.
    fn split(&self, decoded: &Decoded, size: usize) -> (Vec<(Vec<u32>, f64, f64)>, usize) {
        let begin = self.specials().timestamp_begin;
        let tokens = &decoded.tokens;
        let is_ts = |t: u32| t >= begin;
        let time = |t: u32| f64::from(t - begin) * TIMESTAMP_SECONDS;
        let single_end =
            tokens.len() >= 2 && !is_ts(tokens[tokens.len() - 2]) && is_ts(tokens[tokens.len() - 1]);
        let mut cuts: Vec<usize> =
            (1..tokens.len()).filter(|&i| is_ts(tokens[i]) && is_ts(tokens[i - 1])).collect();
        if cuts.is_empty() {
            let duration = match tokens.iter().rev().find(|&&t| is_ts(t)) {
                Some(&t) if t != begin => time(t),
                _ => size as f64 * FRAME_SECONDS,
            };
            return (vec![(tokens.clone(), 0.0, duration)], size);
        }
        if single_end {
            cuts.push(tokens.len());
        }
        let mut pieces = Vec::new();
        let mut last = 0;
        for &cut in &cuts {
            let piece = tokens[last..cut].to_vec();
            let (Some(&first), Some(&end)) = (piece.first(), piece.last()) else { continue };
            let start = if is_ts(first) { time(first) } else { 0.0 };
            let end = if is_ts(end) { time(end) } else { start };
            pieces.push((piece, start, end));
            last = cut;
        }
        let advance = if single_end {
            size
        } else {
            tokens
                .get(last.wrapping_sub(1))
                .filter(|&&t| is_ts(t))
                .map_or(size, |&t| (t - begin) as usize * FRAMES_PER_TIMESTAMP)
        };
        (pieces, advance)
    }
}
