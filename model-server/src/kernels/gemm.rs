//! Bounds-checked wrappers around the `gemm` crate (the micro-kernels candle itself uses), on
//! strided views of flat `f32` buffers, so attention can multiply slices of the packed QKV
//! matrix in place instead of copying heads out.

use gemm::Parallelism;
/// The instruction set the `gemm` crate's micro-kernels dispatch to on this CPU, for logs and
/// benchmarks. It picks at run time by itself: its 512-bit kernels (the `x86-v4` feature) need
/// the whole x86-64-v4 level, else the AVX2+FMA ones, else portable code.
pub fn matmul_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v3 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt");
        if v3
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl")
        {
            return "avx512";
        }
        if v3 {
            return "avx2+fma";
        }
    }
    "portable"
}

/// A matrix inside a flat buffer: element `(i, j)` is at `offset + i·row_stride + j·col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A dense row-major `rows × cols` matrix starting at `offset`.
    pub fn dense(offset: usize, rows: usize, cols: usize) -> View {
        View { offset, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose, without moving data.
    pub fn t(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// One past the last element the view touches.
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `dst = a · b`, or `dst += a · b` when `accumulate` (then `dst` may be pre-filled with a bias
/// or hold the residual, which saves a separate pass). `threads > 1` lets gemm split the work
/// over the current rayon pool.
///
/// # Safety
/// `dst` must be valid for reads and writes of `dst_len` elements, and nothing else may access
/// the elements `dv` covers during the call. `a` and `b` must not overlap them.
pub unsafe fn gemm_raw(
    dst: *mut f32,
    dst_len: usize,
    dv: View,
    (a, av): (&[f32], View),
    (b, bv): (&[f32], View),
    accumulate: bool,
    threads: usize,
) {
    assert!(dv.rows == av.rows && dv.cols == bv.cols && av.cols == bv.rows, "matmul shapes");
    assert!(dv.end() <= dst_len && av.end() <= a.len() && bv.end() <= b.len(), "matmul bounds");
    let (m, n, k) = (dv.rows, dv.cols, av.cols);
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the asserts keep every access of all three views inside its buffer; the caller
    // guarantees `dst` is valid and exclusively ours over `dv`. Strides fit in isize because
    // they index allocations, which never exceed isize::MAX bytes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.add(dv.offset),
            dv.col_stride as isize,
            dv.row_stride as isize,
            accumulate,
            a.as_ptr().add(av.offset),
            av.col_stride as isize,
            av.row_stride as isize,
            b.as_ptr().add(bv.offset),
            bv.col_stride as isize,
            bv.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// [`gemm_raw`] into an exclusively borrowed buffer.
pub fn gemm(
    dst: &mut [f32],
    dv: View,
    a: (&[f32], View),
    b: (&[f32], View),
    accumulate: bool,
    threads: usize,
) {
    // SAFETY: `dst` is a unique borrow, so it is valid over its length and cannot alias `a`/`b`.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst.len(), dv, a, b, accumulate, threads) }
}

/// A weight matrix `[in, out]` (PyTorch's `[out, in]`, transposed), laid out for gemm's
/// micro-kernel: for each input feature it reads 16 consecutive outputs, one cache line if rows
/// start cache-line aligned. Rows are padded to an odd number of cache lines: with few tokens gemm
/// reads the weights in place, and a stride of an even number of lines (384, 1152 or 1536 floats)
/// would map all rows to a handful of L1 sets.
pub struct Weight {
    data: Vec<f32>,
    offset: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Weight {
    /// From a dense row-major `[rows, cols]` matrix.
    pub fn new(dense: &[f32], rows: usize, cols: usize) -> Weight {
        assert_eq!(dense.len(), rows * cols, "weight shape");
        let mut weight = Weight::zeroed(rows, cols);
        let (offset, stride) = (weight.offset, weight.stride);
        for (dst, src) in weight.data[offset..].chunks_mut(stride).zip(dense.chunks_exact(cols)) {
            dst[..cols].copy_from_slice(src);
        }
        weight
    }

    /// `[inputs, outputs]` from PyTorch's `[outputs, inputs]` layout, read one output at a time:
    /// `read(o, row)` fills `row` with output `o`'s weights. The transpose goes 16 outputs at a
    /// time, so each write fills a cache line and the rows being read stay in L2.
    pub fn from_output_rows(
        inputs: usize,
        outputs: usize,
        mut read: impl FnMut(usize, &mut [f32]),
    ) -> Weight {
        const TILE: usize = LINE;
        let mut weight = Weight::zeroed(inputs, outputs);
        let (offset, stride) = (weight.offset, weight.stride);
        let mut tile = vec![0.0; TILE * inputs];
        for first in (0..outputs).step_by(TILE) {
            let n = TILE.min(outputs - first);
            for (r, row) in tile.chunks_exact_mut(inputs).take(n).enumerate() {
                read(first + r, row);
            }
            for (i, dst) in weight.data[offset..].chunks_mut(stride).take(inputs).enumerate() {
                for (r, d) in dst[first..first + n].iter_mut().enumerate() {
                    *d = tile[r * inputs + i];
                }
            }
        }
        weight
    }

    fn zeroed(rows: usize, cols: usize) -> Weight {
        let lines = cols.div_ceil(LINE);
        let stride = (lines | 1) * LINE;
        let data = vec![0.0; rows * stride + LINE];
        let offset = data.as_ptr().align_offset(64).min(LINE);
        Weight { data, offset, rows, cols, stride }
    }

    fn view(&self) -> View {
        View { offset: self.offset, rows: self.rows, cols: self.cols, row_stride: self.stride, col_stride: 1 }
    }
}

/// A linear layer: the weight transposed (`[in, out]`, see [`Weight`]) and the bias.
pub struct Linear {
    pub weight: Weight,
    pub bias: Vec<f32>,
}

/// f32 per 64-byte cache line.
const LINE: usize = 16;

/// The output of a parallel loop whose tasks each write their own block of it.
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

impl SharedOut {
    pub fn new(dst: &mut [f32]) -> SharedOut {
        SharedOut { ptr: dst.as_mut_ptr(), len: dst.len() }
    }

    /// [`gemm_raw`] into this buffer.
    ///
    /// # Safety
    /// The buffer must still be alive and borrowed for this loop only, and no other task may
    /// access the elements `dv` covers meanwhile.
    pub unsafe fn gemm(&self, dv: View, a: (&[f32], View), b: (&[f32], View), accumulate: bool) {
        // SAFETY: forwarded from the caller.
        unsafe { gemm_raw(self.ptr, self.len, dv, a, b, accumulate, 1) }
    }

    /// A pointer to element `offset`, for a kernel that writes rows itself.
    ///
    /// # Safety
    /// As [`SharedOut::gemm`], for the elements the kernel writes; `offset` must be in bounds.
    pub unsafe fn at(&self, offset: usize) -> *mut f32 {
        debug_assert!(offset < self.len);
        // SAFETY: in bounds per the caller.
        unsafe { self.ptr.add(offset) }
    }
}

// SAFETY: a `SharedOut` is only written through `gemm`, whose callers guarantee that concurrent
// tasks write disjoint elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}

/// At most this many rows (a short input's tokens) [`linear`] multiplies in one task per block
/// of output columns, on the current team or pool, reading the weights in place: [`few`] on
/// AVX-512, else gemm per block (the padded [`Weight`] layout makes reading in place cheap).
/// Above, it makes one gemm call, which packs the weights once and splits the work itself over
/// rayon's pool: gemm packs its LHS (here: the weights) when a call has more than 16
/// micro-tiles of 6 columns (tokens), and below that packing would cost more than it saves.
pub const FEW_TOKENS: usize = 96;

/// At most this many rows [`linear`] multiplies with [`skinny`]: a decoder step (one token per
/// sequence) or a short input.
const SKINNY_TOKENS: usize = 8;

/// The level our own matmul kernels run at: [`super::Isa::chosen`] (so `KILN_ENGINE_ISA` lowers
/// them too), read once. The gemm crate's micro-kernels pick theirs by themselves.
fn level() -> super::Isa {
    static LEVEL: std::sync::OnceLock<super::Isa> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(super::Isa::chosen)
}

/// `dst[t×out] (+)= x[t×in] · w`, all rows dense, on the current team or rayon pool
/// ([`super::team::for_each`]); `threads` is how many threads that has.
pub fn linear(dst: &mut [f32], x: &[f32], w: &Weight, accumulate: bool, threads: usize) {
    let (inp, out) = (w.rows, w.cols);
    let tokens = x.len() / inp;
    #[cfg(target_arch = "x86_64")]
    if tokens <= FEW_TOKENS && level() == super::Isa::Avx512 {
        return few(dst, x, w, accumulate, threads);
    }
    if tokens <= SKINNY_TOKENS && level().has_avx2() {
        return skinny(dst, x, w, accumulate, threads);
    }
    let xv = View::dense(0, tokens, inp);
    if tokens > FEW_TOKENS || threads == 1 {
        return gemm(dst, View::dense(0, tokens, out), (x, xv), (&w.data, w.view()), accumulate, threads);
    }
    // One task per thread, each on a block of output columns cut at multiples of gemm's 16-row
    // micro-tile.
    let part = out.div_ceil(threads).div_ceil(16) * 16;
    let shared = SharedOut::new(dst);
    super::team::for_each(out.div_ceil(part), &|p| {
        let (c0, cn) = (p * part, part.min(out - p * part));
        let dv = View { offset: c0, rows: tokens, cols: cn, row_stride: out, col_stride: 1 };
        let wv = View { offset: w.offset + c0, rows: inp, cols: cn, row_stride: w.stride, col_stride: 1 };
        // SAFETY: tasks write disjoint column blocks of `dst`, borrowed until the loop ends.
        unsafe { shared.gemm(dv, (x, xv), (&w.data, wv), accumulate) };
    });
}

/// [`linear`] for a few rows: every weight is read from memory once for all of them (gemm's
/// in-place path walks the weights once per six rows and spends most of a decoder step on
/// bookkeeping at these sizes). Output columns are split over the pool in blocks of 16; each
/// value is the same sequence of fused multiply-adds whatever the other rows are, so a row
/// gets bit-identical results alone or batched.
fn skinny(dst: &mut [f32], x: &[f32], w: &Weight, accumulate: bool, threads: usize) {
    let (inp, out) = (w.rows, w.cols);
    let tokens = x.len() / inp;
    assert!(dst.len() >= tokens * out && x.len() >= tokens * inp, "matmul bounds");
    // Blocks small enough that two threads stay busy to the end.
    let blocks = out.div_ceil(16);
    let per_task = blocks.div_ceil(4 * threads.max(1)).max(1);
    let shared = SharedOut::new(dst);
    let task = |t: usize| {
        let (b0, b1) = (t * per_task, ((t + 1) * per_task).min(blocks));
        for b in b0..b1 {
            let mut block = [[0.0f32; 16]; SKINNY_TOKENS];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `linear` only comes here when the CPU has AVX2 and FMA.
            unsafe {
                avx2::skinny_block(x, tokens, inp, &w.data, w.offset + 16 * b, w.stride, &mut block)
            };
            let width = 16.min(out - 16 * b);
            for (r, vals) in block.iter().enumerate().take(tokens) {
                // SAFETY: tasks write disjoint column blocks of `dst`, borrowed until the loop
                // ends; row r's block is in bounds (asserted above).
                let row = unsafe { std::slice::from_raw_parts_mut(shared.at(r * out + 16 * b), width) };
                if accumulate {
                    row.iter_mut().zip(vals).for_each(|(d, v)| *d += v);
                } else {
                    row.copy_from_slice(&vals[..width]);
                }
            }
        }
    };
    let tasks = blocks.div_ceil(per_task);
    if threads <= 1 {
        (0..tasks).for_each(task);
    } else {
        super::team::for_each(tasks, &task);
    }
}

/// An element type [`by_rows`] multiplies in: f32, or f16 (half the bytes to stream, for
/// weights a checkpoint stores as f16 anyway, so nothing is rounded).
pub trait RowElement: Copy + Send + Sync {
    /// `dots[r] = x_r · w` for the first `rows` rows of `xs` (each `w.len()` long).
    fn dots(xs: &[f32], rows: usize, w: &[Self], dots: &mut [f32; SKINNY_TOKENS]);
}

impl RowElement for f32 {
    fn dots(xs: &[f32], rows: usize, w: &[f32], dots: &mut [f32; SKINNY_TOKENS]) {
        #[cfg(target_arch = "x86_64")]
        if level().has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::dots(xs, rows, w, dots) };
        }
        for (d, x) in dots.iter_mut().zip(xs.chunks_exact(w.len().max(1))).take(rows) {
            *d = x.iter().zip(w).map(|(a, b)| a * b).sum();
        }
    }
}

impl RowElement for half::f16 {
    fn dots(xs: &[f32], rows: usize, w: &[half::f16], dots: &mut [f32; SKINNY_TOKENS]) {
        #[cfg(target_arch = "x86_64")]
        if level().has_avx2() && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            return unsafe { avx2::dots_f16(xs, rows, w, dots) };
        }
        for (d, x) in dots.iter_mut().zip(xs.chunks_exact(w.len().max(1))).take(rows) {
            *d = x.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

/// `dst[t×n] = x[t×k] · Wᵀ` with `w` in PyTorch's row-major `[n × k]` layout, for a wide `n`
/// (a vocabulary): each weight row is one contiguous run the prefetcher streams, where the
/// transposed [`Weight`] layout would step a whole (vocabulary-wide) row per input. Up to
/// [`SKINNY_TOKENS`] rows of `x` share each pass over `w`; each value is the same dot product
/// whatever the other rows are.
pub fn by_rows<E: RowElement>(dst: &mut [f32], x: &[f32], w: &[E], k: usize, threads: usize) {
    if k == 0 {
        return dst.fill(0.0);
    }
    let n = w.len() / k;
    let tokens = x.len() / k;
    assert!(dst.len() >= tokens * n, "matmul bounds");
    let per_task = n.div_ceil(4 * threads.max(1)).max(1);
    let shared = SharedOut::new(dst);
    let task = |t: usize| {
        let (v0, v1) = (t * per_task, ((t + 1) * per_task).min(n));
        for first in (0..tokens).step_by(SKINNY_TOKENS) {
            let rows = SKINNY_TOKENS.min(tokens - first);
            let xs = &x[first * k..(first + rows) * k];
            let mut dots = [0.0f32; SKINNY_TOKENS];
            for v in v0..v1 {
                E::dots(xs, rows, &w[v * k..(v + 1) * k], &mut dots);
                for (r, &d) in dots.iter().enumerate().take(rows) {
                    // SAFETY: tasks write disjoint columns of `dst`, borrowed until the loop
                    // ends; (first + r, v) is in bounds (asserted above).
                    unsafe { *shared.at((first + r) * n + v) = d };
                }
            }
        }
    };
    let tasks = n.div_ceil(per_task);
    if threads <= 1 {
        (0..tasks).for_each(task);
    } else {
        super::team::for_each(tasks, &task);
    }
}

/// [`linear`] for up to [`FEW_TOKENS`] rows on AVX-512: a short input's tokens. Output columns
/// go in blocks of 32 (two vectors), each thread taking one contiguous range of blocks; within
/// a block, rows go in passes of up to 12 (24 accumulators) over the whole input dimension, so
/// each weight vector loaded feeds up to 12 fused multiply-adds, and the block's weights, read
/// once from memory (prefetched a few rows ahead: at these sizes the stream of weights from
/// L3 is the limit), serve the other passes from L2. Each value is the same sequence of
/// multiply-adds whatever the other rows are, so a row gets bit-identical results alone or
/// batched.
#[cfg(target_arch = "x86_64")]
fn few(dst: &mut [f32], x: &[f32], w: &Weight, accumulate: bool, threads: usize) {
    let (inp, out) = (w.rows, w.cols);
    let tokens = x.len() / inp;
    assert!(dst.len() >= tokens * out && x.len() >= tokens * inp, "matmul bounds");
    assert!(inp == 0 || w.offset + (inp - 1) * w.stride + out <= w.data.len(), "matmul bounds");
    let per_pass = tokens.div_ceil(tokens.div_ceil(avx512::ROWS).max(1)).max(1);
    let shared = SharedOut::new(dst);
    let block = |b: usize| {
        let c0 = b * avx512::COLS;
        let width = avx512::COLS.min(out - c0);
        for r0 in (0..tokens).step_by(per_pass) {
            let rows = per_pass.min(tokens - r0);
            // SAFETY: `linear` only comes here when the CPU has AVX-512F. Bounds: rows r0..r0+rows
            // of `x` and of `dst` (columns c0..c0+width) are inside, as are the weight rows'
            // columns c0..c0+width (asserted above); each block runs once, writing its own
            // columns of `dst`, borrowed until the loop ends.
            unsafe {
                avx512::block(
                    x.as_ptr().add(r0 * inp),
                    rows,
                    inp,
                    w.data.as_ptr().add(w.offset + c0),
                    w.stride,
                    shared.at(r0 * out + c0),
                    out,
                    width,
                    accumulate,
                )
            };
        }
    };
    // One run of blocks per thread: finer tasks measured slower (shorter runs of each weight row).
    super::team::for_runs(out.div_ceil(avx512::COLS), threads, &block);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Output columns per block: two vectors.
    pub const COLS: usize = 32;
    /// Rows per pass: 2·12 accumulators, two weight vectors and a broadcast fit 32 registers.
    pub const ROWS: usize = 12;
    /// How far ahead the weight rows are prefetched (measured: 8 to 32 alike, none 40% slower).
    const PREFETCH_ROWS: usize = 16;

    /// `dst[r, j] (+)= Σ_k x[r·inp + k] · w[k·stride + j]` for `r < rows` (at most [`ROWS`]) and
    /// `j < width` (at most [`COLS`]); `dst` rows are `dst_stride` apart.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds `rows·inp` floats, `w` `inp` rows of `width` floats
    /// `stride` apart, `dst` `rows` rows of `width` floats that nothing else accesses meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block(
        x: *const f32,
        rows: usize,
        inp: usize,
        w: *const f32,
        stride: usize,
        dst: *mut f32,
        dst_stride: usize,
        width: usize,
        accumulate: bool,
    ) {
        let masks = (lanes(width), lanes(width.saturating_sub(16)));
        let io = Io { x, inp, w, stride, dst, dst_stride, masks, accumulate };
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                0 => {}
                1 => pass::<1>(io),
                2 => pass::<2>(io),
                3 => pass::<3>(io),
                4 => pass::<4>(io),
                5 => pass::<5>(io),
                6 => pass::<6>(io),
                7 => pass::<7>(io),
                8 => pass::<8>(io),
                9 => pass::<9>(io),
                10 => pass::<10>(io),
                11 => pass::<11>(io),
                _ => pass::<12>(io),
            }
        }
    }

    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
    }

    #[derive(Clone, Copy)]
    struct Io {
        x: *const f32,
        inp: usize,
        w: *const f32,
        stride: usize,
        dst: *mut f32,
        dst_stride: usize,
        masks: (__mmask16, __mmask16),
        accumulate: bool,
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pass<const R: usize>(io: Io) {
        let (m0, m1) = io.masks;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY (whole body): within the bounds `block`'s caller guarantees; masked-off lanes
        // are never accessed.
        unsafe {
            if io.accumulate {
                for (r, a) in acc.iter_mut().enumerate() {
                    let d = io.dst.add(r * io.dst_stride);
                    a[0] = _mm512_maskz_loadu_ps(m0, d);
                    a[1] = _mm512_maskz_loadu_ps(m1, d.add(16));
                }
            }
            for k in 0..io.inp {
                let wk = io.w.add(k * io.stride);
                // The block's rows are `stride` apart; fetch a few rows ahead (a prefetch past the
                // end is harmless: it never faults).
                let ahead = wk.wrapping_add(PREFETCH_ROWS * io.stride);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
                let w0 = _mm512_maskz_loadu_ps(m0, wk);
                let w1 = _mm512_maskz_loadu_ps(m1, wk.add(16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*io.x.add(r * io.inp + k));
                    a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(b, w1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let d = io.dst.add(r * io.dst_stride);
                _mm512_mask_storeu_ps(d, m0, a[0]);
                _mm512_mask_storeu_ps(d.add(16), m1, a[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `dots[r] = x_r · w` for the `rows` rows of `xs` (each `w.len()` long): `w` is loaded once
    /// per 8 values for all rows.
    #[target_feature(enable = "avx2,fma")]
    pub fn dots(xs: &[f32], rows: usize, w: &[f32], dots: &mut [f32; super::SKINNY_TOKENS]) {
        let k = w.len();
        assert!(rows <= dots.len() && xs.len() >= rows * k, "dot rows");
        // SAFETY: i + 8 <= k, within `w`.
        let load = |i: usize| unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
        finish(xs, rows, k, accumulate(xs, rows, k, load), |i| w[i], dots);
    }

    /// [`dots`] over f16 weights, widened 8 at a time with F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dots_f16(xs: &[f32], rows: usize, w: &[half::f16], dots: &mut [f32; super::SKINNY_TOKENS]) {
        let k = w.len();
        assert!(rows <= dots.len() && xs.len() >= rows * k, "dot rows");
        // SAFETY: i + 8 <= k, within `w` (8 halves are 16 bytes).
        let load = |i: usize| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast())) };
        finish(xs, rows, k, accumulate(xs, rows, k, load), |i| w[i].to_f32(), dots);
    }

    /// The 8-lane sums `Σ x_r[i..i+8] · load(i)` over the whole 8-wide body of each row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn accumulate(
        xs: &[f32],
        rows: usize,
        k: usize,
        load: impl Fn(usize) -> __m256,
    ) -> [__m256; super::SKINNY_TOKENS] {
        let mut acc = [_mm256_setzero_ps(); super::SKINNY_TOKENS];
        for i in (0..k / 8 * 8).step_by(8) {
            let wv = load(i);
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                // SAFETY: i + 8 <= k, within row r of `xs` (checked by the callers).
                *a = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xs.as_ptr().add(r * k + i)) }, wv, *a);
            }
        }
        acc
    }

    /// Horizontal sums of `acc` plus the scalar tail past the 8-wide body.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn finish(
        xs: &[f32],
        rows: usize,
        k: usize,
        acc: [__m256; super::SKINNY_TOKENS],
        w: impl Fn(usize) -> f32,
        dots: &mut [f32; super::SKINNY_TOKENS],
    ) {
        for (r, (d, a)) in dots.iter_mut().zip(&acc).enumerate().take(rows) {
            let hi = _mm256_extractf128_ps(*a, 1);
            let s = _mm_add_ps(_mm256_castps256_ps128(*a), hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            let tail: f32 = (k / 8 * 8..k).map(|i| xs[r * k + i] * w(i)).sum();
            *d = _mm_cvtss_f32(s) + tail;
        }
    }

    /// `out[r][j] = Σ_k x[r, k] · w[offset + k·stride + j]` for 16 columns `j` and every row
    /// `r < tokens`, four rows per pass over the weight block (which stays in L1 between
    /// passes). Reads 16 columns even at the matrix's edge: [`super::Weight`] rows are padded
    /// to whole cache lines.
    #[target_feature(enable = "avx2,fma")]
    pub fn skinny_block(
        x: &[f32],
        tokens: usize,
        inp: usize,
        w: &[f32],
        offset: usize,
        stride: usize,
        out: &mut [[f32; 16]; super::SKINNY_TOKENS],
    ) {
        assert!(tokens <= out.len() && x.len() >= tokens * inp, "skinny rows");
        assert!(inp == 0 || offset + (inp - 1) * stride + 16 <= w.len(), "skinny weight bounds");
        let mut r0 = 0;
        while r0 < tokens {
            let rows = (tokens - r0).min(4);
            let x = &x[r0 * inp..(r0 + rows) * inp];
            let out = &mut out[r0..r0 + rows];
            match rows {
                1 => pass::<1>(x, inp, w, offset, stride, out),
                2 => pass::<2>(x, inp, w, offset, stride, out),
                3 => pass::<3>(x, inp, w, offset, stride, out),
                _ => pass::<4>(x, inp, w, offset, stride, out),
            }
            r0 += rows;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn pass<const R: usize>(
        x: &[f32],
        inp: usize,
        w: &[f32],
        offset: usize,
        stride: usize,
        out: &mut [[f32; 16]],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in 0..inp {
            let at = offset + k * stride;
            // SAFETY: `skinny_block` checked that 16 values from the last row's `at` are in
            // `w`, and that `x` holds R rows of `inp`.
            unsafe {
                let w0 = _mm256_loadu_ps(w.as_ptr().add(at));
                let w1 = _mm256_loadu_ps(w.as_ptr().add(at + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*x.get_unchecked(r * inp + k));
                    a[0] = _mm256_fmadd_ps(b, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(b, w1, a[1]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: each row of `out` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], av: View, b: &[f32], bv: View) -> Vec<f32> {
        let at = |v: View, s: &[f32], i: usize, j: usize| s[v.offset + i * v.row_stride + j * v.col_stride];
        let mut out = vec![0.0; av.rows * bv.cols];
        for i in 0..av.rows {
            for j in 0..bv.cols {
                out[i * bv.cols + j] = (0..av.cols).map(|p| at(av, a, i, p) * at(bv, b, p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn strided_views_and_accumulation() {
        let buf: Vec<f32> = (0..600).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        // Q-like rows of 4 with stride 20, and a K-like transposed view of the same buffer.
        let q = View { offset: 3, rows: 5, cols: 4, row_stride: 20, col_stride: 1 };
        let k = View { offset: 9, rows: 5, cols: 4, row_stride: 20, col_stride: 1 }.t();
        let want = naive(&buf, q, &buf, k);
        let mut dst = vec![1.0; 25];
        gemm(&mut dst, View::dense(0, 5, 5), (&buf, q), (&buf, k), true, 1);
        assert!(dst.iter().zip(&want).all(|(d, w)| (d - (w + 1.0)).abs() < 1e-4));
        gemm(&mut dst, View::dense(0, 5, 5), (&buf, q), (&buf, k), false, 1);
        assert!(dst.iter().zip(&want).all(|(d, w)| (d - w).abs() < 1e-4));
    }

    #[test]
    fn padded_weights_multiply_like_dense_ones() {
        let (t, i, o) = (7, 5, 40);
        let x: Vec<f32> = (0..t * i).map(|v| (v % 5) as f32 - 2.0).collect();
        let w: Vec<f32> = (0..i * o).map(|v| (v % 7) as f32 * 0.5).collect();
        let want = naive(&x, View::dense(0, t, i), &w, View::dense(0, i, o));
        let weight = Weight::new(&w, i, o);
        assert_eq!(weight.stride % 32, 16, "odd number of cache lines");
        // The same matrix read from PyTorch's [out, in] layout, one output at a time.
        let transposed = Weight::from_output_rows(i, o, |out, row| {
            for (inp, r) in row.iter_mut().enumerate() {
                *r = w[inp * o + out];
            }
        });
        let dense = |w: &Weight| -> Vec<f32> {
            w.data[w.offset..].chunks(w.stride).take(w.rows).flat_map(|r| r[..w.cols].to_vec()).collect()
        };
        assert_eq!(dense(&transposed), w);
        assert_eq!(dense(&weight), w);
        let mut dst = vec![0.0; t * o];
        linear(&mut dst, &x, &weight, false, 1);
        assert_eq!(dst, want);
    }

    type Kernel = fn(&mut [f32], &[f32], &Weight, bool, usize);

    /// The few-row kernels this CPU runs: name, most rows, whether a row comes out bit-identical
    /// alone and batched, and the kernel.
    fn few_row_kernels() -> Vec<(&'static str, usize, bool, Kernel)> {
        let mut kernels: Vec<(&'static str, usize, bool, Kernel)> =
            vec![("linear", FEW_TOKENS, false, linear)];
        if super::super::Isa::best().has_avx2() {
            kernels.push(("skinny", SKINNY_TOKENS, true, skinny));
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::Isa::best() == super::super::Isa::Avx512 {
            kernels.push(("few", FEW_TOKENS, true, few));
        }
        let names: Vec<_> = kernels.iter().map(|k| k.0).collect();
        eprintln!("few-row kernels on this CPU: {names:?}");
        kernels
    }

    #[test]
    fn few_rows_multiply_like_many_and_alone_like_batched() {
        for (name, most, identical, kernel) in few_row_kernels() {
            for (i, o) in [(5, 40), (384, 37), (33, 16), (7, 100), (40, 70)] {
                let w: Vec<f32> = (0..i * o).map(|v| ((v * 31) % 17) as f32 * 0.25 - 2.0).collect();
                let weight = Weight::new(&w, i, o);
                for t in (1..=8).chain([11, 12, 13, 25, 30, FEW_TOKENS]).filter(|&t| t <= most) {
                    let x: Vec<f32> = (0..t * i).map(|v| ((v * 13) % 11) as f32 * 0.5 - 2.5).collect();
                    let want = naive(&x, View::dense(0, t, i), &w, View::dense(0, i, o));
                    for threads in [1, 2] {
                        let mut dst = vec![1.0; t * o];
                        kernel(&mut dst, &x, &weight, true, threads);
                        let ok = dst
                            .iter()
                            .zip(&want)
                            .all(|(d, w)| (d - (w + 1.0)).abs() <= 1e-3 * (1.0 + w.abs()));
                        assert!(ok, "{name}: {i}x{o}, {t} rows, {threads} threads");
                        if identical {
                            let mut alone = vec![0.0; o];
                            kernel(&mut alone, &x[(t - 1) * i..], &weight, false, threads);
                            kernel(&mut dst, &x, &weight, false, threads);
                            assert_eq!(
                                &dst[(t - 1) * o..],
                                &alone[..],
                                "{name}: the last row batched and alone"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_of_a_pytorch_layout_multiply_like_the_transpose() {
        for (k, n) in [(384, 37), (13, 20), (8, 3)] {
            let w: Vec<f32> = (0..n * k).map(|v| ((v * 29) % 19) as f32 * 0.125 - 1.0).collect();
            let wt = View::dense(0, n, k).t();
            for t in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..t * k).map(|v| ((v * 7) % 5) as f32 - 2.0).collect();
                let want = naive(&x, View::dense(0, t, k), &w, wt);
                for threads in [1, 2] {
                    let mut dst = vec![0.0; t * n];
                    by_rows(&mut dst, &x, &w, k, threads);
                    let ok = dst.iter().zip(&want).all(|(d, w)| (d - w).abs() <= 1e-3 * (1.0 + w.abs()));
                    assert!(ok, "{k}x{n}, {t} rows");
                    let mut alone = vec![0.0; n];
                    by_rows(&mut alone, &x[..k], &w, k, threads);
                    assert_eq!(&dst[..n], &alone[..], "the first row batched and alone");
                    // The weights are exact in f16 (multiples of 1/8 below 2): the same values.
                    let halves: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                    let mut from_halves = vec![0.0; t * n];
                    by_rows(&mut from_halves, &x, &halves, k, threads);
                    assert_eq!(from_halves, dst, "f16 weights, {k}x{n}, {t} rows");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "matmul bounds")]
    fn out_of_bounds_views_are_refused() {
        let buf = vec![0.0; 10];
        let mut dst = vec![0.0; 4];
        gemm(
            &mut dst,
            View::dense(0, 2, 2),
            (&buf, View::dense(4, 2, 4)),
            (&buf, View::dense(0, 4, 2)),
            false,
            1,
        );
    }
}
