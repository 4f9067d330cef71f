//! Long-form transcription: Whisper's sequential 30-second windows, as faster-whisper walks
//! them. Each window is decoded after the text so far (`<|startofprev|>` and up to 223 earlier
//! tokens); its timestamp pairs cut it into segments; the next window starts at the last
//! closed timestamp, or after the window when the text ran to its end. A window the model
//! takes for silence (no-speech probability above 0.6 and average log-probability below -1)
//! is skipped. A window whose text loops (compresses too well) or is unlikely is decoded again
//! at rising temperatures (Whisper's fallback). Transcriptions are state machines so that many
//! step together: their windows share encoder batches and their hypotheses decoder steps.

use super::decoding::{Choice, Decoded, Hypothesis};
use super::engine::{Audio, Sequence, Step};
use super::mel::{HOP, SAMPLE_RATE};
use super::{AudioFeatures, Task, WINDOW_FRAMES, Whisper};
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
    /// Temperatures tried in turn while a window's text looks wrong (Whisper's fallback);
    /// `[0.0]` is greedy decoding alone.
    pub temperatures: Vec<f32>,
}

/// Whisper's and faster-whisper's default fallback schedule.
pub const FALLBACK_TEMPERATURES: [f32; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];

impl Options {
    /// Transcription in the spoken language (detected when the model is multilingual), with
    /// the default fallback.
    pub fn transcribe() -> Options {
        Options {
            language: None,
            task: Task::Transcribe,
            prompt: None,
            temperatures: FALLBACK_TEMPERATURES.to_vec(),
        }
    }

    /// The fallback schedule from `temperature` up to 1 in steps of 0.2, as Whisper builds it
    /// from a requested temperature.
    pub fn schedule_from(temperature: f32) -> Vec<f32> {
        let mut out = vec![temperature];
        let mut t = temperature;
        while t + 0.2 <= 1.0 + 1e-6 {
            t += 0.2;
            out.push(t);
        }
        out
    }
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
    /// The temperature the window was decoded at, and its text's compression ratio.
    pub temperature: f32,
    pub compression_ratio: f32,
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

/// Windows encoded together at most (the encoder's activations grow with each).
pub const ENCODE_BATCH: usize = 4;
/// Hypotheses sampled at each temperature above zero; the likeliest is kept.
const BEST_OF: usize = 5;
/// A window whose text compresses better than this is taken for a repetition loop.
const COMPRESSION_RATIO_THRESHOLD: f32 = 2.4;
/// A window decoded hotter than this no longer conditions the next one on its text.
const PROMPT_RESET_TEMPERATURE: f32 = 0.5;

/// One transcription in progress: its features, the text so far and where the walk over the
/// windows stands. [`Whisper::advance`] moves many of them on together.
pub struct Transcription {
    features: Vec<f32>,
    frames: usize,
    /// Frames of real audio (the frame after the last hop left out, as faster-whisper does).
    content: usize,
    duration: f64,
    options: Options,
    /// Code, probability and token, once given or detected.
    language: Option<(String, f32, Option<u32>)>,
    sot_sequence: Vec<u32>,
    history: Vec<u32>,
    segments: Vec<Segment>,
    seek: usize,
    stage: Stage,
}

enum Stage {
    /// The window at `seek` waits for the encoder; `detect`: the first window, for language
    /// detection.
    Encode {
        detect: bool,
    },
    /// One decoder step after `<|startoftranscript|>` picks the language.
    Detect {
        audio: Audio,
        seq: Sequence,
        sot: [u32; 1],
        reuse: bool,
    },
    /// The window at `seek` being decoded at `temperatures[attempt]`.
    Decode {
        audio: Audio,
        attempt: usize,
        hypotheses: Vec<Hypothesis>,
        tried: Vec<Attempt>,
    },
    Done,
    Failed(ModelError),
}

/// A finished decoding of a window at one temperature.
struct Attempt {
    decoded: Decoded,
    temperature: f32,
    avg_logprob: f32,
    compression_ratio: f32,
}

impl Transcription {
    /// A transcription of 16 kHz mono `samples` (its features computed here); checks the
    /// options against the model first.
    pub fn new(model: &Whisper, samples: &[f32], options: Options) -> Result<Self, ModelError> {
        Self::of_features(model, model.audio_features(samples), options)
    }

