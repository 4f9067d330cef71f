//! Greedy decoding of one 30-second window with Whisper's logit rules, in the order and with
//! the exact conditions CTranslate2 applies them (faster-whisper's engine, the parity
//! reference): suppressed tokens; blank and end-of-text suppressed at the first step;
//! timestamp rules (timestamps in pairs, never decreasing and strictly increasing after text,
//! the first one at most 1 s in, a timestamp forced when timestamps together outweigh the
//! likeliest text token); then the first maximum of the log-probabilities, or a draw at a
//! temperature (Whisper's fallback: from the temperature-scaled distribution, the
//! log-probability summed from the unscaled one, as openai-whisper scores its samples).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::engine::{Audio, Engine, Sequence, Step};
use crate::models::ModelError;

/// The last allowed initial timestamp, in 20 ms steps (1 s).
const MAX_INITIAL_TIMESTAMP: u32 = 50;

/// Special token ids of a Whisper vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub eot: u32,
    pub sot: u32,
    pub transcribe: u32,
    pub translate: u32,
    pub sot_prev: u32,
    pub no_timestamps: u32,
    /// `<|0.00|>`; timestamps run from here to the end of the vocabulary in 20 ms steps.
    pub timestamp_begin: u32,
}

/// What decoding a window gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Text and timestamp tokens, end-of-text excluded.
    pub tokens: Vec<u32>,
    /// Sum of the chosen tokens' log-probabilities, end-of-text included.
    pub sum_logprob: f32,
    /// Probability of the no-speech token at the first step.
    pub no_speech_prob: f32,
}

/// The rules' settings for one model.
pub struct Rules {
    pub specials: Specials,
    /// Never generated.
    pub suppress: Vec<u32>,
    /// Not generated at the first step (blank, end-of-text).
    pub suppress_begin: Vec<u32>,
    /// `<|nocaptions|>` or `<|nospeech|>`, if the vocabulary has it.
    pub no_speech: Option<u32>,
    pub timestamps: bool,
}

fn disable(logits: &mut [f32], range: std::ops::Range<usize>) {
    let end = range.end.min(logits.len());
    if range.start < end {
        logits[range.start..end].fill(f32::MIN);
    }
}

/// `x − max − ln Σ exp(x − max)`, in place.
fn log_softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let shift = -max - sum.ln();
    x.iter_mut().for_each(|v| *v += shift);
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

impl Rules {
    /// Applies every rule to the logits of the step after `generated` tokens.
    pub fn apply(&self, logits: &mut [f32], generated: &[u32]) {
        for &t in &self.suppress {
            disable(logits, t as usize..t as usize + 1);
        }
        if generated.is_empty() {
            for &t in &self.suppress_begin {
                disable(logits, t as usize..t as usize + 1);
            }
        }
        if !self.timestamps {
            return;
        }
        let s = self.specials;
        let (begin, end) = (s.timestamp_begin as usize, logits.len());
        disable(logits, s.no_timestamps as usize..s.no_timestamps as usize + 1);
        let is_ts = |t: u32| t >= s.timestamp_begin;
        let mut check = false;
        if let Some(&last) = generated.last() {
            // At the second step the "penultimate" token is the first one itself.
            let pen = generated.len().checked_sub(2).map_or(last, |i| generated[i]);
            if is_ts(last) {
                if is_ts(pen) {
                    // A pair just closed (or the first timestamp): text must follow.
                    disable(logits, begin..end);
                } else {
                    // A segment's end is open: only its end time (or end-of-text) may follow.
                    disable(logits, 0..s.eot as usize);
                    disable(logits, begin..last as usize);
                    check = true;
                }
            } else {
                check = true;
                if let Some(&t) = generated.iter().rev().find(|&&t| is_ts(t)) {
                    disable(logits, begin..t as usize + 1);
                }
            }
        } else {
            disable(logits, 0..begin);
            disable(logits, begin + MAX_INITIAL_TIMESTAMP as usize + 1..end);
        }
        if check {
            let mut lp = logits.to_vec();
            log_softmax(&mut lp);
            let timestamp = log_sum_exp(&lp[begin..]);
            let text = lp[..begin].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if timestamp > text {
                disable(logits, 0..begin);
            }
        }
    }
}

