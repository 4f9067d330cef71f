//! The face-detection family: YuNet (an ONNX file in the model directory) behind
//! `POST /face/detect`, with OpenCV `FaceDetectorYN`'s post-processing and defaults. Images are
//! decoded on the request's side ([`crate::images`]: limits, EXIF orientation) and batched by
//! the size they pad to; faces come back in the uploaded image's pixels, as a viewer shows it.

mod routes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use image::RgbImage;
use serde_json::{Value, json};

use super::batcher::{BatchInput, BatchModel, BatchResult, BatchServing, BatchStatus};
use super::{ModelFamily, Shared, StartContext};
use crate::device::ComputeDevice;
use crate::images::{ImageError, ImageLimits};
use crate::manifest::{Family, ModelRef};
use crate::models::yunet::{BgrImage, DetectOptions, Face, Yunet, is_yunet, padded};
use crate::models::{Architecture, ModelError, architecture};

/// This family's endpoints.
pub const ENDPOINTS: &[&str] = &["POST /face/detect"];

/// Larger images are scaled down to this many pixels (a 4K frame) before detection, and the
/// faces scaled back: the network's memory and time grow with the pixels, and a face small
/// enough to vanish at 4K is below what YuNet finds (about 10 pixels) anyway.
pub const MAX_DETECT_PIXELS: u64 = 3840 * 2160;

/// Pixels the network runs on at once. The kernels split each map's rows over the pod's cores,
/// so stacking frames gains little beyond a megapixel, while the maps of a stack must fit the
/// buffers kept between runs: a 1080p frame runs alone (its maps are about 120 MB).
pub const PIXELS_PER_RUN: u64 = 1 << 20;

pub struct FaceDetection;

impl ModelFamily for FaceDetection {
    const FAMILY: Family = Family::FaceDetection;
    type Model = FaceModel;
    type Serving = BatchServing<FaceModel, Input>;

    fn load(dir: &Path, device: &ComputeDevice) -> Result<FaceModel, ModelError> {
        FaceModel::load_on(dir, device)
    }

    fn summary(model: &FaceModel) -> String {
        let file = model.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        format!("YuNet from {file}")
    }

    /// A synthetic 640x480 frame through the network.
    fn warm(model: &FaceModel, _inputs: &[String]) -> Result<(), ModelError> {
        let image = RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x / 8 + y / 8) % 2 * 200) as u8])
        });
        let input = model.input(image, (640, 480), DetectOptions::default());
        model.run(&[&input]).map(|_| ())
    }

    fn start(id: &ModelRef, model: Arc<FaceModel>, ctx: StartContext) -> std::io::Result<Self::Serving> {
        BatchServing::start(id, model, ctx)
    }

    fn routes() -> Router<Shared<Self>> {
        routes::routes()
    }
}

/// An image waiting for detection: BGR bytes at the size the network sees, and what it takes
/// to report faces in the uploaded image's pixels.
pub struct Input {
    bgr: Vec<u8>,
    width: usize,
    height: usize,
    /// The uploaded image's size (after EXIF orientation).
    original: (u32, u32),
    options: DetectOptions,
}

/// What a detection gives back for one image.
#[derive(Debug, Clone)]
pub struct Detection {
    pub faces: Vec<Face>,
    pub width: u32,
    pub height: u32,
}

impl BatchInput for Input {
    type Output = Detection;

    /// A token per 256 pixels (as for image embeddings), so the queue's bound holds about as
    /// much memory for images as for texts.
    fn tokens(&self) -> usize {
        (self.width * self.height / 256).max(1)
    }

    /// Images batch with images that pad to the same size.
    fn group(&self) -> u64 {
        ((padded(self.width) as u64) << 32) | padded(self.height) as u64
    }
}

/// A loaded face detector.
pub struct FaceModel {
    yunet: Yunet,
    file: PathBuf,
}

impl FaceModel {
    /// Load the model directory's ONNX file (exactly one `*.onnx`) for the CPU; the
    /// architecture is recognised by the graph's outputs.
    pub fn load(dir: &Path) -> Result<FaceModel, ModelError> {
        Self::load_with(dir, None)
    }

    /// [`Self::load`] for `device`: the packed kernels on the CPU, candle's ops on a GPU.
    pub fn load_on(dir: &Path, device: &ComputeDevice) -> Result<FaceModel, ModelError> {
        Self::load_with(dir, (!device.is_cpu()).then(|| device.candle()))
    }

    /// The GPU path (candle's ops) on any candle device: the CPU too, where it is checked
    /// against the same reference.
    pub fn load_candle(dir: &Path, device: &candle_core::Device) -> Result<FaceModel, ModelError> {
        Self::load_with(dir, Some(device))
    }

