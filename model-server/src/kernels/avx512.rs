//! The row kernels on 16 lanes (AVX-512F; DQ and VL for the masks and conversions). Tails go
//! through masked loads and stores instead of scalar code, so a 384-wide row is 24 vectors and
//! a 13-wide one is a single masked vector.

use std::arch::x86_64::*;

use super::coef::*;

/// The lanes of a 16-float chunk that exist: all of them, or the tail's.
#[inline]
fn mask(len: usize) -> __mmask16 {
    if len >= 16 { 0xFFFF } else { (1u16 << len) - 1 }
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn load(s: &[f32]) -> __m512 {
    // SAFETY: the mask only enables lanes inside `s`; masked-off lanes are never read.
    unsafe { _mm512_maskz_loadu_ps(mask(s.len()), s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn store(s: &mut [f32], v: __m512) {
    // SAFETY: as in `load`, for writes.
    unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), mask(s.len()), v) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn poly(x: __m512, c: &[f32]) -> __m512 {
    c.iter().fold(_mm512_setzero_ps(), |acc, &k| _mm512_fmadd_ps(acc, x, _mm512_set1_ps(k)))
}

/// The same polynomial as the scalar and AVX2 `exp`, 16 lanes at a time.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn exp(x: __m512) -> __m512 {
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(EXP_HI)), _mm512_set1_ps(EXP_LO));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(LOG2E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let p = poly(r, &EXP_P);
    let p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
}

#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn gelu(x: __m512) -> __m512 {
    let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let z = _mm512_max_ps(_mm512_min_ps(z, _mm512_set1_ps(ERF_CLAMP)), _mm512_set1_ps(-ERF_CLAMP));
    let z2 = _mm512_mul_ps(z, z);
    let erf = _mm512_div_ps(_mm512_mul_ps(z, poly(z2, &ERF_P)), poly(z2, &ERF_Q));
    let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
    _mm512_fmadd_ps(half_x, erf, half_x)
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (r, b) in row.chunks_mut(16).zip(bias.chunks(16)) {
            store(r, gelu(_mm512_add_ps(load(r), load(b))));
        }
    }
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
pub fn bias_sigmoid_gate(x: &mut [f32], bias: &[f32], a: f32, b: f32) {
    let (va, vb, one) = (_mm512_set1_ps(a), _mm512_set1_ps(b), _mm512_set1_ps(1.0));
    for row in x.chunks_exact_mut(bias.len()) {
        for (r, c) in row.chunks_mut(16).zip(bias.chunks(16)) {
            let v = _mm512_add_ps(load(r), load(c));
            let z = _mm512_mul_ps(v, _mm512_fmadd_ps(vb, _mm512_mul_ps(v, v), va));
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), z));
            store(r, _mm512_div_ps(v, _mm512_add_ps(one, e)));
        }
    }
}

/// [`super::small_attention`] on whole vectors: Kᵀ written out once (zero-padded to 16 keys),
/// then each query's scores 16 keys per vector (a broadcast of one query element against a row
/// of Kᵀ per multiply-add) and each output row held in registers over the values, where the
/// generic body spent a horizontal sum on every score and a load and store of the output row on
/// every value. Head sizes that are not a multiple of 16 (or above 128) take the generic body.
///
/// # Safety
/// As [`super::small_attention`].
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
pub unsafe fn small_attention(qkv: &[f32], h: super::HeadView, scratch: &mut [f32], out: *mut f32) {
    let (n, d) = (h.n, h.d);
    if n == 0 || !d.is_multiple_of(16) || d > 128 || n > 64 {
        // SAFETY: forwarded from the caller; this function has the features Avx512 needs.
        return unsafe { super::small_attention_body(qkv, h, scratch, out, super::Isa::Avx512) };
    }
    let padded = n.next_multiple_of(16);
    let end = |at: usize| at + (n - 1) * h.stride + d;
    assert!(end(h.q).max(end(h.k)).max(end(h.v)) <= qkv.len(), "attention head bounds");
    let (scores, kt) = scratch.split_at_mut(n * n);
    let kt = &mut kt[..d * padded];
    for j in 0..padded {
        for c in 0..d {
            kt[c * padded + j] = if j < n { qkv[h.k + j * h.stride + c] } else { 0.0 };
        }
    }
    // SAFETY (both): the rows of q, k and v are inside `qkv` (asserted above), `kt` holds d rows
    // of `padded`, `scores` n×n floats; `out` is the caller's.
    unsafe {
        match padded / 16 {
            1 => attention_scores::<1>(qkv, h, kt, scores),
            2 => attention_scores::<2>(qkv, h, kt, scores),
            3 => attention_scores::<3>(qkv, h, kt, scores),
            _ => attention_scores::<4>(qkv, h, kt, scores),
        }
    }
    softmax(scores, n);
    // SAFETY: as above.
    unsafe {
        match d / 16 {
            1 => attention_values::<1>(qkv, h, scores, out),
            2 => attention_values::<2>(qkv, h, scores, out),
            3 => attention_values::<3>(qkv, h, scores, out),
            4 => attention_values::<4>(qkv, h, scores, out),
            5 => attention_values::<5>(qkv, h, scores, out),
            6 => attention_values::<6>(qkv, h, scores, out),
            7 => attention_values::<7>(qkv, h, scores, out),
            _ => attention_values::<8>(qkv, h, scores, out),
        }
    }
}

