//! YuNet against OpenCV: the same ONNX file (`make fixtures`), and the faces OpenCV's
//! `cv2.FaceDetectorYN` found with its defaults on images made from scikit-image's samples
//! (scripts/yunet_reference.py). Every face must match with IoU at least 0.95, score within
//! 0.01 and landmarks within 2 pixels; images without faces give none; an EXIF-rotated JPEG
//! gives the faces of the picture a viewer shows.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use kiln_model_server::families::face_detection::{Detection, FaceModel};
use kiln_model_server::images::ImageLimits;
use kiln_model_server::kernels::Isa;
use kiln_model_server::models::yunet::DetectOptions;

fn found(d: &Detection) -> Vec<common::FoundFace> {
    d.faces.iter().map(|f| (f.bbox, f.landmarks, f.score)).collect()
}

fn detect(model: &FaceModel, bytes: &[u8], options: DetectOptions) -> Detection {
    let input = model.image(bytes, &ImageLimits::default(), options).expect("decode");
    model.run(&[&input]).expect("detect").remove(0)
}

#[test]
fn every_reference_image_gives_opencvs_faces_on_each_isa() {
    let (dir, cases) = common::face_reference();
    assert!(cases.iter().map(|c| c.faces.len()).sum::<usize>() >= 6, "the reference has the faces it should");
    for isa in Isa::supported() {
        let model = FaceModel::load(&common::yunet_dir()).expect("load").with_isa(isa);
        for case in &cases {
            let bytes = std::fs::read(dir.join(&case.file)).expect("image");
            let d = detect(&model, &bytes, DetectOptions::default());
            assert_eq!(
                (d.width, d.height),
                (case.width, case.height),
                "{}: size as a viewer shows it",
                case.name
            );
            common::assert_faces_match(&format!("{} ({isa:?})", case.name), &found(&d), &case.faces);
        }
    }
}

/// YuNet's GPU path (the same planned graph on candle's ops) finds OpenCV's faces, image by
/// image and all in one batch (several sizes, two of the same padded size): on the CPU every
/// run, and on CUDA device 0 where one opens.
#[test]
fn the_gpu_path_gives_opencvs_faces() {
    let (dir, cases) = common::face_reference();
    let options = DetectOptions::default();
    for device in common::devices() {
        let model = FaceModel::load_candle(&common::yunet_dir(), device.candle()).expect("load on candle");
        let label = format!("candle on {} ({})", device.label(), device.name());
        let mut inputs = Vec::new();
        for case in &cases {
            let bytes = std::fs::read(dir.join(&case.file)).expect("image");
            let d = detect(&model, &bytes, options);
            common::assert_faces_match(&format!("{} ({label})", case.name), &found(&d), &case.faces);
            inputs.push(model.image(&bytes, &ImageLimits::default(), options).expect("decode"));
        }
        let refs: Vec<_> = inputs.iter().collect();
        for (case, d) in cases.iter().zip(model.run(&refs).expect("detect")) {
            common::assert_faces_match(
                &format!("{} in a batch ({label})", case.name),
                &found(&d),
                &case.faces,
            );
        }
        eprintln!("{label}: OpenCV's faces on {} images", cases.len());
    }
}

#[test]
fn batched_images_give_what_each_gives_alone() {
    let (dir, cases) = common::face_reference();
    let model = FaceModel::load(&common::yunet_dir()).expect("load");
    let options = DetectOptions::default();
    // All reference images in one batch: several sizes, two of them the same padded size.
    let inputs: Vec<_> = cases
        .iter()
        .map(|c| {
            model.image(&std::fs::read(dir.join(&c.file)).expect("image"), &ImageLimits::default(), options)
        })
        .collect::<Result<_, _>>()
        .expect("decode");
    let refs: Vec<_> = inputs.iter().collect();
    let batched = model.run(&refs).expect("detect");
    for (case, d) in cases.iter().zip(&batched) {
        common::assert_faces_match(&format!("{} in a batch", case.name), &found(d), &case.faces);
    }
}

#[test]
fn settings_change_what_is_found() {
    let (dir, cases) = common::face_reference();
    let model = FaceModel::load(&common::yunet_dir()).expect("load");
    let collage = cases.iter().find(|c| c.name == "collage").expect("collage");
    let bytes = std::fs::read(dir.join(&collage.file)).expect("image");
    let lowest = collage.faces.iter().map(|f| f.score).fold(f32::INFINITY, f32::min);
    // A threshold above the weakest face drops it; top_k 1 (candidates into NMS, as OpenCV)
    // keeps the best face only.
    let strict =
        detect(&model, &bytes, DetectOptions { score_threshold: lowest + 0.005, ..Default::default() });
    assert_eq!(strict.faces.len(), collage.faces.len() - 1);
    let best = collage.faces.iter().map(|f| f.score).fold(0.0, f32::max);
    let one = detect(&model, &bytes, DetectOptions { top_k: 1, ..Default::default() });
    assert_eq!(one.faces.len(), 1);
    assert!((one.faces[0].score - best).abs() <= 0.01, "{} vs {best}", one.faces[0].score);
    // A low threshold finds more candidates; NMS still leaves one box per face region at 0.3.
    let loose = detect(&model, &bytes, DetectOptions { score_threshold: 0.5, ..Default::default() });
    assert!(loose.faces.len() >= collage.faces.len());
}

#[test]
fn a_large_image_is_scaled_down_for_detection_and_faces_come_back_in_its_pixels() {
    let (dir, cases) = common::face_reference();
    let astronaut = cases.iter().find(|c| c.name == "astronaut").expect("astronaut");
    let image = image::open(dir.join(&astronaut.file)).expect("image").to_rgb8();
    // The astronaut at 1.6x on a 4608 x 2592 canvas: 11.9 megapixels, over the 4K limit, so
    // detection runs at 5/6 of the size and the face comes back in the upload's pixels.
    let big = image::imageops::resize(&image, 819, 819, image::imageops::FilterType::Triangle);
    let mut canvas = image::RgbImage::from_pixel(4608, 2592, image::Rgb([90, 90, 90]));
    image::imageops::replace(&mut canvas, &big, 1000, 500);
    let mut png = Vec::new();
    canvas.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).expect("png");
    let model = FaceModel::load(&common::yunet_dir()).expect("load");
    let d = detect(&model, &png, DetectOptions::default());
    assert_eq!((d.width, d.height), (4608, 2592));
    assert_eq!(d.faces.len(), 1, "{:?}", d.faces);
    let b = astronaut.faces[0].bbox;
    let want = [b[0] * 1.6 + 1000.0, b[1] * 1.6 + 500.0, b[2] * 1.6, b[3] * 1.6];
    let overlap = common::iou(&d.faces[0].bbox, &want);
    assert!(overlap >= 0.85, "{:?} vs {want:?} (IoU {overlap})", d.faces[0].bbox);
}

#[test]
fn a_file_that_is_not_yunet_is_refused_by_name() {
    let scratch = common::scratch("not-yunet");
    std::fs::write(scratch.join("model.onnx"), b"not protobuf at all").expect("write");
    let err = FaceModel::load(&scratch).err().expect("refused").to_string();
    assert!(err.contains("model.onnx") && err.contains("not an ONNX model"), "{err}");
    std::fs::remove_file(scratch.join("model.onnx")).expect("rm");
    let err = FaceModel::load(&scratch).err().expect("refused").to_string();
    assert!(err.contains("no .onnx file"), "{err}");
}
