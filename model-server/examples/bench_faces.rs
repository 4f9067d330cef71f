//! Face-detection benchmark without HTTP: YuNet on decoded frames, as the batcher runs it.
//! Prints, for 640x640 and 1920x1080 frames (a synthetic pattern: the work does not depend on
//! what the frames show), images/s with 8 frames per run and the batch-1 p50 latency. Threads:
//! RAYON_NUM_THREADS (default: all cores).
//!
//! DEVICE (default cpu) is `--device`'s form: `cuda:0` runs the GPU path (a `cuda` build).
//!
//! cargo run --release -p kiln-model-server --example bench_faces -- MODEL_DIR [DEVICE]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use image::{ImageFormat, RgbImage};
use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::families::face_detection::FaceModel;
use kiln_model_server::images::ImageLimits;
use kiln_model_server::models::yunet::DetectOptions;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_faces MODEL_DIR [DEVICE]"));
    let request: DeviceRequest = std::env::args().nth(2).as_deref().unwrap_or("cpu").parse().expect("device");
    let device = ComputeDevice::open(request).expect("open the device");
    let model = FaceModel::load_on(&dir, &device).expect("load");
    eprintln!("loaded on {} ({})", device.label(), device.name());
    for (w, h) in [(640u32, 640u32), (1920, 1080)] {
        let inputs: Vec<_> = (0..8u32)
            .map(|i| {
                let frame = RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([
                        ((x * 3 + i * 17) % 256) as u8,
                        ((y * 2 + i * 29) % 256) as u8,
                        ((x + y) / 4 % 256) as u8,
                    ])
                });
                let mut png = Vec::new();
                frame.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).expect("encode");
                model.image(&png, &ImageLimits::default(), DetectOptions::default()).expect("decode")
            })
            .collect();
        let all: Vec<_> = inputs.iter().collect();
        model.run(&all[..1]).expect("warm");
        let t = Instant::now();
        for _ in 0..3 {
            model.run(&all).expect("detect");
        }
        let per_s = (3 * all.len()) as f64 / t.elapsed().as_secs_f64();
        let mut ms: Vec<f64> = (0..10)
            .map(|i| {
                let t = Instant::now();
                model.run(&all[i % all.len()..][..1]).expect("detect");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!("{w}x{h}: {per_s:.1} images/s (8 per run), batch-1 p50 {:.2} ms", ms[ms.len() / 2]);
    }
}
