//! Fast CPU encoder for the BERT architecture and XLM-RoBERTa (post-LayerNorm, absolute
//! positions, GELU (erf), token type 0).
//!
//! Where the reference [`CandleBert`](super::candle::CandleBert) pads a batch to its longest
//! input, this one packs: the real tokens of every input sit in one `[tokens, hidden]` matrix,
//! positions restart at each input, and attention runs per (input, head) on strided views of
//! the fused QKV matrix. So no work is spent on padding and no sorting is needed. Measured on
//! MiniLM (docs/benchmarks.md):
//! - weights are converted once at load: Q, K, V fused into one matrix with 1/√d folded into Q,
//!   all stored transposed (`[in, out]`), the layout gemm reads without packing;
//! - matmuls write into their output with the bias or the residual already in it, and the
//!   element-wise work after them is one fused pass (bias + GELU, bias + LayerNorm);
//! - row kernels use AVX2+FMA when the CPU has it ([`crate::kernels`]);
//! - buffers are kept between calls, so steady state allocates nothing large.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

use super::BertConfig;
use crate::kernels::attention::{Mask, attend_head};
use crate::kernels::gemm::{self as matmul, Linear, SharedOut, View, Weight};
use crate::kernels::team::Team;
use crate::kernels::{self, Isa, Norm};
use crate::models::{Encoder, ModelError, Pooling};
use crate::weights::tensors::{Scope, Tensors};

/// Tokens per feed-forward block: bounds the `[block, intermediate]` buffer (6 MB for MiniLM,
/// which stays in L3 between the two matmuls) whatever the batch, while keeping gemm's per-call
/// weight packing rare.
const FFN_BLOCK: usize = 1024;
/// Inputs up to this many tokens get attention computed directly rather than as two GEMMs
/// (tuned on MiniLM, head size 32: the GEMM calls' setup dominates for short inputs).
const SMALL_ATTENTION_TOKENS: usize = 64;

/// How to run; `Default` reads the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackedOptions {
    /// Worker threads. Default: `RAYON_NUM_THREADS`, else the available cores.
    pub threads: Option<usize>,
    /// Row-kernel implementation. Default: [`Isa::chosen`] (the best the CPU supports, lowered
    /// by `KILN_ENGINE_ISA`).
    pub isa: Option<Isa>,
}

impl PackedOptions {
    fn threads(&self) -> usize {
        let env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.threads.or(env).filter(|&n| n > 0).unwrap_or(cores)
    }

    fn isa(&self) -> Isa {
        self.isa.unwrap_or_else(Isa::chosen)
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    /// Rows of the position table.
    position_rows: usize,
    /// Position of an input's first token in that table: 0 for BERT; RoBERTa models start
    /// after the padding index (`pad_token_id + 1`).
    first_position: usize,
    /// Positions an input may use: the table's rows past `first_position`.
    max_positions: usize,
    token_types: usize,
    eps: f32,
}

struct Layer {
    /// `[hidden, 3·hidden]`: per head, its columns of Q·(1/√d) | K | V side by side, so a
    /// thread's contiguous share of the matmul's columns is whole heads, the heads its share of
    /// attention then reads (from its own cache, not the other core's).
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    ffn_up: Linear,
    ffn_down: Linear,
    ffn_norm: Norm,
}

struct Embeddings {
    word: Vec<f32>,
    position: Vec<f32>,
    /// Row 0 of the token-type table: every input is a single segment.
    token_type: Vec<f32>,
    norm: Norm,
}

/// Activations of one batch; grown to the largest batch seen and then reused.
#[derive(Default)]
struct Workspace {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    ffn: Vec<f32>,
}

impl Workspace {
    fn reserve(&mut self, tokens: usize, d: &Dims) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.x, tokens * d.hidden);
        grow(&mut self.qkv, tokens * 3 * d.hidden);
        grow(&mut self.ctx, tokens * d.hidden);
        grow(&mut self.ffn, tokens.min(FFN_BLOCK) * d.intermediate);
    }
}

/// Where one input's tokens sit in the packed matrix.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