    fn load_with(dir: &Path, candle: Option<&candle_core::Device>) -> Result<FaceModel, ModelError> {
        let file = onnx_file(dir)?;
        let onnx = crate::weights::onnx::read(&file)?;
        let declared = if is_yunet(&onnx) { "yunet".to_string() } else { onnx.outputs.join(", ") };
        let arch = architecture(Family::FaceDetection, Some(&declared), "graph outputs", &file)
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        let yunet = match arch {
            Architecture::Yunet => Yunet::from_graph(&onnx, &file, candle)?,
            other => return Err(ModelError::Unsupported(format!("{other:?} is not a face detector"))),
        };
        Ok(FaceModel { yunet, file })
    }

    /// Run on the given ISA's kernels (tests compare them).
    pub fn with_isa(mut self, isa: crate::kernels::Isa) -> FaceModel {
        self.yunet = self.yunet.with_isa(isa);
        self
    }

    /// Decode an image and make it the batcher's input.
    pub fn image(
        &self,
        bytes: &[u8],
        limits: &ImageLimits,
        options: DetectOptions,
    ) -> Result<Input, ImageError> {
        let image = crate::images::decode(bytes, limits)?;
        let original = image.dimensions();
        Ok(self.input(image, original, options))
    }

    fn input(&self, image: RgbImage, original: (u32, u32), options: DetectOptions) -> Input {
        let (w, h) = original;
        let pixels = u64::from(w) * u64::from(h);
        let image = if pixels > MAX_DETECT_PIXELS {
            let scale = (MAX_DETECT_PIXELS as f64 / pixels as f64).sqrt();
            let sw = ((f64::from(w) * scale) as u32).max(1);
            let sh = ((f64::from(h) * scale) as u32).max(1);
            image::imageops::resize(&image, sw, sh, image::imageops::FilterType::Triangle)
        } else {
            image
        };
        let (width, height) = (image.width() as usize, image.height() as usize);
        let mut bgr = image.into_raw();
        for px in bgr.chunks_exact_mut(3) {
            px.swap(0, 2);
        }
        Input { bgr, width, height, original, options }
    }

    /// Detect faces in a batch of inputs. Inputs that pad to the same size run through the
    /// network together (a request's list may mix sizes), at most [`PIXELS_PER_RUN`] at once.
    pub fn run(&self, inputs: &[&Input]) -> BatchResult<Detection> {
        let mut found: Vec<Option<Vec<Face>>> = inputs.iter().map(|_| None).collect();
        let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let group = input.group();
            match groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, members)) => members.push(i),
                None => groups.push((group, vec![i])),
            }
        }
        for (_, members) in groups {
            let first = inputs[members[0]];
            let pixels = (padded(first.width) * padded(first.height)) as u64;
            let per_run = (PIXELS_PER_RUN / pixels.max(1)).max(1) as usize;
            for chunk in members.chunks(per_run) {
                let images: Vec<BgrImage> = chunk
                    .iter()
                    .map(|&i| BgrImage {
                        width: inputs[i].width,
                        height: inputs[i].height,
                        pixels: &inputs[i].bgr,
                    })
                    .collect();
                let options: Vec<DetectOptions> = chunk.iter().map(|&i| inputs[i].options).collect();
                for (&i, faces) in chunk.iter().zip(self.yunet.detect(&images, &options)?) {
                    found[i] = Some(faces);
                }
            }
        }
        inputs
            .iter()
            .zip(found)
            .map(|(input, faces)| {
                let faces = faces.ok_or_else(|| ModelError::Inference("an image got no detection".into()))?;
                let (w, h) = input.original;
                let (sx, sy) = (w as f32 / input.width as f32, h as f32 / input.height as f32);
                let faces = faces
                    .into_iter()
                    .map(|f| Face {
                        bbox: [f.bbox[0] * sx, f.bbox[1] * sy, f.bbox[2] * sx, f.bbox[3] * sy],
                        landmarks: f.landmarks.map(|[x, y]| [x * sx, y * sy]),
                        score: f.score,
                    })
                    .collect();
                Ok(Detection { faces, width: w, height: h })
            })
            .collect()
    }
}

/// The one `*.onnx` file of a model directory.
fn onnx_file(dir: &Path) -> Result<PathBuf, ModelError> {
    let files_err = |message: String| ModelError::Files { path: dir.display().to_string(), message };
    let entries = std::fs::read_dir(dir).map_err(|e| files_err(e.to_string()))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| files_err(e.to_string()))?.path();
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) && path.is_file() {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(files_err("no .onnx file: a face-detection model is one ONNX file (YuNet)".into())),
        n => Err(files_err(format!("{n} .onnx files; a face-detection model version holds exactly one"))),
    }
}

impl BatchStatus for FaceModel {
    fn status(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let d = DetectOptions::default();
        m.insert(
            "defaults".into(),
            json!({"scoreThreshold": d.score_threshold, "nmsThreshold": d.nms_threshold, "topK": d.top_k}),
        );
        m.insert("maxDetectPixels".into(), json!(MAX_DETECT_PIXELS));
        m
    }
}

impl BatchModel<Input> for FaceModel {
    fn run(&self, inputs: &[&Input]) -> BatchResult<Detection> {
        FaceModel::run(self, inputs)
    }
}
