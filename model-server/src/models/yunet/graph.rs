//! An ONNX graph of the operators convolutional detectors like YuNet are exported with (Conv,
//! Relu, Sigmoid, MaxPool, Resize/Upsample nearest, Add, Transpose, Reshape, Constant,
//! Identity), planned once into steps on [`crate::kernels::conv`] and run on any input size.
//! Feature maps stay channels-last between steps; a `Transpose` to NHWC (how YuNet's heads
//! flatten their outputs) is then free. A ReLU right after a convolution runs inside it.

use std::collections::HashMap;

use crate::kernels::Isa;
use crate::kernels::conv::{Buffers, Conv2d, Feature, Window, gather_pixels, max_pool, relu};
use crate::weights::onnx::{Constant, Graph, Node};

/// A value between steps: a feature map (logically NCHW, stored NHWC) or a plain row-major
/// tensor.
#[derive(Debug, Clone)]
enum Value {
    Map(Feature),
    Dense { shape: Vec<usize>, data: Vec<f32> },
}

impl Value {
    fn shape(&self) -> Vec<usize> {
        match self {
            Value::Map(f) => vec![f.n, f.c, f.h, f.w],
            Value::Dense { shape, .. } => shape.clone(),
        }
    }

    fn into_map(self) -> Result<Feature, String> {
        match self {
            Value::Map(f) => Ok(f),
            Value::Dense { shape, data } => match shape[..] {
                [n, c, h, w] => Ok(Feature::from_nchw(&data, n, c, h, w)),
                _ => Err(format!("takes a 4-D NCHW tensor, got shape {shape:?}")),
            },
        }
    }

    fn into_dense(self) -> (Vec<usize>, Vec<f32>) {
        match self {
            Value::Map(f) => (vec![f.n, f.c, f.h, f.w], f.to_nchw()),
            Value::Dense { shape, data } => (shape, data),
        }
    }

    fn data_mut(&mut self) -> &mut [f32] {
        match self {
            Value::Map(f) => &mut f.data,
            Value::Dense { data, .. } => data,
        }
    }
}

/// How a nearest-neighbour resize maps an output index to an input one (ONNX's Resize
/// attributes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Nearest {
    pub scale_h: f32,
    pub scale_w: f32,
    coordinate: Coordinate,
    rounding: Rounding,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Coordinate {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

impl Nearest {
    /// The input index each of `floor(size · scale)` outputs reads.
    pub(super) fn indices(&self, size: usize, scale: f32) -> Vec<usize> {
        let out = (size as f32 * scale).floor() as usize;
        (0..out)
            .map(|o| {
                let o = o as f32;
                let x = match self.coordinate {
                    Coordinate::HalfPixel => (o + 0.5) / scale - 0.5,
                    Coordinate::PytorchHalfPixel if out > 1 => (o + 0.5) / scale - 0.5,
                    Coordinate::PytorchHalfPixel => 0.0,
                    Coordinate::AlignCorners if out > 1 => o * (size as f32 - 1.0) / (out as f32 - 1.0),
                    Coordinate::AlignCorners => 0.0,
                    Coordinate::Asymmetric => o / scale,
                    Coordinate::TfHalfPixelForNn => (o + 0.5) / scale,
                };
                let i = match self.rounding {
                    Rounding::Floor => x.floor(),
                    Rounding::Ceil => x.ceil(),
                    Rounding::RoundPreferFloor if x.fract() == 0.5 => x.floor(),
                    Rounding::RoundPreferCeil if x.fract() == 0.5 => x.ceil(),
                    Rounding::RoundPreferFloor | Rounding::RoundPreferCeil => x.round(),
                };
                (i.max(0.0) as usize).min(size.saturating_sub(1))
            })
            .collect()
    }
}

pub(super) enum Op<C> {
    Conv(C),
    Relu,
    Sigmoid,
    MaxPool(Window),
    Resize(Nearest),
    Add,
    Transpose(Vec<usize>),
    Reshape(Vec<i64>),
    Identity,
}

pub(super) struct Step<C> {
    pub node: String,
    pub op: Op<C>,
    pub inputs: Vec<usize>,
    pub output: usize,
    /// Values no later step reads, dropped after this one.
    pub frees: Vec<usize>,
}

/// A convolution as ONNX gives it: weight `[out, in / groups, kh, kw]`, bias `[out]`.
pub(super) struct ConvSpec<'a> {
    pub weight: &'a [f32],
    pub out_c: usize,
    pub in_per_group: usize,
    pub groups: usize,
    pub window: Window,
    pub bias: Option<&'a [f32]>,
}