pub struct PackedBert {
    dims: Dims,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    isa: Isa,
    threads: usize,
    pool: rayon::ThreadPool,
    /// Runs a short batch's forward pass: its ~50 parallel loops are tens of microseconds each,
    /// and between them rayon's idle workers would sleep and need waking (see
    /// [`crate::kernels::team`]). Longer batches run on `pool`, where gemm splits its own work.
    team: Team,
    workspaces: Mutex<Vec<Workspace>>,
}

impl PackedBert {
    pub fn load(dir: &Path, config: &BertConfig) -> Result<Self, ModelError> {
        Self::load_with(dir, config, PackedOptions::default())
    }

    pub fn load_with(dir: &Path, config: &BertConfig, options: PackedOptions) -> Result<Self, ModelError> {
        let dims = check_config(dir, config)?;
        let isa = options.isa();
        if !isa.is_supported() {
            return Err(ModelError::Inference(format!("{isa:?} kernels are not supported by this CPU")));
        }
        let threads = options.threads();
        let tensors = Tensors::open(dir)?;
        let root = model_root(&tensors, config).ok_or_else(|| ModelError::Files {
            path: dir.display().to_string(),
            message: "no embeddings.word_embeddings.weight tensor (with or without a model prefix)"
                .to_string(),
        })?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-encoder-{i}"))
            .build()
            .map_err(|e| ModelError::Inference(format!("thread pool: {e}")))?;
        let team = Team::new(threads, "kiln-encoder-team")
            .map_err(|e| ModelError::Inference(format!("thread team: {e}")))?;
        let (embeddings, layers) = pool.install(|| load_weights(&root, &dims, config.num_hidden_layers))?;
        Ok(PackedBert {
            dims,
            embeddings,
            layers,
            isa,
            threads,
            pool,
            team,
            workspaces: Mutex::new(Vec::new()),
        })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn check_inputs(&self, inputs: &[&[u32]]) -> Result<(), ModelError> {
        for input in inputs {
            if input.len() > self.dims.max_positions {
                return Err(ModelError::Inference(format!(
                    "input of {} tokens is longer than the model's {} positions",
                    input.len(),
                    self.dims.max_positions
                )));
            }
            if let Some(id) = input.iter().find(|&&id| id as usize >= self.dims.vocab) {
                return Err(ModelError::Inference(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.dims.vocab
                )));
            }
        }
        Ok(())
    }

    /// Runs the encoder; on return `ws.x` holds the last hidden states of all tokens.
    fn forward(&self, ws: &mut Workspace, inputs: &[&[u32]], spans: &[Span], tokens: usize) {
        let h = self.dims.hidden;
        let x = &mut ws.x[..tokens * h];
        self.embed(x, inputs, spans);
        for layer in &self.layers {
            self.attention_block(layer, x, &mut ws.qkv[..tokens * 3 * h], &mut ws.ctx[..tokens * h], spans);
            self.ffn_block(layer, x, &mut ws.ffn);
        }
    }

    /// `x = LayerNorm(word + position + token type)` per token.
    fn embed(&self, x: &mut [f32], inputs: &[&[u32]], spans: &[Span]) {
        let (h, e) = (self.dims.hidden, &self.embeddings);
        for (input, span) in inputs.iter().zip(spans) {
            for (pos, &id) in input.iter().enumerate() {
                let row = &mut x[(span.start + pos) * h..][..h];
                let word = &e.word[id as usize * h..][..h];
                let position = &e.position[(self.dims.first_position + pos) * h..][..h];
                for ((r, w), p) in row.iter_mut().zip(word).zip(position) {
                    *r = w + p;
                }
            }
        }
        // The token-type row goes in as the LayerNorm's "bias".
        kernels::par_rows(x, h, |rows| {
            kernels::bias_layer_norm(
                rows,
                &e.token_type,
                &e.norm.gamma,
                &e.norm.beta,
                self.dims.eps,
                self.isa,
            )
        });
    }

