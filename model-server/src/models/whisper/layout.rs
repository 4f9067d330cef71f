//! Where a Whisper checkpoint keeps its weights (CTranslate2's `model.bin` or a Hugging Face
//! checkpoint), the shape they give and the blocks they make: read alike by the packed CPU
//! network and the candle one.

use crate::models::ModelError;
use crate::weights::ctranslate2::Ct2Model;
use crate::weights::tensors::{Tensor, Tensors};

/// The shape, derived from the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub mels: usize,
    /// Encoder positions: 1500 (30 s at 50 frames per second after the stride-2 convolution).
    pub audio_ctx: usize,
    pub hidden: usize,
    pub encoder_heads: usize,
    pub encoder_layers: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Decoder positions: 448.
    pub text_ctx: usize,
    pub decoder_heads: usize,
    pub decoder_layers: usize,
}

impl Dims {
    /// The shape of a CTranslate2 `WhisperSpec` file, from its tensors.
    pub fn of_ctranslate2(model: &Ct2Model) -> Result<Dims, ModelError> {
        let files_err = |message: String| ModelError::Files { path: "model.bin".to_string(), message };
        let first = |name: &str| -> Result<usize, ModelError> {
            model
                .dims(name)
                .and_then(|d| d.first().copied())
                .ok_or_else(|| files_err(format!("no variable {name}")))
        };
        let conv1 = model.dims("encoder/conv1/weight").map(<[usize]>::to_vec).unwrap_or_default();
        let [hidden, mels, 3] = conv1[..] else {
            return Err(files_err(format!(
                "encoder/conv1/weight has dims {conv1:?}, expected [hidden, mels, 3]"
            )));
        };
        let heads = |name: &str| -> Result<usize, ModelError> {
            Ok(usize::try_from(model.scalar(name)?).unwrap_or(0))
        };
        let l = Layout::Ctranslate2;
        Ok(Dims {
            mels,
            audio_ctx: first("encoder/position_encodings/encodings")?,
            hidden,
            encoder_heads: heads("encoder/num_heads")?,
            encoder_layers: l.count_layers(model, "encoder"),
            ffn: first("encoder/layer_0/ffn/linear_0/weight")?,
            vocab: first("decoder/embeddings/weight")?,
            text_ctx: first("decoder/position_encodings/encodings")?,
            decoder_heads: heads("decoder/num_heads")?,
            decoder_layers: l.count_layers(model, "decoder"),
        })
    }

    /// Bytes of the float32 weights, about (the matrices; biases and norms are noise).
    pub fn weight_bytes(&self) -> usize {
        let d = self;
        let (h, f) = (d.hidden, d.ffn);
        let encoder = d.encoder_layers * (4 * h * h + 2 * h * f);
        let decoder = d.decoder_layers * (8 * h * h + 2 * h * f);
        let rest = d.vocab * h + 3 * d.mels * h + 3 * h * h + (d.audio_ctx + d.text_ctx) * h;
        (encoder + decoder + rest) * std::mem::size_of::<f32>()
    }

    /// Mel frames the encoder takes: twice its positions (3000 for 30 s).
    pub fn frames(&self) -> usize {
        2 * self.audio_ctx
    }

    /// Refuses a shape no Whisper has (no layers, heads that do not divide the width), before
    /// any weight is read.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.encoder_layers == 0 || self.decoder_layers == 0 || self.ffn == 0 {
            return Err(ModelError::Unsupported(format!("not a Whisper model: {self:?}")));
        }
        for heads in [self.encoder_heads, self.decoder_heads] {
            if heads == 0 || !self.hidden.is_multiple_of(heads) {
                return Err(ModelError::Unsupported(format!(
                    "{heads} attention heads do not divide the hidden size {}",
                    self.hidden
                )));
            }
        }
        Ok(())
    }

    /// Refuses a decoder step that feeds nothing, runs past the positions or names a token
    /// outside the vocabulary (`cached` positions are already decoded).
    pub fn check_step(&self, cached: usize, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Inference("no tokens to decode".to_string()));
        }
        let end = cached.saturating_add(tokens.len());
        if end > self.text_ctx {
            return Err(ModelError::Inference(format!(
                "{end} tokens do not fit the decoder's {} positions",
                self.text_ctx
            )));
        }
        if let Some(id) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ModelError::Inference(format!(
                "token {id} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        Ok(())
    }
}

/// A checkpoint's tensors, whatever file holds them.
pub trait Source: Sync {
    fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<'_>, ModelError>;
    fn contains(&self, name: &str) -> bool;
}

impl Source for Ct2Model {
    fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<'_>, ModelError> {
        Ct2Model::get(self, name, dims)
    }
    fn contains(&self, name: &str) -> bool {
        Ct2Model::contains(self, name)
    }
}

impl Source for Tensors {
    fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<'_>, ModelError> {
        Tensors::get(self, name, dims)
    }
    fn contains(&self, name: &str) -> bool {
        Tensors::contains(self, name)
    }
}

/// Where a checkpoint layout keeps each weight: CTranslate2 stacks Q, K, V (and the
/// cross-attention K, V) in one matrix; Hugging Face keeps one per projection, K without a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Ctranslate2,
    HuggingFace,
}