/// A convolution in an executor's form: the packed CPU kernel's or candle's.
pub(super) trait ConvKind: Sized {
    /// What building one needs besides the ONNX weights (candle's device).
    type Context;
    fn build(spec: ConvSpec<'_>, context: &Self::Context) -> Result<Self, String>;
    fn in_channels(&self) -> usize;
    /// Apply a ReLU to the output; false when it already does.
    fn fuse_relu(&mut self) -> bool;
}

impl ConvKind for Conv2d {
    type Context = ();

    fn build(s: ConvSpec<'_>, _: &()) -> Result<Self, String> {
        Conv2d::new(s.weight, s.out_c, s.in_per_group, s.groups, s.window, s.bias)
    }

    fn in_channels(&self) -> usize {
        self.in_c
    }

    fn fuse_relu(&mut self) -> bool {
        !std::mem::replace(&mut self.relu, true)
    }
}

/// A graph planned into steps, each value in a slot, for any executor.
pub(super) struct Plan<C> {
    pub steps: Vec<Step<C>>,
    pub slots: usize,
    pub input: usize,
    pub input_channels: usize,
    pub outputs: Vec<(String, usize)>,
}

/// A planned graph: run it on a batch of NHWC images.
pub struct Program {
    plan: Plan<Conv2d>,
    /// Map buffers kept from one run to the next (runs are one at a time: the model's worker).
    buffers: std::sync::Mutex<Buffers>,
}

/// Map buffers a program keeps between runs: those of a 1080p frame.
const KEPT_BUFFER_BYTES: usize = 256 << 20;

/// The operators [`Program`] runs, for messages.
pub const OPERATORS: &str =
    "Conv, Relu, Sigmoid, MaxPool, Resize/Upsample (nearest), Add, Transpose, Reshape, Constant, Identity";

/// A graph output as a row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Program {
    /// Plan `graph`; the error names the node and what about it is not run here.
    pub fn plan(graph: &Graph) -> Result<Program, String> {
        Ok(Program { plan: Plan::new(graph, &())?, buffers: Default::default() })
    }
}

