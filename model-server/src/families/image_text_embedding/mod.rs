//! The image-text-embedding family: SigLIP or CLIP (from `config.json`'s `model_type`), whose
//! image and text towers embed into one space, behind `/embed/vision` (JSON base64 or a
//! multipart file), `/embed/text` and OpenAI's `/v1/embeddings` (text). Images are decoded and
//! preprocessed on the request's side ([`crate::images`], `preprocessor_config.json`); both
//! towers share one batcher, whose batches hold one tower's inputs each.

mod routes;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use serde_json::{Value, json};

use super::batcher::{BatchInput, BatchModel, BatchResult, BatchServing, BatchStatus};
use super::embedding::{self, Tokens, l2_normalize};
use super::{ModelFamily, Shared, StartContext};
use crate::device::ComputeDevice;
use crate::images::preprocess::{PixelValues, Preprocess};
use crate::images::{ImageError, ImageLimits};
use crate::manifest::{Family, ModelRef};
use crate::models::clip::Clip;
use crate::models::clip::candle::CandleClip;
use crate::models::siglip::Siglip;
use crate::models::siglip::candle::CandleSiglip;
use crate::models::{Architecture, ImageTextEncoder, ModelError, architecture};
use crate::weights::{model_type, read_json_if_present};

/// This family's endpoints.
pub const ENDPOINTS: &[&str] = &["POST /embed/vision", "POST /embed/text", "POST /v1/embeddings"];

pub struct ImageTextEmbedding;

impl ModelFamily for ImageTextEmbedding {
    const FAMILY: Family = Family::ImageTextEmbedding;
    type Model = ImageTextModel;
    type Serving = BatchServing<ImageTextModel, Input>;

    fn load(dir: &Path, device: &ComputeDevice) -> Result<ImageTextModel, ModelError> {
        ImageTextModel::load_on(dir, device)
    }

    fn summary(model: &ImageTextModel) -> String {
        let side = model.encoder.shape().image_size;
        format!(
            "dimension {}, images {side}x{side}, texts up to {} tokens",
            model.dimension(),
            model.max_tokens
        )
    }

    /// The warmup texts and a synthetic image through both towers.
    fn warm(model: &ImageTextModel, inputs: &[String]) -> Result<(), ModelError> {
        let texts = inputs.iter().map(|t| model.tokenize(t)).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&[u32]> = texts.iter().map(|t| t.ids.as_slice()).collect();
        model.embed_texts(&ids)?;
        let image = model.preprocess.pixel_values(&synthetic_image());
        model.embed_images(&[&image])?;
        Ok(())
    }

    fn start(id: &ModelRef, model: Arc<ImageTextModel>, ctx: StartContext) -> std::io::Result<Self::Serving> {
        BatchServing::start(id, model, ctx)
    }

    fn routes() -> Router<Shared<Self>> {
        routes::routes()
    }
}

/// A gradient with some structure, 640 × 480: resized and cropped like a real photo.
fn synthetic_image() -> image::RgbImage {
    image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x / 8 + y / 8) % 2 * 200) as u8])
    })
}

/// What the batcher queues: a text's token ids or an image's pixel values. Each forms batches
/// with its own kind only.
pub enum Input {
    Text(Vec<u32>),
    /// With what it weighs in the queue's token bound: a token per 256 pixels (a 16-pixel
    /// patch), so a queue's bound holds about as much memory for images as for texts.
    Image {
        pixels: PixelValues,
        tokens: usize,
    },
}

impl BatchInput for Input {
    type Output = Vec<f32>;

    fn tokens(&self) -> usize {
        match self {
            Input::Text(ids) => ids.len(),
            Input::Image { tokens, .. } => *tokens,
        }
    }

    fn group(&self) -> u64 {
        match self {
            Input::Text(_) => 0,
            Input::Image { .. } => 1,
        }
    }
}

/// A loaded image-text model: its towers, tokenizer and image preprocessing.
pub struct ImageTextModel {
    encoder: Box<dyn ImageTextEncoder>,
    tokenizer: tokenizers::Tokenizer,
    preprocess: Preprocess,
    /// The id texts are padded with, for towers that take padded texts (padding happens as a
    /// batch runs, so token counts and the queue's bound see the real tokens).
    pad: Option<u32>,
    max_tokens: usize,
    /// What an image weighs in the queue's bound: pixels / 256, at least 1.
    image_tokens: usize,
}

