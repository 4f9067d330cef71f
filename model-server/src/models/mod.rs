//! Model architectures: the forward passes, one folder each, chosen from what a checkpoint
//! declares (`config.json`'s `model_type`, or a GGUF file's `general.architecture`) through one
//! table. An architecture the build does not run is refused by name, with the ones it does.
//!
//! Architectures share [`crate::kernels`] (ISA dispatch, GEMM, quantized matmul, row loops) and
//! [`crate::weights`] (safetensors, JSON configs, GGUF metadata); none imports another.

pub mod bert;
pub mod clip;
pub mod llama;
pub mod siglip;
pub mod whisper;
pub mod yunet;

use std::path::Path;

use crate::manifest::Family;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Files { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Inference(e.to_string())
    }
}

/// How an encoder turns its per-token outputs into one vector per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over real tokens (padding excluded).
    Mean,
    /// The first token ([CLS], or `<s>` for XLM-RoBERTa).
    Cls,
}

/// What an encoder architecture gives the text-embedding family. Implementations must be
/// thread-safe and deterministic; the batcher calls them from its own thread.
pub trait Encoder: Send + Sync {
    /// One pooled (not normalised) vector per input, in input order.
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, ModelError>;
    fn hidden_size(&self) -> usize;
    /// Positions an input may use; longer inputs cannot be encoded.
    fn max_positions(&self) -> usize;
}

/// What an image-text architecture (two towers, one embedding space) gives the
/// image-text-embedding family. Deterministic and thread-safe, like [`Encoder`].
pub trait ImageTextEncoder: Send + Sync {
    /// One feature vector (not normalised) per image (at least one); images are
    /// [`TowerShape::image_size`] a side.
    fn embed_images(
        &self,
        images: &[&crate::images::preprocess::PixelValues],
    ) -> Result<Vec<Vec<f32>>, ModelError>;
    /// One feature vector (not normalised) per text (at least one), from its token ids.
    fn embed_texts(&self, texts: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Feature width, image size and text length of the towers.
    fn shape(&self) -> TowerShape;
}

/// What the image-text-embedding family needs to know of a model's towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TowerShape {
    /// Width of both towers' features.
    pub dimension: usize,
    /// Side of the square pixel values the vision tower takes.
    pub image_size: usize,
    /// Most token ids a text may have.
    pub max_text_tokens: usize,
    /// Whether texts are padded to `max_text_tokens` (SigLIP was trained on padded texts and
    /// attends to the padding).
    pub pads_text: bool,
}

/// Every architecture this build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// BERT and its kin (MiniLM, BGE, E5): the packed encoder.
    Bert,
    /// XLM-RoBERTa (BGE-M3, multilingual-e5): the packed encoder with RoBERTa positions.
    XlmRoberta,
    /// Llama and Mistral decoders.
    Llama,
    /// Whisper encoder-decoder (speech to text), from CTranslate2's `WhisperSpec` or a Hugging
    /// Face `whisper` checkpoint.
    Whisper,
    /// SigLIP's image and text towers (sigmoid loss, attention-pooling head).
    Siglip,
    /// CLIP's image and text towers (class-token and end-of-text pooling, projections).
    Clip,
    /// YuNet face detection, an ONNX graph recognised by its outputs (`cls_8` … `kps_32`).
    Yunet,
}

