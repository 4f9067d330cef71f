//! Quantized matmuls over GGUF blocks as stored, for the decoder's projections.
//!
//! candle's quantized matmul takes one activation row at a time, so a decode step over eight
//! sequences costs nearly eight single steps, and it has only scalar code for Q4_1. Here the
//! activations of a whole step are quantized to 8 bits once (32 values per block, like
//! llama.cpp's Q8_1), and each weight block is unpacked once and multiplied with up to
//! [`TILE`] activation rows while it sits in registers. Output rows are split over the rayon
//! pool. Formats: Q4_0, Q4_1 and Q8_0 natively, Q5_0 and Q5_1 re-blocked as Q8_0 at load;
//! anything else (the K-quants, f16) goes through candle's `QMatMul`.
//!
//! Each output value is computed by the same sequence of operations whatever the other rows of
//! the step are, so a sequence gets bit-identical logits alone or batched.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use super::Isa;
use crate::models::ModelError;

/// Values per quantization block, in every format here.
pub const BLOCK: usize = 32;
/// Most activation rows multiplied per pass over a weight row (8 accumulators in registers).
const TILE: usize = 8;

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// A GGUF block format this module multiplies natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 scale, 32 4-bit values offset by 8.
    Q4_0,
    /// f16 scale and minimum, 32 4-bit values.
    Q4_1,
    /// f16 scale, 32 signed bytes.
    Q8_0,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Format> {
        match dtype {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Rows of activations quantized to 8 bits, 32 values per block: block `b` of row `r` holds
/// `d[i] * qs[i][j]` with `i = r * nb + b`, and `s[i] = d[i] * Σ_j qs[i][j]` carries the row's
/// share of a Q4 format's offset or minimum. Scales are kept apart from the values so the
/// kernels read them as contiguous runs.
pub struct Acts {
    rows: usize,
    nb: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; BLOCK]>,
}

/// A weight matrix of `rows` outputs by `cols` inputs, each row `cols / 32` blocks of `format`
/// exactly as GGUF stores them.
pub struct QWeight {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    isa: Isa,
}

impl QWeight {
    /// The weight in a native format, or None when it must stay with candle.
    pub fn from_qtensor(t: &QTensor, device: &Device) -> Result<Option<QWeight>, ModelError> {
        let (rows, cols) = match t.shape().dims() {
            [rows, cols] => (*rows, *cols),
            _ => return Ok(None),
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        // Q5 blocks hold values a byte holds exactly enough; their bit-spread layout has no
        // cheap SIMD unpacking, so they are re-blocked once.
        let requantized;
        let t = if matches!(t.dtype(), GgmlDType::Q5_0 | GgmlDType::Q5_1) {
            requantized = QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?;
            &requantized
        } else {
            t
        };
        let Some(format) = Format::of(t.dtype()) else { return Ok(None) };
        let data = t.data()?.into_owned();
        if data.len() != rows * cols / BLOCK * format.block_bytes() {
            return Err(ModelError::Unsupported(format!(
                "{format:?} tensor of {rows}x{cols} holds {} bytes",
                data.len()
            )));
        }
        Ok(Some(QWeight { format, rows, cols, data, isa: kernel_isa() }))
    }

    /// Rows of several weights with the same format and input size, stacked into one matrix:
    /// one pass over the activations for Q, K and V, or for the gate and up projections.
    pub fn stack(parts: &[QWeight]) -> Option<QWeight> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.cols != first.cols) {
            return None;
        }
        Some(QWeight {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            isa: first.isa,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// Row `i` as floats (an embedding lookup). None when `i` is out of range.
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) -> Option<()> {
        let bytes = self.data.get(i * self.row_bytes()..(i + 1) * self.row_bytes())?;
        for (block, out) in bytes.chunks_exact(self.format.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
            let d = f16(block, 0);
            match self.format {
                Format::Q4_0 | Format::Q4_1 => {
                    let (m, qs) = match self.format {
                        Format::Q4_1 => (f16(block, 2), &block[4..]),
                        _ => (-8.0 * d, &block[2..]),
                    };
                    for (j, q) in qs.iter().enumerate() {
                        out[j] = d * f32::from(q & 0x0F) + m;
                        out[j + BLOCK / 2] = d * f32::from(q >> 4) + m;
                    }
                }
                Format::Q8_0 => {
                    for (o, q) in out.iter_mut().zip(&block[2..]) {
                        *o = d * f32::from(*q as i8);
                    }
                }
            }
        }
        Some(())
    }

    /// `x · Wᵀ` for `x` of `t` rows of `cols` floats: `t` rows of `rows` floats.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), t * self.cols);
        let nb = self.cols / BLOCK;
        let acts = quantize_rows(x, self.cols, self.isa);
        let (n, row_bytes) = (self.rows, self.row_bytes());
        let mut y = vec![0f32; t * n];
        // Each task owns a run of weight rows, that is a band of output columns.
        let out = Columns(y.as_mut_ptr());
        let tasks = super::team::threads().max(1) * 4;
        let per_task = n.div_ceil(tasks).next_multiple_of(8).max(8);
        let work = |c: usize| {
            let first = c * per_task;
            let rows = per_task.min(n.saturating_sub(first));
            let mut r0 = 0;
            while r0 < t {
                let tile = match t - r0 {
                    left if left >= TILE => TILE,
                    left if left >= 4 => 4,
                    _ => 1,
                };
                let mut vals = [0f32; TILE];
                let row = |i: usize| &self.data[i * row_bytes..(i + 1) * row_bytes];
                let mut i = first;
                while i < first + rows {
                    // One activation row: two weight rows at a time (see `avx2::dot_tile`).
                    let pair = tile == 1 && i + 1 < first + rows;
                    let (width, cols) = if pair { (2, [row(i), row(i + 1)]) } else { (1, [row(i), row(i)]) };
                    let vals = &mut vals[..width * tile];
                    if pair {
                        dot_pair(self.format, self.isa, cols, &acts, r0, vals);
                    } else {
                        dot_rows(self.format, self.isa, cols[0], &acts, r0, vals);
                    }
                    for (j, v) in vals.iter().enumerate() {
                        let (col, k) = (i + j / tile, j % tile);
                        // SAFETY: (r0 + k, col) is inside the t x n output, and column col
                        // belongs to this task alone.
                        unsafe { out.at((r0 + k) * n + col).write(*v) };
                    }
                    i += width;
                }
                r0 += tile;
            }
        };
        let parts = n.div_ceil(per_task);
        if n * t * nb < 4096 {
            (0..parts).for_each(work);
        } else {
            super::team::for_each(parts, &work);
        }
        y
    }
}

/// The output of a matmul while tasks write their own columns of it.
#[derive(Clone, Copy)]
struct Columns(*mut f32);

impl Columns {
    /// (A method, so closures capture the whole wrapper rather than its raw pointer field.)
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: tasks write disjoint elements (see `QWeight::matmul`), and the buffer outlives them.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

/// A projection: native blocks when the format has a kernel here, candle's otherwise.
pub enum Linear {
    Native(Arc<QWeight>),
    Candle(QMatMul),
}

impl Linear {
    pub fn new(t: QTensor, device: &Device) -> Result<Linear, ModelError> {
        Ok(match QWeight::from_qtensor(&t, device)? {
            Some(w) => Linear::Native(Arc::new(w)),
            None => Linear::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    /// `t` rows of inputs to `t` rows of outputs.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            Linear::Native(w) => native_forward(w, x, t),
            Linear::Candle(m) => {
                let x = Tensor::from_slice(x, (t, x.len() / t.max(1)), &Device::Cpu)?;
                Ok(m.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Several projections of the same input (Q, K and V; gate and up): one stacked matmul when
/// their weights share a native format, else one each.
pub enum Projections {
    Stacked { weight: QWeight, outputs: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<QTensor>, device: &Device) -> Result<Projections, ModelError> {
        let mut native = Vec::with_capacity(parts.len());
        for p in &parts {
            match QWeight::from_qtensor(p, device)? {
                Some(w) => native.push(w),
                None => break,
            }
        }
        if native.len() == parts.len()
            && let Some(weight) = QWeight::stack(&native)
        {
            let outputs = native.iter().map(|w| w.rows).collect();
            return Ok(Projections::Stacked { weight, outputs });
        }
        Ok(Projections::Separate(
            parts.into_iter().map(|t| Linear::new(t, device)).collect::<Result<_, _>>()?,
        ))
    }

    /// `t` rows of outputs per projection, in order.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Projections::Separate(ls) => ls.iter().map(|l| l.forward(x, t)).collect(),
            Projections::Stacked { weight, outputs } => {
                let y = native_forward(weight, x, t)?;
                let mut parts: Vec<Vec<f32>> = outputs.iter().map(|n| Vec::with_capacity(t * n)).collect();
                for row in y.chunks_exact(weight.rows) {
                    let mut start = 0;
                    for (part, n) in parts.iter_mut().zip(outputs) {
                        part.extend_from_slice(&row[start..start + n]);
                        start += n;
                    }
                }
                Ok(parts)
            }
        }
    }
}

fn native_forward(w: &QWeight, x: &[f32], t: usize) -> Result<Vec<f32>, ModelError> {
    if x.len() != t * w.cols {
        return Err(ModelError::Inference(format!(
            "matmul of {} values in {t} rows against a weight of {} inputs",
            x.len(),
            w.cols
        )));
    }
    Ok(w.matmul(x, t))
}

/// AVX-512 with VNNI (its level includes F16C), AVX2 with FMA and F16C (for the block scales),
/// or plain Rust; at most [`Isa::chosen`].
fn kernel_isa() -> Isa {
    capped(Isa::chosen())
}

/// The level the kernels here run at when `isa` is asked for: AVX2 also needs F16C.
fn capped(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma && !std::arch::is_x86_feature_detected!("f16c") {
        return Isa::Scalar;
    }
    isa
}

fn f16(block: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([block[at], block[at + 1]])).to_f32()
}

/// Rows of `cols` floats as 8-bit blocks.
fn quantize_rows(x: &[f32], cols: usize, isa: Isa) -> Acts {
    debug_assert_eq!(cols % BLOCK, 0);
    let blocks = x.len() / BLOCK;
    let mut acts = Acts {
        rows: x.len() / cols,
        nb: cols / BLOCK,
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
        qs: vec![[0; BLOCK]; blocks],
    };
    let nb = acts.nb;
    let row = |(((x, qs), d), s)| quantize_row(x, qs, d, s, isa);
    if acts.rows < 16 {
        x.chunks(cols)
            .zip(acts.qs.chunks_mut(nb))
            .zip(acts.d.chunks_mut(nb))
            .zip(acts.s.chunks_mut(nb))
            .for_each(row);
    } else {
        x.par_chunks(cols)
            .zip(acts.qs.par_chunks_mut(nb))
            .zip(acts.d.par_chunks_mut(nb))
            .zip(acts.s.par_chunks_mut(nb))
            .for_each(row);
    }
    acts
}

/// One row: its blocks' values, scales and `s`.
fn quantize_row(x: &[f32], qs: &mut [[i8; BLOCK]], d: &mut [f32], s: &mut [f32], isa: Isa) {
    for (i, vals) in x.chunks_exact(BLOCK).enumerate() {
        (d[i], s[i]) = match isa {
            // SAFETY: `kernel_isa` picks Avx2Fma only when the CPU has AVX2, FMA and F16C, which
            // Avx512 includes.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma | Isa::Avx512 => unsafe { avx2::quantize_block(vals, &mut qs[i]) },
            _ => scalar::quantize_block(vals, &mut qs[i]),
        };
    }
}

/// `$body` with `$F` the const block format of the run-time `$format` (the kernels take it as
/// a const parameter, so each format's unpacking is compiled in).
macro_rules! with_format {
    ($format:expr, $F:ident => $body:expr) => {
        match $format {
            Format::Q4_0 => {
                const $F: u8 = Q4_0;
                $body
            }
            Format::Q4_1 => {
                const $F: u8 = Q4_1;
                $body
            }
            Format::Q8_0 => {
                const $F: u8 = Q8_0;
                $body
            }
        }
    };
}

/// One weight row `$w` against the `$out.len()` activation rows from `$r0` with ISA module
/// `$m`'s `dot_tile`: in one tile of [`TILE`] or 4 rows, else one row at a time.
macro_rules! rows_in_tiles {
    ($m:ident, $F:ident, $w:expr, $acts:expr, $r0:expr, $out:expr) => {
        match $out.len() {
            TILE => $m::dot_tile::<$F, 1, TILE>([$w], $acts, $r0, $out),
            4 => $m::dot_tile::<$F, 1, 4>([$w], $acts, $r0, $out),
            _ => {
                for (k, o) in $out.iter_mut().enumerate() {
                    $m::dot_tile::<$F, 1, 1>([$w], $acts, $r0 + k, std::slice::from_mut(o));
                }
            }
        }
    };
}

/// `out[j] = w[j] · row r` of `acts`, for two weight rows (the same result as one at a time).
fn dot_pair(format: Format, isa: Isa, w: [&[u8]; 2], acts: &Acts, r: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel_isa` picks Avx512 only when the CPU has it, VNNI included; the kernel
        // checks the slices' bounds.
        Isa::Avx512 => unsafe { with_format!(format, F => avx512::dot_tile::<F, 2, 1>(w, acts, r, out)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `quantize_rows`; the kernel checks the slices' bounds.
        Isa::Avx2Fma => unsafe { with_format!(format, F => avx2::dot_tile::<F, 2, 1>(w, acts, r, out)) },
        _ => {
            for (o, w) in out.iter_mut().zip(w) {
                *o = scalar::dot(format, w, acts, r);
            }
        }
    }
}

/// `out[k] = w · row r0 + k` of `acts` for one weight row `w`, for `out.len()` rows (1, 4 or
/// [`TILE`]; any other count goes one row at a time, with the same result).
fn dot_rows(format: Format, isa: Isa, w: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_pair`.
        Isa::Avx512 => unsafe { with_format!(format, F => rows_in_tiles!(avx512, F, w, acts, r0, out)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_pair`.
        Isa::Avx2Fma => unsafe { with_format!(format, F => rows_in_tiles!(avx2, F, w, acts, r0, out)) },
        _ => {
            for (k, o) in out.iter_mut().enumerate() {
                *o = scalar::dot(format, w, acts, r0 + k);
            }
        }
    }
}

/// Blocks per segment of the SIMD tile kernels: a weight row's minimums are gathered for this
/// many blocks, then applied to each activation row's `s` with vector arithmetic. A multiple of
/// four, so AVX-512's groups of four blocks never straddle two segments.
const SEGMENT: usize = 32;

/// What every tile kernel checks before its unchecked reads: W weight rows of `acts.nb` blocks
/// of format F, activation rows `r0..r0 + R`, room for W·R outputs. Returns F's block size and
/// where each activation row's blocks start.
fn tile_bounds<const F: u8, const W: usize, const R: usize>(
    w: &[&[u8]; W],
    acts: &Acts,
    r0: usize,
    out: &[f32],
) -> (usize, [usize; R]) {
    let bytes = match F {
        Q4_0 => 18,
        Q4_1 => 20,
        _ => 34,
    };
    let nb = acts.nb;
    assert!(w.iter().all(|w| w.len() >= nb * bytes) && r0 + R <= acts.rows && out.len() >= W * R);
    assert!(
        acts.d.len() >= acts.rows * nb && acts.s.len() >= acts.rows * nb && acts.qs.len() >= acts.rows * nb
    );
    (bytes, std::array::from_fn(|r| (r0 + r) * nb))
}

mod scalar {
    use super::{Acts, BLOCK, Format, f16};

    /// Returns the block's scale and `s`.
    pub fn quantize_block(vals: &[f32], qs: &mut [i8; BLOCK]) -> (f32, f32) {
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(vals) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        (d, d * sum as f32)
    }

    pub fn dot(format: Format, w: &[u8], acts: &Acts, row: usize) -> f32 {
        let at = row * acts.nb;
        let mut total = 0f32;
        for (b, block) in w.chunks_exact(format.block_bytes()).take(acts.nb).enumerate() {
            let (ad, a_s, aq) = (acts.d[at + b], acts.s[at + b], &acts.qs[at + b]);
            let d = f16(block, 0);
            let mut sum = 0i32;
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let qs = if format == Format::Q4_1 { &block[4..] } else { &block[2..] };
                    for (j, q) in qs.iter().enumerate() {
                        sum += i32::from(q & 0x0F) * i32::from(aq[j])
                            + i32::from(q >> 4) * i32::from(aq[j + BLOCK / 2]);
                    }
                    total += d * ad * sum as f32;
                    total += if format == Format::Q4_1 { f16(block, 2) * a_s } else { -8.0 * d * a_s };
                }
                Format::Q8_0 => {
                    for (q, x) in block[2..].iter().zip(aq) {
                        sum += i32::from(*q as i8) * i32::from(*x);
                    }
                    total += d * ad * sum as f32;
                }
            }
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, BLOCK, Q4_1, Q8_0, SEGMENT};
    use crate::kernels::avx2::{hmax, hsum};

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16(p: *const u8) -> f32 {
        // SAFETY: callers pass a pointer to two readable bytes.
        let bits = unsafe { p.cast::<u16>().read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Returns the block's scale and `s`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn quantize_block(vals: &[f32], qs: &mut [i8; BLOCK]) -> (f32, f32) {
        assert_eq!(vals.len(), BLOCK);
        // SAFETY: `vals` holds 32 floats (asserted); loads are unaligned.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(vals.as_ptr().add(8 * i)) });
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, x| _mm256_max_ps(m, _mm256_and_ps(*x, abs_mask)));
        let d = hmax(m) / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], id),
            ))
        });
        let sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
        // Packing works within 128-bit lanes; the permute puts the values back in order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qs` is 32 bytes.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), p) };
        (d, d * sum as f32)
    }

    /// The 32 weights of the block at `p` as bytes (unsigned 0..15 for the Q4 formats, signed
    /// for Q8_0), its scale, and what one activation block's `s` is multiplied by.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unpack<const F: u8>(p: *const u8) -> (__m256i, f32, f32) {
        let d = f16(p);
        // SAFETY (all loads): the caller passes a pointer to a whole block of format F.
        match F {
            Q8_0 => (unsafe { _mm256_loadu_si256(p.add(2).cast()) }, d, 0.0),
            _ => {
                let (min, qs) = if F == Q4_1 {
                    (f16(unsafe { p.add(2) }), unsafe { p.add(4) })
                } else {
                    (-8.0 * d, unsafe { p.add(2) })
                };
                let packed = unsafe { _mm_loadu_si128(qs.cast()) };
                // Low nibbles are values 0..16, high nibbles 16..32.
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
                (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), d, min)
            }
        }
    }

    /// Σ w_i a_i over one block, as 8 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_dot<const F: u8>(w: __m256i, a: __m256i) -> __m256 {
        let pairs = if F == Q8_0 {
            // maddubs multiplies unsigned by signed: move the weights' signs onto the activations.
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
        } else {
            _mm256_maddubs_epi16(w, a)
        };
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// `out[j * R + k] = w[j] · row r0 + k`: W weight rows by R activation rows. Each output
    /// comes from the same operations in the same order whatever W and R are, so a row's
    /// result does not depend on what it was tiled with. Two weight rows against one
    /// activation row give a single decoding sequence two independent chains of additions.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // block j indexes the minimums of every weight row
    pub unsafe fn dot_tile<const F: u8, const W: usize, const R: usize>(
        w: [&[u8]; W],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let (bytes, at) = super::tile_bounds::<F, W, R>(&w, acts, r0, out);
        let nb = acts.nb;
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        let mut offset = [[0f32; R]; W];
        let mut mins = [[0f32; SEGMENT]; W];
        let mut b0 = 0;
        while b0 < nb {
            let seg = SEGMENT.min(nb - b0);
            for j in 0..seg {
                let b = b0 + j;
                for x in 0..W {
                    // SAFETY: block b of the rows and of each activation row is in bounds
                    // (asserted).
                    unsafe {
                        // A kilobyte ahead (measured best of 512, 1024 and 2048 bytes: 10% faster
                        // single-stream decoding); a prefetch never faults, even past the end.
                        _mm_prefetch::<_MM_HINT_T0>(w[x].as_ptr().wrapping_add(b * bytes + 1024).cast());
                        let (wq, d, m) = unpack::<F>(w[x].as_ptr().add(b * bytes));
                        mins[x][j] = m;
                        let vd = _mm256_set1_ps(d);
                        for r in 0..R {
                            let i = at[r] + b;
                            let aq = _mm256_loadu_si256(acts.qs.as_ptr().add(i).cast());
                            let scale = _mm256_mul_ps(vd, _mm256_broadcast_ss(&*acts.d.as_ptr().add(i)));
                            acc[x][r] = _mm256_fmadd_ps(block_dot::<F>(wq, aq), scale, acc[x][r]);
                        }
                    }
                }
            }
            if F != Q8_0 {
                for x in 0..W {
                    for r in 0..R {
                        let s = &acts.s[at[r] + b0..at[r] + b0 + seg];
                        let mut v = _mm256_setzero_ps();
                        let whole = seg - seg % 8;
                        for k in (0..whole).step_by(8) {
                            // SAFETY: k + 8 <= seg, within both slices.
                            unsafe {
                                v = _mm256_fmadd_ps(
                                    _mm256_loadu_ps(mins[x].as_ptr().add(k)),
                                    _mm256_loadu_ps(s.as_ptr().add(k)),
                                    v,
                                );
                            }
                        }
                        let tail: f32 = mins[x][whole..seg].iter().zip(&s[whole..]).map(|(m, s)| m * s).sum();
                        offset[x][r] += hsum(v) + tail;
                    }
                }
            }
            b0 += seg;
        }
        for x in 0..W {
            for r in 0..R {
                out[x * R + r] = hsum(acc[x][r]) + offset[x][r];
            }
        }
    }
}

/// The same products with AVX-512 VNNI: `vpdpbusd` multiplies unsigned weight bytes by signed
/// activation bytes and adds each group of four into 32-bit lanes, one instruction where AVX2
/// needs three, and a 512-bit register holds two blocks. Q8_0's signed weights are made unsigned
/// by adding 128 (a sign-bit flip), which becomes a per-block offset of −128·d, handled as the
/// Q4 formats' offsets are.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Acts, BLOCK, Q4_1, Q8_0, SEGMENT};

    /// One block's 32 weights as unsigned bytes, its scale, and its offset per unit of `s`:
    /// the AVX2 unpacking, with Q8_0's sign bits flipped (+128, undone by a minimum of −128·d).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn unpack<const F: u8>(p: *const u8) -> (__m256i, f32, f32) {
        // SAFETY: forwarded from the caller.
        let (w, d, min) = unsafe { super::avx2::unpack::<F>(p) };
        match F {
            Q8_0 => (_mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)), d, -128.0 * d),
            _ => (w, d, min),
        }
    }

    /// `out[j * R + k] = w[j] · row r0 + k`, as `super::avx2::dot_tile`: every output comes
    /// from the same operations in the same order whatever W and R are.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // block j indexes the minimums of every weight row
    pub unsafe fn dot_tile<const F: u8, const W: usize, const R: usize>(
        w: [&[u8]; W],
        acts: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let (bytes, at) = super::tile_bounds::<F, W, R>(&w, acts, r0, out);
        let nb = acts.nb;
        let mut acc = [[_mm512_setzero_ps(); R]; W];
        let mut offset = [[0f32; R]; W];
        let mut mins = [[0f32; SEGMENT]; W];
        let mut b0 = 0;
        while b0 < nb {
            let seg = SEGMENT.min(nb - b0);
            // Four blocks at a time, then what is left two at a time (the split depends on the
            // row length only, so every output is computed alike).
            let mut j = 0;
            while j + 4 <= seg {
                // SAFETY: blocks b0 + j .. b0 + j + 4 are in bounds (asserted).
                unsafe { quad::<F, W, R>(&w, acts, &at, b0 + j, &mut acc, &mut mins, j) };
                j += 4;
            }
            for j in (j..seg).step_by(2) {
                let b = b0 + j;
                // The last block of an odd row goes alone: a zero second half adds nothing.
                let two = j + 1 < seg;
                for x in 0..W {
                    // SAFETY: blocks b (and b + 1 when `two`) of the rows and of each activation
                    // row are in bounds (asserted).
                    unsafe {
                        // A kilobyte ahead, as in the AVX2 kernel; a prefetch never faults.
                        _mm_prefetch::<_MM_HINT_T0>(w[x].as_ptr().wrapping_add(b * bytes + 1024).cast());
                        let (lo, d0, m0) = unpack::<F>(w[x].as_ptr().add(b * bytes));
                        let (hi, d1, m1) = if two {
                            unpack::<F>(w[x].as_ptr().add((b + 1) * bytes))
                        } else {
                            (_mm256_setzero_si256(), 0.0, 0.0)
                        };
                        mins[x][j] = m0;
                        if two {
                            mins[x][j + 1] = m1;
                        }
                        let wq = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                        let wd = _mm512_insertf32x8::<1>(_mm512_set1_ps(d0), _mm256_set1_ps(d1));
                        for r in 0..R {
                            let i = at[r] + b;
                            let aq = if two {
                                _mm512_loadu_si512(acts.qs.as_ptr().add(i).cast())
                            } else {
                                _mm512_zextsi256_si512(_mm256_loadu_si256(acts.qs.as_ptr().add(i).cast()))
                            };
                            let a1 = if two { *acts.d.get_unchecked(i + 1) } else { 0.0 };
                            let ad = _mm512_insertf32x8::<1>(
                                _mm512_set1_ps(*acts.d.get_unchecked(i)),
                                _mm256_set1_ps(a1),
                            );
                            let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, aq));
                            acc[x][r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(wd, ad), acc[x][r]);
                        }
                    }
                }
            }
            for x in 0..W {
                for r in 0..R {
                    let s = &acts.s[at[r] + b0..at[r] + b0 + seg];
                    let mut v = _mm512_setzero_ps();
                    for k in (0..seg).step_by(16) {
                        let m: __mmask16 = if seg - k >= 16 { 0xFFFF } else { (1u16 << (seg - k)) - 1 };
                        // SAFETY: the mask keeps both loads inside the `seg` elements of each.
                        unsafe {
                            v = _mm512_fmadd_ps(
                                _mm512_maskz_loadu_ps(m, mins[x].as_ptr().add(k)),
                                _mm512_maskz_loadu_ps(m, s.as_ptr().add(k)),
                                v,
                            );
                        }
                    }
                    offset[x][r] += _mm512_reduce_add_ps(v);
                }
            }
            b0 += seg;
        }
        for x in 0..W {
            for r in 0..R {
                out[x * R + r] = _mm512_reduce_add_ps(acc[x][r]) + offset[x][r];
            }
        }
    }

    /// Four blocks `b..b + 4` of each weight row against each activation row, the scales of the
    /// four converted and multiplied as one vector. Q4: the blocks' 64 packed bytes in one
    /// register, low nibbles against the activations' values 0..16 and high nibbles against
    /// 16..32 (two `vpdpbusd` into the same lanes, four per block). Q8_0: two blocks per
    /// register, as the activations lie. Their minimums go to `mins[x][j..j + 4]`.
    ///
    /// # Safety
    /// Blocks `b..b + 4` must be inside every weight row and activation row (the caller's
    /// asserts), and `j + 4 <= SEGMENT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn quad<const F: u8, const W: usize, const R: usize>(
        w: &[&[u8]; W],
        acts: &Acts,
        at: &[usize; R],
        b: usize,
        acc: &mut [[__m512; R]; W],
        mins: &mut [[f32; SEGMENT]; W],
        j: usize,
    ) {
        let (bytes, qs) = match F {
            Q4_1 => (20, 4),
            Q8_0 => (34, 2),
            _ => (18, 2),
        };
        let nibbles = _mm512_set1_epi8(0x0F);
        // Lane l of the 16 block sums belongs to block l / 4.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        // Q8_0: lane l of a two-block register belongs to block l / 8.
        let (first_two, last_two) = (
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        );
        for x in 0..W {
            // SAFETY (all loads): blocks b..b + 4 of row x, per the contract.
            unsafe {
                let p = w[x].as_ptr().add(b * bytes);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(1024).cast());
                let half = |at: usize| {
                    let h = |k: usize| p.add(k * bytes + at).cast::<i16>().read_unaligned();
                    _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0))
                };
                if F == Q8_0 {
                    // Signed weights made unsigned by a sign-bit flip (+128), undone by the
                    // minimum −128·d.
                    let block = |k: usize| _mm256_loadu_si256(p.add(k * bytes + qs).cast());
                    let pair = |k: usize| {
                        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block(k)), block(k + 1));
                        _mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN))
                    };
                    let (w01, w23) = (pair(0), pair(2));
                    let d = half(0);
                    _mm_storeu_ps(mins[x].as_mut_ptr().add(j), _mm_mul_ps(d, _mm_set1_ps(-128.0)));
                    for r in 0..R {
                        let i = at[r] + b;
                        let a = acts.qs.as_ptr().add(i).cast::<__m512i>();
                        let zero = _mm512_setzero_si512();
                        let s01 = _mm512_dpbusd_epi32(zero, w01, _mm512_loadu_si512(a));
                        let s23 = _mm512_dpbusd_epi32(zero, w23, _mm512_loadu_si512(a.add(1)));
                        let scale =
                            _mm512_castps128_ps512(_mm_mul_ps(d, _mm_loadu_ps(acts.d.as_ptr().add(i))));
                        let (c01, c23) =
                            (_mm512_permutexvar_ps(first_two, scale), _mm512_permutexvar_ps(last_two, scale));
                        acc[x][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s01), c01, acc[x][r]);
                        acc[x][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s23), c23, acc[x][r]);
                    }
                    continue;
                }
                let q = |k: usize| _mm_loadu_si128(p.add(k * bytes + qs).cast());
                let packed = _mm512_inserti32x4::<3>(
                    _mm512_inserti32x4::<2>(
                        _mm512_inserti32x4::<1>(_mm512_castsi128_si512(q(0)), q(1)),
                        q(2),
                    ),
                    q(3),
                );
                let lo = _mm512_and_si512(packed, nibbles);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibbles);
                let d = half(0);
                let m = if F == Q4_1 { half(2) } else { _mm_mul_ps(d, _mm_set1_ps(-8.0)) };
                _mm_storeu_ps(mins[x].as_mut_ptr().add(j), m);
                for r in 0..R {
                    let i = at[r] + b;
                    let a = acts.qs.as_ptr().add(i).cast::<__m512i>();
                    // Two loads hold four blocks of 32 values; regroup them as the values 0..16
                    // and the values 16..32 of each block, in block order.
                    let (a01, a23) = (_mm512_loadu_si512(a), _mm512_loadu_si512(a.add(1)));
                    let a_lo = _mm512_shuffle_i64x2::<0b10_00_10_00>(a01, a23);
                    let a_hi = _mm512_shuffle_i64x2::<0b11_01_11_01>(a01, a23);
                    let sums =
                        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, a_lo), hi, a_hi);
                    let scale = _mm_mul_ps(d, _mm_loadu_ps(acts.d.as_ptr().add(i)));
                    let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scale));
                    acc[x][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[x][r]);
                }
            }
        }
    }

    const _: () = assert!(SEGMENT.is_multiple_of(4) && BLOCK == 32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight of `rows` x `cols` with values spread over the format's range.
    fn weight(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, Vec<f32>) {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.45) * (1.0 + (i % 5) as f32))
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let q = QTensor::quantize(&t, dtype).unwrap_or_else(|e| panic!("{e}"));
        let dense = q.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1()).unwrap_or_default();
        (q, dense)
    }

    fn input(t: usize, cols: usize) -> Vec<f32> {
        (0..t * cols).map(|i| ((i * 104729 % 997) as f32 / 997.0 - 0.5) * 3.0).collect()
    }

    fn dense_matmul(x: &[f32], w: &[f32], t: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * rows];
        for r in 0..t {
            for n in 0..rows {
                y[r * rows + n] = (0..cols).map(|k| x[r * cols + k] * w[n * cols + k]).sum();
            }
        }
        y
    }

    #[test]
    fn every_format_and_isa_matches_the_dequantized_product() {
        let (rows, cols, t) = (40, 96, 7);
        let levels = levels();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let (q, dense) = weight(dtype, rows, cols);
            let x = input(t, cols);
            let want = dense_matmul(&x, &dense, t, rows, cols);
            for &isa in &levels {
                let mut w = QWeight::from_qtensor(&q, &Device::Cpu)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| panic!("{dtype:?}"));
                w.isa = isa;
                let got = w.matmul(&x, t);
                // The activations are rounded to 8 bits: errors of about 1% of a row's scale.
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    worst < 0.01 * scale,
                    "{dtype:?} {isa:?}: worst error {worst} against values up to {scale}"
                );
            }
        }
    }

    /// Every level this CPU runs the kernels at, printed so a run shows which it checked.
    fn levels() -> Vec<Isa> {
        let mut levels: Vec<Isa> = Isa::supported().into_iter().map(capped).collect();
        levels.dedup();
        eprintln!("quantized matmul levels checked: {levels:?}");
        levels
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let levels = levels();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            // 224 inputs, seven blocks: the AVX-512 kernel's four-block, two-block and odd last
            // block steps all run.
            let (q, _) = weight(dtype, 64, 224);
            for &isa in &levels {
                let mut w = QWeight::from_qtensor(&q, &Device::Cpu)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| panic!("{dtype:?}"));
                w.isa = isa;
                // 21 rows: tiles of 8, 8, 4 and 1, and quantized on the pool (16 rows or more).
                let x = input(21, 224);
                let batched = w.matmul(&x, 21);
                for r in 0..21 {
                    let alone = w.matmul(&x[r * 224..(r + 1) * 224], 1);
                    assert_eq!(alone, batched[r * 64..(r + 1) * 64], "{dtype:?} {isa:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn every_level_gives_the_scalar_products_up_to_rounding() {
        // Long rows (Llama-sized: 1536 inputs, 48 blocks, segments of 32 and 16) in every format.
        let (rows, cols, t) = (24, 1536, 9);
        let levels = levels();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, _) = weight(dtype, rows, cols);
            let x = input(t, cols);
            let mut w =
                QWeight::from_qtensor(&q, &Device::Cpu).ok().flatten().unwrap_or_else(|| panic!("{dtype:?}"));
            w.isa = Isa::Scalar;
            let want = w.matmul(&x, t);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for &isa in &levels {
                w.isa = isa;
                let got = w.matmul(&x, t);
                // Same integer block sums; only the float additions are ordered differently.
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-5 * scale, "{dtype:?} {isa:?}: {worst} off, values up to {scale}");
            }
        }
    }

    #[test]
    fn dequantized_rows_match_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, dense) = weight(dtype, 5, 64);
            let w =
                QWeight::from_qtensor(&q, &Device::Cpu).ok().flatten().unwrap_or_else(|| panic!("{dtype:?}"));
            let mut row = vec![0f32; 64];
            assert_eq!(w.dequantize_row(3, &mut row), Some(()));
            assert_eq!(row, dense[3 * 64..4 * 64], "{dtype:?}");
            assert_eq!(w.dequantize_row(5, &mut row), None);
        }
    }

    #[test]
    fn formats_without_a_kernel_here_go_through_candle() {
        // Q4_K (256-value super-blocks) beside a Q4_1 part: nothing to stack, each multiplies
        // on its own, candle's for the K-quant.
        let (k, k_dense) = weight(GgmlDType::Q4K, 8, 256);
        let (q, _) = weight(GgmlDType::Q4_1, 8, 256);
        let x = input(2, 256);
        // The same weight again (QTensor is not Clone; quantizing is deterministic).
        let alone =
            Linear::new(weight(GgmlDType::Q4K, 8, 256).0, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(alone, Linear::Candle(_)));
        let y = alone.forward(&x, 2).unwrap_or_else(|e| panic!("{e}"));
        let want = dense_matmul(&x, &k_dense, 2, 8, 256);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 0.02 * scale), "{y:?} against {want:?}");
        let both = Projections::new(vec![k, q], &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&both, Projections::Separate(parts) if parts.len() == 2));
        let parts = both.forward(&x, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parts[0], y);
        assert_eq!(parts[1].len(), 16);
    }

    #[test]
    fn stacked_weights_give_the_parts_side_by_side() {
        let parts: Vec<QWeight> = [24, 8, 8]
            .iter()
            .map(|&rows| {
                let (q, _) = weight(GgmlDType::Q4_1, rows, 64);
                QWeight::from_qtensor(&q, &Device::Cpu).ok().flatten().unwrap_or_else(|| panic!("Q4_1"))
            })
            .collect();
        let x = input(3, 64);
        let stacked = QWeight::stack(&parts).unwrap_or_else(|| panic!("same format"));
        let y = stacked.matmul(&x, 3);
        let mut start = 0;
        for p in &parts {
            let part = p.matmul(&x, 3);
            for r in 0..3 {
                assert_eq!(y[r * 40 + start..r * 40 + start + p.rows], part[r * p.rows..(r + 1) * p.rows]);
            }
            start += p.rows;
        }
    }
}
