//! Whisper's input features: the log-mel spectrogram of 16 kHz mono audio, computed as
//! faster-whisper's feature extractor does (the reference the parity tests hold Kiln to):
//! 160 zero samples appended, a 400-point periodic Hann window every 160 samples over the
//! reflect-padded signal, the power spectrum through a Slaney-scale mel filter bank (not
//! stored in checkpoints: built here), `log10` floored at 1e-10 and at 8 below the maximum,
//! then `(x + 4) / 4`.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

pub const SAMPLE_RATE: usize = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
/// Bins of the power spectrum: `N_FFT / 2 + 1`.
const BINS: usize = N_FFT / 2 + 1;

/// The features of one model's bin count, with the plan and filters precomputed.
pub struct MelExtractor {
    mels: usize,
    /// `[mels × BINS]`.
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
}

impl MelExtractor {
    pub fn new(mels: usize) -> MelExtractor {
        let window = (0..N_FFT)
            .map(|n| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        let fft = FftPlanner::new().plan_fft_forward(N_FFT);
        MelExtractor { mels, filters: filter_bank(mels), window, fft }
    }

    pub fn mels(&self) -> usize {
        self.mels
    }

    /// Frames the features of `samples` have: one per hop (the last STFT frame is dropped).
    pub fn frames(samples: usize) -> usize {
        (samples + HOP) / HOP
    }

    /// `[mels × frames]` features, bin-major.
    pub fn features(&self, samples: &[f32]) -> Vec<f32> {
        // 160 zeros appended, then centred frames over the reflect-padded signal.
        let mut padded = samples.to_vec();
        padded.resize(samples.len() + HOP, 0.0);
        let signal = reflect_pad(&padded, N_FFT / 2);
        let frames = Self::frames(samples.len());
        let mut power = vec![0.0f32; frames * BINS];
        let mut buf = vec![Complex::new(0.0f32, 0.0); N_FFT];
        let mut scratch = vec![Complex::new(0.0f32, 0.0); self.fft.get_inplace_scratch_len()];
        for (t, out) in power.chunks_exact_mut(BINS).enumerate() {
            let frame = &signal[t * HOP..][..N_FFT];
            for ((b, &s), &w) in buf.iter_mut().zip(frame).zip(&self.window) {
                *b = Complex::new(s * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (o, c) in out.iter_mut().zip(&buf) {
                *o = c.norm_sqr();
            }
        }
        let mut mel = vec![0.0f32; self.mels * frames];
        for (m, row) in mel.chunks_exact_mut(frames).enumerate() {
            let filter = &self.filters[m * BINS..][..BINS];
            for (t, v) in row.iter_mut().enumerate() {
                let p = &power[t * BINS..][..BINS];
                let e: f32 = filter.iter().zip(p).map(|(f, p)| f * p).sum();
                *v = e.max(1e-10).log10();
            }
        }
        let max = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in &mut mel {
            *v = (v.max(max - 8.0) + 4.0) / 4.0;
        }
        mel
    }
}

/// numpy's `pad(mode="reflect")` (the edge sample not repeated); a signal shorter than the pad
/// reflects back and forth as numpy does.
fn reflect_pad(x: &[f32], pad: usize) -> Vec<f32> {
    let n = x.len() as isize;
    if n <= 1 {
        return vec![x.first().copied().unwrap_or(0.0); x.len() + 2 * pad];
    }
    let period = 2 * (n - 1);
    (-(pad as isize)..n + pad as isize)
        .map(|i| {
            let j = i.rem_euclid(period);
            let j = if j >= n { period - j } else { j };
            x[j as usize]
        })
        .collect()
}

/// Slaney-scale triangular filters with Slaney normalisation (librosa's default, what Whisper
/// was trained with), from 0 to 8 kHz, `[mels × BINS]`.
pub fn filter_bank(mels: usize) -> Vec<f32> {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;
    let logstep = 6.4f64.ln() / 27.0;
    let hz_to_mel =
        |f: f64| if f >= MIN_LOG_HZ { MIN_LOG_MEL + (f / MIN_LOG_HZ).ln() / logstep } else { f / F_SP };
    let mel_to_hz =
        |m: f64| if m >= MIN_LOG_MEL { MIN_LOG_HZ * (logstep * (m - MIN_LOG_MEL)).exp() } else { F_SP * m };
    let top = hz_to_mel(SAMPLE_RATE as f64 / 2.0);
    let points: Vec<f64> = (0..mels + 2).map(|i| mel_to_hz(top * i as f64 / (mels + 1) as f64)).collect();
    let fft_freq = |k: usize| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64;
    let mut out = vec![0.0f32; mels * BINS];
    for m in 0..mels {
        let (lo, mid, hi) = (points[m], points[m + 1], points[m + 2]);
        let norm = 2.0 / (hi - lo);
        for k in 0..BINS {
            let f = fft_freq(k);
            let lower = (f - lo) / (mid - lo);
            let upper = (hi - f) / (hi - mid);
            out[m * BINS + k] = (lower.min(upper).max(0.0) * norm) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_padding_matches_numpy() {
        assert_eq!(reflect_pad(&[1.0, 2.0, 3.0], 2), [3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0]);
        // Longer than the signal: numpy keeps reflecting.
        assert_eq!(reflect_pad(&[1.0, 2.0], 3), [2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn the_filter_bank_has_whisper_s_shape() {
        let f = filter_bank(80);
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80): the first filter peaks at bin 1
        // with 0.02486259; every filter is non-negative and non-empty.
        assert!((f[1] - 0.024_862_59).abs() < 1e-6, "{}", f[1]);
        assert_eq!(f[0], 0.0);
        for row in f.chunks_exact(BINS) {
            assert!(row.iter().all(|&v| v >= 0.0) && row.iter().any(|&v| v > 0.0));
        }
    }

    #[test]
    fn a_tone_lights_the_mel_bins_around_its_frequency() {
        let tone: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin())
            .collect();
        let x = MelExtractor::new(80);
        let mel = x.features(&tone);
        let frames = MelExtractor::frames(tone.len());
        assert_eq!(mel.len(), 80 * frames);
        assert_eq!(frames, 101);
        // The loudest bin of a middle frame is the one whose filter covers 1 kHz.
        let t = 50;
        let loudest =
            (0..80).max_by(|&a, &b| mel[a * frames + t].total_cmp(&mel[b * frames + t])).unwrap_or(0);
        let f = filter_bank(80);
        let k = 1000 * N_FFT / SAMPLE_RATE;
        let best_filter = (0..80).max_by(|&a, &b| f[a * BINS + k].total_cmp(&f[b * BINS + k])).unwrap_or(0);
        assert_eq!(loudest, best_filter);
        assert!(mel.iter().all(|v| v.is_finite()));
    }
}