    /// A transcription of a clip's features ([`Whisper::audio_features`]).
    pub fn of_features(model: &Whisper, audio: AudioFeatures, options: Options) -> Result<Self, ModelError> {
        model.check_options(&options).map_err(|e| ModelError::Inference(e.to_string()))?;
        if options.temperatures.is_empty() {
            return Err(ModelError::Inference("no temperature to decode at".to_string()));
        }
        let AudioFeatures { features, frames, seconds } = audio;
        if features.len() != frames * model.engine().dims().mels {
            return Err(ModelError::Inference("features of another model's shape".to_string()));
        }
        let language = if !model.is_multilingual() {
            Some(("en".to_string(), 1.0, None))
        } else {
            options.language.as_ref().map(|code| (code.clone(), 1.0, model.language_token(code)))
        };
        let history = match options.prompt.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
            Some(p) => model.encode_text(&format!(" {p}"))?,
            None => Vec::new(),
        };
        let sot_sequence = language
            .as_ref()
            .map(|(_, _, token)| model.sot_sequence(*token, options.task))
            .unwrap_or_default();
        let detect = language.is_none();
        let mut t = Transcription {
            features,
            frames,
            content: frames.saturating_sub(1),
            duration: seconds,
            options,
            language,
            sot_sequence,
            history,
            segments: Vec::new(),
            seek: 0,
            stage: Stage::Encode { detect },
        };
        if !detect && t.content == 0 {
            t.stage = Stage::Done;
        }
        Ok(t)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done | Stage::Failed(_))
    }

    /// Seconds of audio walked so far.
    pub fn seconds_done(&self) -> f64 {
        (self.seek as f64 * FRAME_SECONDS).min(self.duration)
    }

    /// Seconds of audio in all.
    pub fn duration(&self) -> f64 {
        self.duration
    }

    /// The transcript, once done.
    pub fn finish(self) -> Result<Transcript, ModelError> {
        match self.stage {
            Stage::Failed(e) => Err(e),
            Stage::Done => {
                let (language, language_probability, _) = self.language.unwrap_or_default();
                Ok(Transcript {
                    language,
                    language_probability,
                    duration: self.duration,
                    segments: self.segments,
                })
            }
            _ => Err(ModelError::Inference("the transcription has not finished".to_string())),
        }
    }

    fn fail(&mut self, e: ModelError) {
        self.stage = Stage::Failed(e);
    }

    fn window_waiting(&self) -> bool {
        matches!(self.stage, Stage::Encode { .. })
    }

    /// The window the encoder takes next: for detection the first 30 s whole (as
    /// faster-whisper detects), else the content from `seek`.
    fn window(&self, model: &Whisper) -> Vec<f32> {
        match self.stage {
            Stage::Encode { detect: true } => {
                model.window(&self.features, self.frames, 0, self.frames.min(WINDOW_FRAMES))
            }
            _ => model.window(&self.features, self.frames, self.seek, self.window_size()),
        }
    }

    fn window_size(&self) -> usize {
        WINDOW_FRAMES.min(self.content - self.seek.min(self.content))
    }

    fn encoded(&mut self, model: &Whisper, audio: Audio) {
        if let Stage::Encode { detect: true } = self.stage {
            // The detection window is the first decoding window when the audio fills it.
            let reuse = self.frames.min(WINDOW_FRAMES) == self.window_size();
            let sot = [model.specials().sot];
            self.stage = Stage::Detect { audio, seq: model.engine().sequence(), sot, reuse };
        } else {
            self.start_attempt(model, audio, 0, Vec::new());
        }
    }

    /// Decodes the window at `seek` (encoded as `audio`) at `temperatures[attempt]`.
    fn start_attempt(&mut self, model: &Whisper, audio: Audio, attempt: usize, tried: Vec<Attempt>) {
        let mut prompt = Vec::new();
        if !self.history.is_empty() {
            let keep = model.engine().dims().text_ctx / 2 - 1;
            prompt.push(model.specials().sot_prev);
            prompt.extend_from_slice(&self.history[self.history.len().saturating_sub(keep)..]);
        }
        prompt.extend_from_slice(&self.sot_sequence);
        let temperature = self.options.temperatures[attempt];
        let choices: Vec<Choice> = if temperature > 0.0 {
            // Seeded by place, so the same audio gives the same transcript.
            (0..BEST_OF)
                .map(|c| {
                    Choice::sample(temperature, (self.seek as u64) << 16 | (attempt as u64) << 8 | c as u64)
                })
                .collect()
        } else {
            vec![Choice::Greedy]
        };
        let hypotheses: Result<Vec<_>, _> = choices
            .into_iter()
            .map(|choice| Hypothesis::new(model.engine(), model.rules(), &prompt, choice))
            .collect();
        match hypotheses {
            Ok(hypotheses) => self.stage = Stage::Decode { audio, attempt, hypotheses, tried },
            Err(e) => self.fail(e),
        }
    }

    /// The decoder steps this transcription takes next.
    fn steps<'a>(&'a mut self, out: &mut Vec<Step<'a>>) {
        match &mut self.stage {
            Stage::Detect { audio, seq, sot, .. } => out.push(Step { audio, seq, tokens: sot }),
            Stage::Decode { audio, hypotheses, .. } => {
                let audio = &*audio;
                out.extend(hypotheses.iter_mut().filter(|h| !h.is_done()).map(|h| h.step(audio)));
            }
            _ => {}
        }
    }

    /// Takes the logits of the steps [`Self::steps`] gave, in order.
    fn stepped(&mut self, model: &Whisper, logits: Vec<Vec<f32>>) {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Detect { audio, reuse, .. } => {
                let Some(logits) = logits.first() else {
                    return self.fail(ModelError::Inference("no logits for language detection".to_string()));
                };
                let (token, p) = model.language_from_logits(logits);
                let code = model.language_code(token).unwrap_or_default();
                self.sot_sequence = model.sot_sequence(Some(token), self.options.task);
                self.language = Some((code, p, Some(token)));
                if self.content == 0 {
                    self.stage = Stage::Done;
                } else if reuse {
                    self.start_attempt(model, audio, 0, Vec::new());
                } else {
                    self.stage = Stage::Encode { detect: false };
                }
            }
            Stage::Decode { audio, attempt, mut hypotheses, tried } => {
                let live = hypotheses.iter_mut().filter(|h| !h.is_done());
                for (h, logits) in live.zip(logits) {
                    h.advance(model.rules(), logits);
                }
                if hypotheses.iter().all(Hypothesis::is_done) {
                    self.attempt_done(model, audio, attempt, hypotheses, tried);
                } else {
                    self.stage = Stage::Decode { audio, attempt, hypotheses, tried };
                }
            }
            other => self.stage = other,
        }
    }

    /// Whisper's fallback: a window whose text compresses too well (a repetition loop) or whose
    /// average log-probability is too low is decoded again hotter, unless it is silence; when
    /// every temperature fails, the likeliest attempt that does not loop is kept.
    fn attempt_done(
        &mut self,
        model: &Whisper,
        audio: Audio,
        attempt: usize,
        hypotheses: Vec<Hypothesis>,
        mut tried: Vec<Attempt>,
    ) {
        let temperature = self.options.temperatures[attempt];
        // The best hypothesis by log-probability per token.
        let score = |h: &Hypothesis| h.decoded().sum_logprob / h.decoded().tokens.len().max(1) as f32;
        let Some(best) = hypotheses.into_iter().max_by(|a, b| score(a).total_cmp(&score(b))) else {
            return self.fail(ModelError::Inference("a window without a hypothesis".to_string()));
        };
        let decoded = best.into_decoded();
        let text = match model.text(&decoded.tokens) {
            Ok(text) => text,
            Err(e) => return self.fail(e),
        };
        let avg_logprob = decoded.sum_logprob / (decoded.tokens.len() + 1) as f32;
        let compression_ratio = compression_ratio(text.trim());
        let fallback = needs_fallback(decoded.no_speech_prob, avg_logprob, compression_ratio);
        tried.push(Attempt { decoded, temperature, avg_logprob, compression_ratio });
        if fallback && attempt + 1 < self.options.temperatures.len() {
            return self.start_attempt(model, audio, attempt + 1, tried);
        }
        let chosen = if fallback { best_of_failed(tried) } else { tried.pop() };
        let Some(chosen) = chosen else {
            return self.fail(ModelError::Inference("a window without an attempt".to_string()));
        };
        // As faster-whisper: the last temperature tried decides whether the prompt resets.
        self.window_done(model, chosen, temperature);
    }

    /// Cuts the decoded window into segments and moves on.
    fn window_done(&mut self, model: &Whisper, chosen: Attempt, last_temperature: f32) {
        let size = self.window_size();
        let Attempt { decoded, temperature, avg_logprob, compression_ratio } = chosen;
        if decoded.no_speech_prob > NO_SPEECH_THRESHOLD && avg_logprob <= LOGPROB_THRESHOLD {
            self.seek += size;
        } else {
            let offset = self.seek as f64 * FRAME_SECONDS;
            let (pieces, advance) = model.split(&decoded, size);
            for (tokens, start, end) in pieces {
                let text = match model.text(&tokens) {
                    Ok(text) => text,
                    Err(e) => return self.fail(e),
                };
                let (start, end) = (offset + start, offset + end);
                if start == end || text.trim().is_empty() {
                    continue;
                }
                self.history.extend_from_slice(&tokens);
                self.segments.push(Segment {
                    start,
                    end,
                    text,
                    tokens,
                    avg_logprob,
                    no_speech_prob: decoded.no_speech_prob,
                    temperature,
                    compression_ratio,
                    seek: self.seek,
                });
            }
            if last_temperature > PROMPT_RESET_TEMPERATURE {
                self.history.clear();
            }
            // A window always moves the walk forward.
            self.seek += advance.clamp(1, size.max(1));
        }
        self.stage = if self.seek < self.content { Stage::Encode { detect: false } } else { Stage::Done };
    }
}

