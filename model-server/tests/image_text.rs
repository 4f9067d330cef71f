//! SigLIP and CLIP against transformers: the tiny random-weight checkpoints that
//! scripts/tiny_models.py wrote with transformers, and the token ids, text features and image
//! features transformers computed from them (on the files in tests/data/images). Each
//! embedding must be within cosine 0.9999 of transformers' feature; tokens must be equal.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use candle_core::DType;

use kiln_model_server::families::image_text_embedding::{ImageTextModel, Input};
use kiln_model_server::families::text_embedding::cosine;
use kiln_model_server::images::ImageLimits;
use kiln_model_server::models::ImageTextEncoder;
use kiln_model_server::models::clip::candle::CandleClip;
use kiln_model_server::models::siglip::candle::CandleSiglip;
use serde_json::Value;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn reference(name: &str) -> Value {
    let path = data().join("tiny").join(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json")
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).expect("vectors")
}

fn image(model: &ImageTextModel, file: &str) -> Vec<f32> {
    let bytes = std::fs::read(data().join("images").join(file)).expect("image");
    let Input::Image { pixels, .. } = model.image(&bytes, &ImageLimits::default()).expect("decode") else {
        panic!("not an image input")
    };
    model.embed_images(&[&pixels]).expect("embed").remove(0)
}

/// Texts one at a time and all together, images one at a time: every vector within cosine
/// 0.9999 of transformers', and unit length.
fn parity(name: &str) {
    let model = ImageTextModel::load(&data().join("tiny").join(name)).expect("load");
    check(&model, name, name);
}

/// `model` (of the tiny checkpoint `name`) against transformers' reference; `label` names
/// the path in failures.
fn check(model: &ImageTextModel, name: &str, label: &str) {
    let r = reference(name);
    let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).expect("texts");
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).expect("ids");
    let want_text = vectors(&r["text_embeds"]);
    let mut tokens = Vec::new();
    for (text, want) in texts.iter().zip(&ids) {
        let got = model.tokenize(text).expect("tokenize").ids;
        // transformers' ids are padded to the tower's length; ours are padded as a batch runs.
        assert_eq!(&want[..got.len()], got.as_slice(), "{label}: ids of {text:?}");
        let pad = want.last().copied().unwrap_or_default();
        assert!(want[got.len()..].iter().all(|&t| t == pad), "{label}: {text:?} is longer in transformers");
        tokens.push(got);
    }
    assert!(model.tokenize(&texts[4]).expect("tokenize").truncated, "the long text is cut");
    let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let batched = model.embed_texts(&refs).expect("texts");
    for (i, want) in want_text.iter().enumerate() {
        let alone = model.embed_texts(&refs[i..=i]).expect("text").remove(0);
        for got in [&alone, &batched[i]] {
            let c = cosine(got, want);
            assert!(c >= 0.9999, "{label}: text {i} ({:?}): cosine {c}", texts[i]);
            let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{label}: norm {norm}");
        }
    }
    // The features tell inputs apart, so agreeing with them means something.
    assert!(cosine(&want_text[0], &want_text[1]) < 0.99, "{label}: reference texts barely differ");
    let files: Vec<String> = serde_json::from_value(r["images"].clone()).expect("images");
    let want_image = vectors(&r["image_embeds"]);
    let mut got_images = Vec::new();
    for (file, want) in files.iter().zip(&want_image) {
        let got = image(model, file);
        let c = cosine(&got, want);
        assert!(c >= 0.9999, "{label}: image {file}: cosine {c}");
        got_images.push(got);
    }
    assert!(cosine(&want_image[0], &want_image[1]) < 0.99, "{label}: reference images barely differ");
    // A batch of images gives what each gives alone.
    let pixels: Vec<_> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(data().join("images").join(f)).expect("image");
            match model.image(&bytes, &ImageLimits::default()).expect("decode") {
                Input::Image { pixels, .. } => pixels,
                Input::Text(_) => panic!("not an image"),
            }
        })
        .collect();
    let refs: Vec<_> = pixels.iter().collect();
    for (batched, alone) in model.embed_images(&refs).expect("batch").iter().zip(&got_images) {
        assert!(cosine(batched, alone) > 0.99999, "{label}: batched image differs");
    }
    // The same picture as PNG and as JPEG: as close as the decoders' few levels allow.
    let png = files.iter().position(|f| f == "rings-200x120.png").expect("png");
    let jpg = files.iter().position(|f| f == "rings-200x120.jpg").expect("jpg");
    let c = cosine(&got_images[png], &got_images[jpg]);
    assert!(c > 0.999, "{label}: PNG and JPEG of one image: cosine {c}");
    // The towers share one space: text and image vectors have one dimension.
    assert_eq!(got_images[0].len(), batched[0].len());
    assert_eq!(model.dimension(), batched[0].len());
}

#[test]
fn siglip_matches_transformers() {
    parity("siglip");
}

#[test]
fn clip_matches_transformers() {
    parity("clip");
}

/// The GPU paths (candle's SigLIP, in float32 and float16, and CLIP towers) on the CPU every
/// run, and on CUDA device 0 where one opens, through the same checks; `load_on` a GPU picks
/// them.
#[test]
fn the_gpu_paths_match_transformers() {
    for device in &common::devices() {
        // SigLIP runs on a GPU in float16: checked in it as well as in float32.
        for (name, dtype) in [("siglip", DType::F32), ("siglip", DType::F16), ("clip", DType::F32)] {
            let dir = data().join("tiny").join(name);
            let encoder: Box<dyn ImageTextEncoder> = match name {
                "siglip" => {
                    Box::new(CandleSiglip::load(&dir, device.candle(), dtype).expect("candle's SigLIP"))
                }
                _ => Box::new(CandleClip::load(&dir, device.candle()).expect("candle's CLIP")),
            };
            let model = ImageTextModel::with_encoder(&dir, encoder).expect("model");
            let label = format!("{name} (candle {dtype:?} on {}, {})", device.label(), device.name());
            check(&model, name, &label);
            eprintln!("{label}: within cosine 0.9999 of transformers");
            if !device.is_cpu() {
                let model = ImageTextModel::load_on(&dir, device).expect("load_on the GPU");
                check(&model, name, &format!("{name} (load_on {})", device.label()));
            }
        }
    }
}