/// How a hypothesis picks each token.
pub enum Choice {
    /// The likeliest token.
    Greedy,
    /// A draw from the distribution at `temperature`, with its own seeded generator.
    Sample { temperature: f32, rng: Box<StdRng> },
}

impl Choice {
    pub fn sample(temperature: f32, seed: u64) -> Choice {
        Choice::Sample { temperature, rng: Box::new(StdRng::seed_from_u64(seed)) }
    }
}

/// One hypothesis being decoded over a window, a step at a time, so that the hypotheses of
/// many windows (and requests) can step together through [`Engine::decode_batch`].
pub struct Hypothesis {
    seq: Sequence,
    /// The tokens the next step feeds.
    feed: Vec<u32>,
    /// Prompt tokens after `<|startoftranscript|>`, fed once the logits there are read.
    rest: Vec<u32>,
    /// The next logits are those at `<|startoftranscript|>` (the no-speech probability).
    at_sot: bool,
    choice: Choice,
    max_new: usize,
    decoded: Decoded,
    done: bool,
}

impl Hypothesis {
    /// A hypothesis after `prompt` (the start-of-transcript sequence, maybe preceded by
    /// `<|startofprev|>` and earlier text).
    pub fn new(engine: &Engine, rules: &Rules, prompt: &[u32], choice: Choice) -> Result<Self, ModelError> {
        let text_ctx = engine.dims().text_ctx;
        if prompt.is_empty() || prompt.len() >= text_ctx {
            return Err(ModelError::Inference(format!(
                "a prompt of {} tokens; the decoder takes 1 to {}",
                prompt.len(),
                text_ctx - 1
            )));
        }
        // As CTranslate2: at most half the context, less the prompt beyond its last token.
        let max_new = (text_ctx / 2).min(text_ctx - (prompt.len() - 1));
        let (feed, rest, at_sot) = match prompt.iter().position(|&t| t == rules.specials.sot) {
            Some(i) => (prompt[..=i].to_vec(), prompt[i + 1..].to_vec(), true),
            None => (prompt.to_vec(), Vec::new(), false),
        };
        Ok(Hypothesis {
            seq: engine.sequence(),
            feed,
            rest,
            at_sot,
            choice,
            max_new,
            decoded: Decoded { tokens: Vec::new(), sum_logprob: 0.0, no_speech_prob: 0.0 },
            done: false,
        })
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The step this hypothesis takes next, against its window's `audio`.
    pub fn step<'a>(&'a mut self, audio: &'a Audio) -> Step<'a> {
        Step { audio, seq: &mut self.seq, tokens: &self.feed }
    }

    /// Takes the logits after the tokens fed: reads the no-speech probability at
    /// `<|startoftranscript|>`, then applies the rules and picks the next token.
    pub fn advance(&mut self, rules: &Rules, mut logits: Vec<f32>) {
        if self.at_sot {
            // Read before any rule.
            self.decoded.no_speech_prob = no_speech(&logits, rules.no_speech);
            self.at_sot = false;
            if !self.rest.is_empty() {
                self.feed = std::mem::take(&mut self.rest);
                return;
            }
        }
        let tokens = &mut self.decoded.tokens;
        rules.apply(&mut logits, tokens);
        log_softmax(&mut logits);
        let token = match &mut self.choice {
            Choice::Greedy => argmax(&logits),
            Choice::Sample { temperature, rng } => draw(&logits, *temperature, rng),
        };
        self.decoded.sum_logprob += logits[token as usize];
        if token == rules.specials.eot {
            self.done = true;
            return;
        }
        tokens.push(token);
        if tokens.len() == self.max_new {
            self.done = true;
            return;
        }
        self.feed = vec![token];
    }

    pub fn decoded(&self) -> &Decoded {
        &self.decoded
    }

    pub fn into_decoded(self) -> Decoded {
        self.decoded
    }
}

/// The first maximum.
fn argmax(x: &[f32]) -> u32 {
    let (best, _) = x
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if v > bv { (i, v) } else { (bi, bv) });
    best as u32
}

/// A draw from `softmax(logprobs / temperature)`; suppressed tokens (log-probability about
/// `f32::MIN`) weigh nothing.
fn draw(logprobs: &[f32], temperature: f32, rng: &mut StdRng) -> u32 {
    let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let t = temperature.max(f32::EPSILON);
    let weight = |lp: f32| ((lp - max) / t).exp();
    let total: f32 = logprobs.iter().map(|&lp| weight(lp)).sum();
    let mut left = rng.random::<f32>() * total;
    for (i, &lp) in logprobs.iter().enumerate() {
        left -= weight(lp);
        if left <= 0.0 {
            return i as u32;
        }
    }
    argmax(logprobs)
}

