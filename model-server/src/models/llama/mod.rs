//! Llama-family decoder over GGUF weights, built for continuous batching.
//!
//! One [`Llama::forward`] runs any mix of sequences, each a run of new tokens (a prefill chunk or
//! a single decode token) against its own [`SequenceCache`]. Every projection and MLP matmul sees
//! all tokens of the step at once, so a decode step over eight streams reads the weights once;
//! only attention, which depends on each sequence's history, runs per sequence.
//!
//! The matmuls run on the GGUF blocks as stored ([`crate::kernels::quant`]: several activation rows per
//! pass over each weight block; Q, K and V, and gate and up, stacked into one matmul each).
//! Everything between them (norms, rotary embeddings, attention over each sequence's cache) is
//! plain loops over float rows: at one token per sequence a step is hundreds of tiny operations,
//! and a tensor library's per-operation cost would outweigh their arithmetic. The
//! layout follows llama.cpp's GGUF conventions: `blk.N.attn_q/k/v/output`, `ffn_gate/up/down`,
//! interleaved ("normal") rotary embeddings, output weights tied to the token embeddings when
//! `output.weight` is absent.
//!
//! That is the CPU path. On a GPU, [`candle`] runs the same network on candle's ops and
//! quantized matmuls, from the same weights ([`Weights`]); [`Decoder`] is whichever of the two a
//! model was loaded on.

pub mod candle;
pub mod hf;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

use crate::kernels::quant::{Linear, Projections, QWeight};
use crate::kernels::team::Team;
use crate::kernels::{self, Isa};
use crate::models::ModelError;
use crate::weights::gguf::{metadata_f32, metadata_string, metadata_u32, tensor};

/// Shape of a Llama-family model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, ModelError> {
        // Which Llama variant (the table in `models` chose this decoder for it) prefixes the keys.
        let arch = metadata_string(ct, "general.architecture")?;
        let u = |key: &str| metadata_u32(ct, &format!("{arch}.{key}")).map(|v| v as usize);
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = Self::head_dim_of(hidden, heads, kv_heads).map_err(ModelError::Unsupported)?;
        if let Ok(rope_dim) = u("rope.dimension_count")
            && rope_dim != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions)"
            )));
        }
        // Llama 3.1+ frequency factors come as the rope_freqs tensor (applied at load); other
        // context extensions change the rotary angles in ways this decoder does not model.
        let scaling =
            metadata_string(ct, &format!("{arch}.rope.scaling.type")).unwrap_or_else(|_| "none".into());
        let linear = metadata_f32(ct, &format!("{arch}.rope.scale_linear")).unwrap_or(1.0);
        if scaling != "none" || linear != 1.0 {
            return Err(ModelError::Unsupported(format!(
                "rotary scaling {scaling:?} (linear factor {linear}); only unscaled rotary embeddings and \
                 Llama 3 frequency factors are supported"
            )));
        }
        let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => u("vocab_size")?,
        };
        Ok(LlamaConfig {
            layers: u("block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            context_length: u("context_length")?,
            rms_eps: metadata_f32(ct, &format!("{arch}.attention.layer_norm_rms_epsilon"))? as f64,
            rope_base: metadata_f32(ct, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
            vocab_size,
            architecture: arch,
        })
    }
}

impl LlamaConfig {
    /// Bytes of keys and values (float32) one position of one sequence occupies.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.layers as u64) * 2 * (self.kv_heads as u64) * (self.head_dim as u64) * 4
    }

    /// The size of one attention head, where the shape is one the decoder runs: query heads
    /// dividing the hidden size, and key/value heads dividing the query heads.
    pub(crate) fn head_dim_of(hidden: usize, heads: usize, kv_heads: usize) -> Result<usize, String> {
        if heads == 0 || kv_heads == 0 || !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "attention shape: {heads} heads, {kv_heads} key/value heads, hidden size {hidden}"
            ));
        }
        Ok(hidden / heads)
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V.
    qkv: Projections,
    wo: Linear,
    ffn_norm: Vec<f32>,
    /// Gate and up.
    gate_up: Projections,
    down: Linear,
}

/// The token table: rows dequantized on lookup when its format is native here (no float copy
/// of a table that is often the largest tensor), else a dense copy.
enum Embeddings {
    Quantized(Arc<QWeight>),
    Dense(Vec<f32>),
}