/// Whether a window's decoding calls for another, hotter try: its text loops or is unlikely,
/// unless the window is silence (then it is skipped whatever its text).
fn needs_fallback(no_speech_prob: f32, avg_logprob: f32, compression_ratio: f32) -> bool {
    let silence = no_speech_prob > NO_SPEECH_THRESHOLD && avg_logprob < LOGPROB_THRESHOLD;
    !silence && (compression_ratio > COMPRESSION_RATIO_THRESHOLD || avg_logprob < LOGPROB_THRESHOLD)
}

/// When every temperature failed: the likeliest attempt among those that do not loop, or
/// among all when each loops.
fn best_of_failed(tried: Vec<Attempt>) -> Option<Attempt> {
    let loops = |a: &Attempt| a.compression_ratio > COMPRESSION_RATIO_THRESHOLD;
    let some_do_not = tried.iter().any(|a| !loops(a));
    tried
        .into_iter()
        .filter(|a| !(some_do_not && loops(a)))
        .max_by(|a, b| a.avg_logprob.total_cmp(&b.avg_logprob))
}

/// Bytes of `text` over bytes of its zlib compression (as Whisper computes it).
fn compression_ratio(text: &str) -> f32 {
    use std::io::Write;
    if text.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let compressed = z.write_all(text.as_bytes()).and_then(|()| z.finish()).map_or(0, |c| c.len());
    text.len() as f32 / compressed.max(1) as f32
}

