//! Decoder benchmark without HTTP: the forward steps the continuous-batching scheduler runs.
//! Prints prefill tokens/s (one 128-token prompt in one step), single-sequence decode tokens/s,
//! and aggregate decode tokens/s with 4 and 8 sequences per step (128 steps each, after a
//! 64-token prompt per sequence). Threads: RAYON_NUM_THREADS (default: all cores).
//!
//! DEVICE (default cpu) is `--device`'s form: `cuda:0` runs the GPU path (a `cuda` build).
//!
//! cargo run --release -p kiln-model-server --example bench_llama -- MODEL_DIR [DEVICE]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::families::text_generation::model::GenerationModel;
use kiln_model_server::models::llama::Step;

const PROMPT: usize = 64;
const STEPS: usize = 128;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_llama MODEL_DIR [DEVICE]"));
    let request: DeviceRequest = std::env::args().nth(2).as_deref().unwrap_or("cpu").parse().expect("device");
    let device = ComputeDevice::open(request).expect("open the device");
    let started = Instant::now();
    let model = GenerationModel::load_on(&dir, &device).expect("load");
    eprintln!("loaded on {} ({}) in {:.2} s", device.label(), device.name(), started.elapsed().as_secs_f64());
    let llama = model.decoder();
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 7).collect();

    if std::env::var_os("SINGLE_ONLY").is_some() {
        let mut cache = llama.new_cache();
        for i in 0..400u32 {
            llama
                .forward(&mut [Step { tokens: &[100 + i], cache: &mut cache, logits: true }])
                .expect("decode");
        }
        return;
    }
    if std::env::var_os("PREFILL_ONLY").is_some() {
        for _ in 0..10 {
            let mut cache = llama.new_cache();
            llama.forward(&mut [Step { tokens: &prompt, cache: &mut cache, logits: true }]).expect("prefill");
        }
        return;
    }
    for round in 0..2 {
        let mut cache = llama.new_cache();
        let t = Instant::now();
        llama.forward(&mut [Step { tokens: &prompt, cache: &mut cache, logits: true }]).expect("prefill");
        let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();

        let mut rates = Vec::new();
        for streams in [1usize, 4, 8] {
            let mut caches: Vec<_> = (0..streams).map(|_| llama.new_cache()).collect();
            for (i, c) in caches.iter_mut().enumerate() {
                let p: Vec<u32> = prompt[i..i + PROMPT].to_vec();
                llama.forward(&mut [Step { tokens: &p, cache: c, logits: true }]).expect("prompt");
            }
            let tokens: Vec<[u32; 1]> = (0..streams).map(|i| [200 + i as u32]).collect();
            let t = Instant::now();
            for _ in 0..STEPS {
                let mut steps: Vec<Step<'_>> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, tok)| Step { tokens: tok, cache, logits: true })
                    .collect();
                llama.forward(&mut steps).expect("decode");
            }
            rates.push((streams, (streams * STEPS) as f64 / t.elapsed().as_secs_f64()));
        }
        if round == 1 {
            println!("prefill 128 tokens: {prefill:.0} tok/s");
            for (streams, rate) in rates {
                println!("decode, {streams} sequences per step: {rate:.1} tok/s");
            }
        }
    }
}