impl Embeddings {
    fn lookup(&self, ids: &[u32], hidden: usize) -> Result<Vec<f32>, ModelError> {
        let mut x = vec![0f32; ids.len() * hidden];
        for (id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
            let i = *id as usize;
            let found = match self {
                Embeddings::Quantized(w) => w.dequantize_row(i, row),
                Embeddings::Dense(table) => {
                    table.get(i * hidden..(i + 1) * hidden).map(|r| row.copy_from_slice(r))
                }
            };
            found.ok_or_else(|| ModelError::Inference(format!("token id {id} is outside the vocabulary")))?;
        }
        Ok(x)
    }
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Embeddings,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// Rotary tables, [context_length][head_dim / 2].
    cos: Vec<f32>,
    sin: Vec<f32>,
    device: Device,
    isa: Isa,
    /// The model's own threads (as many as the process's inference threads): the step's
    /// caller and helpers that spin between its loops (see [`crate::kernels::team`]).
    team: Team,
}

/// One layer's keys and values for the positions seen so far, one row of
/// `kv_heads * head_dim` per position.
#[derive(Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The attention history of one sequence: keys and values per layer, and how many positions
/// they hold. Dropping it frees the memory.
pub struct SequenceCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// Floats per position in each of `k` and `v`.
    row: usize,
    /// On the GPU path: this sequence's keys and values on the device (`layers` is then
    /// empty).
    candle: Option<candle::CandleCache>,
}

impl SequenceCache {
    /// Forget keys and values a failed step appended past `len`, so the sequence can run again.
    pub fn rollback(&mut self) {
        let keep = self.len * self.row;
        for layer in &mut self.layers {
            layer.k.truncate(keep);
            layer.v.truncate(keep);
        }
    }

    /// Positions already in the cache (prompt and generated tokens fed so far).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a forward step.
pub struct Step<'a> {
    /// New tokens: a prefill chunk, or the last sampled token.
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    /// Whether to return next-token logits for this sequence (false for a prefill chunk that
    /// is not the prompt's last).
    pub logits: bool,
}

/// The decoder a model was loaded on: the packed CPU kernels, or candle's ops (the
/// GPU path). The scheduler sees one interface: caches, one forward over many sequences.
pub enum Decoder {
    Packed(Llama),
    Candle(candle::CandleLlama),
}

impl Decoder {
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Decoder::Packed(m) => m.config(),
            Decoder::Candle(m) => m.config(),
        }
    }

    pub fn new_cache(&self) -> SequenceCache {
        self.new_cache_for(0)
    }

    /// A cache for a sequence of up to `tokens` positions (see [`Llama::new_cache_for`]).
    pub fn new_cache_for(&self, tokens: usize) -> SequenceCache {
        match self {
            Decoder::Packed(m) => m.new_cache_for(tokens),
            Decoder::Candle(m) => {
                SequenceCache { layers: Vec::new(), len: 0, row: 0, candle: Some(m.new_cache()) }
            }
        }
    }

    pub fn kv_bytes_per_token(&self) -> u64 {
        self.config().kv_bytes_per_token()
    }

    /// One step over several sequences ([`Llama::forward`]). On failure no cache has changed
    /// past what [`SequenceCache::rollback`] restores.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, ModelError> {
        match self {
            Decoder::Packed(m) => m.forward(steps),
            Decoder::Candle(m) => m.forward(steps),
        }
    }
}

/// Attention work (query rows x keys x head size) below which a step's attention runs on the
/// calling thread: handing a few microseconds of work to the pool costs more than it saves.
const PARALLEL_ATTENTION: usize = 1 << 18;

/// A decoder's weights by role, as the file gives them (GGUF blocks, or a checkpoint's
/// matrices quantized by `hf`): what either path packs its own way.
pub(crate) struct Weights {
    pub embed: QTensor,
    /// The output head; None when tied to the token table.
    pub head: Option<QTensor>,
    pub norm: Vec<f32>,
    /// Llama 3.1+ frequency factors (llama.cpp's rope_freqs), one per rotary frequency.
    pub rope_factors: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights>,
}

