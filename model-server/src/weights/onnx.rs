//! ONNX files: the graph (nodes in topological order, as the format requires), its
//! initializers and attributes, decoded from protobuf with `prost` into plain Rust values. Only
//! what a convolutional network needs is kept: float32/float16/int64/int32 tensors stored in the
//! file (external data is refused by name) and scalar, list and tensor attributes.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use crate::models::ModelError;

/// The parts of `onnx.proto` read here, with its field numbers; prost skips the rest.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(float, tag = "2")]
        pub f: f32,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(bytes = "vec", tag = "4")]
        pub s: Vec<u8>,
        #[prost(message, optional, tag = "5")]
        pub t: Option<TensorProto>,
        #[prost(float, repeated, tag = "7")]
        pub floats: Vec<f32>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int32, repeated, tag = "5")]
        pub int32_data: Vec<i32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }
}

/// A tensor stored in the file: an initializer or a `Constant`.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub dims: Vec<usize>,
    pub data: ConstantData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConstantData {
    /// float32, and float16 widened.
    F32(Vec<f32>),
    /// int64, and int32 widened.
    I64(Vec<i64>),
}

impl Constant {
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn floats(&self) -> Option<&[f32]> {
        match &self.data {
            ConstantData::F32(v) => Some(v),
            ConstantData::I64(_) => None,
        }
    }

    pub fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            ConstantData::I64(v) => Some(v),
            ConstantData::F32(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    String(String),
    Tensor(Constant),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    /// A kind not read here (graphs, sparse tensors, string lists).
    Other,
}

/// One operator application.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name, or `op_type` and its first output when the exporter left it empty.
    pub name: String,
    pub op_type: String,
    /// Empty names are inputs left out (an optional input before a given one).
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, Attribute>,
}