    /// Self-attention and its output projection: `x = LayerNorm(x + attn(x)·Wo + bo)`.
    fn attention_block(
        &self,
        layer: &Layer,
        x: &mut [f32],
        qkv: &mut [f32],
        ctx: &mut [f32],
        spans: &[Span],
    ) {
        let h = self.dims.hidden;
        fill_rows(qkv, &layer.qkv.bias);
        matmul::linear(qkv, x, &layer.qkv.weight, true, self.threads);
        self.attention(qkv, ctx, spans);
        // Accumulating onto x adds the residual for free; bias and LayerNorm follow in one pass.
        matmul::linear(x, ctx, &layer.attn_out.weight, true, self.threads);
        kernels::par_rows(x, h, |rows| {
            let n = &layer.attn_norm;
            kernels::bias_layer_norm(rows, &layer.attn_out.bias, &n.gamma, &n.beta, self.dims.eps, self.isa)
        });
    }

    /// `ctx = softmax(Q·Kᵀ)·V` for every (input, head), in parallel over those pairs.
    fn attention(&self, qkv: &[f32], ctx: &mut [f32], spans: &[Span]) {
        let heads = self.dims.heads;
        let out = SharedOut::new(ctx);
        // In runs, as the QKV matmul splits its columns: a thread attends over the heads it
        // computed.
        kernels::team::for_runs(spans.len() * heads, self.threads, &|item| {
            // SAFETY: item ↦ (input, head) is one-to-one and each item runs once, so each writes
            // its own block of `ctx`, which stays mutably borrowed (and alive) for the whole loop.
            unsafe { self.attend(qkv, &out, spans[item / heads], item % heads) }
        });
    }

    /// One (input, head): two strided GEMMs straight on the packed QKV matrix, no copies.
    ///
    /// # Safety
    /// No other thread may access the rows of `span` × the columns of `head` in `out` meanwhile.
    unsafe fn attend(&self, qkv: &[f32], out: &SharedOut, span: Span, head: usize) {
        let (h, d, n) = (self.dims.hidden, self.dims.head_dim, span.len);
        if n == 0 {
            return;
        }
        let stride = 3 * h;
        let rows = |offset| View { offset, rows: n, cols: d, row_stride: stride, col_stride: 1 };
        let base = span.start * stride + head * 3 * d;
        let (q, k, v) = (rows(base), rows(base + d), rows(base + 2 * d));
        let ctx = View { offset: span.start * h + head * d, rows: n, cols: d, row_stride: h, col_stride: 1 };
        if n <= SMALL_ATTENTION_TOKENS {
            let view =
                kernels::HeadView { q: q.offset, k: k.offset, v: v.offset, stride, out_stride: h, n, d };
            // SAFETY: the caller gives this task exclusive use of the `ctx` block, which starts
            // at `ctx.offset` and spans n rows of d floats, h apart.
            unsafe { kernels::small_attention(qkv, view, out.at(ctx.offset), self.isa) };
            return;
        }
        // SAFETY: the caller gives this task exclusive use of the `ctx` block.
        unsafe { attend_head((qkv, q), (qkv, k, v), (out, ctx), Mask::None, self.isa) };
    }

    /// Feed-forward: `x = LayerNorm(x + GELU(x·W1 + b1)·W2 + b2)`, in blocks of tokens.
    fn ffn_block(&self, layer: &Layer, x: &mut [f32], ffn: &mut [f32]) {
        let (h, i) = (self.dims.hidden, self.dims.intermediate);
        for xb in x.chunks_mut(FFN_BLOCK * h) {
            let tokens = xb.len() / h;
            let up = &mut ffn[..tokens * i];
            matmul::linear(up, xb, &layer.ffn_up.weight, false, self.threads);
            kernels::par_rows(up, i, |rows| kernels::bias_gelu(rows, &layer.ffn_up.bias, self.isa));
            matmul::linear(xb, up, &layer.ffn_down.weight, true, self.threads);
            kernels::par_rows(xb, h, |rows| {
                let n = &layer.ffn_norm;
                kernels::bias_layer_norm(
                    rows,
                    &layer.ffn_down.bias,
                    &n.gamma,
                    &n.beta,
                    self.dims.eps,
                    self.isa,
                )
            });
        }
    }

    fn take_workspace(&self) -> Workspace {
        self.workspaces.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default()
    }

