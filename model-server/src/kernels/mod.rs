//! Kernels every architecture shares: [`gemm`] (float matmuls on packed and strided views),
//! [`quant`] (matmuls on GGUF quantized blocks), and here the row kernels, the element-wise work
//! between matmuls (bias + GELU, softmax, bias + residual + LayerNorm, attention over a short
//! input). Each has a portable scalar version, an AVX2+FMA version and an AVX-512 one
//! ([`avx512`]); [`Isa`] picks one at run time, so one binary is fast on current x86-64 and still
//! correct on any CPU or target, and a test can force each path.
//!
//! `exp` and `erf` are branch-free polynomials: libm's scalar versions (and `f32::round`, a libm
//! call on baseline x86-64) cost more than the matmuls they sit between.

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub mod conv;
pub mod encoder;
pub mod gemm;
pub mod quant;
pub mod team;

/// Which implementation the kernels use, slowest first: each level has everything the one
/// before it has, so a kernel written only up to AVX2 runs its AVX2 version on an AVX-512 CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Scalar,
    /// 256-bit AVX2 with fused multiply-add; only chosen when the CPU has both.
    Avx2Fma,
    /// 512-bit AVX-512 (F, BW, DQ, VL) with VNNI's int8 dot products, on top of AVX2, FMA and
    /// F16C: current Xeons and AMD Zen 4 and later.
    Avx512,
}

impl Isa {
    /// Every level, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512];

    /// The fastest implementation this CPU supports.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                let avx512 = has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512dq")
                    && has!("avx512vl")
                    && has!("avx512vnni")
                    && has!("f16c");
                return if avx512 { Isa::Avx512 } else { Isa::Avx2Fma };
            }
        }
        Isa::Scalar
    }

    /// What the models use: [`Isa::best`], lowered by `KILN_ENGINE_ISA` (`scalar`, `avx2` or
    /// `avx512`) to compare the paths on one machine; a level the CPU lacks is never chosen.
    pub fn chosen() -> Isa {
        let cap = std::env::var("KILN_ENGINE_ISA").ok().and_then(|v| Isa::from_name(&v));
        cap.map_or(Isa::best(), |cap| cap.min(Isa::best()))
    }

    /// `scalar`, `avx2` or `avx512` (any case).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn is_supported(self) -> bool {
        self <= Isa::best()
    }

    /// Every level this CPU supports, for tests that force each path.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// Whether the AVX2+FMA kernels may run (this level or a higher one).
    pub fn has_avx2(self) -> bool {
        self >= Isa::Avx2Fma
    }
}

/// Below this many floats a row kernel runs on the calling thread: a short input's LayerNorm
/// takes a few microseconds, less than handing half of it to another thread and waiting for it
/// (measured: the pool's wake-ups were a tenth of a batch-1 forward pass).
const PARALLEL_ROWS_MIN: usize = 16 * 1024;

/// Runs a row kernel over `data` (rows of `row_len`), one contiguous block per thread of the
/// current team or rayon pool ([`team::for_each`]), or on this thread when `data` is small.
pub fn par_rows(data: &mut [f32], row_len: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    let rows = data.len() / row_len.max(1);
    let threads = team::threads();
    if threads == 1 || rows < 2 || data.len() < PARALLEL_ROWS_MIN {
        return f(data);
    }
    let (block, len) = (rows.div_ceil(threads) * row_len, data.len());
    let out = gemm::SharedOut::new(data);
    team::for_each(len.div_ceil(block), &|b| {
        let start = b * block;
        // SAFETY: blocks are disjoint and inside `data`, which stays borrowed until the loop ends.
        f(unsafe { std::slice::from_raw_parts_mut(out.at(start), block.min(len - start)) })
    });
}

/// `x[r] = gelu(x[r] + bias)` for every row `r` of `x` (rows of `bias.len()`).
pub fn bias_gelu(x: &mut [f32], bias: &[f32], isa: Isa) {
    debug_assert_eq!(x.len() % bias.len(), 0);
    match isa {
        // SAFETY: `Isa::Avx2Fma` is only used when `is_supported` said the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { avx2::bias_gelu(x, bias) },
        // SAFETY: `Isa::Avx512` likewise only when the CPU has AVX-512 F/BW/DQ/VL.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::bias_gelu(x, bias) },
        _ => scalar::bias_gelu(x, bias),
    }
}

