//! Whisper's encoder and decoder on the shared packed kernels: pre-LayerNorm transformer blocks,
//! exact GELU, the encoder's two convolutions as matmuls over three neighbouring frames, and a
//! decoder that keeps its self-attention keys and values per sequence and its cross-attention
//! keys and values per window.

use rayon::prelude::*;

use super::layout::{self, Dims, Layout, Reads, Source};
use crate::kernels::attention::{Mask, attend_head};
use crate::kernels::gemm::{self as matmul, Linear, SharedOut, View, Weight};
use crate::kernels::{self, Isa, Norm};
use crate::models::ModelError;

/// Whisper's LayerNorm epsilon.
const EPS: f32 = 1e-5;

type EncoderLayer = layout::EncoderLayer<Norm, Linear>;
type DecoderLayer = layout::DecoderLayer<Norm, Linear>;

pub struct Network {
    pub dims: Dims,
    /// Over three consecutive mel frames (frame-major: `[3 × mels, hidden]`).
    conv1: Linear,
    conv2: Linear,
    encoder_positions: Vec<f32>,
    encoder_layers: Vec<EncoderLayer>,
    encoder_norm: Norm,
    /// `[vocab × hidden]`: the token lookups, and the tied output projection read row by row.
    embeddings: Embeddings,
    decoder_positions: Vec<f32>,
    decoder_layers: Vec<DecoderLayer>,
    decoder_norm: Norm,
    isa: Isa,
}

/// The decoder's token embeddings, kept in f16 when the checkpoint stores them so: exact, and
/// half the bytes the output projection streams at every decoder step.
enum Embeddings {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Embeddings {
    /// Token `t`'s row (`out.len()` wide) as f32.
    fn row(&self, t: usize, out: &mut [f32]) {
        let h = out.len();
        match self {
            Embeddings::F32(e) => out.copy_from_slice(&e[t * h..][..h]),
            Embeddings::F16(e) => out.iter_mut().zip(&e[t * h..][..h]).for_each(|(o, v)| *o = v.to_f32()),
        }
    }

    /// `logits = x · Eᵀ` for each row of `x` (`h` wide).
    fn project(&self, logits: &mut [f32], x: &[f32], h: usize, threads: usize) {
        match self {
            Embeddings::F32(e) => matmul::by_rows(logits, x, e, h, threads),
            Embeddings::F16(e) => matmul::by_rows(logits, x, e, h, threads),
        }
    }
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

/// One sequence's part of a decoder step.
pub type Step<'a> = layout::Step<'a, Audio, Sequence>;

/// Reads one layout's weights into the packed forms.
struct Reader<'a> {
    source: &'a dyn Source,
    layout: Layout,
}

impl Reader<'_> {
    /// PyTorch's `[out, in, 3]` convolution into rows over three frames, frame-major: input
    /// `k·in + c`.
    fn conv(&self, prefix: &str, channels: usize, hidden: usize) -> Result<Linear, ModelError> {
        let w = self.source.get(&self.layout.weight(prefix), &[hidden, channels, 3])?;
        let weight = Weight::from_output_rows(3 * channels, hidden, |o, row| {
            let mut raw = vec![0.0; channels * 3];
            w.read_rows(o * channels, &mut raw);
            for c in 0..channels {
                for k in 0..3 {
                    row[k * channels + c] = raw[c * 3 + k];
                }
            }
        });
        Ok(Linear { weight, bias: self.vector(&self.layout.bias(prefix), hidden)? })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.source.get(name, &[len])?.to_vec())
    }
}

impl Reads for Reader<'_> {
    type Norm = Norm;
    type Linear = Linear;

    fn norm(&self, prefix: &str, hidden: usize) -> Result<Norm, ModelError> {
        let (gamma, beta) = self.layout.gamma_beta(prefix);
        Ok(Norm { gamma: self.vector(&gamma, hidden)?, beta: self.vector(&beta, hidden)? })
    }

    fn linear(
        &self,
        parts: &[String],
        inputs: usize,
        outputs: usize,
        scaled: usize,
        scale: f32,
    ) -> Result<Linear, ModelError> {
        let each = outputs / parts.len().max(1);
        let weights = parts
            .iter()
            .map(|p| self.source.get(&self.layout.weight(p), &[each, inputs]))
            .collect::<Result<Vec<_>, _>>()?;
        let bias = self.layout.stacked_bias(self.source, parts, each, scaled, scale)?;
        let weight = Weight::from_output_rows(inputs, outputs, |o, row| {
            weights[o / each].read_row(o % each, row);
            if o < scaled {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        });
        Ok(Linear { weight, bias })
    }
}

