//! YuNet's GPU path: the planned graph ([`Plan`], the same steps the CPU runs) on candle's ops,
//! float32, feature maps NCHW on the device (on a CUDA device: candle's convolution kernels and
//! cuBLAS). Only the heads' outputs come back to the CPU, for OpenCV's decoding and NMS as on
//! the CPU path.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::graph::{ConvKind, ConvSpec, Op, Output, Plan, reshape};
use crate::kernels::conv::{Feature, Window};
use crate::weights::onnx::Graph;

/// A convolution as candle runs it: ONNX's weight and bias on the device.
pub struct CandleConv {
    /// `[out, in / groups, kh, kw]`.
    weight: Tensor,
    /// `[1, out, 1, 1]`, added across the map.
    bias: Tensor,
    groups: usize,
    in_c: usize,
    window: Window,
    relu: bool,
}

impl ConvKind for CandleConv {
    type Context = Device;

    fn build(s: ConvSpec<'_>, device: &Device) -> Result<Self, String> {
        let w = s.window;
        if w.stride_h != w.stride_w {
            return Err(format!(
                "strides {}x{}: the GPU path's convolution takes one stride for both sides",
                w.stride_h, w.stride_w
            ));
        }
        if s.groups == 0 || !s.out_c.is_multiple_of(s.groups) {
            return Err(format!("{} output channels do not split into {} groups", s.out_c, s.groups));
        }
        let e = |e: candle_core::Error| e.to_string();
        let weight =
            Tensor::from_slice(s.weight, (s.out_c, s.in_per_group, w.kh, w.kw), device).map_err(e)?;
        let bias = match s.bias {
            Some(b) => Tensor::from_slice(b, (1, s.out_c, 1, 1), device),
            None => Tensor::zeros((1, s.out_c, 1, 1), DType::F32, device),
        }
        .map_err(e)?;
        Ok(CandleConv {
            weight,
            bias,
            groups: s.groups,
            in_c: s.in_per_group * s.groups,
            window: w,
            relu: false,
        })
    }

    fn in_channels(&self) -> usize {
        self.in_c
    }

    fn fuse_relu(&mut self) -> bool {
        !std::mem::replace(&mut self.relu, true)
    }
}

impl CandleConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.window;
        let even = w.pad_top == w.pad_bottom && w.pad_left == w.pad_right && w.pad_top == w.pad_left;
        // candle pads all four sides alike; other padding is added to the map first.
        let y = if even {
            x.conv2d(&self.weight, w.pad_top, w.stride_h, 1, self.groups)?
        } else {
            pad(x, w, 0.0)?.conv2d(&self.weight, 0, w.stride_h, 1, self.groups)?
        };
        let y = y.broadcast_add(&self.bias)?;
        if self.relu { y.relu() } else { Ok(y) }
    }
}

/// `x` (NCHW) with `window`'s padding of `value` around its height and width.
fn pad(x: &Tensor, w: Window, value: f32) -> candle_core::Result<Tensor> {
    let side = |x: Tensor, dim: usize, before: usize, after: usize| -> candle_core::Result<Tensor> {
        if before + after == 0 {
            return Ok(x);
        }
        let fill = |size: usize| {
            let mut shape = x.dims().to_vec();
            shape[dim] = size;
            Tensor::full(value, shape, x.device())
        };
        let mut parts = Vec::with_capacity(3);
        if before > 0 {
            parts.push(fill(before)?);
        }
        parts.push(x.clone());
        if after > 0 {
            parts.push(fill(after)?);
        }
        Tensor::cat(&parts, dim)
    };
    let x = side(x.clone(), 2, w.pad_top, w.pad_bottom)?;
    side(x, 3, w.pad_left, w.pad_right)
}

/// A planned graph on a candle device.
pub struct CandleProgram {
    plan: Plan<CandleConv>,
    device: Device,
}

impl CandleProgram {
    /// Plan `graph` with its convolutions on `device`; the error names the node and what about
    /// it is not run here.
    pub fn plan(graph: &Graph, device: &Device) -> Result<CandleProgram, String> {
        Ok(CandleProgram { plan: Plan::new(graph, device)?, device: device.clone() })
    }

    pub fn input_channels(&self) -> usize {
        self.plan.input_channels
    }

    /// Run on `input` (NHWC, as the CPU path takes it); every graph output by name.
    pub fn run(&self, input: Feature) -> Result<HashMap<String, Output>, String> {
        let (n, h, w, c) = (input.n, input.h, input.w, input.c);
        let e = |e: candle_core::Error| e.to_string();
        let x = Tensor::from_vec(input.data, (n, h, w, c), &self.device)
            .and_then(|t| t.permute((0, 3, 1, 2))?.contiguous())
            .map_err(e)?;
        let mut values: Vec<Option<Tensor>> = vec![None; self.plan.slots];
        values[self.plan.input] = Some(x);
        for step in &self.plan.steps {
            let err = |m: String| format!("node {:?}: {m}", step.node);
            let read = |slot: usize| -> Result<&Tensor, String> {
                values[slot].as_ref().ok_or_else(|| err("reads a value that was never computed".into()))
            };
            let x = read(step.inputs[0])?;
            let y = match &step.op {
                Op::Conv(conv) => conv.forward(x),
                Op::MaxPool(window) => pad(x, *window, f32::NEG_INFINITY).and_then(|p| {
                    p.max_pool2d_with_stride((window.kh, window.kw), (window.stride_h, window.stride_w))
                }),
                Op::Resize(nearest) => {
                    let (_, _, h, w) = x.dims4().map_err(|e| err(e.to_string()))?;
                    let index = |v: Vec<usize>| {
                        let v: Vec<u32> = v.into_iter().map(|i| i as u32).collect();
                        Tensor::new(v.as_slice(), &self.device)
                    };
                    index(nearest.indices(h, nearest.scale_h))
                        .and_then(|rows| x.index_select(&rows, 2))
                        .and_then(|y| y.index_select(&index(nearest.indices(w, nearest.scale_w))?, 3))
                }
                Op::Relu => x.relu(),
                Op::Sigmoid => candle_nn::ops::sigmoid(x),
                Op::Identity => Ok(x.clone()),
                Op::Add => {
                    let b = read(step.inputs[1])?;
                    if x.dims() != b.dims() {
                        return Err(err(format!(
                            "adds shapes {:?} and {:?}; broadcasting is not run here",
                            x.dims(),
                            b.dims()
                        )));
                    }
                    x + b
                }
                Op::Transpose(perm) => {
                    if perm.len() != x.rank() {
                        return Err(err(format!("perm {perm:?} does not fit shape {:?}", x.dims())));
                    }
                    x.permute(perm.clone()).and_then(|t| t.contiguous())
                }
                Op::Reshape(spec) => x.reshape(reshape(x.dims(), spec).map_err(err)?),
            }
            .map_err(|e| err(e.to_string()))?;
            values[step.output] = Some(y);
            for &slot in &step.frees {
                values[slot] = None;
            }
        }
        let mut out = HashMap::new();
        for (name, slot) in &self.plan.outputs {
            let t = values[*slot].as_ref().ok_or_else(|| format!("output {name:?} was not computed"))?;
            let data = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(e)?;
            out.insert(name.clone(), Output { shape: t.dims().to_vec(), data });
        }
        Ok(out)
    }
}