/// The feed-forward activations checkpoints declare (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with erf (`gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`): SigLIP.
    GeluTanh,
    /// `x·σ(1.702·x)` (`quick_gelu`): OpenAI's CLIP.
    QuickGelu,
}

impl Activation {
    /// The activation a `hidden_act` names, if the kernels have it.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            "quick_gelu" => Some(Activation::QuickGelu),
            _ => None,
        }
    }

    /// Both approximations are `x·σ(a·x + b·x³)`: 0.5·(1 + tanh(u)) = σ(2u).
    fn gate(self) -> (f32, f32) {
        // √(2/π), in f64 so the f32 constants are correctly rounded.
        let k = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
        match self {
            Activation::GeluTanh => ((2.0 * k) as f32, (2.0 * k * 0.044715) as f32),
            Activation::QuickGelu | Activation::Gelu => (1.702, 0.0),
        }
    }
}

/// `x[r] = act(x[r] + bias)` for every row `r` of `x` (rows of `bias.len()`).
pub fn bias_activation(x: &mut [f32], bias: &[f32], act: Activation, isa: Isa) {
    debug_assert_eq!(x.len() % bias.len(), 0);
    if act == Activation::Gelu {
        return bias_gelu(x, bias, isa);
    }
    let (a, b) = act.gate();
    match isa {
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { avx2::bias_sigmoid_gate(x, bias, a, b) },
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::bias_sigmoid_gate(x, bias, a, b) },
        _ => scalar::bias_sigmoid_gate(x, bias, a, b),
    }
}

/// Softmax of every row of `x` (rows of `n`), in place.
pub fn softmax(x: &mut [f32], n: usize, isa: Isa) {
    debug_assert_eq!(x.len() % n, 0);
    match isa {
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { avx2::softmax(x, n) },
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::softmax(x, n) },
        _ => scalar::softmax(x, n),
    }
}

/// Where one (input, head) of attention reads and writes: Q, K and V rows of `d` floats start at
/// `q`, `k` and `v` in the packed QKV matrix, `stride` apart; output rows start at `out`,
/// `out_stride` apart.
#[derive(Clone, Copy, Debug)]
pub struct HeadView {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub stride: usize,
    pub out_stride: usize,
    pub n: usize,
    pub d: usize,
}

/// `out_i = Σ_j softmax_j(q_i·k_j) v_j` for one (input, head), computed directly (the 1/√d
/// scale is folded into Wq). For a few dozen tokens this beats two GEMM calls, whose setup
/// costs more than the arithmetic. Its scratch (the scores, and Kᵀ padded to whole vectors of
/// keys) is the calling thread's, grown to the longest input seen and reused.
///
/// # Safety
/// `out` must be valid for writes of the `n` rows of `d` floats that `h` describes, and no
/// other thread may access them meanwhile.
pub unsafe fn small_attention(qkv: &[f32], h: HeadView, out: *mut f32, isa: Isa) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let need = h.n * h.n + h.d * h.n.next_multiple_of(16);
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        match isa {
            // SAFETY: as in `bias_gelu`; `out` forwarded from the caller.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::small_attention(qkv, h, scratch, out) },
            // SAFETY: as in `bias_gelu`; `out` forwarded from the caller.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::small_attention(qkv, h, scratch, out) },
            // SAFETY: forwarded from the caller.
            _ => unsafe { small_attention_body(qkv, h, scratch, out, Isa::Scalar) },
        }
    })
}

