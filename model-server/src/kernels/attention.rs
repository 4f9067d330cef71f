//! Attention of one head over views into flat buffers: `out = softmax(Q·Kᵀ + mask)·V`, two
//! strided GEMMs straight on the projection outputs (or a key/value cache), no copies. The
//! 1/√d scale is the caller's (architectures fold it into Wq).

use std::cell::RefCell;

use super::Isa;
use super::gemm::{self as matmul, SharedOut, View};

thread_local! {
    /// Scores of the head this thread is working on, reused across calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Which keys a query may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Every key (encoders, cross-attention).
    None,
    /// Query `i` sees keys `0..=first + i`: the queries are the positions after `first` cached
    /// ones (a decoder extending its sequence).
    Causal { first: usize },
}

/// One head: `q` is n×d in `qs`, `k` and `v` are m×d in `kvs`, the result goes to the n×d
/// view `o` of `out`.
///
/// # Safety
/// No other thread may access the elements `o` covers in `out` meanwhile, and `out` must stay
/// borrowed for the loop that shares it.
pub unsafe fn attend_head(
    (qs, q): (&[f32], View),
    (kvs, k, v): (&[f32], View, View),
    (out, o): (&SharedOut, View),
    mask: Mask,
    isa: Isa,
) {
    let (n, m) = (q.rows, k.rows);
    if n == 0 || m == 0 {
        return;
    }
    SCORES.with_borrow_mut(|buf| {
        if buf.len() < n * m {
            buf.resize(n * m, 0.0);
        }
        let scores = &mut buf[..n * m];
        let sv = View::dense(0, n, m);
        matmul::gemm(scores, sv, (qs, q), (kvs, k.t()), false, 1);
        if let Mask::Causal { first } = mask {
            for (i, row) in scores.chunks_exact_mut(m).enumerate() {
                let visible = (first + i + 1).min(m);
                row[visible..].fill(f32::NEG_INFINITY);
            }
        }
        super::softmax(scores, m, isa);
        // SAFETY: forwarded from the caller.
        unsafe { out.gemm(o, (scores, sv), (kvs, v), false) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        m: usize,
        d: usize,
        first: Option<usize>,
    ) -> Vec<f32> {
        let mut out = vec![0.0; n * d];
        for i in 0..n {
            let visible = first.map_or(m, |f| (f + i + 1).min(m));
            let s: Vec<f32> =
                (0..visible).map(|j| (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum()).collect();
            let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                for c in 0..d {
                    out[i * d + c] += p / z * v[j * d + c];
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_naive_softmax_attention_with_and_without_a_causal_mask() {
        let (n, m, d) = (3, 5, 4);
        let val = |i: usize| ((i * 37) % 11) as f32 * 0.1 - 0.5;
        let q: Vec<f32> = (0..n * d).map(val).collect();
        let k: Vec<f32> = (0..m * d).map(|i| val(i + 3)).collect();
        let v: Vec<f32> = (0..m * d).map(|i| val(i + 7)).collect();
        // K and V interleaved in one cache buffer, as a decoder keeps them.
        let kv: Vec<f32> =
            (0..m).flat_map(|j| k[j * d..][..d].iter().chain(&v[j * d..][..d]).copied()).collect();
        let kview = View { offset: 0, rows: m, cols: d, row_stride: 2 * d, col_stride: 1 };
        let vview = View { offset: d, ..kview };
        for (mask, first) in [(Mask::None, None), (Mask::Causal { first: 2 }, Some(2))] {
            for isa in Isa::supported() {
                let mut out = vec![0.0; n * d];
                let shared = SharedOut::new(&mut out);
                // SAFETY: one task, writing the whole buffer.
                unsafe {
                    attend_head(
                        (&q, View::dense(0, n, d)),
                        (&kv, kview, vview),
                        (&shared, View::dense(0, n, d)),
                        mask,
                        isa,
                    )
                };
                let want = naive(&q, &k, &v, n, m, d, first);
                assert!(
                    out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
                    "{isa:?} {mask:?}: {out:?} vs {want:?}"
                );
            }
        }
    }
}