pub(crate) struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: QTensor,
    pub k: QTensor,
    pub v: QTensor,
    pub o: QTensor,
    pub ffn_norm: Vec<f32>,
    pub gate: QTensor,
    pub up: QTensor,
    pub down: QTensor,
}

impl Weights {
    /// Asks `weights` for each tensor by its GGUF name; a missing one is refused by name.
    pub(crate) fn read(
        cfg: &LlamaConfig,
        weights: &mut WeightSource<'_>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let head = weights("output.weight")?;
        let rope_factors = match weights("rope_freqs.weight")? {
            None => None,
            Some(q) => {
                let f = q.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?;
                if f.len() != cfg.head_dim / 2 || f.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                    return Err(ModelError::Unsupported(format!(
                        "rope_freqs has {} factors for {} rotary frequencies, or one not positive",
                        f.len(),
                        cfg.head_dim / 2
                    )));
                }
                Some(f)
            }
        };
        let mut t = |name: &str| {
            weights(name)?.ok_or_else(|| ModelError::Unsupported(format!("the weights have no {name}")))
        };
        let norm_of = |q: QTensor, name: &str| -> Result<Vec<f32>, ModelError> {
            let v = q.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != cfg.hidden {
                return Err(ModelError::Unsupported(format!(
                    "tensor {name} has {} values for a hidden size of {}",
                    v.len(),
                    cfg.hidden
                )));
            }
            Ok(v)
        };
        let embed = t("token_embd.weight")?;
        let norm = norm_of(t("output_norm.weight")?, "output_norm.weight")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let name = |what: &str| format!("blk.{i}.{what}.weight");
            layers.push(LayerWeights {
                attn_norm: norm_of(t(&name("attn_norm"))?, &name("attn_norm"))?,
                q: t(&name("attn_q"))?,
                k: t(&name("attn_k"))?,
                v: t(&name("attn_v"))?,
                o: t(&name("attn_output"))?,
                ffn_norm: norm_of(t(&name("ffn_norm"))?, &name("ffn_norm"))?,
                gate: t(&name("ffn_gate"))?,
                up: t(&name("ffn_up"))?,
                down: t(&name("ffn_down"))?,
            });
        }
        Ok(Weights { embed, head, norm, rope_factors, layers })
    }
}

/// A tensor by its GGUF name (`blk.0.attn_q.weight`...), Q and K rows in the interleaved
/// rotary order GGUF uses; None when the model has no such tensor.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Option<QTensor>, ModelError> + 'a;

/// A decoder built from its weights: the packed CPU one or candle's (the GPU path).
pub trait FromWeights: Sized {
    /// What a Hugging Face checkpoint's matrices are stored as for this decoder.
    const CHECKPOINT_MATRICES: GgmlDType;
    fn from_weights(
        cfg: LlamaConfig,
        weights: &mut WeightSource<'_>,
        device: &Device,
    ) -> Result<Self, ModelError>;
}

/// The decoder of a GGUF file whose header is `ct` and which `reader` reads, its tensors read
/// onto `device`.
pub fn load_gguf<M: FromWeights, R: std::io::Read + std::io::Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> Result<M, ModelError> {
    let cfg = LlamaConfig::from_gguf(ct)?;
    let mut weights = |name: &str| -> Result<Option<QTensor>, ModelError> {
        if ct.tensor_infos.contains_key(name) { tensor(ct, reader, device, name).map(Some) } else { Ok(None) }
    };
    M::from_weights(cfg, &mut weights, device)
}

impl FromWeights for Llama {
    /// 8-bit blocks: the quantized matmul is the CPU path's fastest kernel.
    const CHECKPOINT_MATRICES: GgmlDType = GgmlDType::Q8_0;

