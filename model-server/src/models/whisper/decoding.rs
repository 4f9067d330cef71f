//! Greedy decoding of one 30-second window with Whisper's logit rules, in the order and with
//! the exact conditions CTranslate2 applies them (faster-whisper's engine, the parity
//! reference): suppressed tokens; blank and end-of-text suppressed at the first step;
//! timestamp rules (timestamps in pairs, never decreasing and strictly increasing after text,
//! the first one at most 1 s in, a timestamp forced when timestamps together outweigh the
//! likeliest text token); then the first maximum of the log-probabilities.

use super::network::{Audio, Network};
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

/// Greedy decoding of one window after `prompt` (the start-of-transcript sequence, maybe
/// preceded by `<|startofprev|>` and earlier text).
pub fn greedy(
    network: &Network,
    audio: &Audio,
    rules: &Rules,
    prompt: &[u32],
) -> Result<Decoded, ModelError> {
    let text_ctx = network.dims.text_ctx;
    if prompt.is_empty() || prompt.len() >= text_ctx {
        return Err(ModelError::Inference(format!(
            "a prompt of {} tokens; the decoder takes 1 to {}",
            prompt.len(),
            text_ctx - 1
        )));
    }
    // As CTranslate2: at most half the context, less the prompt beyond its last token.
    let max_new = (text_ctx / 2).min(text_ctx - (prompt.len() - 1));
    let mut seq = network.sequence();
    let sot_at = prompt.iter().position(|&t| t == rules.specials.sot);
    // The no-speech probability is read at the start-of-transcript position, before any rule.
    let mut no_speech_prob = 0.0;
    let mut logits = match sot_at {
        Some(i) if i + 1 < prompt.len() => {
            let at_sot = network.decode(audio, &mut seq, &prompt[..=i])?;
            no_speech_prob = no_speech(&at_sot, rules.no_speech);
            network.decode(audio, &mut seq, &prompt[i + 1..])?
        }
        Some(_) => {
            let logits = network.decode(audio, &mut seq, prompt)?;
            no_speech_prob = no_speech(&logits, rules.no_speech);
            logits
        }
        None => network.decode(audio, &mut seq, prompt)?,
    };
    let mut tokens = Vec::new();
    let mut sum_logprob = 0.0;
    for step in 0..max_new {
        rules.apply(&mut logits, &tokens);
        log_softmax(&mut logits);
        let (best, lp) = logits
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if v > bv { (i, v) } else { (bi, bv) });
        let token = best as u32;
        sum_logprob += lp;
        if token == rules.specials.eot {
            break;
        }
        tokens.push(token);
        if step + 1 == max_new {
            break;
        }
        logits = network.decode(audio, &mut seq, &[token])?;
    }
    Ok(Decoded { tokens, sum_logprob, no_speech_prob })
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
}
