//! YuNet face detection (libfacedetection's network, as OpenCV's `FaceDetectorYN` runs it): the
//! ONNX graph on this crate's convolution kernels ([`graph`]), then OpenCV's post-processing.
//! The input is BGR in 0..255, padded at the bottom and right to multiples of 32; per stride
//! (8, 16, 32) the heads give a class and an objectness score, a box (centre offset and log
//! size, in strides) and five landmarks for every cell; a face scores sqrt(cls · obj), and
//! faces over the threshold go through OpenCV's NMS (on integer boxes, as OpenCV builds them).

pub mod candle;
pub mod graph;

use std::path::Path;

use candle_core::Device;
use graph::Program;

use self::candle::CandleProgram;

use super::ModelError;
use crate::kernels::Isa;
use crate::kernels::conv::Feature;

/// The strides of YuNet's three heads, and the names of their outputs (`cls_8`, …).
pub const STRIDES: [usize; 3] = [8, 16, 32];
const HEADS: [(&str, usize); 4] = [("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)];

/// Inputs are padded to a multiple of this (the coarsest stride).
pub const PAD_TO: usize = 32;

/// One detected face, in the input image's pixels. Landmarks: right eye, left eye, nose tip,
/// right and left mouth corners (the person's right and left).
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    /// x, y of the top-left corner, width, height.
    pub bbox: [f32; 4],
    pub landmarks: [[f32; 2]; 5],
    pub score: f32,
}

/// What a request may set; the defaults are OpenCV's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Faces scoring below this are dropped.
    pub score_threshold: f32,
    /// Of two faces overlapping more than this (intersection over union), the lower-scoring
    /// one is dropped.
    pub nms_threshold: f32,
    /// At most this many candidates (the best) go into NMS.
    pub top_k: usize,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions { score_threshold: 0.9, nms_threshold: 0.3, top_k: 5000 }
    }
}

/// A BGR image in 0..255 as the network takes it: `[h, w, 3]` row-major bytes.
pub struct BgrImage<'a> {
    pub width: usize,
    pub height: usize,
    pub pixels: &'a [u8],
}

/// Where the graph runs: the packed CPU kernels, or candle's ops (the GPU path).
enum Executor {
    Packed(Program),
    Candle(CandleProgram),
}

pub struct Yunet {
    program: Executor,
    isa: Isa,
    /// The model's own threads (as many as the process's inference threads), the caller running
    /// inside the pool as the encoders do: a frame is ~90 steps of short parallel loops, each of
    /// which would otherwise hand its work to sleeping threads from outside.
    pool: rayon::ThreadPool,
}

impl Yunet {
    /// Plan YuNet's graph as read from `path` for the CPU (`candle` None) or for candle's ops
    /// on that device; an operator not run there is refused by name.
    pub fn from_graph(
        onnx: &crate::weights::onnx::Graph,
        path: &Path,
        candle: Option<&Device>,
    ) -> Result<Yunet, ModelError> {
        let files = |message: String| ModelError::Files { path: path.display().to_string(), message };
        let (program, channels) = match candle {
            None => {
                let p = Program::plan(onnx).map_err(files)?;
                let c = p.input_channels();
                (Executor::Packed(p), c)
            }
            Some(device) => {
                let p = CandleProgram::plan(onnx, device).map_err(files)?;
                let c = p.input_channels();
                (Executor::Candle(p), c)
            }
        };
        if channels != 3 {
            return Err(files(format!("the input has {channels} channels; YuNet takes 3 (BGR)")));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("kiln-yunet-{i}"))
            .build()
            .map_err(|e| ModelError::Inference(format!("thread pool: {e}")))?;
        Ok(Yunet { program, isa: Isa::chosen(), pool })
    }

    /// Run on the given ISA's kernels (tests compare them).
    pub fn with_isa(mut self, isa: Isa) -> Yunet {
        self.isa = isa;
        self
    }