impl Whisper {
    /// The most working memory one transcription holds at a time, beyond its features: one
    /// window's cross-attention keys and values and [`BEST_OF`] full decoder caches (46 MB for
    /// tiny.en, 1.2 GB for large-v3).
    pub fn transcription_bytes(&self) -> usize {
        let d = self.engine().dims();
        let per_position = d.decoder_layers * 2 * d.hidden * std::mem::size_of::<f32>();
        per_position * (d.audio_ctx + BEST_OF * d.text_ctx)
    }

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
        let mut one = [Transcription::new(self, samples, options.clone())?];
        let mut reported = 0.0;
        while !one[0].is_done() {
            self.advance(&mut one);
            let done = one[0].seconds_done();
            if done > reported {
                reported = done;
                progress(done);
            }
        }
        let [t] = one;
        t.finish()
    }

    /// Moves transcriptions on together: windows waiting for the encoder are encoded in one
    /// batch (up to [`ENCODE_BATCH`]); otherwise every hypothesis of every window being
    /// decoded takes one decoder step in one batch. A failure ends the transcriptions it
    /// touched, never the others.
    pub fn advance(&self, active: &mut [Transcription]) {
        let waiting: Vec<usize> =
            (0..active.len()).filter(|&i| active[i].window_waiting()).take(ENCODE_BATCH).collect();
        if !waiting.is_empty() {
            let windows: Vec<Vec<f32>> = waiting.iter().map(|&i| active[i].window(self)).collect();
            let views: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
            match self.engine().encode_batch(&views) {
                Ok(audio) => {
                    for (&i, audio) in waiting.iter().zip(audio) {
                        active[i].encoded(self, audio);
                    }
                }
                Err(e) => waiting.iter().for_each(|&i| active[i].fail(e.clone())),
            }
            return;
        }
        let mut steps = Vec::new();
        let mut counts = Vec::with_capacity(active.len());
        for t in active.iter_mut() {
            let before = steps.len();
            t.steps(&mut steps);
            counts.push(steps.len() - before);
        }
        if steps.is_empty() {
            return;
        }
        let result = self.engine().decode_batch(&mut steps);
        drop(steps);
        match result {
            Ok(logits) => {
                let mut logits = logits.into_iter();
                for (t, &n) in active.iter_mut().zip(&counts) {
                    if n > 0 {
                        t.stepped(self, logits.by_ref().take(n).collect());
                    }
                }
            }
            Err(e) => {
                for (t, &n) in active.iter_mut().zip(&counts) {
                    if n > 0 {
                        t.fail(e.clone());
                    }
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(temperature: f32, avg_logprob: f32, compression_ratio: f32) -> Attempt {
        let decoded = Decoded { tokens: Vec::new(), sum_logprob: 0.0, no_speech_prob: 0.0 };
        Attempt { decoded, temperature, avg_logprob, compression_ratio }
    }

    #[test]
    fn a_requested_temperature_starts_whisper_s_schedule() {
        let near =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!(near(&Options::schedule_from(0.0), &FALLBACK_TEMPERATURES));
        assert!(near(&Options::schedule_from(0.5), &[0.5, 0.7, 0.9]));
        assert!(near(&Options::schedule_from(1.0), &[1.0]));
    }

    #[test]
    fn repetition_compresses_well_and_prose_does_not() {
        let looped = "the the the the the the the the the the the the the the the the the the the the";
        assert!(compression_ratio(looped) > COMPRESSION_RATIO_THRESHOLD, "{}", compression_ratio(looped));
        let prose = "Kiln serves speech to text with the weights faster-whisper reads.";
        assert!(compression_ratio(prose) < 1.5, "{}", compression_ratio(prose));
        assert_eq!(compression_ratio(""), 0.0);
    }

    #[test]
    fn loops_and_unlikely_text_fall_back_but_silence_does_not() {
        assert!(!needs_fallback(0.1, -0.3, 1.2), "likely prose");
        assert!(needs_fallback(0.1, -0.3, 3.0), "a loop");
        assert!(needs_fallback(0.1, -1.5, 1.2), "unlikely text");
        assert!(!needs_fallback(0.9, -1.5, 1.2), "silence is skipped, not retried");
        assert!(needs_fallback(0.9, -0.5, 3.0), "likely but looping speech");
    }

    #[test]
    fn when_every_temperature_fails_the_likeliest_attempt_that_does_not_loop_is_kept() {
        let tried = vec![attempt(0.0, -0.2, 3.0), attempt(0.2, -1.4, 1.3), attempt(0.4, -1.2, 1.4)];
        assert_eq!(best_of_failed(tried).map(|a| a.temperature), Some(0.4));
        let all_loop = vec![attempt(0.0, -0.9, 3.0), attempt(0.2, -0.4, 2.5)];
        assert_eq!(best_of_failed(all_loop).map(|a| a.temperature), Some(0.2));
        assert!(best_of_failed(Vec::new()).is_none());
    }
}