/// Greedy decoding of one window after `prompt`, alone.
pub fn greedy(engine: &Engine, audio: &Audio, rules: &Rules, prompt: &[u32]) -> Result<Decoded, ModelError> {
    let mut hypothesis = Hypothesis::new(engine, rules, prompt, Choice::Greedy)?;
    while !hypothesis.is_done() {
        let logits = engine.decode_batch(&mut [hypothesis.step(audio)])?;
        let logits =
            logits.into_iter().next().ok_or_else(|| ModelError::Inference("no logits".to_string()))?;
        hypothesis.advance(rules, logits);
    }
    Ok(hypothesis.into_decoded())
}

fn no_speech(logits: &[f32], token: Option<u32>) -> f32 {
    let Some(t) = token.filter(|&t| (t as usize) < logits.len()) else { return 0.0 };
    let mut p = logits.to_vec();
    log_softmax(&mut p);
    p[t as usize].exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let specials = Specials {
            eot: 3,
            sot: 4,
            transcribe: 5,
            translate: 6,
            sot_prev: 7,
            no_timestamps: 8,
            timestamp_begin: 9,
        };
        Rules { specials, suppress: vec![1], suppress_begin: vec![0, 3], no_speech: None, timestamps: true }
    }

    fn allowed(logits: &[f32]) -> Vec<usize> {
        logits.iter().enumerate().filter(|(_, v)| **v > f32::MIN).map(|(i, _)| i).collect()
    }

    #[test]
    fn timestamp_rules_follow_ctranslate2() {
        // Vocabulary: 0..9 text/specials, 9.. timestamps (9 = 0.00 s).
        let r = rules();
        let vocab = 9 + 60;
        // Step 0: only timestamps up to 1 s.
        let mut l = vec![0.0; vocab];
        r.apply(&mut l, &[]);
        assert_eq!(allowed(&l), (9..=9 + 50).collect::<Vec<_>>());
        // After a single timestamp: text is out except end-of-text (likely enough here to
        // survive the probability rule); earlier timestamps out.
        let mut l = vec![0.0; vocab];
        l[3] = 10.0;
        r.apply(&mut l, &[2, 12]);
        let a = allowed(&l);
        assert!(
            a.contains(&3) && a.contains(&12) && !a.iter().any(|&t| t < 3 || (9..12).contains(&t)),
            "{a:?}"
        );
        // After a pair: no timestamp.
        let mut l = vec![0.0; vocab];
        l[2] = 10.0;
        r.apply(&mut l, &[12, 0, 13, 13]);
        assert_eq!(allowed(&l), [0, 2, 3, 4, 5, 6, 7]);
        // After text: timestamps strictly after the last one; when timestamps together
        // outweigh the best text token, only timestamps remain.
        let mut l = vec![0.0; vocab];
        r.apply(&mut l, &[12, 0]);
        assert_eq!(allowed(&l), (13..vocab).collect::<Vec<_>>());
        let mut l = vec![-10.0; vocab];
        l[2] = 10.0;
        r.apply(&mut l, &[12, 0]);
        assert!(allowed(&l).contains(&2) && allowed(&l).contains(&13) && !allowed(&l).contains(&12));
    }

    #[test]
    fn draws_follow_the_temperature_and_never_pick_a_suppressed_token() {
        let mut lp = vec![-0.1f32, -2.5, -4.0, f32::MIN];
        log_softmax(&mut lp);
        let count = |t: f32| {
            let mut rng = StdRng::seed_from_u64(3);
            let mut seen = [0usize; 4];
            (0..2000).for_each(|_| seen[draw(&lp, t, &mut rng) as usize] += 1);
            seen
        };
        let cold = count(0.01);
        assert_eq!(cold, [2000, 0, 0, 0], "near zero is greedy");
        let hot = count(1.0);
        assert_eq!(hot[3], 0, "a suppressed token is never drawn");
        assert!(hot[1] > 100 && hot[2] > 10 && hot[0] > hot[1], "{hot:?}");
        assert_eq!(count(1.0), hot, "a seed gives the same draws");
    }
}
