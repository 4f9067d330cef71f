//! Convolutional-network kernels on channels-last (NHWC) feature maps: convolution (1x1 as a
//! matmul, depthwise as a channel-vector loop, anything else through im2col + matmul), max
//! pooling and nearest-neighbour upsampling. Channels last puts a pixel's channels side by side,
//! so a depthwise filter, a pooling window or a copied pixel is a run of contiguous floats the
//! compiler vectorizes; the loops are compiled twice (baseline and AVX2+FMA) and [`Isa`] picks.
//! Work is split over the current rayon pool by output rows.

use rayon::prelude::*;

use super::Isa;
use super::gemm::{View, Weight, gemm, linear};

/// A batch of feature maps, `[n, h, w, c]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Feature {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Feature {
        Feature { n, h, w, c, data: vec![0.0; n * h * w * c] }
    }

    /// From `[n, c, h, w]` (ONNX's layout).
    pub fn from_nchw(data: &[f32], n: usize, c: usize, h: usize, w: usize) -> Feature {
        let mut f = Feature::zeros(n, h, w, c);
        for (b, dst) in f.data.chunks_exact_mut(h * w * c).enumerate() {
            let src = &data[b * c * h * w..(b + 1) * c * h * w];
            for (p, px) in dst.chunks_exact_mut(c).enumerate() {
                for (ch, v) in px.iter_mut().enumerate() {
                    *v = src[ch * h * w + p];
                }
            }
        }
        f
    }

    /// To `[n, c, h, w]`.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (h, w, c) = (self.h, self.w, self.c);
        let mut out = vec![0.0; self.data.len()];
        for (b, src) in self.data.chunks_exact(h * w * c).enumerate() {
            let dst = &mut out[b * c * h * w..(b + 1) * c * h * w];
            for (p, px) in src.chunks_exact(c).enumerate() {
                for (ch, v) in px.iter().enumerate() {
                    dst[ch * h * w + p] = *v;
                }
            }
        }
        out
    }

    fn row_len(&self) -> usize {
        self.w * self.c
    }

    /// Pixel `(y, x)` of image `b`.
    fn pixel(&self, b: usize, y: usize, x: usize) -> &[f32] {
        let at = ((b * self.h + y) * self.w + x) * self.c;
        &self.data[at..at + self.c]
    }
}

/// Recycled output buffers: a network's maps come in the same few sizes on every run, and a
/// fresh allocation of megabytes costs page faults and zeroing each time. A buffer handed out
/// holds old values: only for kernels that write every element.
#[derive(Debug, Default)]
pub struct Buffers(Vec<Vec<f32>>);