/// Eight independent partial sums, so the loop vectorises without reordering a reduction.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Inlined into each ISA's entry point, so the loops are compiled for that ISA.
///
/// # Safety
/// As [`small_attention`].
#[inline(always)]
unsafe fn small_attention_body(qkv: &[f32], h: HeadView, scores: &mut [f32], out: *mut f32, isa: Isa) {
    let (n, d) = (h.n, h.d);
    let scores = &mut scores[..n * n];
    for i in 0..n {
        let qi = &qkv[h.q + i * h.stride..][..d];
        for j in 0..n {
            scores[i * n + j] = dot(qi, &qkv[h.k + j * h.stride..][..d]);
        }
    }
    softmax(scores, n, isa);
    for i in 0..n {
        // SAFETY: row i of this head's output block, exclusively ours per the contract.
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * h.out_stride), d) };
        o.fill(0.0);
        for (j, &p) in scores[i * n..(i + 1) * n].iter().enumerate() {
            for (oc, vc) in o.iter_mut().zip(&qkv[h.v + j * h.stride..][..d]) {
                *oc += p * vc;
            }
        }
    }
}

/// A LayerNorm's scale and shift.
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// `x[r] = LayerNorm(x[r] + bias)` for every row `r` (rows of `bias.len()`). The residual is
/// already in `x`: the matmul before it accumulated onto the layer's input.
pub fn bias_layer_norm(x: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32, isa: Isa) {
    debug_assert_eq!(x.len() % bias.len(), 0);
    debug_assert!(gamma.len() == bias.len() && beta.len() == bias.len());
    match isa {
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { avx2::bias_layer_norm(x, bias, gamma, beta, eps) },
        // SAFETY: as in `bias_gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::bias_layer_norm(x, bias, gamma, beta, eps) },
        _ => scalar::bias_layer_norm(x, bias, gamma, beta, eps),
    }
}

/// Polynomial coefficients shared by both implementations.
mod coef {
    // exp(x) = 2^n · p(r), n = round(x·log2 e), r = x − n·ln 2 (ln 2 split in two for precision);
    // p is Cephes' expf polynomial. Inputs are clamped so that 2^n stays a normal float.
    pub const EXP_HI: f32 = 88.0;
    pub const EXP_LO: f32 = -87.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const EXP_P: [f32; 6] =
        [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

    // erf(x) = x·P(x²)/Q(x²) on [−4, 4] (outside it erf is ±1 in f32): Eigen's rational fit,
    // within 1e-7 of erf.
    pub const ERF_CLAMP: f32 = 4.0;
    pub const ERF_P: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    pub const ERF_Q: [f32; 5] =
        [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];
}

pub(crate) mod scalar {
    use super::coef::*;

    /// Round half to even without libm: adding 1.5·2^23 leaves no fraction bits.
    #[inline(always)]
    fn round(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0;
        (x + MAGIC) - MAGIC
    }

    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        let x = x.clamp(EXP_LO, EXP_HI);
        let n = round(x * LOG2E);
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = EXP_P.iter().fold(0.0, |acc, c| acc * r + c);
        let p = p * r * r + r + 1.0;
        // n is in [−126, 127], so the biased exponent is a normal one.
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    #[inline(always)]
    pub fn erf(x: f32) -> f32 {
        let x = x.clamp(-ERF_CLAMP, ERF_CLAMP);
        let x2 = x * x;
        let p = ERF_P.iter().fold(0.0, |acc, c| acc * x2 + c);
        let q = ERF_Q.iter().fold(0.0, |acc, c| acc * x2 + c);
        x * p / q
    }

    #[inline(always)]
    pub fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }

    #[inline(always)]
    pub fn sigmoid_gate(x: f32, a: f32, b: f32) -> f32 {
        x / (1.0 + exp(-x * (a + b * x * x)))
    }

    pub fn bias_sigmoid_gate(x: &mut [f32], bias: &[f32], a: f32, b: f32) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, c) in row.iter_mut().zip(bias) {
                *v = sigmoid_gate(*v + c, a, b);
            }
        }
    }

    pub fn softmax(x: &mut [f32], n: usize) {
        for row in x.chunks_exact_mut(n) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }

    pub fn bias_layer_norm(x: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let inv_n = 1.0 / bias.len() as f32;
        for row in x.chunks_exact_mut(bias.len()) {
            let mut sum = 0.0;
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
                sum += *v;
            }
            let mean = sum * inv_n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() * inv_n;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * rstd * g + b;
            }
        }
    }
}