    fn return_workspace(&self, ws: Workspace) {
        self.workspaces.lock().unwrap_or_else(PoisonError::into_inner).push(ws);
    }
}

impl Encoder for PackedBert {
    fn encode(&self, inputs: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, ModelError> {
        self.check_inputs(inputs)?;
        let mut spans = Vec::with_capacity(inputs.len());
        let mut tokens = 0;
        for input in inputs {
            spans.push(Span { start: tokens, len: input.len() });
            tokens += input.len();
        }
        let mut ws = self.take_workspace();
        ws.reserve(tokens, &self.dims);
        if tokens > matmul::FEW_TOKENS {
            self.pool.install(|| self.forward(&mut ws, inputs, &spans, tokens));
        } else if tokens > 0 {
            self.team.install(|| self.forward(&mut ws, inputs, &spans, tokens));
        }
        let out = pool_spans(&ws.x, &spans, self.dims.hidden, pooling);
        self.return_workspace(ws);
        Ok(out)
    }

    fn hidden_size(&self) -> usize {
        self.dims.hidden
    }

    fn max_positions(&self) -> usize {
        self.dims.max_positions
    }
}

/// One vector per input: the mean of its tokens or its first ([CLS]) token; zeros when empty.
fn pool_spans(x: &[f32], spans: &[Span], h: usize, pooling: Pooling) -> Vec<Vec<f32>> {
    spans
        .iter()
        .map(|s| {
            let mut v = vec![0.0; h];
            if s.len == 0 {
                return v;
            }
            let rows = &x[s.start * h..(s.start + s.len) * h];
            match pooling {
                Pooling::Cls => v.copy_from_slice(&rows[..h]),
                Pooling::Mean => {
                    for row in rows.chunks_exact(h) {
                        v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                    }
                    let inv = 1.0 / s.len as f32;
                    v.iter_mut().for_each(|a| *a *= inv);
                }
            }
            v
        })
        .collect()
}

/// Every row of `dst` set to `row` (the bias a matmul then accumulates onto).
fn fill_rows(dst: &mut [f32], row: &[f32]) {
    for r in dst.chunks_exact_mut(row.len()) {
        r.copy_from_slice(row);
    }
}

fn check_config(dir: &Path, c: &BertConfig) -> Result<Dims, ModelError> {
    let unsupported = |what: String| ModelError::Files {
        path: dir.join("config.json").display().to_string(),
        message: format!("unsupported by the packed encoder: {what}"),
    };
    if c.hidden_act != "gelu" {
        return Err(unsupported(format!("hidden_act {:?} (only gelu)", c.hidden_act)));
    }
    if c.position_embedding_type.as_deref().is_some_and(|t| t != "absolute") {
        return Err(unsupported(format!(
            "position_embedding_type {:?} (only absolute)",
            c.position_embedding_type.as_deref().unwrap_or_default()
        )));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(unsupported(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        )));
    }
    if c.type_vocab_size == 0 {
        return Err(unsupported("type_vocab_size 0 (token type 0 is always used)".to_string()));
    }
    let first_position = c.first_position();
    if first_position >= c.max_position_embeddings {
        return Err(unsupported(format!(
            "max_position_embeddings {} leaves no position after the padding index {}",
            c.max_position_embeddings,
            first_position.saturating_sub(1)
        )));
    }
    Ok(Dims {
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        head_dim: c.hidden_size / c.num_attention_heads,
        intermediate: c.intermediate_size,
        vocab: c.vocab_size,
        position_rows: c.max_position_embeddings,
        first_position,
        max_positions: c.max_position_embeddings - first_position,
        token_types: c.type_vocab_size,
        eps: c.layer_norm_eps as f32,
    })
}

/// The weights sit at the root (sentence-transformers exports), or under the prefix a task
/// model saves them with (`bert.`, `roberta.`, or the model type's name).
fn model_root<'a>(tensors: &'a Tensors, config: &BertConfig) -> Option<Scope<'a>> {
    let probe = "embeddings.word_embeddings.weight";
    let prefixes = ["", "bert", "roberta"].into_iter().map(String::from).chain(config.model_type.clone());
    prefixes.map(|p| tensors.scope(&p)).find(|s| s.contains(probe))
}