impl Buffers {
    /// A buffer of `len` floats: the smallest kept one that holds them without being more than
    /// twice as large (a large buffer holding a small map could leave with the run's outputs),
    /// else a new one.
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        let fits = |v: &Vec<f32>| v.capacity() >= len && v.capacity() <= len.saturating_mul(2).max(1 << 16);
        let best = (0..self.0.len()).filter(|&i| fits(&self.0[i])).min_by_key(|&i| self.0[i].capacity());
        let mut v = match best {
            Some(i) => self.0.swap_remove(i),
            None => Vec::new(),
        };
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    pub fn give(&mut self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.0.push(v);
        }
    }

    /// Keep at most `bytes` (the smallest buffers), for the time until the next run.
    pub fn trim(&mut self, bytes: usize) {
        self.0.sort_by_key(Vec::capacity);
        let mut kept = 0;
        self.0.retain(|v| {
            kept += v.capacity() * 4;
            kept <= bytes
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kh: usize,
    pub kw: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl Window {
    /// Output height and width for an input, or None when the window does not fit once.
    pub fn output(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let ph = h + self.pad_top + self.pad_bottom;
        let pw = w + self.pad_left + self.pad_right;
        if ph < self.kh || pw < self.kw || self.stride_h == 0 || self.stride_w == 0 {
            return None;
        }
        Some(((ph - self.kh) / self.stride_h + 1, (pw - self.kw) / self.stride_w + 1))
    }

    /// The input rows (or columns) output index `o` reads: `[first, last)` of the kernel taps
    /// that land inside `0..size`, and the input index of the first tap.
    fn taps(o: usize, stride: usize, pad: usize, k: usize, size: usize) -> (usize, usize, isize) {
        let start = (o * stride) as isize - pad as isize;
        let first = (-start).max(0) as usize;
        let last = ((size as isize - start).max(0) as usize).min(k);
        (first, last.max(first), start)
    }
}

/// How a convolution runs.
enum Kind {
    /// 1x1, stride 1, no padding, one group: `[pixels, in] · [in, out]`.
    Pointwise(Weight),
    /// One filter per channel (`group == in == out`): taps `[kh·kw, c]`.
    Depthwise(Vec<f32>),
    /// Anything else: per group, the patch under each output pixel (`[kh·kw·in_g]`, channels
    /// innermost) times `[kh·kw·in_g, out_g]`.
    Im2col(Vec<Vec<f32>>),
}

/// A 2-D convolution with bias and an optional ReLU after it.
pub struct Conv2d {
    pub in_c: usize,
    pub out_c: usize,
    pub groups: usize,
    pub window: Window,
    pub relu: bool,
    bias: Vec<f32>,
    kind: Kind,
    /// One group, at most 64 outputs in whole AVX registers: the weights `[kh, kw, in, out]`
    /// for the direct AVX2 kernel, which keeps a pixel's outputs in registers (for the few
    /// channels of a detector's early layers the matmul's packing costs more than it saves).
    direct: Option<Vec<f32>>,
}

impl Conv2d {
    /// From ONNX's weight `[out, in / groups, kh, kw]` and bias `[out]` (zeros when absent).
    pub fn new(
        weight: &[f32],
        out_c: usize,
        in_per_group: usize,
        groups: usize,
        window: Window,
        bias: Option<&[f32]>,
    ) -> Result<Conv2d, String> {
        let (kh, kw) = (window.kh, window.kw);
        if groups == 0 || !out_c.is_multiple_of(groups) {
            return Err(format!("{out_c} output channels do not split into {groups} groups"));
        }
        if weight.len() != out_c * in_per_group * kh * kw {
            return Err(format!(
                "the weight holds {} values, not {out_c}x{in_per_group}x{kh}x{kw}",
                weight.len()
            ));
        }
        let bias = match bias {
            Some(b) if b.len() != out_c => {
                return Err(format!("the bias holds {} values for {out_c} outputs", b.len()));
            }
            Some(b) => b.to_vec(),
            None => vec![0.0; out_c],
        };
        let in_c = in_per_group * groups;
        let out_per_group = out_c / groups;
        let unit = window.stride_h == 1
            && window.stride_w == 1
            && window.pad_top + window.pad_left + window.pad_bottom + window.pad_right == 0;
        let kind = if kh == 1 && kw == 1 && unit && groups == 1 {
            Kind::Pointwise(Weight::from_output_rows(in_c, out_c, |o, row| {
                row.copy_from_slice(&weight[o * in_c..(o + 1) * in_c]);
            }))
        } else if groups == in_c && out_c == in_c {
            let mut taps = vec![0.0; kh * kw * in_c];
            for ch in 0..in_c {
                for t in 0..kh * kw {
                    taps[t * in_c + ch] = weight[ch * kh * kw + t];
                }
            }
            Kind::Depthwise(taps)
        } else {
            let k = kh * kw * in_per_group;
            let per_group = (0..groups)
                .map(|g| {
                    let mut m = vec![0.0; k * out_per_group];
                    for o in 0..out_per_group {
                        let filter = &weight[(g * out_per_group + o) * in_per_group * kh * kw..]
                            [..in_per_group * kh * kw];
                        for i in 0..in_per_group {
                            for t in 0..kh * kw {
                                m[(t * in_per_group + i) * out_per_group + o] = filter[i * kh * kw + t];
                            }
                        }
                    }
                    m
                })
                .collect();
            Kind::Im2col(per_group)
        };
        let direct = (groups == 1 && out_c.is_multiple_of(8) && out_c <= 64).then(|| {
            let mut m = vec![0.0; kh * kw * in_c * out_c];
            for o in 0..out_c {
                for i in 0..in_c {
                    for t in 0..kh * kw {
                        m[(t * in_c + i) * out_c + o] = weight[(o * in_c + i) * kh * kw + t];
                    }
                }
            }
            m
        });
        Ok(Conv2d { in_c, out_c, groups, window, relu: false, bias, kind, direct })
    }

    /// Run on `x`; the error names a shape that does not fit.
    pub fn forward(&self, x: &Feature, isa: Isa, buffers: &mut Buffers) -> Result<Feature, String> {
        if x.c != self.in_c {
            return Err(format!("takes {} channels, got {}", self.in_c, x.c));
        }
        let (oh, ow) = self.window.output(x.h, x.w).ok_or_else(|| {
            format!("a {}x{} window does not fit a {}x{} input", self.window.kh, self.window.kw, x.h, x.w)
        })?;
        let mut y = Feature { n: x.n, h: oh, w: ow, c: self.out_c, data: Vec::new() };
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(weights)) = (isa.has_avx2(), &self.direct) {
            y.data = buffers.take(x.n * oh * ow * self.out_c);
            let row = ow * self.out_c;
            // The kernel for this many 8-wide output registers.
            let kernel = avx2::DIRECT_ROW[self.out_c / 8 - 1];
            let run = |r: usize, out: &mut [f32]| {
                let (b, oy) = (r / oh, r % oh);
                // SAFETY: Avx2Fma is only chosen or forced on a CPU with AVX2 and FMA.
                unsafe { kernel(x, b, oy, out, weights, &self.bias, self.window, self.relu) }
            };
            y.data.par_chunks_mut(row).enumerate().for_each(|(r, out)| run(r, out));
            return Ok(y);
        }
        match &self.kind {
            Kind::Pointwise(w) => {
                y.data = buffers.take(x.n * oh * ow * self.out_c);
                y.data.chunks_exact_mut(self.out_c).for_each(|px| px.copy_from_slice(&self.bias));
                linear(&mut y.data, &x.data, w, true, rayon::current_num_threads());
                if self.relu {
                    relu(&mut y.data);
                }
            }
            Kind::Depthwise(taps) => {
                y.data = buffers.take(x.n * oh * ow * self.out_c);
                let row = ow * self.out_c;
                y.data.par_chunks_mut(row).enumerate().for_each(|(r, out)| {
                    let (b, oy) = (r / oh, r % oh);
                    depthwise_row(x, b, oy, out, taps, &self.bias, self.window, self.relu, isa);
                });
            }
            Kind::Im2col(per_group) => {
                y.data = buffers.take(x.n * oh * ow * self.out_c);
                let row = ow * self.out_c;
                y.data.par_chunks_mut(row).enumerate().for_each(|(r, out)| {
                    let (b, oy) = (r / oh, r % oh);
                    self.im2col_row(x, b, oy, out, per_group);
                });
            }
        }
        Ok(y)
    }

    fn im2col_row(&self, x: &Feature, b: usize, oy: usize, out: &mut [f32], per_group: &[Vec<f32>]) {
        let Window { kh, kw, stride_h, stride_w, pad_top, pad_left, .. } = self.window;
        let ow = out.len() / self.out_c;
        let in_g = self.in_c / self.groups;
        let out_g = self.out_c / self.groups;
        let k = kh * kw * in_g;
        let mut patches = vec![0.0f32; ow * k];
        for px in out.chunks_exact_mut(self.out_c) {
            px.copy_from_slice(&self.bias);
        }
        let (ky0, ky1, iy0) = Window::taps(oy, stride_h, pad_top, kh, x.h);
        for (g, weights) in per_group.iter().enumerate() {
            for (ox, patch) in patches.chunks_exact_mut(k).enumerate() {
                patch.fill(0.0);
                let (kx0, kx1, ix0) = Window::taps(ox, stride_w, pad_left, kw, x.w);
                for ky in ky0..ky1 {
                    let iy = (iy0 + ky as isize) as usize;
                    for kx in kx0..kx1 {
                        let ix = (ix0 + kx as isize) as usize;
                        let src = &x.pixel(b, iy, ix)[g * in_g..(g + 1) * in_g];
                        patch[(ky * kw + kx) * in_g..][..in_g].copy_from_slice(src);
                    }
                }
            }
            let dv = View { offset: g * out_g, rows: ow, cols: out_g, row_stride: self.out_c, col_stride: 1 };
            gemm(out, dv, (&patches, View::dense(0, ow, k)), (weights, View::dense(0, k, out_g)), true, 1);
        }
        if self.relu {
            relu(out);
        }
    }
}

/// One output row of a depthwise convolution.
#[allow(clippy::too_many_arguments)]
fn depthwise_row(
    x: &Feature,
    b: usize,
    oy: usize,
    out: &mut [f32],
    taps: &[f32],
    bias: &[f32],
    window: Window,
    relu: bool,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: Avx2Fma and above are only chosen (Isa::chosen) or forced (tests, after
        // is_supported) on a CPU with AVX2 and FMA.
        return unsafe { depthwise_row_avx2(x, b, oy, out, taps, bias, window, relu) };
    }
    let _ = isa;
    depthwise_row_body(x, b, oy, out, taps, bias, window, relu, false);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_row_avx2(
    x: &Feature,
    b: usize,
    oy: usize,
    out: &mut [f32],
    taps: &[f32],
    bias: &[f32],
    window: Window,
    relu: bool,
) {
    depthwise_row_body(x, b, oy, out, taps, bias, window, relu, true);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_row_body(
    x: &Feature,
    b: usize,
    oy: usize,
    out: &mut [f32],
    taps: &[f32],
    bias: &[f32],
    window: Window,
    relu: bool,
    simd: bool,
) {
    let c = x.c;
    let Window { kh, kw, stride_h, stride_w, pad_top, pad_left, .. } = window;
    let (ky0, ky1, iy0) = Window::taps(oy, stride_h, pad_top, kh, x.h);
    let image = &x.data[b * x.h * x.row_len()..(b + 1) * x.h * x.row_len()];
    let row = |ky: usize| &image[(iy0 + ky as isize) as usize * x.row_len()..][..x.row_len()];
    // The input rows under this output row: on the stack for kernels up to 3 rows (every
    // depthwise filter YuNet has), so the hot loop allocates nothing.
    let mut few: [&[f32]; 3] = [&[]; 3];
    let many: Vec<&[f32]>;
    let rows: &[&[f32]] = if ky1 - ky0 <= few.len() {
        for (slot, ky) in few.iter_mut().zip(ky0..ky1) {
            *slot = row(ky);
        }
        &few[..ky1 - ky0]
    } else {
        many = (ky0..ky1).map(row).collect();
        &many
    };
    // The 3x3 stride-1 filters of a MobileNet-style network: away from the left and right
    // borders every tap is in the row, and a pixel's sums stay in AVX registers.
    let mut interior = None;
    #[cfg(target_arch = "x86_64")]
    if simd && (kh, kw, stride_w, pad_left) == (3, 3, 1, 1) && out.len() / c == x.w && x.w >= 3 {
        let (first, last) = (1, x.w - 1);
        // SAFETY: `simd` is only set on the AVX2+FMA path (see `depthwise_row`).
        let done = unsafe {
            match c {
                8 => avx2::depthwise_3x3_interior::<1>(rows, ky0, out, taps, bias, first, last),
                16 => avx2::depthwise_3x3_interior::<2>(rows, ky0, out, taps, bias, first, last),
                32 => avx2::depthwise_3x3_interior::<4>(rows, ky0, out, taps, bias, first, last),
                64 => avx2::depthwise_3x3_interior::<8>(rows, ky0, out, taps, bias, first, last),
                _ => false,
            }
        };
        if done {
            interior = Some((first, last));
        }
    }
    for (ox, acc) in out.chunks_exact_mut(c).enumerate() {
        if interior.is_some_and(|(first, last)| ox >= first && ox < last) {
            continue;
        }
        acc.copy_from_slice(bias);
        let (kx0, kx1, ix0) = Window::taps(ox, stride_w, pad_left, kw, x.w);
        for (row, ky) in rows.iter().zip(ky0..ky1) {
            for kx in kx0..kx1 {
                let px = &row[(ix0 + kx as isize) as usize * c..][..c];
                let tap = &taps[(ky * kw + kx) * c..][..c];
                for ((a, &v), &t) in acc.iter_mut().zip(px).zip(tap) {
                    *a += v * t;
                }
            }
        }
    }
    if relu {
        relu_in_place(out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Feature, Window};

    /// [`direct_row`] for 8, 16, ... 64 outputs.
    pub type DirectRow = unsafe fn(&Feature, usize, usize, &mut [f32], &[f32], &[f32], Window, bool);
    pub const DIRECT_ROW: [DirectRow; 8] = [
        direct_row::<1>,
        direct_row::<2>,
        direct_row::<3>,
        direct_row::<4>,
        direct_row::<5>,
        direct_row::<6>,
        direct_row::<7>,
        direct_row::<8>,
    ];

    /// One output row of a one-group convolution with `8·V` outputs: per pixel, each input
    /// value broadcast and multiplied into all outputs at once, the sums in registers.
    /// `weights` is `[kh, kw, in, out]`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn direct_row<const V: usize>(
        x: &Feature,
        b: usize,
        oy: usize,
        out: &mut [f32],
        weights: &[f32],
        bias: &[f32],
        window: Window,
        relu: bool,
    ) {
        let (c, oc) = (x.c, V * 8);
        let Window { kh, kw, stride_h, stride_w, pad_top, pad_left, .. } = window;
        assert!(weights.len() >= kh * kw * c * oc && bias.len() >= oc, "direct convolution shapes");
        let (ky0, ky1, iy0) = Window::taps(oy, stride_h, pad_top, kh, x.h);
        let zero = _mm256_setzero_ps();
        for (ox, dst) in out.chunks_exact_mut(oc).enumerate() {
            let (kx0, kx1, ix0) = Window::taps(ox, stride_w, pad_left, kw, x.w);
            let mut acc = [zero; V];
            // SAFETY: `bias` holds `oc` values, each weight row `oc`, checked above; pixels
            // come from bounds-checked slices; `dst` holds `oc` values.
            unsafe {
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(bias.as_ptr().add(v * 8));
                }
                for ky in ky0..ky1 {
                    for kx in kx0..kx1 {
                        let px = x.pixel(b, (iy0 + ky as isize) as usize, (ix0 + kx as isize) as usize);
                        let w = weights.as_ptr().add((ky * kw + kx) * c * oc);
                        for (i, &value) in px.iter().enumerate() {
                            let bv = _mm256_set1_ps(value);
                            let wi = w.add(i * oc);
                            for (v, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(bv, _mm256_loadu_ps(wi.add(v * 8)), *a);
                            }
                        }
                    }
                }
                for (v, a) in acc.iter().enumerate() {
                    let a = if relu { _mm256_max_ps(*a, zero) } else { *a };
                    _mm256_storeu_ps(dst.as_mut_ptr().add(v * 8), a);
                }
            }
        }
    }

    /// Output pixels `first..last` of a 3x3, stride-1, padding-1 depthwise row of `8·V`
    /// channels, whose input rows (those inside the image) are `rows`, the first being kernel
    /// row `ky0`. False (nothing written) if the slices are too short for that.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn depthwise_3x3_interior<const V: usize>(
        rows: &[&[f32]],
        ky0: usize,
        out: &mut [f32],
        taps: &[f32],
        bias: &[f32],
        first: usize,
        last: usize,
    ) -> bool {
        let c = V * 8;
        if taps.len() < (ky0 + rows.len()) * 3 * c
            || bias.len() < c
            || out.len() < last * c
            || rows.iter().any(|r| r.len() < (last + 1) * c)
            || first == 0
        {
            return false;
        }
        for ox in first..last {
            // SAFETY: every offset below is within the lengths checked above.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); V];
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(bias.as_ptr().add(v * 8));
                }
                for (r, row) in rows.iter().enumerate() {
                    for kx in 0..3 {
                        let p = row.as_ptr().add((ox + kx - 1) * c);
                        let t = taps.as_ptr().add(((ky0 + r) * 3 + kx) * c);
                        for (v, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(
                                _mm256_loadu_ps(p.add(v * 8)),
                                _mm256_loadu_ps(t.add(v * 8)),
                                *a,
                            );
                        }
                    }
                }
                let o = out.as_mut_ptr().add(ox * c);
                for (v, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.add(v * 8), *a);
                }
            }
        }
        true
    }
}

