//! Whisper's encoder and decoder on the shared packed kernels: pre-LayerNorm transformer blocks,
//! exact GELU, the encoder's two convolutions as matmuls over three neighbouring frames, and a
//! decoder that keeps its self-attention keys and values per sequence and its cross-attention
//! keys and values per window.

use rayon::prelude::*;

use crate::kernels::attention::{Mask, attend_head};
use crate::kernels::gemm::{self as matmul, Linear, SharedOut, View, Weight};
use crate::kernels::{self, Isa, Norm};
use crate::models::ModelError;
use crate::weights::ctranslate2::Ct2Model;
use crate::weights::tensors::Tensor;

/// Whisper's LayerNorm epsilon.
const EPS: f32 = 1e-5;

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

struct EncoderLayer {
    attn_norm: Norm,
    /// Q, K, V stacked; Q pre-scaled by 1/√d.
    qkv: Linear,
    attn_out: Linear,
    ffn_norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

struct DecoderLayer {
    self_norm: Norm,
    self_qkv: Linear,
    self_out: Linear,
    cross_norm: Norm,
    cross_q: Linear,
    /// K and V of the encoder output, stacked.
    cross_kv: Linear,
    cross_out: Linear,
    ffn_norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

pub struct Network {
    pub dims: Dims,
    /// Over three consecutive mel frames (frame-major: `[3 × mels, hidden]`).
    conv1: Linear,
    conv2: Linear,
    encoder_positions: Vec<f32>,
    encoder_layers: Vec<EncoderLayer>,
    encoder_norm: Norm,
    /// `[vocab × hidden]`, for lookups.
    embeddings: Vec<f32>,
    /// The embeddings transposed (`[hidden, vocab]`): the tied output projection.
    output: Weight,
    decoder_positions: Vec<f32>,
    decoder_layers: Vec<DecoderLayer>,
    decoder_norm: Norm,
    isa: Isa,
}

/// One window's encoder output, with each decoder layer's cross-attention K and V of it.
pub struct Audio {
    /// Per decoder layer, `[audio_ctx × 2·hidden]`: K then V of each position.
    cross_kv: Vec<Vec<f32>>,
}

/// One sequence being decoded against an [`Audio`].
pub struct Sequence {
    /// Per decoder layer, `[len × 2·hidden]`: K then V of each position so far.
    self_kv: Vec<Vec<f32>>,
    len: usize,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Reads the weights of CTranslate2's `WhisperSpec`.
struct Ct2<'a> {
    model: &'a Ct2Model,
}

impl Ct2<'_> {
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.model.get(name, &[len])?.to_vec())
    }

    fn norm(&self, prefix: &str, hidden: usize) -> Result<Norm, ModelError> {
        Ok(Norm {
            gamma: self.vector(&format!("{prefix}/gamma"), hidden)?,
            beta: self.vector(&format!("{prefix}/beta"), hidden)?,
        })
    }

    /// `prefix/weight` (`[outputs, inputs]`) and `prefix/bias`, the first `scaled` outputs
    /// multiplied by `scale` (how 1/√d is folded into Q).
    fn linear(
        &self,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        scaled: usize,
        scale: f32,
    ) -> Result<Linear, ModelError> {
        let w = self.model.get(&format!("{prefix}/weight"), &[outputs, inputs])?;
        let mut bias = self.vector(&format!("{prefix}/bias"), outputs)?;
        bias[..scaled].iter_mut().for_each(|b| *b *= scale);
        Ok(Linear { weight: rows_to_weight(&w, inputs, outputs, scaled, scale), bias })
    }
}

