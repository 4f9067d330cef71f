//! Image decoding and preprocessing against transformers' image processors (the PIL path the
//! SigLIP and CLIP checkpoints were trained with): the same files, the same configs, pixel
//! values within a few levels of 255 (PIL rounds to 8 bits between its two resize passes and
//! decodes JPEG with libjpeg; we resize in floating point and decode with zune-jpeg).
//! The files and reference values are written by scripts/image_references.py.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use kiln_model_server::images::preprocess::{Preprocess, PreprocessorConfig};
use kiln_model_server::images::{ImageLimits, decode};
use serde_json::Value;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/images")
}

/// Per case: the largest and the mean difference, in levels of 0..255.
#[test]
fn pixel_values_match_transformers_within_a_few_levels() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("reference.json")).expect("reference"))
            .expect("json");
    let configs = reference["configs"].as_object().expect("configs");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20, "{}", cases.len());
    let mut report = Vec::new();
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let name = case["config"].as_str().expect("config");
        let config: PreprocessorConfig = serde_json::from_value(configs[name].clone()).expect("config");
        let p = Preprocess::new(&config).expect("preprocess");
        let bytes = std::fs::read(data().join(file)).expect("image");
        let image = decode(&bytes, &ImageLimits::default()).expect("decode");
        let got = p.pixel_values(&image);
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).expect("shape");
        assert_eq!(shape, [3, got.height, got.width], "{file} {name}");
        let want: Vec<f32> = serde_json::from_value(case["pixel_values"].clone()).expect("values");
        assert_eq!(want.len(), got.data.len());
        // Back to levels: value * std / rescale + mean / rescale.
        let std: [f32; 3] = config.image_std.filter(|_| config.do_normalize).unwrap_or([1.0; 3]);
        let plane = got.height * got.width;
        let levels = |i: usize, v: f32| v * std[i / plane] / config.rescale_factor;
        let diffs: Vec<f32> = got
            .data
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (a, b))| (levels(i, *a) - levels(i, *b)).abs())
            .collect();
        let worst = diffs.iter().copied().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        report.push(format!("{file:22} {name:18} worst {worst:5.2} mean {mean:.3}"));
        // Measured: PNG at most 1 level off (PIL's rounding between passes), mean 0.15; JPEG
        // adds the two decoders' differences (IDCT and upsampling rounding): 2 levels, mean 0.5.
        let (worst_limit, mean_limit) = if file.ends_with(".jpg") { (3.0, 0.6) } else { (1.5, 0.25) };
        assert!(worst <= worst_limit && mean <= mean_limit, "{file} {name}: worst {worst} mean {mean}");
    }
    eprintln!("{}", report.join("\n"));
}

/// The same picture as PNG and as JPEG gives nearly the same pixel values (the JPEG's loss).
#[test]
fn png_and_jpeg_of_one_picture_agree_within_the_codec() {
    let config: PreprocessorConfig = serde_json::from_value(serde_json::json!({
        "size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
    }))
    .expect("config");
    let p = Preprocess::new(&config).expect("preprocess");
    for name in ["gradient-97x61", "rings-200x120", "tall-40x150"] {
        let values = |ext: &str| {
            let bytes = std::fs::read(data().join(format!("{name}.{ext}"))).expect("image");
            p.pixel_values(&decode(&bytes, &ImageLimits::default()).expect("decode")).data
        };
        let (png, jpg) = (values("png"), values("jpg"));
        let mean = png.iter().zip(&jpg).map(|(a, b)| (a - b).abs()).sum::<f32>() / png.len() as f32;
        // In levels (std 0.5 over 1/255): a quality-90 JPEG stays within a few levels on average.
        assert!(mean * 0.5 * 255.0 < 4.0, "{name}: mean difference {} levels", mean * 0.5 * 255.0);
    }
}