pub fn relu(x: &mut [f32]) {
    relu_in_place(x);
}

#[inline(always)]
fn relu_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// Max pooling; padding never wins (it is -inf).
pub fn max_pool(x: &Feature, window: Window, buffers: &mut Buffers) -> Result<Feature, String> {
    let (oh, ow) = window
        .output(x.h, x.w)
        .ok_or_else(|| format!("a {}x{} pool does not fit a {}x{} input", window.kh, window.kw, x.h, x.w))?;
    let c = x.c;
    let mut y = Feature { n: x.n, h: oh, w: ow, c, data: buffers.take(x.n * oh * ow * c) };
    y.data.par_chunks_mut(ow * c).enumerate().for_each(|(r, out)| {
        let (b, oy) = (r / oh, r % oh);
        let (ky0, ky1, iy0) = Window::taps(oy, window.stride_h, window.pad_top, window.kh, x.h);
        for (ox, acc) in out.chunks_exact_mut(c).enumerate() {
            acc.fill(f32::NEG_INFINITY);
            let (kx0, kx1, ix0) = Window::taps(ox, window.stride_w, window.pad_left, window.kw, x.w);
            for ky in ky0..ky1 {
                for kx in kx0..kx1 {
                    let px = x.pixel(b, (iy0 + ky as isize) as usize, (ix0 + kx as isize) as usize);
                    for (a, &v) in acc.iter_mut().zip(px) {
                        *a = a.max(v);
                    }
                }
            }
        }
    });
    Ok(y)
}