impl<C: ConvKind> Plan<C> {
    /// Plan `graph`, convolutions built with `context`; the error names the node and what
    /// about it is not run here.
    pub(super) fn new(graph: &Graph, context: &C::Context) -> Result<Plan<C>, String> {
        let [input] = &graph.inputs[..] else {
            return Err(format!(
                "the graph takes {} inputs; one image input is expected",
                graph.inputs.len()
            ));
        };
        let mut constants: HashMap<&str, &Constant> =
            graph.initializers.iter().map(|(k, v)| (k.as_str(), v)).collect();
        // How many times each value is read: a convolution's output read only by a Relu takes
        // the Relu into the convolution.
        let mut reads: HashMap<&str, usize> = HashMap::new();
        for name in graph.nodes.iter().flat_map(|n| n.inputs.iter()).chain(graph.outputs.iter()) {
            *reads.entry(name.as_str()).or_default() += 1;
        }
        let mut slots: HashMap<String, usize> = HashMap::new();
        slots.insert(input.clone(), 0);
        let mut steps: Vec<Step<C>> = Vec::new();
        let mut input_channels = None;
        for node in &graph.nodes {
            let err = |m: String| format!("node {:?} ({}): {m}", node.name, node.op_type);
            if node.op_type == "Constant" {
                let (Some(out), Some(value)) = (node.outputs.first(), node.tensor("value")) else {
                    return Err(err("only tensor constants (`value`) are read".into()));
                };
                constants.insert(out.as_str(), value);
                continue;
            }
            let data = |i: usize| -> Result<usize, String> {
                let name = node
                    .inputs
                    .get(i)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| err(format!("input {i} is missing")))?;
                slots.get(name).copied().ok_or_else(|| {
                    err(format!("input {name:?} is a constant or not computed before it; only data inputs are read here"))
                })
            };
            let constant = |i: usize| {
                node.inputs.get(i).filter(|n| !n.is_empty()).and_then(|n| constants.get(n.as_str()).copied())
            };
            let op = match node.op_type.as_str() {
                "Conv" => {
                    let conv: C = conv(node, constant(1), constant(2), context).map_err(err)?;
                    if data(0)? == 0 {
                        input_channels.get_or_insert(conv.in_channels());
                    }
                    Op::Conv(conv)
                }
                "Relu" => {
                    // Fuse into the convolution that produced the value, if only this reads it.
                    let x = data(0)?;
                    let source = node.inputs[0].as_str();
                    if let Some(step) = steps.iter_mut().rev().find(|s| s.output == x)
                        && let Op::Conv(c) = &mut step.op
                        && reads.get(source) == Some(&1)
                        && c.fuse_relu()
                    {
                        let out = node.outputs.first().ok_or_else(|| err("no output".into()))?;
                        slots.insert(out.clone(), x);
                        continue;
                    }
                    Op::Relu
                }
                "Sigmoid" => Op::Sigmoid,
                "Identity" => Op::Identity,
                "Add" => Op::Add,
                "MaxPool" => Op::MaxPool(pool(node).map_err(err)?),
                "Resize" | "Upsample" => Op::Resize(nearest(node, graph.opset, &constant).map_err(err)?),
                "Transpose" => Op::Transpose(match node.ints("perm") {
                    Some(p) => p
                        .iter()
                        .map(|&v| usize::try_from(v).map_err(|_| err(format!("perm {p:?}"))))
                        .collect::<Result<_, _>>()?,
                    None => vec![3, 2, 1, 0],
                }),
                "Reshape" => {
                    let shape = constant(1)
                        .and_then(Constant::ints)
                        .ok_or_else(|| err("the shape must be a constant".into()))?;
                    Op::Reshape(shape.to_vec())
                }
                other => {
                    return Err(err(format!(
                        "operator {other} is not run here; the face-detection family runs {OPERATORS}"
                    )));
                }
            };
            let inputs = match op {
                Op::Add => vec![data(0)?, data(1)?],
                _ => vec![data(0)?],
            };
            let [out] = &node.outputs[..] else {
                return Err(err(format!("{} outputs; one is read", node.outputs.len())));
            };
            let output = slots.len();
            slots.insert(out.clone(), output);
            steps.push(Step { node: node.name.clone(), op, inputs, output, frees: Vec::new() });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|name| {
                slots
                    .get(name)
                    .map(|&s| (name.clone(), s))
                    .ok_or_else(|| format!("output {name:?} is never computed"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Each value is dropped after the last step that reads it; outputs are kept.
        let mut last: HashMap<usize, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            for &x in &step.inputs {
                last.insert(x, i);
            }
        }
        for (&slot, &i) in &last {
            if !outputs.iter().any(|(_, s)| *s == slot) {
                steps[i].frees.push(slot);
            }
        }
        let input_channels = input_channels.ok_or("the input is not read by a convolution")?;
        Ok(Plan { steps, slots: slots.len(), input: 0, input_channels, outputs })
    }
}

impl Program {
    /// A buffer of `len` floats for the next input, from those kept between runs; it holds old
    /// values, to be overwritten.
    pub fn buffer(&self, len: usize) -> Vec<f32> {
        self.buffers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take(len)
    }

    /// Channels the input image must have.
    pub fn input_channels(&self) -> usize {
        self.plan.input_channels
    }

    /// Run on `input` (NHWC); every graph output by name.
    pub fn run(&self, input: Feature, isa: Isa) -> Result<HashMap<String, Output>, String> {
        // A panic elsewhere cannot leave the buffers half-written: they hold no invariant.
        let mut pool = self.buffers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.run_with(input, isa, &mut pool);
        pool.trim(KEPT_BUFFER_BYTES);
        result
    }

    fn run_with(
        &self,
        input: Feature,
        isa: Isa,
        buffers: &mut Buffers,
    ) -> Result<HashMap<String, Output>, String> {
        let mut values: Vec<Option<Value>> = vec![None; self.plan.slots];
        values[self.plan.input] = Some(Value::Map(input));
        for step in &self.plan.steps {
            let err = |m: String| format!("node {:?}: {m}", step.node);
            let x = step.inputs[0];
            // A value read for the last time is taken rather than copied.
            let take = |values: &mut Vec<Option<Value>>, slot: usize| -> Result<Value, String> {
                let v = if step.frees.contains(&slot) { values[slot].take() } else { values[slot].clone() };
                v.ok_or_else(|| err("reads a value that was never computed".into()))
            };
            let y = match &step.op {
                Op::Conv(conv) => {
                    let map = match &values[x] {
                        Some(Value::Map(f)) => conv.forward(f, isa, buffers),
                        _ => conv.forward(&take(&mut values, x)?.into_map().map_err(err)?, isa, buffers),
                    };
                    Value::Map(map.map_err(err)?)
                }
                Op::MaxPool(window) => {
                    let f = match &values[x] {
                        Some(Value::Map(f)) => max_pool(f, *window, buffers),
                        _ => max_pool(&take(&mut values, x)?.into_map().map_err(err)?, *window, buffers),
                    };
                    Value::Map(f.map_err(err)?)
                }
                Op::Resize(nearest) => {
                    let f = take(&mut values, x)?.into_map().map_err(err)?;
                    let rows = nearest.indices(f.h, nearest.scale_h);
                    let cols = nearest.indices(f.w, nearest.scale_w);
                    let y = gather_pixels(&f, &rows, &cols, buffers);
                    buffers.give(f.data);
                    Value::Map(y)
                }
                Op::Relu => {
                    let mut v = take(&mut values, x)?;
                    relu(v.data_mut());
                    v
                }
                Op::Sigmoid => {
                    let mut v = take(&mut values, x)?;
                    v.data_mut().iter_mut().for_each(|a| *a = 1.0 / (1.0 + (-*a).exp()));
                    v
                }
                Op::Identity => take(&mut values, x)?,
                Op::Add => {
                    let mut a = take(&mut values, x)?;
                    let b = take(&mut values, step.inputs[1])?;
                    // Both maps, or both plain: then the elements line up.
                    let b = match (&a, b) {
                        (Value::Map(_), b @ Value::Map(_))
                        | (Value::Dense { .. }, b @ Value::Dense { .. }) => b,
                        (Value::Map(_), b) => Value::Map(b.into_map().map_err(err)?),
                        (Value::Dense { .. }, b) => {
                            let (shape, data) = b.into_dense();
                            Value::Dense { shape, data }
                        }
                    };
                    if a.shape() != b.shape() {
                        return Err(err(format!(
                            "adds shapes {:?} and {:?}; broadcasting is not run here",
                            a.shape(),
                            b.shape()
                        )));
                    }
                    let (Value::Map(Feature { data: bd, .. }) | Value::Dense { data: bd, .. }) = b;
                    a.data_mut().iter_mut().zip(&bd).for_each(|(p, q)| *p += q);
                    buffers.give(bd);
                    a
                }
                Op::Transpose(perm) => transpose(take(&mut values, x)?, perm).map_err(err)?,
                Op::Reshape(spec) => {
                    let (shape, data) = take(&mut values, x)?.into_dense();
                    Value::Dense { shape: reshape(&shape, spec).map_err(err)?, data }
                }
            };
            values[step.output] = Some(y);
            for &slot in &step.frees {
                match values[slot].take() {
                    Some(Value::Map(f)) => buffers.give(f.data),
                    Some(Value::Dense { data, .. }) => buffers.give(data),
                    None => {}
                }
            }
        }
        let mut out = HashMap::new();
        for (name, slot) in &self.plan.outputs {
            let v = values[*slot].clone().ok_or_else(|| format!("output {name:?} was not computed"))?;
            let (shape, data) = v.into_dense();
            out.insert(name.clone(), Output { shape, data });
        }
        Ok(out)
    }
}

fn transpose(v: Value, perm: &[usize]) -> Result<Value, String> {
    // NCHW → NHWC of a map stored NHWC: its data already is the result.
    if let (Value::Map(f), [0, 2, 3, 1]) = (&v, perm) {
        let shape = vec![f.n, f.h, f.w, f.c];
        let Value::Map(f) = v else { unreachable!("matched above") };
        return Ok(Value::Dense { shape, data: f.data });
    }
    let (shape, data) = v.into_dense();
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    if sorted != (0..shape.len()).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} does not fit shape {shape:?}"));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; shape.len()];
    for _ in 0..data.len() {
        out.push(data[index.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum::<usize>()]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < out_shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Value::Dense { shape: out_shape, data: out })
}

/// ONNX's Reshape: 0 copies the input's dimension, -1 takes what is left.
pub(super) fn reshape(shape: &[usize], spec: &[i64]) -> Result<Vec<usize>, String> {
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        out.push(match d {
            0 => *shape.get(i).ok_or_else(|| format!("0 at {i} copies a dimension {shape:?} lacks"))?,
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            d if d > 0 => d as usize,
            _ => return Err(format!("shape {spec:?} is not valid")),
        });
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {shape:?} to {spec:?}"));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(format!("cannot reshape {shape:?} to {spec:?}"));
    }
    Ok(out)
}

fn pair(node: &Node, name: &str, default: usize) -> Result<(usize, usize), String> {
    match node.ints(name) {
        None => Ok((default, default)),
        Some([a, b]) if *a >= 0 && *b >= 0 => Ok((*a as usize, *b as usize)),
        Some(v) => Err(format!("`{name}` {v:?}: two non-negative values (2-D) are read")),
    }
}

/// Kernel, strides and padding of a 2-D Conv or MaxPool.
fn window(node: &Node, kernel: Option<(usize, usize)>) -> Result<Window, String> {
    if let Some(mode) = node.string("auto_pad").filter(|m| *m != "NOTSET" && *m != "VALID") {
        return Err(format!("auto_pad {mode} is not run here; export with explicit pads"));
    }
    if pair(node, "dilations", 1)? != (1, 1) {
        return Err("dilated windows are not run here".into());
    }
    let (kh, kw) = match (node.ints("kernel_shape"), kernel) {
        (Some(_), _) | (None, None) => pair(node, "kernel_shape", 0)?,
        (None, Some(k)) => k,
    };
    let (stride_h, stride_w) = pair(node, "strides", 1)?;
    let (pad_top, pad_left, pad_bottom, pad_right) = match node.ints("pads") {
        None => (0, 0, 0, 0),
        Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => {
            (t as usize, l as usize, b as usize, r as usize)
        }
        Some(p) => return Err(format!("pads {p:?}: four non-negative values (2-D) are read")),
    };
    if kh == 0 || kw == 0 || stride_h == 0 || stride_w == 0 {
        return Err("kernel and strides must be positive".into());
    }
    Ok(Window { kh, kw, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right })
}

fn conv<C: ConvKind>(
    node: &Node,
    weight: Option<&Constant>,
    bias: Option<&Constant>,
    context: &C::Context,
) -> Result<C, String> {
    let weight = weight.ok_or("the weight must be an initializer")?;
    let w = weight.floats().ok_or("the weight must be floating point")?;
    let [out_c, in_per_group, kh, kw] = weight.dims[..] else {
        return Err(format!("weight shape {:?}: 2-D convolutions are run here", weight.dims));
    };
    let groups = usize::try_from(node.int("group").unwrap_or(1)).map_err(|_| "negative group")?;
    let bias = match (node.inputs.get(2).filter(|n| !n.is_empty()), bias) {
        (None, _) => None,
        (Some(_), Some(b)) => Some(b.floats().ok_or("the bias must be floating point")?),
        (Some(_), None) => return Err("the bias must be an initializer".into()),
    };
    let window = window(node, Some((kh, kw)))?;
    C::build(ConvSpec { weight: w, out_c, in_per_group, groups, window, bias }, context)
}

fn pool(node: &Node) -> Result<Window, String> {
    if node.int("ceil_mode").unwrap_or(0) != 0 {
        return Err("ceil_mode 1 is not run here".into());
    }
    if node.int("storage_order").unwrap_or(0) != 0 || node.outputs.len() > 1 {
        return Err("pooling indices are not computed here".into());
    }
    window(node, None)
}

fn nearest<'a>(
    node: &Node,
    opset: i64,
    constant: &dyn Fn(usize) -> Option<&'a Constant>,
) -> Result<Nearest, String> {
    let mode = node.string("mode").unwrap_or("nearest");
    if mode != "nearest" {
        return Err(format!("mode {mode:?}: only nearest-neighbour resizing is run here"));
    }
    // Upsample (opset ≤ 9) and Resize 10 take scales second and sample asymmetric/floor;
    // Resize 11+ takes (X, roi, scales, sizes) with explicit modes.
    let legacy = node.op_type == "Upsample" || opset < 11;
    let scales = match (node.attributes.get("scales"), legacy) {
        (Some(crate::weights::onnx::Attribute::Floats(s)), _) => s.clone(),
        (_, true) => constant(1).and_then(Constant::floats).ok_or("scales must be a constant")?.to_vec(),
        (_, false) => match constant(2).and_then(Constant::floats) {
            Some(s) if !s.is_empty() => s.to_vec(),
            _ => return Err("scales must be a constant (resizing to fixed sizes is not run here)".into()),
        },
    };
    let &[sn, sc, scale_h, scale_w] = &scales[..] else {
        return Err(format!("scales {scales:?}: four (NCHW) are read"));
    };
    if sn != 1.0 || sc != 1.0 || !(scale_h > 0.0 && scale_w > 0.0) {
        return Err(format!("scales {scales:?}: only height and width may scale"));
    }
    let coordinate = match (legacy, node.string("coordinate_transformation_mode").unwrap_or("half_pixel")) {
        (true, _) | (false, "asymmetric") => Coordinate::Asymmetric,
        (false, "half_pixel") => Coordinate::HalfPixel,
        (false, "pytorch_half_pixel") => Coordinate::PytorchHalfPixel,
        (false, "align_corners") => Coordinate::AlignCorners,
        (false, "tf_half_pixel_for_nn") => Coordinate::TfHalfPixelForNn,
        (false, other) => return Err(format!("coordinate_transformation_mode {other:?} is not run here")),
    };
    let rounding = match (legacy, node.string("nearest_mode").unwrap_or("round_prefer_floor")) {
        (true, _) | (false, "floor") => Rounding::Floor,
        (false, "ceil") => Rounding::Ceil,
        (false, "round_prefer_floor") => Rounding::RoundPreferFloor,
        (false, "round_prefer_ceil") => Rounding::RoundPreferCeil,
        (false, other) => return Err(format!("nearest_mode {other:?} is not run here")),
    };
    Ok(Nearest { scale_h, scale_w, coordinate, rounding })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_and_transpose_follow_onnx() {
        assert_eq!(reshape(&[1, 4, 5, 2], &[1, -1, 2]), Ok(vec![1, 20, 2]));
        assert_eq!(reshape(&[2, 3], &[0, 3]), Ok(vec![2, 3]));
        assert!(reshape(&[2, 3], &[4, -1]).is_err());
        let v = Value::Dense { shape: vec![2, 3], data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0] };
        let Value::Dense { shape, data } = transpose(v, &[1, 0]).expect("valid") else { panic!("dense") };
        assert_eq!((shape, data), (vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]));
        // NCHW → NHWC of a map is its own storage; the general path agrees.
        let f = Feature::from_nchw(&(0..24).map(|i| i as f32).collect::<Vec<_>>(), 1, 2, 3, 4);
        let Value::Dense { data: fast, .. } = transpose(Value::Map(f.clone()), &[0, 2, 3, 1]).expect("valid")
        else {
            panic!("dense")
        };
        let (shape, data) = Value::Map(f).into_dense();
        let Value::Dense { data: slow, .. } =
            transpose(Value::Dense { shape, data }, &[0, 2, 3, 1]).expect("valid")
        else {
            panic!("dense")
        };
        assert_eq!(fast, slow);
    }

    #[test]
    fn nearest_indices_follow_the_coordinate_modes() {
        let n = |coordinate, rounding| Nearest { scale_h: 2.0, scale_w: 2.0, coordinate, rounding };
        assert_eq!(n(Coordinate::Asymmetric, Rounding::Floor).indices(3, 2.0), [0, 0, 1, 1, 2, 2]);
        assert_eq!(n(Coordinate::HalfPixel, Rounding::RoundPreferFloor).indices(3, 2.0), [0, 0, 1, 1, 2, 2]);
        assert_eq!(n(Coordinate::AlignCorners, Rounding::RoundPreferFloor).indices(2, 2.0), [0, 0, 1, 1]);
        assert_eq!(n(Coordinate::Asymmetric, Rounding::Floor).indices(4, 0.5), [0, 2]);
    }
}