/// The one table: the name a checkpoint declares, the architecture that runs it, and the
/// family that serves it.
const ARCHITECTURES: &[(&str, Architecture, Family)] = &[
    ("bert", Architecture::Bert, Family::TextEmbedding),
    ("xlm-roberta", Architecture::XlmRoberta, Family::TextEmbedding),
    ("llama", Architecture::Llama, Family::TextGeneration),
    ("mistral", Architecture::Llama, Family::TextGeneration),
    ("WhisperSpec", Architecture::Whisper, Family::SpeechToText),
    ("whisper", Architecture::Whisper, Family::SpeechToText),
    ("siglip", Architecture::Siglip, Family::ImageTextEmbedding),
    ("clip", Architecture::Clip, Family::ImageTextEmbedding),
    ("yunet", Architecture::Yunet, Family::FaceDetection),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchitectureError {
    #[error(
        "{source_name} declares {kind} {found:?}, which this build does not run; the {family} family runs {supported}"
    )]
    Unknown { source_name: String, kind: &'static str, found: String, family: Family, supported: String },
    #[error("{source_name} declares no {kind}; the {family} family runs {supported}")]
    Undeclared { source_name: String, kind: &'static str, family: Family, supported: String },
}

/// The names of the architectures a family serves, for messages.
pub fn supported(family: Family) -> String {
    let names: Vec<&str> =
        ARCHITECTURES.iter().filter(|(_, _, f)| *f == family).map(|(n, _, _)| *n).collect();
    if names.is_empty() { "nothing yet".to_string() } else { names.join(", ") }
}

/// The architecture for `declared` (a `model_type` or `general.architecture`) in `family`.
/// `kind` names what was read ("model_type"), `source_name` where (a file), for the message.
pub fn architecture(
    family: Family,
    declared: Option<&str>,
    kind: &'static str,
    source_name: &Path,
) -> Result<Architecture, ArchitectureError> {
    let source_name = source_name.display().to_string();
    let Some(found) = declared else {
        return Err(ArchitectureError::Undeclared {
            source_name,
            kind,
            family,
            supported: supported(family),
        });
    };
    // Hugging Face writes `xlm-roberta`; some exports write `xlm_roberta`.
    let normalized = found.replace('_', "-");
    ARCHITECTURES
        .iter()
        .find(|(name, _, f)| *name == normalized && *f == family)
        .map(|(_, a, _)| *a)
        .ok_or_else(|| ArchitectureError::Unknown {
            source_name,
            kind,
            found: found.to_string(),
            family,
            supported: supported(family),
        })
}

/// The additive causal mask of a GPU path's attention, `[n, first + n]`: query row `i` (position
/// `first + i`) sees the keys up to its own position.
pub(crate) fn causal_mask(
    n: usize,
    first: usize,
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let m = first + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > first + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    candle_core::Tensor::from_vec(mask, (n, m), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_picks_the_architecture_and_names_what_it_refuses() {
        let file = Path::new("m/config.json");
        let arch = |t: &str| architecture(Family::TextEmbedding, Some(t), "model_type", file);
        assert_eq!(arch("bert"), Ok(Architecture::Bert));
        assert_eq!(arch("xlm-roberta"), Ok(Architecture::XlmRoberta));
        assert_eq!(arch("xlm_roberta"), Ok(Architecture::XlmRoberta));
        let err = arch("mpnet").expect_err("not run by this build").to_string();
        assert!(
            err.contains("\"mpnet\"") && err.contains("bert, xlm-roberta") && err.contains("m/config.json"),
            "{err}"
        );
        // A decoder is not an embedding model, whatever the table knows.
        let err = arch("llama").expect_err("wrong family").to_string();
        assert!(err.contains("text-embedding family runs bert, xlm-roberta"), "{err}");
        let gguf =
            architecture(Family::TextGeneration, Some("llama"), "general.architecture", Path::new("m.gguf"));
        assert_eq!(gguf, Ok(Architecture::Llama));
        let whisper = |t: &str| architecture(Family::SpeechToText, Some(t), "model_type", file);
        assert_eq!(whisper("whisper"), Ok(Architecture::Whisper));
        assert_eq!(whisper("WhisperSpec"), Ok(Architecture::Whisper));
        let err = whisper("TransformerSpec").expect_err("not Whisper").to_string();
        assert!(err.contains("speech-to-text family runs WhisperSpec, whisper"), "{err}");
        let image_text = |t: &str| architecture(Family::ImageTextEmbedding, Some(t), "model_type", file);
        assert_eq!(image_text("siglip"), Ok(Architecture::Siglip));
        assert_eq!(image_text("clip"), Ok(Architecture::Clip));
        let err = image_text("siglip2").expect_err("not run").to_string();
        assert!(err.contains("image-text-embedding family runs siglip, clip"), "{err}");
        let none = architecture(Family::TextGeneration, None, "model_type", file).expect_err("undeclared");
        assert!(none.to_string().contains("declares no model_type"), "{none}");
    }
}
