//! CTranslate2's `model.bin`: the layout faster-whisper loads and the one the package
//! registries ship Whisper in. Little-endian throughout:
//!
//! ```text
//! u32 binary version (6)
//! u16 length, spec name ("WhisperSpec\0")
//! u32 spec revision
//! u32 variable count, then per variable:
//!     u16 length, name ("encoder/layer_0/ffn/linear_0/weight\0")
//!     u8 rank, rank × u32 dims
//!     u8 element type (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)
//!     u32 byte count, the bytes
//! u32 alias count, then (alias, target) name pairs ("decoder/projection/weight" →
//!     "decoder/embeddings/weight": Whisper's tied output)
//! ```
//!
//! Scalars (`encoder/num_heads`, `decoder/pre_norm`) are rank-0 variables. Int8 weights come
//! with a `<name>_scale` variable holding one f32 per row: the value is `q / scale`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::tensors::{Element, Tensor};
use crate::models::ModelError;

/// The binary versions this reader understands (CTranslate2 3.x and 4.x write 6).
const VERSIONS: std::ops::RangeInclusive<u32> = 5..=6;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Float(Element),
    I16,
    I32,
}

struct Variable {
    dims: Vec<usize>,
    kind: Kind,
    start: usize,
    end: usize,
}

/// A mapped `model.bin`.
pub struct Ct2Model {
    path: PathBuf,
    map: Mmap,
    spec: String,
    revision: u32,
    variables: HashMap<String, Variable>,
}

/// A cursor over the header, every read bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u16-length, NUL-terminated string.
    fn string(&mut self) -> Result<String, String> {
        let len = usize::from(self.u16()?);
        let raw = self.take(len)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).map_err(|_| format!("a name before byte {} is not UTF-8", self.at))
    }
}

impl Ct2Model {
    /// Maps and indexes `path` (a `model.bin`); tensors are converted only when asked for.
    pub fn open(path: &Path) -> Result<Ct2Model, ModelError> {
        let err = |message: String| ModelError::Files { path: path.display().to_string(), message };
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        // SAFETY: read-only mapping of a cache entry, which `pull` writes atomically and never
        // modifies in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(e.to_string()))?;
        let (spec, revision, variables) = Self::index(&map).map_err(err)?;
        Ok(Ct2Model { path: path.to_path_buf(), map, spec, revision, variables })
    }

    fn index(bytes: &[u8]) -> Result<(String, u32, HashMap<String, Variable>), String> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u32()?;
        if !VERSIONS.contains(&version) {
            return Err(format!(
                "CTranslate2 binary version {version}; this build reads versions {}-{} (CTranslate2 3 and 4)",
                VERSIONS.start(),
                VERSIONS.end()
            ));
        }
        let spec = r.string()?;
        let revision = r.u32()?;
        let count = r.u32()?;
        let mut variables = HashMap::new();
        for _ in 0..count {
            let name = r.string()?;
            let rank = r.u8()?;
            let dims = (0..rank).map(|_| r.u32().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            let kind = match r.u8()? {
                0 => Kind::Float(Element::F32),
                1 => Kind::Float(Element::I8),
                2 => Kind::I16,
                3 => Kind::I32,
                4 => Kind::Float(Element::F16),
                5 => Kind::Float(Element::BF16),
                other => {
                    return Err(format!(
                        "variable {name} has element type {other}, which this build does not read"
                    ));
                }
            };
            let len = r.u32()? as usize;
            let start = r.at;
            r.take(len)?;
            let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let width = match kind {
                Kind::Float(e) => e.bytes(),
                Kind::I16 => 2,
                Kind::I32 => 4,
            };
            if elements.and_then(|n| n.checked_mul(width)) != Some(len) {
                return Err(format!("variable {name}: {len} bytes do not fit its dims {dims:?}"));
            }
            variables.insert(name, Variable { dims, kind, start, end: r.at });
        }
        // Aliases: a second name for a variable (Whisper's output projection is its embedding).
        if r.at < bytes.len() {
            let aliases = r.u32()?;
            for _ in 0..aliases {
                let alias = r.string()?;
                let target = r.string()?;
                let var = variables
                    .get(&target)
                    .ok_or_else(|| format!("alias {alias} names a missing {target}"))?;
                let copy =
                    Variable { dims: var.dims.clone(), kind: var.kind, start: var.start, end: var.end };
                variables.insert(alias, copy);
            }
        }
        Ok((spec, revision, variables))
    }

