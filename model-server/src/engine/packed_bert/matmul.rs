//! Bounds-checked wrappers around the `gemm` crate (the micro-kernels candle itself uses), on
//! strided views of flat `f32` buffers, so attention can multiply slices of the packed QKV
//! matrix in place instead of copying heads out.

use gemm::Parallelism;

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

/// Dense row-major `dst[m×n] (+)= a[m×k] · b[k×n]`.
pub fn matmul(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    threads: usize,
) {
    gemm(
        dst,
        View::dense(0, m, n),
        (a, View::dense(0, m, k)),
        (b, View::dense(0, k, n)),
        accumulate,
        threads,
    );
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