/// `scores[i, j] = q_i · k_j` from Kᵀ (`kt`: d rows of 16·J keys), J vectors of keys per query.
///
/// # Safety
/// The n query rows of `h` are inside `qkv`; `kt` holds d·16·J floats, `scores` n·n.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn attention_scores<const J: usize>(qkv: &[f32], h: super::HeadView, kt: &[f32], scores: &mut [f32]) {
    let (n, d, padded) = (h.n, h.d, 16 * J);
    for i in 0..n {
        let mut acc = [_mm512_setzero_ps(); J];
        for c in 0..d {
            // SAFETY: per the contract.
            unsafe {
                let q = _mm512_set1_ps(*qkv.get_unchecked(h.q + i * h.stride + c));
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(q, _mm512_loadu_ps(kt.as_ptr().add(c * padded + 16 * v)), *a);
                }
            }
        }
        let row = &mut scores[i * n..(i + 1) * n];
        for (v, a) in acc.iter().enumerate() {
            store(&mut row[16 * v..], *a);
        }
    }
}

/// `out_i = Σ_j scores[i, j] · v_j` for head size 16·C, each output row in C registers.
///
/// # Safety
/// The n value rows of `h` are inside `qkv`; `out` is valid for the n rows of d floats that
/// `h` describes, which nothing else accesses meanwhile.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn attention_values<const C: usize>(qkv: &[f32], h: super::HeadView, scores: &[f32], out: *mut f32) {
    let n = h.n;
    for i in 0..n {
        let mut acc = [_mm512_setzero_ps(); C];
        for (j, &p) in scores[i * n..(i + 1) * n].iter().enumerate() {
            let p = _mm512_set1_ps(p);
            // SAFETY: per the contract.
            unsafe {
                let v = qkv.as_ptr().add(h.v + j * h.stride);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(p, _mm512_loadu_ps(v.add(16 * c)), *a);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: per the contract.
            unsafe { _mm512_storeu_ps(out.add(i * h.out_stride + 16 * c), *a) };
        }
    }
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
pub fn softmax(x: &mut [f32], n: usize) {
    for row in x.chunks_exact_mut(n) {
        // Masked-off lanes load as 0, so the max starts from −∞ with a masked max.
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in row.chunks(16) {
            // SAFETY: the mask keeps the load inside `c`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask(c.len()), c.as_ptr()) };
            vmax = _mm512_mask_max_ps(vmax, mask(c.len()), vmax, v);
        }
        let vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let mut vsum = _mm512_setzero_ps();
        for c in row.chunks_mut(16) {
            let e = exp(_mm512_sub_ps(load(c), vm));
            vsum = _mm512_mask_add_ps(vsum, mask(c.len()), vsum, e);
            store(c, e);
        }
        let vinv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        for c in row.chunks_mut(16) {
            store(c, _mm512_mul_ps(load(c), vinv));
        }
    }
}

#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
pub fn bias_layer_norm(x: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = bias.len();
    let inv_n = 1.0 / n as f32;
    for row in x.chunks_exact_mut(n) {
        // Pass 1: add the bias, sum (masked-off lanes are 0 in both).
        let mut vsum = _mm512_setzero_ps();
        for (c, b) in row.chunks_mut(16).zip(bias.chunks(16)) {
            let v = _mm512_add_ps(load(c), load(b));
            vsum = _mm512_add_ps(vsum, v);
            store(c, v);
        }
        let mean = _mm512_reduce_add_ps(vsum) * inv_n;
        // Pass 2: variance around the mean (two passes: no cancellation).
        let vmean = _mm512_set1_ps(mean);
        let mut vvar = _mm512_setzero_ps();
        for c in row.chunks(16) {
            let d = _mm512_maskz_sub_ps(mask(c.len()), load(c), vmean);
            vvar = _mm512_fmadd_ps(d, d, vvar);
        }
        let var = _mm512_reduce_add_ps(vvar) * inv_n;
        let vrstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        // Pass 3: normalise, scale, shift.
        for ((c, g), b) in row.chunks_mut(16).zip(gamma.chunks(16)).zip(beta.chunks(16)) {
            let d = _mm512_mul_ps(_mm512_sub_ps(load(c), vmean), vrstd);
            store(c, _mm512_fmadd_ps(d, load(g), load(b)));
        }
    }
}