impl Network {
    /// The network in `source`, laid out as `layout`, of shape `dims` (which the caller derived
    /// from the tensors or the config and which every tensor is checked against).
    pub fn load(source: &dyn Source, layout: Layout, dims: Dims) -> Result<Network, ModelError> {
        dims.check()?;
        let r = Reader { source, layout };
        let (h, l) = (dims.hidden, layout);
        // The layers, the convolutions and the embeddings convert side by side.
        let convs = || -> Result<_, ModelError> {
            let conv1 = r.conv(&l.top("encoder", "conv1"), dims.mels, h)?;
            let conv2 = r.conv(&l.top("encoder", "conv2"), h, h)?;
            let embeddings = source.get(&l.top("decoder", "embeddings"), &[dims.vocab, h])?;
            let embeddings = match embeddings.to_f16() {
                Some(halves) => Embeddings::F16(halves),
                None => Embeddings::F32(embeddings.to_vec()),
            };
            Ok((conv1, conv2, embeddings))
        };
        let encoder = || {
            (0..dims.encoder_layers)
                .into_par_iter()
                .map(|i| EncoderLayer::read(&r, l, &dims, i))
                .collect::<Result<Vec<_>, ModelError>>()
        };
        let decoder = || {
            (0..dims.decoder_layers)
                .into_par_iter()
                .map(|i| DecoderLayer::read(&r, l, &dims, i))
                .collect::<Result<Vec<_>, ModelError>>()
        };
        let (convs, (encoder_layers, decoder_layers)) = rayon::join(convs, || rayon::join(encoder, decoder));
        let (conv1, conv2, embeddings) = convs?;
        let (encoder_layers, decoder_layers) = (encoder_layers?, decoder_layers?);
        Ok(Network {
            dims,
            conv1,
            conv2,
            encoder_positions: source.get(&l.top("encoder", "positions"), &[dims.audio_ctx, h])?.to_vec(),
            encoder_layers,
            encoder_norm: r.norm(&l.top("encoder", "layer_norm"), h)?,
            embeddings,
            decoder_positions: source.get(&l.top("decoder", "positions"), &[dims.text_ctx, h])?.to_vec(),
            decoder_layers,
            decoder_norm: r.norm(&l.top("decoder", "layer_norm"), h)?,
            isa: Isa::chosen(),
        })
    }