    fn from_weights(
        cfg: LlamaConfig,
        weights: &mut WeightSource<'_>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let w = Weights::read(&cfg, weights, device)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in w.layers {
            layers.push(Layer {
                attn_norm: l.attn_norm,
                qkv: Projections::new(vec![l.q, l.k, l.v], device)?,
                wo: Linear::new(l.o, device)?,
                ffn_norm: l.ffn_norm,
                gate_up: Projections::new(vec![l.gate, l.up], device)?,
                down: Linear::new(l.down, device)?,
            });
        }
        let (embed_q, head, norm) = (w.embed, w.head, w.norm);
        // Tied embeddings (SmolLM2 and most small models) reuse the token table as the head.
        let (embed, output) =
            match QWeight::from_qtensor(&embed_q, device)?.filter(|w| w.cols() == cfg.hidden) {
                Some(w) => {
                    let w = Arc::new(w);
                    let output = match head {
                        Some(h) => Linear::new(h, device)?,
                        None => Linear::Native(w.clone()),
                    };
                    (Embeddings::Quantized(w), output)
                }
                None => {
                    let table = embed_q.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?;
                    let output = Linear::new(head.unwrap_or(embed_q), device)?;
                    (Embeddings::Dense(table), output)
                }
            };
        let (cos, sin) = rotary_tables(&cfg, w.rope_factors.as_deref());
        // As many threads as the process's pool (RAYON_NUM_THREADS, set from --threads).
        let team = Team::new(rayon::current_num_threads(), "kiln-llama")
            .map_err(|e| ModelError::Inference(format!("inference threads: {e}")))?;
        Ok(Llama {
            cfg,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
            isa: Isa::chosen(),
            team,
        })
    }
}

impl Llama {
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// A cache with room for `tokens` positions allocated up front, so it never reallocates
    /// (a growing Vec may briefly hold twice its contents) and its memory is what the scheduler
    /// reserved for it. Untouched pages cost no resident memory until written.
    pub fn new_cache_for(&self, tokens: usize) -> SequenceCache {
        let row = self.cfg.kv_heads * self.cfg.head_dim;
        let layer = || LayerCache {
            k: Vec::with_capacity(tokens.saturating_mul(row)),
            v: Vec::with_capacity(tokens.saturating_mul(row)),
        };
        SequenceCache { layers: (0..self.cfg.layers).map(|_| layer()).collect(), len: 0, row, candle: None }
    }