    /// The faces in each image. The images run as one batch: they must pad to the same size
    /// ([`padded`]); each is padded with zeros as it would be alone, so batching changes nothing.
    pub fn detect(
        &self,
        images: &[BgrImage],
        options: &[DetectOptions],
    ) -> Result<Vec<Vec<Face>>, ModelError> {
        let Some(first) = images.first() else { return Ok(Vec::new()) };
        let (pw, ph) = (padded(first.width), padded(first.height));
        if images.iter().any(|i| (padded(i.width), padded(i.height)) != (pw, ph))
            || options.len() != images.len()
        {
            return Err(ModelError::Inference("a batch of images that pad to different sizes".into()));
        }
        // A recycled buffer: every value is written, the padding with zeros.
        let len = images.len() * ph * pw * 3;
        let data = match &self.program {
            Executor::Packed(p) => p.buffer(len),
            Executor::Candle(_) => vec![0.0; len],
        };
        let mut input = Feature { n: images.len(), h: ph, w: pw, c: 3, data };
        for (image, dst) in images.iter().zip(input.data.chunks_exact_mut(ph * pw * 3)) {
            let width = image.width;
            if image.pixels.len() != width * image.height * 3 || width == 0 {
                return Err(ModelError::Inference("image bytes do not match its size".into()));
            }
            let mut src_rows = image.pixels.chunks_exact(width * 3);
            for row in dst.chunks_exact_mut(pw * 3) {
                let (pixels, padding) = row.split_at_mut(width * 3);
                match src_rows.next() {
                    Some(src) => pixels.iter_mut().zip(src).for_each(|(d, &s)| *d = f32::from(s)),
                    None => pixels.fill(0.0),
                }
                padding.fill(0.0);
            }
        }
        let outputs = match &self.program {
            Executor::Packed(p) => self.pool.install(|| p.run(input, self.isa)),
            Executor::Candle(p) => p.run(input),
        }
        .map_err(ModelError::Inference)?;
        let mut faces = Vec::with_capacity(images.len());
        for (b, opts) in options.iter().enumerate() {
            let mut candidates = Vec::new();
            for stride in STRIDES {
                let (rows, cols) = (ph / stride, pw / stride);
                let head = |name: &str, k: usize| -> Result<&[f32], ModelError> {
                    let key = format!("{name}_{stride}");
                    let out =
                        outputs.get(&key).ok_or_else(|| ModelError::Inference(format!("no output {key}")))?;
                    let per_image = rows * cols * k;
                    if out.data.len() != per_image * images.len() {
                        return Err(ModelError::Inference(format!(
                            "{key} holds {} values; a {pw}x{ph} input gives {per_image} per image",
                            out.data.len()
                        )));
                    }
                    Ok(&out.data[b * per_image..(b + 1) * per_image])
                };
                let [cls, obj, bbox, kps] = HEADS.map(|(name, k)| head(name, k));
                decode(stride, cols, (cls?, obj?, bbox?, kps?), opts.score_threshold, &mut candidates);
            }
            faces.push(nms(candidates, opts));
        }
        Ok(faces)
    }
}

fn output_names() -> impl Iterator<Item = String> {
    HEADS.into_iter().flat_map(|(name, _)| STRIDES.map(move |s| format!("{name}_{s}")))
}

/// Whether a graph has YuNet's outputs (what OpenCV's `FaceDetectorYN` reads): how an ONNX
/// file, which declares no architecture, is recognised.
pub fn is_yunet(onnx: &crate::weights::onnx::Graph) -> bool {
    output_names().all(|n| onnx.outputs.contains(&n))
}

/// A side padded up to a multiple of 32, as OpenCV pads.
pub fn padded(side: usize) -> usize {
    side.div_ceil(PAD_TO).max(1) * PAD_TO
}

/// OpenCV's decoding of one stride's cells into faces scoring at least `threshold`.
fn decode(
    stride: usize,
    cols: usize,
    (cls, obj, bbox, kps): (&[f32], &[f32], &[f32], &[f32]),
    threshold: f32,
    out: &mut Vec<Face>,
) {
    let s = stride as f32;
    for (idx, (&c, &o)) in cls.iter().zip(obj).enumerate() {
        let score = (c.clamp(0.0, 1.0) * o.clamp(0.0, 1.0)).sqrt();
        if score < threshold {
            continue;
        }
        let (r, col) = ((idx / cols) as f32, (idx % cols) as f32);
        let b = &bbox[idx * 4..idx * 4 + 4];
        let (cx, cy) = ((col + b[0]) * s, (r + b[1]) * s);
        let (w, h) = (b[2].exp() * s, b[3].exp() * s);
        let k = &kps[idx * 10..idx * 10 + 10];
        let landmarks = std::array::from_fn(|n| [(k[2 * n] + col) * s, (k[2 * n + 1] + r) * s]);
        out.push(Face { bbox: [cx - w / 2.0, cy - h / 2.0, w, h], landmarks, score });
    }
}