impl ImageTextModel {
    /// Load a Hugging Face directory: `config.json` (the architecture from `model_type`),
    /// safetensors, `tokenizer.json` (and `tokenizer_config.json` for the padding token),
    /// `preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_on(dir, &ComputeDevice::cpu())
    }

    /// [`Self::load`] for `device`: on the CPU the packed towers; on a GPU candle's SigLIP (in
    /// float16: within cosine 0.9999 of float32 and half the memory traffic) and CLIP (float32:
    /// candle's CLIP adds a float32 mask) towers.
    pub fn load_on(dir: &Path, device: &ComputeDevice) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let declared = model_type(&config_path)?;
        let arch = architecture(Family::ImageTextEmbedding, declared.as_deref(), "model_type", &config_path)
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        let encoder: Box<dyn ImageTextEncoder> = match arch {
            Architecture::Siglip if device.is_cpu() => Box::new(Siglip::load(dir)?),
            Architecture::Siglip => {
                Box::new(CandleSiglip::load(dir, device.candle(), candle_core::DType::F16)?)
            }
            Architecture::Clip if device.is_cpu() => Box::new(Clip::load(dir)?),
            Architecture::Clip => Box::new(CandleClip::load(dir, device.candle())?),
            other => return Err(ModelError::Unsupported(format!("{other:?} is not an image-text model"))),
        };
        Self::with_encoder(dir, encoder)
    }

    /// The model in `dir` computed by `encoder` (one of its architecture's paths).
    pub fn with_encoder(dir: &Path, encoder: Box<dyn ImageTextEncoder>) -> Result<Self, ModelError> {
        let preprocess = Preprocess::read(dir)?;
        let shape = encoder.shape();
        let (h, w) = (shape.image_size, shape.image_size);
        // Whatever the input's shape, the preprocessing must give what the tower takes.
        for (iw, ih) in [(1000, 700), (300, 1000), (w as u32, h as u32)] {
            let (ow, oh) = preprocess.output_size(iw, ih);
            if (ow as usize, oh as usize) != (w, h) {
                return Err(ModelError::Files {
                    path: dir.join("preprocessor_config.json").display().to_string(),
                    message: format!(
                        "turns a {iw}x{ih} image into {ow}x{oh} pixels, but the vision tower takes {w}x{h}"
                    ),
                });
            }
        }
        let max_tokens = shape.max_text_tokens;
        let (tokenizer, declared_pad) = text_tokenizer(dir, max_tokens)?;
        let pad = if shape.pads_text { Some(pad_id(dir, &tokenizer, declared_pad)?) } else { None };
        let image_tokens = (h * w / 256).max(1);
        Ok(ImageTextModel { encoder, tokenizer, preprocess, pad, max_tokens, image_tokens })
    }

    pub fn dimension(&self) -> usize {
        self.encoder.shape().dimension
    }

    /// A text's ids, cut at the tower's limit (special tokens kept).
    pub fn tokenize(&self, text: &str) -> Result<Tokens, ModelError> {
        embedding::tokenize(&self.tokenizer, text)
    }

    /// Decode and preprocess an image, as the batcher's input.
    pub fn image(&self, bytes: &[u8], limits: &ImageLimits) -> Result<Input, ImageError> {
        let image = crate::images::decode(bytes, limits)?;
        Ok(Input::Image { pixels: self.preprocess.pixel_values(&image), tokens: self.image_tokens })
    }

    /// Normalised text embeddings; texts are padded here for a tower that takes them padded.
    pub fn embed_texts(&self, ids: &[&[u32]]) -> BatchResult {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = match self.pad {
            Some(pad) => {
                let padded: Vec<Vec<u32>> = ids
                    .iter()
                    .map(|t| {
                        let mut t = t.to_vec();
                        t.resize(self.max_tokens.max(t.len()), pad);
                        t
                    })
                    .collect();
                let refs: Vec<&[u32]> = padded.iter().map(Vec::as_slice).collect();
                self.encoder.embed_texts(&refs)?
            }
            None => self.encoder.embed_texts(ids)?,
        };
        out.iter_mut().for_each(|v| l2_normalize(v));
        Ok(out)
    }

    /// Normalised image embeddings.
    pub fn embed_images(&self, images: &[&PixelValues]) -> BatchResult {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = self.encoder.embed_images(images)?;
        out.iter_mut().for_each(|v| l2_normalize(v));
        Ok(out)
    }
}

impl BatchStatus for ImageTextModel {
    fn status(&self) -> serde_json::Map<String, Value> {
        let side = self.encoder.shape().image_size;
        let mut m = serde_json::Map::new();
        m.insert("dimension".into(), json!(self.dimension()));
        m.insert("imageSize".into(), json!({"width": side, "height": side}));
        m.insert("maxSeqLength".into(), json!(self.max_tokens));
        m
    }
}

impl BatchModel<Input> for ImageTextModel {
    /// A batch holds one kind; were it mixed, each kind runs on its own and the results are put
    /// back in order.
    fn run(&self, inputs: &[&Input]) -> BatchResult {
        let mut texts = Vec::new();
        let mut images = Vec::new();
        for input in inputs {
            match input {
                Input::Text(ids) => texts.push(ids.as_slice()),
                Input::Image { pixels, .. } => images.push(pixels),
            }
        }
        let mut texts = self.embed_texts(&texts)?.into_iter();
        let mut images = self.embed_images(&images)?.into_iter();
        inputs
            .iter()
            .map(|input| match input {
                Input::Text(_) => texts.next(),
                Input::Image { .. } => images.next(),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ModelError::Inference("a tower returned fewer vectors than inputs".into()))
    }
}

/// `tokenizer.json`, which SigLIP's published repositories lack: the error says how to write it.
fn text_tokenizer(dir: &Path, max_tokens: usize) -> Result<(tokenizers::Tokenizer, Option<u32>), ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::Files {
            path: path.display().to_string(),
            message: "missing: image-text models need tokenizer.json (transformers writes it: \
                      AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                .into(),
        });
    }
    embedding::load_tokenizer(dir, max_tokens)
}

/// The padding id the checkpoint's processor uses: `tokenizer_config.json`'s `pad_token`, else
/// the padding `tokenizer.json` declares.
fn pad_id(dir: &Path, tokenizer: &tokenizers::Tokenizer, declared: Option<u32>) -> Result<u32, ModelError> {
    let config: Option<Value> = read_json_if_present(&dir.join("tokenizer_config.json"))?;
    let token = config.as_ref().and_then(|c| c.get("pad_token")).and_then(|t| match t {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    });
    if let Some(id) = token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        return Ok(id);
    }
    declared.ok_or_else(|| ModelError::Files {
        path: dir.join("tokenizer_config.json").display().to_string(),
        message: "no pad_token in the tokenizer's vocabulary: this model pads every text to its length"
            .into(),
    })
}