    /// Encodes several windows together: every projection and feed-forward runs once over the
    /// rows of all of them (one larger matmul reads each weight once), attention per window.
    pub fn encode_batch(&self, mels: &[&[f32]]) -> Result<Vec<Audio>, ModelError> {
        let (d, frames, mels_n) = (self.dims, self.dims.frames(), self.dims.mels);
        if let Some(mel) = mels.iter().find(|m| m.len() != mels_n * frames) {
            return Err(ModelError::Inference(format!(
                "{} mel values; the encoder takes {mels_n} bins × {frames} frames",
                mel.len()
            )));
        }
        let (h, n, windows) = (d.hidden, d.audio_ctx, mels.len());
        if windows == 0 {
            return Ok(Vec::new());
        }
        let threads = rayon::current_num_threads();
        let mut x = Vec::with_capacity(windows * n * h);
        for mel in mels {
            // Frame-major, so each convolution input is three consecutive rows.
            let mut t_major = vec![0.0; frames * mels_n];
            for (b, bin) in mel.chunks_exact(frames).enumerate() {
                for (t, &v) in bin.iter().enumerate() {
                    t_major[t * mels_n + b] = v;
                }
            }
            let h1 = self.conv(&t_major, mels_n, frames, 1, &self.conv1, threads);
            let mut w = self.conv(&h1, h, frames, 2, &self.conv2, threads);
            for (row, pos) in w.chunks_exact_mut(h).zip(self.encoder_positions.chunks_exact(h)) {
                row.iter_mut().zip(pos).for_each(|(r, p)| *r += p);
            }
            x.extend_from_slice(&w);
        }
        let rows = windows * n;
        let mut normed = vec![0.0; rows * h];
        let mut qkv = vec![0.0; rows * 3 * h];
        let mut ctx = vec![0.0; rows * h];
        let mut up = vec![0.0; rows * d.ffn];
        let heads = d.encoder_heads;
        let hd = h / heads;
        for layer in &self.encoder_layers {
            self.norm_into(&x, &mut normed, &layer.attn_norm);
            self.project(&normed, &layer.qkv, &mut qkv, threads);
            let shared = SharedOut::new(&mut ctx);
            (0..windows * heads).into_par_iter().for_each(|item| {
                let (window, head) = (item / heads, item % heads);
                let view = |offset| View {
                    offset: window * n * 3 * h + offset + head * hd,
                    rows: n,
                    cols: hd,
                    row_stride: 3 * h,
                    col_stride: 1,
                };
                let o = View {
                    offset: window * n * h + head * hd,
                    rows: n,
                    cols: hd,
                    row_stride: h,
                    col_stride: 1,
                };
                // SAFETY: each (window, head) writes its own block of `ctx`, borrowed for this loop.
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
        let mut cross: Vec<Vec<Vec<f32>>> = (0..windows).map(|_| Vec::new()).collect();
        let mut kv = vec![0.0; rows * 2 * h];
        for layer in &self.decoder_layers {
            self.project(&x, &layer.cross_kv, &mut kv, threads);
            for (audio, part) in cross.iter_mut().zip(kv.chunks_exact(n * 2 * h)) {
                audio.push(part.to_vec());
            }
        }
        Ok(cross.into_iter().map(|cross_kv| Audio { cross_kv }).collect())
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

    /// One decoder step of several sequences together, each against its own window: the
    /// projections, feed-forwards and output run once over the rows of all of them, so the
    /// weights are read once per step however many sequences step. Returns, per step, the
    /// logits after its last token. Nothing changes unless every step is valid.
    pub fn decode_batch(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.dims;
        let h = d.hidden;
        for step in steps.iter() {
            d.check_step(step.seq.len, step.tokens)?;
        }
        // Each step's rows: `start..start + tokens`.
        let mut starts = Vec::with_capacity(steps.len());
        let mut rows = 0;
        for step in steps.iter() {
            starts.push(rows);
            rows += step.tokens.len();
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let threads = rayon::current_num_threads();
        let mut x = vec![0.0; rows * h];
        for (step, &start) in steps.iter().zip(&starts) {
            for (i, &t) in step.tokens.iter().enumerate() {
                let pos = &self.decoder_positions[(step.seq.len + i) * h..][..h];
                let row = &mut x[(start + i) * h..][..h];
                self.embeddings.row(t as usize, row);
                row.iter_mut().zip(pos).for_each(|(r, p)| *r += p);
            }
        }
        let mut normed = vec![0.0; rows * h];
        let mut qkv = vec![0.0; rows * 3 * h];
        let mut ctx = vec![0.0; rows * h];
        let mut up = vec![0.0; rows * d.ffn];
        for (l, layer) in self.decoder_layers.iter().enumerate() {
            // Self-attention over each cache extended by its tokens.
            self.norm_into(&x, &mut normed, &layer.self_norm);
            self.project(&normed, &layer.self_qkv, &mut qkv, threads);
            for (step, &start) in steps.iter_mut().zip(&starts) {
                let cache = &mut step.seq.self_kv[l];
                for row in qkv[start * 3 * h..].chunks_exact(3 * h).take(step.tokens.len()) {
                    cache.extend_from_slice(&row[h..]);
                }
            }
            self.attend(steps, &starts, &qkv, 3 * h, &mut ctx, |step| {
                let kv = &step.seq.self_kv[l];
                (kv.as_slice(), Mask::Causal { first: step.seq.len })
            });
            self.residual(&mut x, &ctx, &layer.self_out, threads);
            // Cross-attention over each step's window.
            self.norm_into(&x, &mut normed, &layer.cross_norm);
            let q = &mut qkv[..rows * h];
            self.project(&normed, &layer.cross_q, q, threads);
            self.attend(steps, &starts, &qkv[..rows * h], h, &mut ctx, |step| {
                (step.audio.cross_kv[l].as_slice(), Mask::None)
            });
            self.residual(&mut x, &ctx, &layer.cross_out, threads);
            self.ffn(&mut x, &mut normed, &mut up, &layer.ffn_norm, &layer.fc1, &layer.fc2, threads);
        }
        // The row after each step's last token.
        let mut last = Vec::with_capacity(steps.len() * h);
        for (step, &start) in steps.iter_mut().zip(&starts) {
            step.seq.len += step.tokens.len();
            last.extend_from_slice(&x[(start + step.tokens.len() - 1) * h..][..h]);
        }
        self.norm_in_place(&mut last, &self.decoder_norm);
        let mut logits = vec![0.0; steps.len() * d.vocab];
        self.embeddings.project(&mut logits, &last, h, threads);
        Ok(logits.chunks_exact(d.vocab).map(<[f32]>::to_vec).collect())
    }

    /// Every (step, head) of `q` (rows `q_stride` apart, Q in the first `hidden` columns of
    /// each) against the K/V rows `keys` gives for that step (`[m × 2·hidden]`), into `ctx`.
    fn attend<'s>(
        &self,
        steps: &'s [Step<'_>],
        starts: &[usize],
        q: &[f32],
        q_stride: usize,
        ctx: &mut [f32],
        keys: impl Fn(&'s Step<'_>) -> (&'s [f32], Mask) + Sync,
    ) {
        let h = self.dims.hidden;
        let heads = self.dims.decoder_heads;
        let hd = h / heads;
        let shared = SharedOut::new(ctx);
        (0..steps.len() * heads).into_par_iter().for_each(|item| {
            let (s, head) = (item / heads, item % heads);
            let (step, start) = (&steps[s], starts[s]);
            let (kv, mask) = keys(step);
            let (n, m) = (step.tokens.len(), kv.len() / (2 * h));
            let qv = View {
                offset: start * q_stride + head * hd,
                rows: n,
                cols: hd,
                row_stride: q_stride,
                col_stride: 1,
            };
            let kv_view = |offset| View {
                offset: offset + head * hd,
                rows: m,
                cols: hd,
                row_stride: 2 * h,
                col_stride: 1,
            };
            let o = View { offset: start * h + head * hd, rows: n, cols: hd, row_stride: h, col_stride: 1 };
            // SAFETY: each (step, head) writes its own block of `ctx`, borrowed for this loop.
            unsafe { attend_head((q, qv), (kv, kv_view(0), kv_view(h)), (&shared, o), mask, self.isa) };
        });
    }
}