/// OpenCV's `NMSBoxes` as `FaceDetectorYN` calls it: boxes truncated to integers, candidates
/// scoring above the threshold in descending score order (ties in decoding order), the first
/// `top_k`, each kept unless it overlaps a kept one by more than the NMS threshold.
fn nms(mut candidates: Vec<Face>, opts: &DetectOptions) -> Vec<Face> {
    if candidates.len() <= 1 {
        return candidates;
    }
    let boxes: Vec<[i64; 4]> = candidates.iter().map(|f| f.bbox.map(|v| v as i64)).collect();
    let mut order: Vec<usize> =
        (0..candidates.len()).filter(|&i| candidates[i].score > opts.score_threshold).collect();
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    order.truncate(opts.top_k);
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.iter().all(|&k| iou(&boxes[i], &boxes[k]) <= opts.nms_threshold) {
            kept.push(i);
        }
    }
    let mut slots: Vec<Option<Face>> = candidates.drain(..).map(Some).collect();
    kept.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Intersection over union of integer `[x, y, w, h]` boxes, as `cv::Rect`'s Jaccard distance.
fn iou(a: &[i64; 4], b: &[i64; 4]) -> f32 {
    let area = |r: &[i64; 4]| r[2].max(0) * r[3].max(0);
    let (x0, y0) = (a[0].max(b[0]), a[1].max(b[1]));
    let (x1, y1) = ((a[0] + a[2]).min(b[0] + b[2]), (a[1] + a[3]).min(b[1] + b[3]));
    let inter = (x1 - x0).max(0) * (y1 - y0).max(0);
    let union = area(a) + area(b) - inter;
    if union <= 0 { 0.0 } else { (inter as f64 / union as f64) as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, y: f32, w: f32, h: f32, score: f32) -> Face {
        Face { bbox: [x, y, w, h], landmarks: [[0.0; 2]; 5], score }
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_faces_and_honours_top_k() {
        let opts = DetectOptions::default();
        let faces = vec![
            face(10.0, 10.0, 50.0, 50.0, 0.92),
            face(12.0, 11.0, 50.0, 50.0, 0.97),
            face(200.0, 10.0, 40.0, 40.0, 0.95),
            face(205.0, 300.0, 40.0, 40.0, 0.90),
        ];
        let kept = nms(faces.clone(), &opts);
        let scores: Vec<f32> = kept.iter().map(|f| f.score).collect();
        // 0.90 equals the threshold: NMSBoxes keeps scores above it only.
        assert_eq!(scores, [0.97, 0.95]);
        let one = nms(faces, &DetectOptions { top_k: 1, ..opts });
        assert_eq!(one.len(), 1);
        assert_eq!(iou(&[0, 0, 10, 10], &[5, 0, 10, 10]), 50.0 / 150.0);
        assert_eq!(iou(&[0, 0, 10, 10], &[20, 20, 5, 5]), 0.0);
    }

    #[test]
    fn decoding_places_boxes_and_landmarks_in_input_pixels() {
        // One cell (row 1, column 2) of a 3-column stride-8 head scores sqrt(0.81 · 1) = 0.9.
        let cls = [0.0, 0.0, 0.0, 0.0, 0.0, 0.81];
        let obj = [1.0; 6];
        let mut bbox = [0.0; 24];
        bbox[20..24].copy_from_slice(&[0.5, 0.25, 0.0, 1.0f32.ln()]);
        let mut kps = [0.0; 60];
        kps[50] = 1.0;
        let mut out = Vec::new();
        decode(8, 3, (&cls, &obj, &bbox, &kps), 0.9, &mut out);
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert!((f.score - 0.9).abs() < 1e-6);
        // Centre ((2 + 0.5)·8, (1 + 0.25)·8) = (20, 10); size (8, 8).
        assert_eq!(f.bbox, [16.0, 6.0, 8.0, 8.0]);
        assert_eq!(f.landmarks[0], [24.0, 8.0]);
        assert_eq!(padded(640), 640);
        assert_eq!(padded(641), 672);
        assert_eq!(padded(1080), 1088);
    }
}