/// The projections of one attention or feed-forward site.
enum Site {
    SelfQkv,
    SelfOut,
    CrossQ,
    CrossKv,
    CrossOut,
    Fc1,
    Fc2,
}

enum NormSite {
    SelfAttention,
    CrossAttention,
    Ffn,
}

impl Layout {
    fn layer(self, side: &str, i: usize) -> String {
        match self {
            Layout::Ctranslate2 => format!("{side}/layer_{i}"),
            Layout::HuggingFace => format!("model.{side}.layers.{i}"),
        }
    }

    /// The matrices stacked for a site (their outputs concatenated in this order).
    fn parts(self, layer: &str, site: Site) -> Vec<String> {
        let names: &[&str] = match (self, site) {
            (Layout::Ctranslate2, Site::SelfQkv) => &["self_attention/linear_0"],
            (Layout::Ctranslate2, Site::SelfOut) => &["self_attention/linear_1"],
            (Layout::Ctranslate2, Site::CrossQ) => &["attention/linear_0"],
            (Layout::Ctranslate2, Site::CrossKv) => &["attention/linear_1"],
            (Layout::Ctranslate2, Site::CrossOut) => &["attention/linear_2"],
            (Layout::Ctranslate2, Site::Fc1) => &["ffn/linear_0"],
            (Layout::Ctranslate2, Site::Fc2) => &["ffn/linear_1"],
            (Layout::HuggingFace, Site::SelfQkv) => {
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            }
            (Layout::HuggingFace, Site::SelfOut) => &["self_attn.out_proj"],
            (Layout::HuggingFace, Site::CrossQ) => &["encoder_attn.q_proj"],
            (Layout::HuggingFace, Site::CrossKv) => &["encoder_attn.k_proj", "encoder_attn.v_proj"],
            (Layout::HuggingFace, Site::CrossOut) => &["encoder_attn.out_proj"],
            (Layout::HuggingFace, Site::Fc1) => &["fc1"],
            (Layout::HuggingFace, Site::Fc2) => &["fc2"],
        };
        names.iter().map(|n| self.join(layer, n)).collect()
    }

    fn norm_site(self, layer: &str, site: NormSite) -> String {
        let name = match (self, site) {
            (Layout::Ctranslate2, NormSite::SelfAttention) => "self_attention/layer_norm",
            (Layout::Ctranslate2, NormSite::CrossAttention) => "attention/layer_norm",
            (Layout::Ctranslate2, NormSite::Ffn) => "ffn/layer_norm",
            (Layout::HuggingFace, NormSite::SelfAttention) => "self_attn_layer_norm",
            (Layout::HuggingFace, NormSite::CrossAttention) => "encoder_attn_layer_norm",
            (Layout::HuggingFace, NormSite::Ffn) => "final_layer_norm",
        };
        self.join(layer, name)
    }

    pub(super) fn join(self, prefix: &str, name: &str) -> String {
        match self {
            Layout::Ctranslate2 => format!("{prefix}/{name}"),
            Layout::HuggingFace => format!("{prefix}.{name}"),
        }
    }

    /// `encoder` or `decoder`-level names: conv1, layer_norm, positions, embeddings.
    pub(super) fn top(self, side: &str, what: &str) -> String {
        match (self, what) {
            (Layout::Ctranslate2, "positions") => format!("{side}/position_encodings/encodings"),
            (Layout::Ctranslate2, "embeddings") => format!("{side}/embeddings/weight"),
            (Layout::Ctranslate2, _) => format!("{side}/{what}"),
            (Layout::HuggingFace, "positions") => format!("model.{side}.embed_positions.weight"),
            (Layout::HuggingFace, "embeddings") => format!("model.{side}.embed_tokens.weight"),
            (Layout::HuggingFace, _) => format!("model.{side}.{what}"),
        }
    }

    pub(super) fn weight(self, prefix: &str) -> String {
        self.join(prefix, "weight")
    }

    pub(super) fn bias(self, prefix: &str) -> String {
        self.join(prefix, "bias")
    }

    pub(super) fn gamma_beta(self, prefix: &str) -> (String, String) {
        match self {
            Layout::Ctranslate2 => (self.join(prefix, "gamma"), self.join(prefix, "beta")),
            Layout::HuggingFace => (self.join(prefix, "weight"), self.join(prefix, "bias")),
        }
    }

    /// The biases of the stacked `parts` (each `each` outputs), zeros for a part without one
    /// (K), the first `scaled` multiplied by `scale` (1/√d folded into Q).
    pub(super) fn stacked_bias(
        self,
        source: &dyn Source,
        parts: &[String],
        each: usize,
        scaled: usize,
        scale: f32,
    ) -> Result<Vec<f32>, ModelError> {
        let mut bias = Vec::with_capacity(parts.len() * each);
        for p in parts {
            let name = self.bias(p);
            if source.contains(&name) {
                bias.extend(source.get(&name, &[each])?.to_vec());
            } else {
                bias.extend(std::iter::repeat_n(0.0, each));
            }
        }
        bias[..scaled].iter_mut().for_each(|b| *b *= scale);
        Ok(bias)
    }