/// A linear layer from `weight` (`[out, in]`) and `bias`.
fn load_linear(s: &Scope, (out, inp): (usize, usize)) -> Result<Linear, ModelError> {
    let w = s.get("weight", &[out, inp])?;
    Ok(Linear {
        weight: Weight::from_output_rows(inp, out, |o, row| w.read_row(o, row)),
        bias: s.get("bias", &[out])?.to_vec(),
    })
}

fn load_norm(s: &Scope, h: usize) -> Result<Norm, ModelError> {
    Ok(Norm { gamma: s.get("weight", &[h])?.to_vec(), beta: s.get("bias", &[h])?.to_vec() })
}

/// Q, K and V as one linear layer (`[hidden, 3·hidden]`), with attention's 1/√d folded into Q.
fn load_qkv(s: &Scope, d: &Dims) -> Result<Linear, ModelError> {
    let h = d.hidden;
    let scale = (1.0 / (d.head_dim as f64).sqrt()) as f32;
    let parts = ["query", "key", "value"].map(|p| s.scope(p));
    let mut qkv = Vec::with_capacity(3);
    for part in &parts {
        qkv.push(part.get("weight", &[h, h])?);
    }
    let hd = d.head_dim;
    // Output column o is head o / 3d's part (o % 3d) / d (Q, K, V), row o % d of it.
    let source = |o: usize| ((o % (3 * hd)) / hd, (o / (3 * hd)) * hd + o % hd);
    let weight = Weight::from_output_rows(h, 3 * h, |o, row| {
        let (part, r) = source(o);
        qkv[part].read_row(r, row);
        if part == 0 {
            row.iter_mut().for_each(|w| *w *= scale);
        }
    });
    let biases =
        parts.iter().map(|p| Ok(p.get("bias", &[h])?.to_vec())).collect::<Result<Vec<_>, ModelError>>()?;
    let bias = (0..3 * h)
        .map(|o| {
            let (part, r) = source(o);
            if part == 0 { biases[part][r] * scale } else { biases[part][r] }
        })
        .collect();
    Ok(Linear { weight, bias })
}

fn load_layer(s: &Scope, d: &Dims) -> Result<Layer, ModelError> {
    let (h, i) = (d.hidden, d.intermediate);
    Ok(Layer {
        qkv: load_qkv(&s.scope("attention.self"), d)?,
        attn_out: load_linear(&s.scope("attention.output.dense"), (h, h))?,
        attn_norm: load_norm(&s.scope("attention.output.LayerNorm"), h)?,
        ffn_up: load_linear(&s.scope("intermediate.dense"), (i, h))?,
        ffn_down: load_linear(&s.scope("output.dense"), (h, i))?,
        ffn_norm: load_norm(&s.scope("output.LayerNorm"), h)?,
    })
}

/// Layers load in parallel on the calling thread pool; each weight is converted straight into
/// its final layout (see [`Tensors`]).
fn load_weights(root: &Scope, d: &Dims, layers: usize) -> Result<(Embeddings, Vec<Layer>), ModelError> {
    let load_embeddings = || -> Result<Embeddings, ModelError> {
        let e = root.scope("embeddings");
        let h = d.hidden;
        let mut token_type = vec![0.0; h];
        e.get("token_type_embeddings.weight", &[d.token_types, h])?.read_row(0, &mut token_type);
        Ok(Embeddings {
            word: e.get("word_embeddings.weight", &[d.vocab, h])?.to_vec(),
            position: e.get("position_embeddings.weight", &[d.position_rows, h])?.to_vec(),
            token_type,
            norm: load_norm(&e.scope("LayerNorm"), h)?,
        })
    };
    let load_layers = || {
        (0..layers)
            .into_par_iter()
            .map(|l| load_layer(&root.scope(&format!("encoder.layer.{l}")), d))
            .collect::<Result<Vec<_>, _>>()
    };
    let (embeddings, layers) = rayon::join(load_embeddings, load_layers);
    let (embeddings, layers) = (embeddings?, layers?);
    Ok((embeddings, layers))
}