/// `[outputs, inputs]` rows into the packed `[inputs, outputs]` layout.
fn rows_to_weight(w: &Tensor<'_>, inputs: usize, outputs: usize, scaled: usize, scale: f32) -> Weight {
    Weight::from_output_rows(inputs, outputs, |o, row| {
        w.read_row(o, row);
        if o < scaled {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    })
}

impl Network {
    /// The network in a CTranslate2 `WhisperSpec` file; the shape comes from its tensors.
    pub fn from_ctranslate2(model: &Ct2Model) -> Result<Network, ModelError> {
        let files_err = |message: String| ModelError::Files { path: "model.bin".to_string(), message };
        let dims_of = |name: &str| {
            model.dims(name).map(<[usize]>::to_vec).ok_or_else(|| files_err(format!("no variable {name}")))
        };
        let conv1 = dims_of("encoder/conv1/weight")?;
        let [hidden, mels, 3] = conv1[..] else {
            return Err(files_err(format!(
                "encoder/conv1/weight has dims {conv1:?}, expected [hidden, mels, 3]"
            )));
        };
        let count = |prefix: &str| {
            (0..).take_while(|i| model.contains(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))).count()
        };
        let ffn = dims_of("encoder/layer_0/ffn/linear_0/weight")?.first().copied().unwrap_or(0);
        let heads = |name: &str| -> Result<usize, ModelError> {
            let h = usize::try_from(model.scalar(name)?).unwrap_or(0);
            if h == 0 || hidden % h != 0 {
                return Err(files_err(format!("{name} = {h} does not divide the hidden size {hidden}")));
            }
            Ok(h)
        };
        let dims = Dims {
            mels,
            audio_ctx: dims_of("encoder/position_encodings/encodings")?.first().copied().unwrap_or(0),
            hidden,
            encoder_heads: heads("encoder/num_heads")?,
            encoder_layers: count("encoder"),
            ffn,
            vocab: dims_of("decoder/embeddings/weight")?.first().copied().unwrap_or(0),
            text_ctx: dims_of("decoder/position_encodings/encodings")?.first().copied().unwrap_or(0),
            decoder_heads: heads("decoder/num_heads")?,
            decoder_layers: count("decoder"),
        };
        if dims.encoder_layers == 0 || dims.decoder_layers == 0 || dims.ffn == 0 {
            return Err(files_err(format!("not a Whisper model: {dims:?}")));
        }
        let r = Ct2 { model };
        let (h, f) = (hidden, ffn);
        let enc_scale = 1.0 / ((h / dims.encoder_heads) as f32).sqrt();
        let dec_scale = 1.0 / ((h / dims.decoder_heads) as f32).sqrt();
        let conv = |name: &str, channels: usize| -> Result<Linear, ModelError> {
            // PyTorch's [out, in, 3] into rows over three frames, frame-major: input k·in + c.
            let w = model.get(&format!("{name}/weight"), &[h, channels, 3])?;
            let weight = Weight::from_output_rows(3 * channels, h, |o, row| {
                let mut raw = vec![0.0; channels * 3];
                w.read_rows(o * channels, &mut raw);
                for c in 0..channels {
                    for k in 0..3 {
                        row[k * channels + c] = raw[c * 3 + k];
                    }
                }
            });
            Ok(Linear { weight, bias: r.vector(&format!("{name}/bias"), h)? })
        };
        let conv1 = conv("encoder/conv1", mels)?;
        let conv2 = conv("encoder/conv2", h)?;
        let encoder_layers = (0..dims.encoder_layers)
            .into_par_iter()
            .map(|i| {
                let p = format!("encoder/layer_{i}");
                Ok(EncoderLayer {
                    attn_norm: r.norm(&format!("{p}/self_attention/layer_norm"), h)?,
                    qkv: r.linear(&format!("{p}/self_attention/linear_0"), h, 3 * h, h, enc_scale)?,
                    attn_out: r.linear(&format!("{p}/self_attention/linear_1"), h, h, 0, 1.0)?,
                    ffn_norm: r.norm(&format!("{p}/ffn/layer_norm"), h)?,
                    fc1: r.linear(&format!("{p}/ffn/linear_0"), h, f, 0, 1.0)?,
                    fc2: r.linear(&format!("{p}/ffn/linear_1"), f, h, 0, 1.0)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let decoder_layers = (0..dims.decoder_layers)
            .into_par_iter()
            .map(|i| {
                let p = format!("decoder/layer_{i}");
                Ok(DecoderLayer {
                    self_norm: r.norm(&format!("{p}/self_attention/layer_norm"), h)?,
                    self_qkv: r.linear(&format!("{p}/self_attention/linear_0"), h, 3 * h, h, dec_scale)?,
                    self_out: r.linear(&format!("{p}/self_attention/linear_1"), h, h, 0, 1.0)?,
                    cross_norm: r.norm(&format!("{p}/attention/layer_norm"), h)?,
                    cross_q: r.linear(&format!("{p}/attention/linear_0"), h, h, h, dec_scale)?,
                    cross_kv: r.linear(&format!("{p}/attention/linear_1"), h, 2 * h, 0, 1.0)?,
                    cross_out: r.linear(&format!("{p}/attention/linear_2"), h, h, 0, 1.0)?,
                    ffn_norm: r.norm(&format!("{p}/ffn/layer_norm"), h)?,
                    fc1: r.linear(&format!("{p}/ffn/linear_0"), h, f, 0, 1.0)?,
                    fc2: r.linear(&format!("{p}/ffn/linear_1"), f, h, 0, 1.0)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let embeddings = model.get("decoder/embeddings/weight", &[dims.vocab, h])?;
        let output = rows_to_weight(&embeddings, h, dims.vocab, 0, 1.0);
        Ok(Network {
            dims,
            conv1,
            conv2,
            encoder_positions: model
                .get("encoder/position_encodings/encodings", &[dims.audio_ctx, h])?
                .to_vec(),
            encoder_layers,
            encoder_norm: r.norm("encoder/layer_norm", h)?,
            embeddings: embeddings.to_vec(),
            output,
            decoder_positions: model
                .get("decoder/position_encodings/encodings", &[dims.text_ctx, h])?
                .to_vec(),
            decoder_layers,
            decoder_norm: r.norm("decoder/layer_norm", h)?,
            isa: Isa::best(),
        })
    }

    /// Mel frames the encoder takes: twice its positions (3000 for 30 s).
    pub fn frames(&self) -> usize {
        2 * self.dims.audio_ctx
    }

    /// Encodes one window of log-mel features (`[mels × frames]`, bin-major as Whisper
    /// computes them) and projects each decoder layer's cross-attention keys and values.
    pub fn encode(&self, mel: &[f32]) -> Result<Audio, ModelError> {
        let (d, frames, mels) = (self.dims, self.frames(), self.dims.mels);
        if mel.len() != mels * frames {
            return Err(ModelError::Inference(format!(
                "{} mel values; the encoder takes {mels} bins × {frames} frames",
                mel.len()
            )));
        }
        let h = d.hidden;
        let threads = rayon::current_num_threads();
        // Frame-major, so each convolution input is three consecutive rows.
        let mut x = vec![0.0; frames * mels];
        for (b, bin) in mel.chunks_exact(frames).enumerate() {
            for (t, &v) in bin.iter().enumerate() {
                x[t * mels + b] = v;
            }
        }
        let h1 = self.conv(&x, mels, frames, 1, &self.conv1, threads);
        let mut x = self.conv(&h1, h, frames, 2, &self.conv2, threads);
        for (row, pos) in x.chunks_exact_mut(h).zip(self.encoder_positions.chunks_exact(h)) {
            row.iter_mut().zip(pos).for_each(|(r, p)| *r += p);
        }
        let n = d.audio_ctx;
        let mut normed = vec![0.0; n * h];
        let mut qkv = vec![0.0; n * 3 * h];
        let mut ctx = vec![0.0; n * h];
        let mut up = vec![0.0; n * d.ffn];
        for layer in &self.encoder_layers {
            self.norm_into(&x, &mut normed, &layer.attn_norm);
            self.project(&normed, &layer.qkv, &mut qkv, threads);
            let heads = d.encoder_heads;
            let hd = h / heads;
            let shared = SharedOut::new(&mut ctx);
            (0..heads).into_par_iter().for_each(|head| {
                let view = |offset| View {
                    offset: offset + head * hd,
                    rows: n,
                    cols: hd,
                    row_stride: 3 * h,
                    col_stride: 1,
                };
                let o = View { offset: head * hd, rows: n, cols: hd, row_stride: h, col_stride: 1 };
                // SAFETY: each head writes its own columns of `ctx`, borrowed for this loop.
                unsafe {
                    attend_head(
                        (&qkv, view(0)),
                        (&qkv, view(h), view(2 * h)),
                        (&shared, o),
                        Mask::None,
                        self.isa,
                    )
                };
            });
            self.residual(&mut x, &ctx, &layer.attn_out, threads);
            self.ffn(&mut x, &mut normed, &mut up, &layer.ffn_norm, &layer.fc1, &layer.fc2, threads);
        }
        self.norm_in_place(&mut x, &self.encoder_norm);
        let cross_kv = self
            .decoder_layers
            .iter()
            .map(|layer| {
                let mut kv = vec![0.0; n * 2 * h];
                self.project(&x, &layer.cross_kv, &mut kv, threads);
                kv
            })
            .collect();
        Ok(Audio { cross_kv })
    }

    /// A kernel-3, padding-1 convolution over time with the given stride, then GELU:
    /// `x` is `[frames × channels]`, the result `[frames / stride × hidden]`.
    fn conv(
        &self,
        x: &[f32],
        channels: usize,
        frames: usize,
        stride: usize,
        w: &Linear,
        threads: usize,
    ) -> Vec<f32> {
        let out_frames = frames / stride;
        let mut cols = vec![0.0; out_frames * 3 * channels];
        for (t, dst) in cols.chunks_exact_mut(3 * channels).enumerate() {
            for k in 0..3 {
                // Input frame stride·t + k − 1; the padding frames stay zero.
                let Some(src) = (stride * t + k).checked_sub(1).filter(|&f| f < frames) else { continue };
                dst[k * channels..][..channels].copy_from_slice(&x[src * channels..][..channels]);
            }
        }
        let h = self.dims.hidden;
        let mut out = vec![0.0; out_frames * h];
        matmul::linear(&mut out, &cols, &w.weight, false, threads);
        out.par_chunks_mut(64 * h).for_each(|rows| kernels::bias_gelu(rows, &w.bias, self.isa));
        out
    }

    /// `out = x·W + b`.
    fn project(&self, x: &[f32], w: &Linear, out: &mut [f32], threads: usize) {
        for row in out.chunks_exact_mut(w.bias.len()) {
            row.copy_from_slice(&w.bias);
        }
        matmul::linear(out, x, &w.weight, true, threads);
    }

    /// `x += y·W + b`.
    fn residual(&self, x: &mut [f32], y: &[f32], w: &Linear, threads: usize) {
        for row in x.chunks_exact_mut(w.bias.len()) {
            row.iter_mut().zip(&w.bias).for_each(|(r, b)| *r += b);
        }
        matmul::linear(x, y, &w.weight, true, threads);
    }

    /// `x += GELU(LN(x)·W1 + b1)·W2 + b2`.
    #[allow(clippy::too_many_arguments)]
    fn ffn(
        &self,
        x: &mut [f32],
        normed: &mut [f32],
        up: &mut [f32],
        norm: &Norm,
        fc1: &Linear,
        fc2: &Linear,
        threads: usize,
    ) {
        let (h, f) = (self.dims.hidden, self.dims.ffn);
        let tokens = x.len() / h;
        let (normed, up) = (&mut normed[..tokens * h], &mut up[..tokens * f]);
        self.norm_into(x, normed, norm);
        matmul::linear(up, normed, &fc1.weight, false, threads);
        up.par_chunks_mut(64 * f).for_each(|rows| kernels::bias_gelu(rows, &fc1.bias, self.isa));
        self.residual(x, up, fc2, threads);
    }

    fn norm_into(&self, x: &[f32], out: &mut [f32], norm: &Norm) {
        let out = &mut out[..x.len()];
        out.copy_from_slice(x);
        self.norm_in_place(out, norm);
    }

    fn norm_in_place(&self, x: &mut [f32], norm: &Norm) {
        let h = self.dims.hidden;
        let zero = vec![0.0; h];
        x.par_chunks_mut(64 * h)
            .for_each(|rows| kernels::bias_layer_norm(rows, &zero, &norm.gamma, &norm.beta, EPS, self.isa));
    }

    /// A sequence with nothing decoded yet.
    pub fn sequence(&self) -> Sequence {
        Sequence { self_kv: vec![Vec::new(); self.dims.decoder_layers], len: 0 }
    }

    /// Feeds `tokens` after what `seq` holds and returns the logits that follow the last one.
    pub fn decode(&self, audio: &Audio, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let d = self.dims;
        let (h, n) = (d.hidden, tokens.len());
        if n == 0 {
            return Err(ModelError::Inference("no tokens to decode".to_string()));
        }
        let end = seq.len.saturating_add(n);
        if end > d.text_ctx {
            return Err(ModelError::Inference(format!(
                "{end} tokens do not fit the decoder's {} positions",
                d.text_ctx
            )));
        }
        if let Some(id) = tokens.iter().find(|&&t| t as usize >= d.vocab) {
            return Err(ModelError::Inference(format!(
                "token {id} is outside the vocabulary of {}",
                d.vocab
            )));
        }
        let threads = rayon::current_num_threads();
        let mut x = vec![0.0; n * h];
        for (i, (row, &t)) in x.chunks_exact_mut(h).zip(tokens).enumerate() {
            let emb = &self.embeddings[t as usize * h..][..h];
            let pos = &self.decoder_positions[(seq.len + i) * h..][..h];
            row.iter_mut().zip(emb.iter().zip(pos)).for_each(|(r, (e, p))| *r = e + p);
        }
        let mut normed = vec![0.0; n * h];
        let mut qkv = vec![0.0; n * 3 * h];
        let mut ctx = vec![0.0; n * h];
        let mut up = vec![0.0; n * d.ffn];
        let first = seq.len;
        for (l, layer) in self.decoder_layers.iter().enumerate() {
            // Self-attention over the cache extended by these tokens.
            self.norm_into(&x, &mut normed, &layer.self_norm);
            self.project(&normed, &layer.self_qkv, &mut qkv, threads);
            let cache = &mut seq.self_kv[l];
            for row in qkv.chunks_exact(3 * h) {
                cache.extend_from_slice(&row[h..]);
            }
            let cache = &seq.self_kv[l];
            self.attend(&qkv, 3 * h, cache, end, &mut ctx, Mask::Causal { first });
            self.residual(&mut x, &ctx, &layer.self_out, threads);
            // Cross-attention over the window.
            self.norm_into(&x, &mut normed, &layer.cross_norm);
            let q = &mut qkv[..n * h];
            self.project(&normed, &layer.cross_q, q, threads);
            let kv = &audio.cross_kv[l];
            self.attend(&qkv[..n * h], h, kv, kv.len() / (2 * h), &mut ctx, Mask::None);
            self.residual(&mut x, &ctx, &layer.cross_out, threads);
            self.ffn(&mut x, &mut normed, &mut up, &layer.ffn_norm, &layer.fc1, &layer.fc2, threads);
        }
        seq.len = end;
        let last = &mut x[(n - 1) * h..];
        self.norm_in_place(last, &self.decoder_norm);
        let mut logits = vec![0.0; d.vocab];
        matmul::linear(&mut logits, last, &self.output, false, threads);
        Ok(logits)
    }

    /// Every head of `q` (rows `q_stride` apart, Q in the first `hidden` columns) against `m`
    /// cached K/V rows (`[m × 2·hidden]`), into `ctx`.
    fn attend(&self, q: &[f32], q_stride: usize, kv: &[f32], m: usize, ctx: &mut [f32], mask: Mask) {
        let h = self.dims.hidden;
        let n = ctx.len() / h;
        let heads = self.dims.decoder_heads;
        let hd = h / heads;
        let shared = SharedOut::new(ctx);
        (0..heads).into_par_iter().for_each(|head| {
            let qv = View { offset: head * hd, rows: n, cols: hd, row_stride: q_stride, col_stride: 1 };
            let kv_view = |offset| View {
                offset: offset + head * hd,
                rows: m,
                cols: hd,
                row_stride: 2 * h,
                col_stride: 1,
            };
            let o = View { offset: head * hd, rows: n, cols: hd, row_stride: h, col_stride: 1 };
            // SAFETY: each head writes its own columns of `ctx`, borrowed for this loop.
            unsafe { attend_head((q, qv), (kv, kv_view(0), kv_view(h)), (&shared, o), mask, self.isa) };
        });
    }
}