    /// The model spec's name (`WhisperSpec`), which picks the architecture.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn revision(&self) -> u32 {
        self.revision
    }

    pub fn contains(&self, name: &str) -> bool {
        self.variables.contains_key(name)
    }

    fn err(&self, message: String) -> ModelError {
        ModelError::Files { path: self.path.display().to_string(), message }
    }

    /// The dims of `name`, if present.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.variables.get(name).map(|v| v.dims.as_slice())
    }

    /// The float (or int8 with its `_scale`) tensor `name`, which must have these dims.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<'_>, ModelError> {
        let var = self.variables.get(name).ok_or_else(|| self.err(format!("no variable {name}")))?;
        if var.dims != dims {
            return Err(self.err(format!("variable {name} has dims {:?}, expected {dims:?}", var.dims)));
        }
        let Kind::Float(element) = var.kind else {
            return Err(self.err(format!("variable {name} is an integer ({:?}), not weights", var.kind)));
        };
        let cols = dims.last().copied().unwrap_or(1);
        let rows = dims.iter().rev().skip(1).product::<usize>();
        let scales = match element {
            Element::I8 => {
                let scale = format!("{name}_scale");
                let t = self
                    .get(&scale, &[rows])
                    .map_err(|e| self.err(format!("int8 {name} without its scales: {e}")))?;
                Some(t.to_vec())
            }
            _ => None,
        };
        let data = &self.map[var.start..var.end];
        super::progress::read(data.len());
        Tensor::new(data, element, rows, cols, scales)
            .ok_or_else(|| self.err(format!("variable {name}: its bytes do not match its dims")))
    }

    /// A rank-0 integer setting (`encoder/num_heads`, `decoder/pre_norm`).
    pub fn scalar(&self, name: &str) -> Result<i64, ModelError> {
        let var = self.variables.get(name).ok_or_else(|| self.err(format!("no setting {name}")))?;
        let b = &self.map[var.start..var.end];
        let value = match (var.kind, b.len()) {
            (Kind::Float(Element::I8), 1) => i64::from(b[0] as i8),
            (Kind::I16, 2) => i64::from(i16::from_le_bytes([b[0], b[1]])),
            (Kind::I32, 4) => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => return Err(self.err(format!("setting {name} is not one integer"))),
        };
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model.bin with the given variables: (name, dims, type id, bytes).
    fn file(vars: &[(&str, &[u32], u8, Vec<u8>)], aliases: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u16 + 1).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        out.extend_from_slice(&6u32.to_le_bytes());
        string(&mut out, "WhisperSpec");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
        for (name, dims, kind, bytes) in vars {
            string(&mut out, name);
            out.push(dims.len() as u8);
            dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.push(*kind);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
        for (a, t) in aliases {
            string(&mut out, a);
            string(&mut out, t);
        }
        out
    }

    fn open(bytes: &[u8]) -> Result<Ct2Model, ModelError> {
        let dir = tempfile::tempdir().map_err(|e| ModelError::Inference(e.to_string()))?;
        let path = dir.path().join("model.bin");
        std::fs::write(&path, bytes).map_err(|e| ModelError::Inference(e.to_string()))?;
        Ct2Model::open(&path)
    }

    #[test]
    fn floats_int8_scalars_and_aliases_read_back() -> Result<(), ModelError> {
        let f32s: Vec<u8> = [1.0f32, -2.0, 3.5, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> =
            [0.5f32, 8.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let q: Vec<u8> = [10i8, -20, 30, -40].iter().map(|&v| v as u8).collect();
        let scale: Vec<u8> = [10.0f32, 20.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = file(
            &[
                ("w", &[2, 2], 0, f32s),
                ("h", &[2], 4, f16s),
                ("q", &[2, 2], 1, q),
                ("q_scale", &[2], 0, scale),
                ("heads", &[], 2, 6i16.to_le_bytes().to_vec()),
                ("flag", &[], 1, vec![1]),
            ],
            &[("tied", "w")],
        );
        let m = open(&bytes)?;
        assert_eq!((m.spec(), m.revision()), ("WhisperSpec", 3));
        assert_eq!(m.get("w", &[2, 2])?.to_vec(), [1.0, -2.0, 3.5, 4.0]);
        assert_eq!(m.get("tied", &[2, 2])?.to_vec(), [1.0, -2.0, 3.5, 4.0]);
        assert_eq!(m.get("h", &[2])?.to_vec(), [0.5, 8.0]);
        assert_eq!(m.get("q", &[2, 2])?.to_vec(), [1.0, -2.0, 1.5, -2.0]);
        assert_eq!((m.scalar("heads")?, m.scalar("flag")?), (6, 1));
        let wrong = m.get("w", &[4]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(wrong.contains("variable w has dims [2, 2], expected [4]"), "{wrong}");
        let missing = m.get("nope", &[1]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("no variable nope"), "{missing}");
        Ok(())
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_with_the_reason() {
        let bytes = file(&[("w", &[2, 2], 0, vec![0; 16])], &[]);
        let cut = open(&bytes[..bytes.len() - 10]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(cut.contains("truncated at byte"), "{cut}");
        let mut old = bytes.clone();
        old[0] = 2;
        let old = open(&old).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(old.contains("binary version 2"), "{old}");
        let lying = file(&[("w", &[3, 2], 0, vec![0; 16])], &[]);
        let lying = open(&lying).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(lying.contains("16 bytes do not fit its dims [3, 2]"), "{lying}");
    }
}