/// The same kernels on 8 lanes. Tails shorter than 8 go through the scalar code.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::coef::*;
    use super::scalar;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(s: &[f32]) -> __m256 {
        assert!(s.len() >= 8);
        // SAFETY: `s` has at least 8 elements, and loadu has no alignment requirement.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store(s: &mut [f32], v: __m256) {
        assert!(s.len() >= 8);
        // SAFETY: as in `load`.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn poly(x: __m256, c: &[f32]) -> __m256 {
        c.iter().fold(_mm256_setzero_ps(), |acc, &k| _mm256_fmadd_ps(acc, x, _mm256_set1_ps(k)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(EXP_HI)), _mm256_set1_ps(EXP_LO));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let p = poly(r, &EXP_P);
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm256_max_ps(_mm256_min_ps(z, _mm256_set1_ps(ERF_CLAMP)), _mm256_set1_ps(-ERF_CLAMP));
        let z2 = _mm256_mul_ps(z, z);
        let erf = _mm256_div_ps(_mm256_mul_ps(z, poly(z2, &ERF_P)), poly(z2, &ERF_Q));
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_x, erf, half_x)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            let mut row = row.chunks_exact_mut(8);
            let mut b = bias.chunks_exact(8);
            for (r, b) in (&mut row).zip(&mut b) {
                store(r, gelu(_mm256_add_ps(load(r), load(b))));
            }
            for (v, b) in row.into_remainder().iter_mut().zip(b.remainder()) {
                *v = scalar::gelu(*v + b);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn bias_sigmoid_gate(x: &mut [f32], bias: &[f32], a: f32, b: f32) {
        let (va, vb, one) = (_mm256_set1_ps(a), _mm256_set1_ps(b), _mm256_set1_ps(1.0));
        for row in x.chunks_exact_mut(bias.len()) {
            let mut row = row.chunks_exact_mut(8);
            let mut bs = bias.chunks_exact(8);
            for (r, c) in (&mut row).zip(&mut bs) {
                let v = _mm256_add_ps(load(r), load(c));
                let z = _mm256_mul_ps(v, _mm256_fmadd_ps(vb, _mm256_mul_ps(v, v), va));
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), z));
                store(r, _mm256_div_ps(v, _mm256_add_ps(one, e)));
            }
            for (v, c) in row.into_remainder().iter_mut().zip(bs.remainder()) {
                *v = scalar::sigmoid_gate(*v + c, a, b);
            }
        }
    }

    /// # Safety
    /// As [`super::small_attention`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn small_attention(qkv: &[f32], h: super::HeadView, scores: &mut [f32], out: *mut f32) {
        // SAFETY: forwarded from the caller; this function has the features Avx2Fma needs.
        unsafe { super::small_attention_body(qkv, h, scores, out, super::Isa::Avx2Fma) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn softmax(x: &mut [f32], n: usize) {
        for row in x.chunks_exact_mut(n) {
            let split = n - n % 8;
            let (body, tail) = row.split_at_mut(split);
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in body.chunks_exact(8) {
                vmax = _mm256_max_ps(vmax, load(c));
            }
            let max = tail.iter().fold(hmax(vmax), |m, &v| m.max(v));
            let (vm, mut vsum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for c in body.chunks_exact_mut(8) {
                let e = exp(_mm256_sub_ps(load(c), vm));
                vsum = _mm256_add_ps(vsum, e);
                store(c, e);
            }
            let mut sum = hsum(vsum);
            for v in tail.iter_mut() {
                *v = scalar::exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            let vinv = _mm256_set1_ps(inv);
            for c in body.chunks_exact_mut(8) {
                store(c, _mm256_mul_ps(load(c), vinv));
            }
            tail.iter_mut().for_each(|v| *v *= inv);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn bias_layer_norm(x: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let n = bias.len();
        let split = n - n % 8;
        let inv_n = 1.0 / n as f32;
        for row in x.chunks_exact_mut(n) {
            let (body, tail) = row.split_at_mut(split);
            // Pass 1: add the bias, sum.
            let mut vsum = _mm256_setzero_ps();
            for (c, b) in body.chunks_exact_mut(8).zip(bias.chunks_exact(8)) {
                let v = _mm256_add_ps(load(c), load(b));
                vsum = _mm256_add_ps(vsum, v);
                store(c, v);
            }
            let mut sum = hsum(vsum);
            for (v, b) in tail.iter_mut().zip(&bias[split..]) {
                *v += b;
                sum += *v;
            }
            let mean = sum * inv_n;
            // Pass 2: variance around the mean (two passes: no cancellation).
            let vmean = _mm256_set1_ps(mean);
            let mut vvar = _mm256_setzero_ps();
            for c in body.chunks_exact(8) {
                let d = _mm256_sub_ps(load(c), vmean);
                vvar = _mm256_fmadd_ps(d, d, vvar);
            }
            let var = tail.iter().fold(hsum(vvar), |s, v| s + (v - mean) * (v - mean)) * inv_n;
            let rstd = 1.0 / (var + eps).sqrt();
            // Pass 3: normalise, scale, shift.
            let vrstd = _mm256_set1_ps(rstd);
            for ((c, g), b) in body.chunks_exact_mut(8).zip(gamma.chunks_exact(8)).zip(beta.chunks_exact(8)) {
                let d = _mm256_mul_ps(_mm256_sub_ps(load(c), vmean), vrstd);
                store(c, _mm256_fmadd_ps(d, load(g), load(b)));
            }
            for ((v, g), b) in tail.iter_mut().zip(&gamma[split..]).zip(&beta[split..]) {
                *v = (*v - mean) * rstd * g + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (exact to 1e-10 on [−4, 4]; beyond, 1 − erf < 2e-8).
    fn erf_ref(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Deterministic values in [−scale, scale].
    fn values(n: usize, scale: f32) -> Vec<f32> {
        let mut s = 0x2545_f491_u32;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn scalar_exp_and_erf_are_accurate() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (scalar::exp(x) as f64, (x as f64).exp());
            assert!((got / want - 1.0).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(scalar::exp(f32::NEG_INFINITY), scalar::exp(-87.0));
        for i in -6000..6000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (scalar::erf(x) as f64, erf_ref(x as f64));
            // A few f32 ulps of 1 near the clamp.
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
    }

    /// Every kernel on every supported ISA against the scalar one, with rows that have tails.
    #[test]
    fn simd_kernels_match_scalar() {
        // Each level this CPU has, named in the output so a run shows which paths it checked.
        eprintln!("ISA levels checked against scalar: {:?}", Isa::supported());
        for isa in Isa::supported() {
            simd_kernels_match_scalar_on(isa);
        }
    }

    /// Attention over one head of a packed QKV matrix (rows of 3·heads·d, this head's Q, K and V
    /// a third apart, the output one of `heads` column blocks), on every supported ISA, against
    /// softmax(Q·Kᵀ)·V in f64: head sizes that take the AVX-512 vectors (32, 64, 128) and one that
    /// does not (24), lengths inside and across whole vectors of keys.
    #[test]
    fn small_attention_matches_the_definition_on_each_isa() {
        for d in [24, 32, 64, 128] {
            for n in [1, 5, 16, 21, 33, 64] {
                let (heads, head) = (3, 1);
                let stride = 3 * heads * d;
                let qkv = values(n * stride, 1.5);
                let view = HeadView {
                    q: head * d,
                    k: heads * d + head * d,
                    v: 2 * heads * d + head * d,
                    stride,
                    out_stride: heads * d,
                    n,
                    d,
                };
                let at = |base: usize, i: usize, c: usize| qkv[base + i * stride + c] as f64;
                let mut want = vec![0.0f64; n * d];
                for i in 0..n {
                    let s: Vec<f64> =
                        (0..n).map(|j| (0..d).map(|c| at(view.q, i, c) * at(view.k, j, c)).sum()).collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        want[i * d + c] = (0..n).map(|j| e[j] / sum * at(view.v, j, c)).sum();
                    }
                }
                for isa in Isa::supported() {
                    let mut out = vec![f32::NAN; n * heads * d];
                    // SAFETY: from this head's first column, `out` holds the n rows of d floats,
                    // heads·d apart, that the view writes, and is ours.
                    unsafe { small_attention(&qkv, view, out.as_mut_ptr().add(head * d), isa) };
                    for i in 0..n {
                        for c in 0..d {
                            let (got, w) = (out[i * heads * d + head * d + c] as f64, want[i * d + c]);
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{isa:?} d={d} n={n} ({i}, {c}): {got} vs {w}"
                            );
                        }
                        let others = out[i * heads * d..][..heads * d].iter().enumerate();
                        assert!(
                            others.filter(|(c, _)| c / d != head).all(|(_, v)| v.is_nan()),
                            "{isa:?} wrote outside its head"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn isa_levels_are_ordered_and_named() {
        assert!(Isa::Scalar < Isa::Avx2Fma && Isa::Avx2Fma < Isa::Avx512);
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("AVX512"), Some(Isa::Avx512));
        assert_eq!(Isa::from_name("sse"), None);
        assert!(Isa::Scalar.is_supported() && Isa::chosen() <= Isa::best());
        assert!(Isa::Avx512.has_avx2() && !Isa::Scalar.has_avx2());
    }

    fn simd_kernels_match_scalar_on(isa: Isa) {
        for n in [1, 7, 8, 13, 16, 17, 64, 384, 390] {
            let x = values(3 * n, 6.0);
            let bias = values(n, 1.0);
            let gamma = values(n, 2.0);
            let beta = values(n, 0.5);
            let close =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 2e-6 * (1.0 + b.abs()));

            let (mut a, mut b) = (x.clone(), x.clone());
            bias_gelu(&mut a, &bias, isa);
            bias_gelu(&mut b, &bias, Isa::Scalar);
            assert!(close(&a, &b), "{isa:?} gelu n={n}");

            for act in [Activation::GeluTanh, Activation::QuickGelu] {
                let (mut a, mut b) = (x.clone(), x.clone());
                bias_activation(&mut a, &bias, act, isa);
                bias_activation(&mut b, &bias, act, Isa::Scalar);
                assert!(close(&a, &b), "{isa:?} {act:?} n={n}");
            }

            let (mut a, mut b) = (x.clone(), x.clone());
            softmax(&mut a, n, isa);
            softmax(&mut b, n, Isa::Scalar);
            assert!(close(&a, &b), "{isa:?} softmax n={n}");
            assert!(b.chunks(n).all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));

            let (mut a, mut b) = (x.clone(), x.clone());
            bias_layer_norm(&mut a, &bias, &gamma, &beta, 1e-12, isa);
            bias_layer_norm(&mut b, &bias, &gamma, &beta, 1e-12, Isa::Scalar);
            assert!(close(&a, &b), "{isa:?} layer norm n={n}");
        }
    }

    #[test]
    fn tanh_gelu_and_quick_gelu_match_their_definitions() {
        let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
        for i in -1000..1000 {
            let x = i as f64 / 100.0;
            let tanh = 0.5 * x * (1.0 + (c * (x + k * x * x * x)).tanh());
            let quick = x / (1.0 + (-1.702 * x).exp());
            for (act, want) in [(Activation::GeluTanh, tanh), (Activation::QuickGelu, quick)] {
                let mut got = [x as f32];
                bias_activation(&mut got, &[0.0], act, Isa::Scalar);
                assert!((got[0] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "{act:?}({x})");
            }
        }
        assert_eq!(Activation::from_name("gelu_pytorch_tanh"), Some(Activation::GeluTanh));
        assert_eq!(Activation::from_name("quick_gelu"), Some(Activation::QuickGelu));
        assert_eq!(Activation::from_name("relu"), None);
    }

    #[test]
    fn scalar_gelu_matches_the_erf_definition() {
        for i in -1000..1000 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x as f64 * (1.0 + erf_ref(x as f64 / std::f64::consts::SQRT_2));
            assert!((scalar::gelu(x) as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "gelu({x})");
        }
    }
}