impl Node {
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.attributes.get(name) {
            Some(Attribute::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.attributes.get(name) {
            Some(Attribute::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn string(&self, name: &str) -> Option<&str> {
        match self.attributes.get(name) {
            Some(Attribute::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&Constant> {
        match self.attributes.get(name) {
            Some(Attribute::Tensor(t)) => Some(t),
            _ => None,
        }
    }
}

/// A model's graph as read from its file.
#[derive(Debug, Clone)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub initializers: HashMap<String, Constant>,
    /// Graph inputs that are not initializers: what the caller feeds.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// The default domain's operator set version.
    pub opset: i64,
    pub producer: String,
}

/// Read an ONNX file.
pub fn read(path: &Path) -> Result<Graph, ModelError> {
    let err = |message: String| ModelError::Files { path: path.display().to_string(), message };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    super::progress::read(bytes.len());
    decode(&bytes).map_err(err)
}

/// Decode an ONNX model from its bytes; the error says what is wrong with them.
pub fn decode(bytes: &[u8]) -> Result<Graph, String> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.ok_or("not an ONNX model: it has no graph")?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or("the model imports no version of the default ONNX operator set")?;
    let mut initializers = HashMap::new();
    for t in graph.initializer {
        let name = t.name.clone();
        initializers.insert(name.clone(), constant(t).map_err(|e| format!("initializer {name:?}: {e}"))?);
    }
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in graph.node {
        let name = if n.name.is_empty() {
            format!("{} -> {}", n.op_type, n.output.first().map_or("?", String::as_str))
        } else {
            n.name
        };
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return Err(format!(
                "node {name:?} is {} from domain {:?}, not a standard ONNX operator",
                n.op_type, n.domain
            ));
        }
        let mut attributes = HashMap::new();
        for a in n.attribute {
            let value = attribute(&a).map_err(|e| format!("node {name:?}, attribute {:?}: {e}", a.name))?;
            attributes.insert(a.name, value);
        }
        nodes.push(Node { name, op_type: n.op_type, inputs: n.input, outputs: n.output, attributes });
    }
    let inputs = graph.input.into_iter().map(|v| v.name).filter(|n| !initializers.contains_key(n)).collect();
    let outputs = graph.output.into_iter().map(|v| v.name).collect();
    Ok(Graph { nodes, initializers, inputs, outputs, opset, producer: model.producer_name })
}

/// `AttributeProto.AttributeType`'s values.
mod attribute_type {
    pub const FLOAT: i32 = 1;
    pub const INT: i32 = 2;
    pub const STRING: i32 = 3;
    pub const TENSOR: i32 = 4;
    pub const FLOATS: i32 = 6;
    pub const INTS: i32 = 7;
}

fn attribute(a: &proto::AttributeProto) -> Result<Attribute, String> {
    Ok(match a.r#type {
        attribute_type::FLOAT => Attribute::Float(a.f),
        attribute_type::INT => Attribute::Int(a.i),
        attribute_type::STRING => Attribute::String(String::from_utf8_lossy(&a.s).into_owned()),
        attribute_type::TENSOR => match &a.t {
            Some(t) => Attribute::Tensor(constant(t.clone())?),
            None => return Err("a tensor attribute without its tensor".into()),
        },
        attribute_type::FLOATS => Attribute::Floats(a.floats.clone()),
        attribute_type::INTS => Attribute::Ints(a.ints.clone()),
        _ => Attribute::Other,
    })
}

/// `TensorProto.DataType`'s values read here.
mod data_type {
    pub const FLOAT: i32 = 1;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const FLOAT16: i32 = 10;
}

fn constant(t: proto::TensorProto) -> Result<Constant, String> {
    if t.data_location == 1 {
        return Err(
            "stored outside the file (external data): export the model with its weights inside".into()
        );
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<Result<Vec<usize>, String>>()?;
    let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("its dimensions overflow")?;
    let raw = &t.raw_data;
    let data = match t.data_type {
        data_type::FLOAT if !raw.is_empty() => ConstantData::F32(
            raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ),
        data_type::FLOAT => ConstantData::F32(t.float_data),
        data_type::FLOAT16 if !raw.is_empty() => ConstantData::F32(
            raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ),
        // float16 values kept as their bits in int32_data.
        data_type::FLOAT16 => {
            ConstantData::F32(t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f32()).collect())
        }
        data_type::INT64 if !raw.is_empty() => ConstantData::I64(
            raw.chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        ),
        data_type::INT64 => ConstantData::I64(t.int64_data),
        data_type::INT32 if !raw.is_empty() => ConstantData::I64(
            raw.chunks_exact(4).map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
        ),
        data_type::INT32 => ConstantData::I64(t.int32_data.iter().map(|&v| i64::from(v)).collect()),
        other => {
            return Err(format!("data type {other} is not read here (float32, float16, int64, int32 are)"));
        }
    };
    let got = match &data {
        ConstantData::F32(v) => v.len(),
        ConstantData::I64(v) => v.len(),
    };
    if got != len {
        return Err(format!("holds {got} values for dimensions {dims:?} ({len})"));
    }
    Ok(Constant { dims, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dims: &[i64], values: &[f32]) -> proto::TensorProto {
        proto::TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::FLOAT,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_graph_round_trips_through_protobuf() {
        let model = proto::ModelProto {
            ir_version: 6,
            producer_name: "test".into(),
            opset_import: vec![proto::OperatorSetIdProto { domain: String::new(), version: 11 }],
            graph: Some(proto::GraphProto {
                node: vec![proto::NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["y".into()],
                    op_type: "Conv".into(),
                    attribute: vec![proto::AttributeProto {
                        name: "strides".into(),
                        ints: vec![2, 2],
                        r#type: attribute_type::INTS,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                initializer: vec![
                    tensor("w", &[1, 1, 1, 2], &[0.5, -1.0]),
                    proto::TensorProto {
                        dims: vec![3],
                        data_type: data_type::INT64,
                        int64_data: vec![1, -1, 4],
                        name: "shape".into(),
                        ..Default::default()
                    },
                ],
                input: vec![
                    proto::ValueInfoProto { name: "x".into() },
                    proto::ValueInfoProto { name: "w".into() },
                ],
                output: vec![proto::ValueInfoProto { name: "y".into() }],
            }),
        };
        let graph = decode(&model.encode_to_vec()).expect("decodes");
        assert_eq!(graph.opset, 11);
        assert_eq!(graph.inputs, ["x"], "initializers are not inputs");
        assert_eq!(graph.outputs, ["y"]);
        assert_eq!(graph.nodes[0].name, "Conv -> y", "a name is made for an unnamed node");
        assert_eq!(graph.nodes[0].ints("strides"), Some(&[2i64, 2][..]));
        assert_eq!(graph.initializers["w"].floats(), Some(&[0.5f32, -1.0][..]));
        assert_eq!(graph.initializers["shape"].ints(), Some(&[1i64, -1, 4][..]));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        assert!(decode(b"\xff\xff\xff").expect_err("garbage").contains("not an ONNX model"));
        let short = proto::ModelProto {
            opset_import: vec![proto::OperatorSetIdProto { domain: String::new(), version: 11 }],
            graph: Some(proto::GraphProto {
                initializer: vec![tensor("w", &[3], &[1.0])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = decode(&short.encode_to_vec()).expect_err("too few values");
        assert!(e.contains("\"w\"") && e.contains("holds 1 values"), "{e}");
        let no_opset = proto::ModelProto { graph: Some(proto::GraphProto::default()), ..Default::default() };
        assert!(decode(&no_opset.encode_to_vec()).expect_err("no opset").contains("operator set"));
    }
}