/// Nearest-neighbour resize: output pixel `(y, x)` copies input pixel `(rows[y], cols[x])`.
pub fn gather_pixels(x: &Feature, rows: &[usize], cols: &[usize], buffers: &mut Buffers) -> Feature {
    let c = x.c;
    let (oh, ow) = (rows.len(), cols.len());
    let mut y = Feature { n: x.n, h: oh, w: ow, c, data: buffers.take(x.n * oh * ow * c) };
    y.data.par_chunks_mut(ow * c).enumerate().for_each(|(r, out)| {
        let (b, oy) = (r / oh, r % oh);
        for (px, &ix) in out.chunks_exact_mut(c).zip(cols) {
            px.copy_from_slice(x.pixel(b, rows[oy], ix));
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Convolution by its definition, on NCHW, for comparison.
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        weight: &[f32],
        out_c: usize,
        groups: usize,
        win: Window,
        bias: &[f32],
    ) -> Vec<f32> {
        let (oh, ow) = win.output(h, w).expect("fits");
        let in_g = c / groups;
        let out_g = out_c / groups;
        let mut y = vec![0.0; n * out_c * oh * ow];
        for b in 0..n {
            for o in 0..out_c {
                let g = o / out_g;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[o];
                        for i in 0..in_g {
                            for ky in 0..win.kh {
                                for kx in 0..win.kw {
                                    let iy = (oy * win.stride_h + ky) as isize - win.pad_top as isize;
                                    let ix = (ox * win.stride_w + kx) as isize - win.pad_left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let ch = g * in_g + i;
                                    acc += x[((b * c + ch) * h + iy as usize) * w + ix as usize]
                                        * weight[((o * in_g + i) * win.kh + ky) * win.kw + kx];
                                }
                            }
                        }
                        y[((b * out_c + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn window(k: usize, stride: usize, pad: usize) -> Window {
        Window {
            kh: k,
            kw: k,
            stride_h: stride,
            stride_w: stride,
            pad_top: pad,
            pad_left: pad,
            pad_bottom: pad,
            pad_right: pad,
        }
    }

    #[test]
    fn every_convolution_kind_matches_the_definition_on_each_isa() {
        // (in, out, groups, kernel, stride, pad): pointwise, depthwise, YuNet's first layer,
        // a grouped one, a depthwise with stride and odd sizes, a depthwise 5x5 (more input
        // rows per output row than the stack holds).
        let cases = [
            (16, 24, 1, 1, 1, 0),
            (16, 16, 16, 3, 1, 1),
            (3, 16, 1, 3, 2, 1),
            (8, 4, 2, 3, 1, 1),
            (12, 12, 12, 3, 2, 1),
            (1, 1, 1, 3, 1, 1),
            (8, 8, 8, 5, 1, 2),
        ];
        for isa in Isa::supported() {
            for &(c, out_c, groups, k, stride, pad) in &cases {
                let (n, h, w) = (2, 13, 10);
                let x = values(n * c * h * w, 7);
                let weight = values(out_c * (c / groups) * k * k, 11);
                let bias = values(out_c, 3);
                let win = window(k, stride, pad);
                let conv = Conv2d::new(&weight, out_c, c / groups, groups, win, Some(&bias)).expect("valid");
                let y = conv
                    .forward(&Feature::from_nchw(&x, n, c, h, w), isa, &mut Buffers::default())
                    .expect("runs");
                let want = reference(&x, (n, c, h, w), &weight, out_c, groups, win, &bias);
                let got = y.to_nchw();
                assert_eq!(got.len(), want.len());
                for (g, r) in got.iter().zip(&want) {
                    assert!(
                        (g - r).abs() < 1e-4,
                        "{isa:?} case {:?}: {g} vs {r}",
                        (c, out_c, groups, k, stride, pad)
                    );
                }
            }
        }
    }

    #[test]
    fn relu_pooling_and_nearest_upsampling() {
        let x = Feature::from_nchw(&values(2 * 3 * 4 * 6, 5), 2, 3, 4, 6);
        let pooled = max_pool(&x, window(2, 2, 0), &mut Buffers::default()).expect("fits");
        assert_eq!((pooled.h, pooled.w), (2, 3));
        for b in 0..2 {
            for y in 0..2 {
                for xx in 0..3 {
                    for ch in 0..3 {
                        let want = [(0, 0), (0, 1), (1, 0), (1, 1)]
                            .iter()
                            .map(|(dy, dx)| x.pixel(b, 2 * y + dy, 2 * xx + dx)[ch])
                            .fold(f32::NEG_INFINITY, f32::max);
                        assert_eq!(pooled.pixel(b, y, xx)[ch], want);
                    }
                }
            }
        }
        let up = gather_pixels(&pooled, &[0, 0, 1, 1], &[0, 0, 1, 1, 2, 2], &mut Buffers::default());
        assert_eq!(up.pixel(1, 3, 5), pooled.pixel(1, 1, 2));
        let weight = values(3 * 3 * 3 * 3, 1);
        let mut conv = Conv2d::new(&weight, 3, 3, 1, window(3, 1, 1), None).expect("valid");
        conv.relu = true;
        let y = conv.forward(&x, Isa::Scalar, &mut Buffers::default()).expect("runs");
        assert!(y.data.iter().all(|&v| v >= 0.0) && y.data.iter().any(|&v| v > 0.0));
        assert!(
            max_pool(&x, window(5, 1, 0), &mut Buffers::default()).is_err(),
            "a window larger than the input is refused"
        );
        assert!(
            conv.forward(&Feature::zeros(1, 4, 4, 2), Isa::Scalar, &mut Buffers::default()).is_err(),
            "channels are checked"
        );
    }
}
