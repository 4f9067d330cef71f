//! Uploaded audio to Whisper's input: any container and codec symphonia reads here (WAV with
//! 8/16/24/32-bit PCM or float, FLAC, MP3, Ogg Vorbis), any rate and channel count, mixed down
//! to mono and resampled to 16 kHz with rubato's FFT resampler. The duration limit is enforced
//! while decoding, so a long file costs no more than the limit.

use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Whisper's sample rate.
pub const RATE: u32 = 16_000;

/// Corrupt packets tolerated before a file is refused as corrupt.
const MAX_BAD_PACKETS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AudioError {
    #[error("the audio file is empty")]
    Empty,
    #[error("unsupported audio format: {0}; send WAV, FLAC, MP3 or Ogg Vorbis")]
    Unsupported(String),
    #[error("the audio cannot be decoded: {0}")]
    Corrupt(String),
    #[error("the audio is longer than this server's limit of {limit_seconds} s")]
    TooLong { limit_seconds: f64 },
    #[error("the audio holds no samples")]
    Silent,
}

/// Decoded audio: 16 kHz mono samples in [-1, 1].
#[derive(Debug, Clone)]
pub struct Audio {
    pub samples: Vec<f32>,
    /// The file's own rate and channels, for logs and the response.
    pub source_rate: u32,
    pub source_channels: usize,
}

impl Audio {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(RATE)
    }
}

/// Decodes `bytes` (`extension` is a hint from the upload's file name, may be empty), refusing
/// more than `max_seconds` of audio.
pub fn decode(bytes: &[u8], extension: &str, max_seconds: f64) -> Result<Audio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let source = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes.to_vec())), Default::default());
    let mut hint = Hint::new();
    if !extension.is_empty() {
        hint.with_extension(extension);
    }
    let format_options = FormatOptions { enable_gapless: true, ..Default::default() };
    let probed = symphonia::default::get_probe()
        .format(&hint, source, &format_options, &MetadataOptions::default())
        .map_err(|e| match e {
            SymphoniaError::Unsupported(what) => AudioError::Unsupported(what.to_string()),
            other => AudioError::Corrupt(other.to_string()),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Unsupported("no audio track".to_string()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let rate =
        params.sample_rate.filter(|&r| r > 0).ok_or_else(|| AudioError::Corrupt("no sample rate".into()))?;
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unsupported(e.to_string()))?;
    let max_frames = (max_seconds * f64::from(rate)).ceil() as usize;
    if params.n_frames.is_some_and(|n| n as usize > max_frames) {
        return Err(AudioError::TooLong { limit_seconds: max_seconds });
    }
    let mut mono: Vec<f32> = Vec::new();
    let mut channels = 0;
    let mut bad_packets = 0;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(SymphoniaError::DecodeError(e)) => {
                bad_packets += 1;
                if bad_packets > MAX_BAD_PACKETS {
                    return Err(AudioError::Corrupt(e.to_string()));
                }
                continue;
            }
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        let spec = *decoded.spec();
        channels = spec.channels.count().max(1);
        let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buf.copy_interleaved_ref(decoded);
        let scale = 1.0 / channels as f32;
        mono.extend(buf.samples().chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() * scale));
        if mono.len() > max_frames {
            return Err(AudioError::TooLong { limit_seconds: max_seconds });
        }
    }
    if mono.is_empty() {
        return Err(AudioError::Silent);
    }
    let samples = resample(&mono, rate)?;
    Ok(Audio { samples, source_rate: rate, source_channels: channels })
}

/// `x` at `rate` to 16 kHz, delay-compensated and of the exact expected length.
pub fn resample(x: &[f32], rate: u32) -> Result<Vec<f32>, AudioError> {
    if rate == RATE {
        return Ok(x.to_vec());
    }
    const CHUNK: usize = 1024;
    let mut resampler = FftFixedIn::<f32>::new(rate as usize, RATE as usize, CHUNK, 2, 1)
        .map_err(|e| AudioError::Unsupported(format!("sample rate {rate} Hz: {e}")))?;
    let expected = (x.len() as u64 * u64::from(RATE) / u64::from(rate)) as usize;
    let delay = resampler.output_delay();
    let mut out = Vec::with_capacity(expected + delay + CHUNK);
    let mut chunks = x.chunks_exact(CHUNK);
    let corrupt = |e: rubato::ResampleError| AudioError::Corrupt(format!("resampling: {e}"));
    for chunk in chunks.by_ref() {
        out.extend_from_slice(&resampler.process(&[chunk], None).map_err(corrupt)?[0]);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        out.extend_from_slice(&resampler.process_partial(Some(&[rest]), None).map_err(corrupt)?[0]);
    }
    // Push out what the filter still holds.
    while out.len() < expected + delay {
        let tail = resampler.process_partial::<&[f32]>(None, None).map_err(corrupt)?;
        if tail[0].is_empty() {
            break;
        }
        out.extend_from_slice(&tail[0]);
    }
    out.drain(..delay.min(out.len()));
    out.resize(expected, 0.0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit PCM WAV of `samples` (interleaved) at `rate`.
    fn wav(samples: &[i16], rate: u32, channels: u16) -> Vec<u8> {
        let data = samples.len() as u32 * 2;
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(36 + data).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
        out.extend_from_slice(&(channels * 2).to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data.to_le_bytes());
        samples.iter().for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
        out
    }

    fn tone(rate: u32, hz: f32, seconds: f32) -> Vec<f32> {
        (0..(rate as f32 * seconds) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn a_stereo_44k_wav_comes_out_as_16k_mono_with_the_same_tone() -> Result<(), AudioError> {
        let left = tone(44_100, 440.0, 1.0);
        // The right channel silent: the mix halves the amplitude.
        let interleaved: Vec<i16> = left.iter().flat_map(|&v| [(v * 32767.0) as i16, 0]).collect();
        let audio = decode(&wav(&interleaved, 44_100, 2), "wav", 60.0)?;
        assert_eq!((audio.source_rate, audio.source_channels), (44_100, 2));
        assert_eq!(audio.samples.len(), 16_000);
        let want = tone(16_000, 440.0, 1.0);
        // Away from the edges the resampled tone is the 16 kHz tone at half amplitude.
        let err = audio.samples[500..15_500]
            .iter()
            .zip(&want[500..15_500])
            .map(|(a, b)| (a - 0.5 * b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 2e-3, "worst difference {err}");
        Ok(())
    }

    #[test]
    fn lengths_that_are_a_multiple_of_the_resampler_chunk_resample_too() -> Result<(), AudioError> {
        let x = tone(22_050, 300.0, 1024.0 * 4.0 / 22_050.0);
        assert_eq!(x.len(), 4096);
        assert_eq!(resample(&x, 22_050)?.len(), 4096 * 16_000 / 22_050);
        Ok(())
    }

    #[test]
    fn empty_garbage_truncated_and_long_audio_are_refused_with_the_reason() {
        assert_eq!(decode(b"", "wav", 60.0).err(), Some(AudioError::Empty));
        let garbage = decode(b"this is not audio at all, just text", "", 60.0).err();
        assert!(matches!(garbage, Some(AudioError::Unsupported(_))), "{garbage:?}");
        let one_second: Vec<i16> = tone(16_000, 300.0, 1.0).iter().map(|&v| (v * 32767.0) as i16).collect();
        let long = decode(&wav(&one_second, 16_000, 1), "wav", 0.5).err();
        assert_eq!(long, Some(AudioError::TooLong { limit_seconds: 0.5 }));
        let header_only = wav(&[], 16_000, 1);
        assert!(decode(&header_only, "wav", 60.0).is_err());
    }
}