    /// How many layers a side has: the first index without a feed-forward weight.
    pub(super) fn count_layers(self, source: &dyn Source, side: &str) -> usize {
        (0..)
            .take_while(|&i| source.contains(&self.weight(&self.parts(&self.layer(side, i), Site::Fc1)[0])))
            .count()
    }
}

/// One sequence's part of a decoder step, in an engine's forms: its window, its cache, the
/// tokens it feeds.
pub struct Step<'a, A, S> {
    pub audio: &'a A,
    pub seq: &'a mut S,
    pub tokens: &'a [u32],
}

/// How an engine reads a LayerNorm and a (stacked) projection into its own forms.
pub(super) trait Reads: Sync {
    type Norm: Send;
    type Linear: Send;
    fn norm(&self, prefix: &str, hidden: usize) -> Result<Self::Norm, ModelError>;
    /// The stacked `parts` (each `[outputs / parts, inputs]`), the first `scaled` outputs
    /// multiplied by `scale` (1/√d folded into Q), biases as [`Layout::stacked_bias`] lays them.
    fn linear(
        &self,
        parts: &[String],
        inputs: usize,
        outputs: usize,
        scaled: usize,
        scale: f32,
    ) -> Result<Self::Linear, ModelError>;
}

/// One encoder block, in an engine's forms.
pub(super) struct EncoderLayer<N, L> {
    pub attn_norm: N,
    /// Q, K, V stacked; Q pre-scaled by 1/√d.
    pub qkv: L,
    pub attn_out: L,
    pub ffn_norm: N,
    pub fc1: L,
    pub fc2: L,
}

/// One decoder block, in an engine's forms.
pub(super) struct DecoderLayer<N, L> {
    pub self_norm: N,
    /// Q, K, V stacked; Q pre-scaled by 1/√d.
    pub self_qkv: L,
    pub self_out: L,
    pub cross_norm: N,
    /// Pre-scaled by 1/√d.
    pub cross_q: L,
    /// K and V of the encoder output, stacked.
    pub cross_kv: L,
    pub cross_out: L,
    pub ffn_norm: N,
    pub fc1: L,
    pub fc2: L,
}

impl<N, L> EncoderLayer<N, L> {
    /// Encoder block `i` of a checkpoint laid out as `l`, of shape `d`.
    pub(super) fn read(
        r: &impl Reads<Norm = N, Linear = L>,
        l: Layout,
        d: &Dims,
        i: usize,
    ) -> Result<Self, ModelError> {
        let (h, f, p) = (d.hidden, d.ffn, l.layer("encoder", i));
        let scale = 1.0 / ((h / d.encoder_heads) as f32).sqrt();
        Ok(EncoderLayer {
            attn_norm: r.norm(&l.norm_site(&p, NormSite::SelfAttention), h)?,
            qkv: r.linear(&l.parts(&p, Site::SelfQkv), h, 3 * h, h, scale)?,
            attn_out: r.linear(&l.parts(&p, Site::SelfOut), h, h, 0, 1.0)?,
            ffn_norm: r.norm(&l.norm_site(&p, NormSite::Ffn), h)?,
            fc1: r.linear(&l.parts(&p, Site::Fc1), h, f, 0, 1.0)?,
            fc2: r.linear(&l.parts(&p, Site::Fc2), f, h, 0, 1.0)?,
        })
    }
}

impl<N, L> DecoderLayer<N, L> {
    /// Decoder block `i` of a checkpoint laid out as `l`, of shape `d`.
    pub(super) fn read(
        r: &impl Reads<Norm = N, Linear = L>,
        l: Layout,
        d: &Dims,
        i: usize,
    ) -> Result<Self, ModelError> {
        let (h, f, p) = (d.hidden, d.ffn, l.layer("decoder", i));
        let scale = 1.0 / ((h / d.decoder_heads) as f32).sqrt();
        Ok(DecoderLayer {
            self_norm: r.norm(&l.norm_site(&p, NormSite::SelfAttention), h)?,
            self_qkv: r.linear(&l.parts(&p, Site::SelfQkv), h, 3 * h, h, scale)?,
            self_out: r.linear(&l.parts(&p, Site::SelfOut), h, h, 0, 1.0)?,
            cross_norm: r.norm(&l.norm_site(&p, NormSite::CrossAttention), h)?,
            cross_q: r.linear(&l.parts(&p, Site::CrossQ), h, h, h, scale)?,
            cross_kv: r.linear(&l.parts(&p, Site::CrossKv), h, 2 * h, 0, 1.0)?,
            cross_out: r.linear(&l.parts(&p, Site::CrossOut), h, h, 0, 1.0)?,
            ffn_norm: r.norm(&l.norm_site(&p, NormSite::Ffn), h)?,
            fc1: r.linear(&l.parts(&p, Site::Fc1), h, f, 0, 1.0)?,
            fc2: r.linear(&l.parts(&p, Site::Fc2), f, h, 0, 1.0)?,
        })
    }
}
