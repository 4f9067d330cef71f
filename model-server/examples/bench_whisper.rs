//! Whisper benchmark without HTTP: the encoder batches and decoder steps the speech worker
//! runs. Prints windows/s encoding 1 and 4 thirty-second windows per batch, and decoder
//! tokens/s with 1, 4 and 8 sequences per step (64 steps after the start-of-transcript prompt,
//! each sequence against its own window). Fixed tokens are fed, so the work does not depend on
//! the weights' values: random weights of a checkpoint's shape measure it. Threads:
//! RAYON_NUM_THREADS (default: all cores).
//!
//! DEVICE (default cpu) is `--device`'s form: `cuda:0` runs the GPU path (float16; a `cuda`
//! build), as the server would.
//!
//! cargo run --release -p kiln-model-server --example bench_whisper -- MODEL_DIR [DEVICE]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::families::ModelFamily;
use kiln_model_server::families::speech_to_text::SpeechToText;
use kiln_model_server::models::whisper::engine::Step;
use kiln_model_server::models::whisper::{Task, WINDOW_FRAMES};

const STEPS: usize = 64;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_whisper MODEL_DIR [DEVICE]"));
    let request: DeviceRequest = std::env::args().nth(2).as_deref().unwrap_or("cpu").parse().expect("device");
    let device = ComputeDevice::open(request).expect("open the device");
    let started = Instant::now();
    let whisper = SpeechToText::load(&dir, &device).expect("load");
    eprintln!(
        "loaded {} on {} ({}) in {:.2} s",
        SpeechToText::summary(&whisper),
        device.label(),
        device.name(),
        started.elapsed().as_secs_f64()
    );
    let engine = whisper.engine();
    // Thirty seconds of a tone: a full window.
    let tone: Vec<f32> = (0..30 * 16_000).map(|i| 0.1 * (i as f32 * 0.05).sin()).collect();
    let features = whisper.features(&tone);
    let frames = features.len() / engine.dims().mels;
    let window = whisper.window(&features, frames, 0, frames.min(WINDOW_FRAMES));
    engine.encode(&window).expect("warm the encoder");
    for batch in [1usize, 4] {
        let windows: Vec<&[f32]> = (0..batch).map(|_| window.as_slice()).collect();
        let t = Instant::now();
        for _ in 0..3 {
            engine.encode_batch(&windows).expect("encode");
        }
        println!(
            "encode, {batch} windows per batch: {:.2} windows/s",
            (3 * batch) as f64 / t.elapsed().as_secs_f64()
        );
    }
    let audio = engine.encode(&window).expect("encode");
    let prompt = whisper.sot_sequence(None, Task::Transcribe);
    // Plain text tokens, fed whatever the model would pick.
    let text: Vec<[u32; 1]> = (0..8u32).map(|i| [400 + 13 * i]).collect();
    for streams in [1usize, 4, 8] {
        let mut seqs: Vec<_> = (0..streams).map(|_| engine.sequence()).collect();
        let mut steps: Vec<Step<'_>> =
            seqs.iter_mut().map(|seq| Step { audio: &audio, seq, tokens: &prompt }).collect();
        engine.decode_batch(&mut steps).expect("prompt");
        drop(steps);
        let t = Instant::now();
        for _ in 0..STEPS {
            let mut steps: Vec<Step<'_>> = seqs
                .iter_mut()
                .zip(&text)
                .map(|(seq, tok)| Step { audio: &audio, seq, tokens: tok })
                .collect();
            engine.decode_batch(&mut steps).expect("decode");
        }
        println!(
            "decode, {streams} sequences per step: {:.1} tok/s",
            (streams * STEPS) as f64 / t.elapsed().as_secs_f64()
        );
    }
}