    /// Run one step over several sequences. Returns next-token logits, `[k, vocab]`, one row per
    /// step with `logits: true`, in order; None when no step asked for logits.
    ///
    /// The caller runs the step on the model's team, taking part in its loops; the helpers spin
    /// between loops rather than sleep, so none waits for a wake-up.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, ModelError> {
        self.team.install(|| self.forward_here(steps))
    }

    fn forward_here(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>, ModelError> {
        let cfg = &self.cfg;
        let all: Vec<u32> = steps.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if all.is_empty() {
            return Ok(None);
        }
        for s in steps.iter() {
            if s.cache.len + s.tokens.len() > cfg.context_length {
                return Err(ModelError::Inference(format!(
                    "sequence of {} tokens exceeds the context window of {}",
                    s.cache.len + s.tokens.len(),
                    cfg.context_length
                )));
            }
            if s.cache.layers.len() != cfg.layers {
                return Err(ModelError::Inference("sequence cache is not from this model".into()));
            }
        }
        let t = all.len();
        let positions: Vec<usize> =
            steps.iter().flat_map(|s| s.cache.len..s.cache.len + s.tokens.len()).collect();
        let mut x = self.embed.lookup(&all, cfg.hidden)?; // [t][hidden]
        let mut h = vec![0f32; x.len()];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32, &mut h);
            let [mut q, mut k, v] = <[Vec<f32>; 3]>::try_from(layer.qkv.forward(&h, t)?)
                .map_err(|_| ModelError::Inference("Q, K and V projections".into()))?;
            self.rope(&mut q, &positions);
            self.rope(&mut k, &positions);
            let kv = cfg.kv_heads * cfg.head_dim;
            let mut offset = 0;
            for step in steps.iter_mut() {
                let n = step.tokens.len();
                let cache = &mut step.cache.layers[li];
                cache.k.extend_from_slice(&k[offset * kv..(offset + n) * kv]);
                cache.v.extend_from_slice(&v[offset * kv..(offset + n) * kv]);
                offset += n;
            }
            let y = self.attention(steps, li, &q);
            add(&mut x, &layer.wo.forward(&y, t)?);
            rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32, &mut h);
            let [mut gate, up] = <[Vec<f32>; 2]>::try_from(layer.gate_up.forward(&h, t)?)
                .map_err(|_| ModelError::Inference("gate and up projections".into()))?;
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            add(&mut x, &layer.down.forward(&gate, t)?);
        }
        let mut last = Vec::new();
        let mut offset = 0;
        for step in steps.iter_mut() {
            let n = step.tokens.len();
            step.cache.len += n;
            offset += n;
            if step.logits && n > 0 {
                last.extend_from_slice(&x[(offset - 1) * cfg.hidden..offset * cfg.hidden]);
            }
        }
        if last.is_empty() {
            return Ok(None);
        }
        let rows = last.len() / cfg.hidden;
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, cfg.rms_eps as f32, &mut normed);
        let logits = self.output.forward(&normed, rows)?;
        let vocab = logits.len() / rows;
        Ok(Some(Tensor::from_vec(logits, (rows, vocab), &self.device)?))
    }

    /// Interleaved rotary embedding of every head of every row, in place.
    fn rope(&self, x: &mut [f32], positions: &[usize]) {
        let half = self.cfg.head_dim / 2;
        let row_len = x.len() / positions.len().max(1);
        for (row, &pos) in x.chunks_exact_mut(row_len).zip(positions) {
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in row.chunks_exact_mut(self.cfg.head_dim) {
                for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }

    /// Causal attention of each step's query rows over its sequence's cached keys and values
    /// (this step's already appended): `[t][heads * head_dim]`.
    fn attention(&self, steps: &[Step<'_>], layer: usize, q: &[f32]) -> Vec<f32> {
        let cfg = &self.cfg;
        let (hd, qd) = (cfg.head_dim, cfg.heads * cfg.head_dim);
        // (step, head, first query row): one job each, writing its own head's columns.
        let mut jobs = Vec::with_capacity(steps.len() * cfg.heads);
        let mut work = 0;
        let mut row = 0;
        for (si, s) in steps.iter().enumerate() {
            let n = s.tokens.len();
            for head in 0..cfg.heads {
                jobs.push((si, head, row));
            }
            work += n * (s.cache.len + n) * qd;
            row += n;
        }
        let job = |&(si, head, row): &(usize, usize, usize)| -> Vec<f32> {
            let s = &steps[si];
            let cache = &s.cache.layers[layer];
            let n = s.tokens.len();
            let q = &q[row * qd..(row + n) * qd];
            attend_head(HeadJob { cfg, cache, pos: s.cache.len, head, q }, self.isa)
        };
        let outs: Vec<Vec<f32>> = if work < PARALLEL_ATTENTION {
            jobs.iter().map(job).collect()
        } else {
            // Each task fills its own slot (uncontended locks).
            let slots: Vec<std::sync::Mutex<Vec<f32>>> = jobs.iter().map(|_| Default::default()).collect();
            kernels::team::for_each(jobs.len(), &|i| {
                let out = job(&jobs[i]);
                *slots[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = out;
            });
            slots
                .into_iter()
                .map(|s| s.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
                .collect()
        };
        let mut y = vec![0f32; row * qd];
        for (&(_, head, first), out) in jobs.iter().zip(&outs) {
            for (i, o) in out.chunks_exact(hd).enumerate() {
                let at = (first + i) * qd + head * hd;
                y[at..at + hd].copy_from_slice(o);
            }
        }
        y
    }
}

/// One query head over one sequence: `n` query rows (of all heads, `heads * head_dim` each) at
/// positions `pos..pos + n`, each seeing keys `0..=its position`.
#[derive(Clone, Copy)]
struct HeadJob<'a> {
    cfg: &'a LlamaConfig,
    cache: &'a LayerCache,
    pos: usize,
    head: usize,
    q: &'a [f32],
}

/// [`HeadJob`]'s output, `[n][head_dim]`, with the loops compiled for the ISA the CPU has.
fn attend_head(job: HeadJob<'_>, isa: Isa) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512F.
        return unsafe { attend_head_avx512(job) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `Isa::Avx2Fma` and above are only chosen when the CPU has AVX2 and FMA.
        return unsafe { attend_head_avx2(job) };
    }
    attend_head_with(job, isa)
}

/// The same loops compiled for AVX2, where the compiler vectorizes them 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(job: HeadJob<'_>) -> Vec<f32> {
    attend_head_with(job, Isa::Avx2Fma)
}

/// The same loops for AVX-512, 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn attend_head_avx512(job: HeadJob<'_>) -> Vec<f32> {
    attend_head_with(job, Isa::Avx512)
}

#[inline(always)]
fn attend_head_with(job: HeadJob<'_>, isa: Isa) -> Vec<f32> {
    let HeadJob { cfg, cache, pos, head, q } = job;
    let hd = cfg.head_dim;
    let kv = cfg.kv_heads * hd;
    let group = head / (cfg.heads / cfg.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let n = q.len() / (cfg.heads * hd);
    let mut out = vec![0f32; n * hd];
    let mut scores = Vec::with_capacity(pos + n);
    for (i, o) in out.chunks_exact_mut(hd).enumerate() {
        let qi = &q[i * cfg.heads * hd + head * hd..][..hd];
        let seen = pos + i + 1;
        scores.clear();
        // A plain loop: a closure here would not be compiled for AVX2 with its caller.
        for k in cache.k.chunks_exact(kv).take(seen) {
            scores.push(dot(qi, &k[group * hd..][..hd]) * scale);
        }
        kernels::softmax(&mut scores, seen, isa);
        for (p, v) in scores.iter().zip(cache.v.chunks_exact(kv)) {
            for (o, v) in o.iter_mut().zip(&v[group * hd..][..hd]) {
                *o += p * v;
            }
        }
    }
    out
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums: lets the compiler keep them in vector lanes.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail: f32 =
        a.chunks_exact(8).remainder().iter().zip(b.chunks_exact(8).remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `out = x / rms(x) * w`, row by row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * w;
        }
    }
}

/// cos and sin of every position's angle for every rotary frequency, `[context][head_dim / 2]`;
/// frequency `i` is `base^(-2i / head_dim) / factors[i]`.
pub(crate) fn rotary_tables(cfg: &LlamaConfig, factors: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            let f = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            1.0 / cfg.rope_base.powf((2 * i) as f32 / cfg.head_dim as f32) / f
        })
        .collect();
    let mut cos = Vec::with_capacity(cfg.context_length * half);
    let mut sin = Vec::with_capacity(cfg.context_length * half);
    for p in 0..cfg.context_length {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv_heads: usize, head_dim: usize) -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            layers: 1,
            hidden: heads * head_dim,
            heads,
            kv_heads,
            head_dim,
            context_length: 4,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            vocab_size: 8,
        }
    }

    #[test]
    fn rotary_factors_divide_each_frequency() {
        let cfg = config(1, 1, 8);
        let factors = [1.0, 2.0, 4.0, 8.0];
        let (cos, sin) = rotary_tables(&cfg, Some(&factors));
        let (plain, _) = rotary_tables(&cfg, None);
        for (i, f) in factors.iter().enumerate() {
            let angle = 3.0 * 10_000f32.powf(-((2 * i) as f32) / 8.0) / f;
            assert!((cos[3 * 4 + i] - angle.cos()).abs() < 1e-6, "cos, frequency {i}");
            assert!((sin[3 * 4 + i] - angle.sin()).abs() < 1e-6, "sin, frequency {i}");
        }
        assert_eq!(cos[3 * 4], plain[3 * 4], "a factor of 1 changes nothing");
        assert_ne!(cos[3 * 4 + 3], plain[3 * 4 + 3]);
    }

    #[test]
    fn attention_is_causal_and_grouped() {
        // Two query heads share one key/value head; a two-token chunk from position 0.
        let cfg = config(2, 1, 2);
        let cache = LayerCache { k: vec![1.0, 0.0, 0.0, 1.0], v: vec![10.0, 20.0, 30.0, 40.0] };
        let q = [5.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0]; // [token][head][dim]
        for head in 0..2 {
            let out = attend_head(HeadJob { cfg: &cfg, cache: &cache, pos: 0, head, q: &q }, Isa::Scalar);
            // The first token sees only the first key: its value exactly.
            assert_eq!(out[..2], [10.0, 20.0], "head {head}");
            // The second sees both, weighted towards the key its query matches.
            let towards_second = if head == 1 { out[2] > 20.0 } else { out[2] < 20.0 };
            assert!(towards_second && out[2] > 10.0 && out[2] < 30.0, "head {head}: {:?}", &out[2..]);
        }
    }
}
