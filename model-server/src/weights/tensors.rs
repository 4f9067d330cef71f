//! The tensors of a safetensors checkpoint, read in place: the files are memory-mapped and each
//! tensor is converted to f32 row by row, straight into the buffer the model keeps. At BGE-M3's
//! size (568M parameters, float16) going through candle tensors instead (convert, scale,
//! concatenate, transpose, copy: a fresh allocation at each step) spent most of a 10 s load
//! having the kernel zero new pages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use super::safetensors_files;
use crate::models::ModelError;

/// Element types read: what checkpoints of the encoder architectures are saved in, and
/// CTranslate2's int8 weights (with one scale per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Element {
    F32,
    F16,
    BF16,
    I8,
}

impl Element {
    fn of(dtype: Dtype) -> Option<Element> {
        match dtype {
            Dtype::F32 => Some(Element::F32),
            Dtype::F16 => Some(Element::F16),
            Dtype::BF16 => Some(Element::BF16),
            _ => None,
        }
    }

    pub(crate) fn bytes(self) -> usize {
        match self {
            Element::F32 => 4,
            Element::F16 | Element::BF16 => 2,
            Element::I8 => 1,
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the mapped file.
    start: usize,
    end: usize,
}

/// Every tensor of a model directory's safetensors files (`model.safetensors`, or the shards
/// an index lists).
pub struct Tensors {
    dir: PathBuf,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl Tensors {
    pub fn open(dir: &Path) -> Result<Tensors, ModelError> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for path in safetensors_files(dir)? {
            let file_err = |message: String| ModelError::Files { path: path.display().to_string(), message };
            let file = std::fs::File::open(&path).map_err(|e| file_err(e.to_string()))?;
            // SAFETY: read-only mapping of a cache entry, which `pull` writes atomically and never
            // modifies in place; the mapping lives only while the model loads.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(e.to_string()))?;
            // Also checks that every tensor's byte range lies inside the file and matches its
            // shape and type.
            let (header, metadata) = SafeTensors::read_metadata(&map).map_err(|e| file_err(e.to_string()))?;
            let data_start = 8 + header;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    file: maps.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start.saturating_add(start),
                    end: data_start.saturating_add(end),
                };
                entries.insert(name, entry);
            }
            maps.push(map);
        }
        Ok(Tensors { dir: dir.to_path_buf(), maps, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, which must have this shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor<'_>, ModelError> {
        let err = |message: String| ModelError::Files { path: self.dir.display().to_string(), message };
        let entry = self.entries.get(name).ok_or_else(|| err(format!("no tensor {name}")))?;
        if entry.shape != shape {
            return Err(err(format!("tensor {name} has shape {:?}, expected {shape:?}", entry.shape)));
        }
        let element = Element::of(entry.dtype).ok_or_else(|| {
            err(format!("tensor {name} is {:?}; only F32, F16 and BF16 checkpoints are read", entry.dtype))
        })?;
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().rev().skip(1).product::<usize>();
        let data = self.maps.get(entry.file).and_then(|m| m.get(entry.start..entry.end));
        let data = data
            .filter(|d| rows.checked_mul(cols).and_then(|n| n.checked_mul(element.bytes())) == Some(d.len()))
            .ok_or_else(|| err(format!("tensor {name}: its byte range does not match its shape")))?;
        super::progress::read(data.len());
        Ok(Tensor { data, element, rows, cols, row_scales: None })
    }

    /// Names under `prefix.`, as [`Scope::get`] reads them.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope { tensors: self, prefix: prefix.to_string() }
    }
}

/// The tensors under a name prefix (`encoder.layer.3.attention`).
pub struct Scope<'a> {
    tensors: &'a Tensors,
    prefix: String,
}

impl<'a> Scope<'a> {
    pub fn scope(&self, name: &str) -> Scope<'a> {
        Scope { tensors: self.tensors, prefix: self.name(name) }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor<'a>, ModelError> {
        self.tensors.get(&self.name(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains(&self.name(name))
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }
}

/// A tensor as rows of its last dimension, in the file's element type.
pub struct Tensor<'a> {
    data: &'a [u8],
    element: Element,
    rows: usize,
    cols: usize,
    /// For int8 rows: the value is `q / scale` (CTranslate2's quantization).
    row_scales: Option<Vec<f32>>,
}

impl<'a> Tensor<'a> {
    /// `data` must hold exactly `rows × cols` elements; int8 needs one scale per row.
    pub(crate) fn new(
        data: &'a [u8],
        element: Element,
        rows: usize,
        cols: usize,
        row_scales: Option<Vec<f32>>,
    ) -> Option<Tensor<'a>> {
        let len = rows.checked_mul(cols)?.checked_mul(element.bytes())?;
        let scales_fit = match (&row_scales, element) {
            (Some(s), Element::I8) => s.len() == rows,
            (None, Element::I8) | (Some(_), _) => false,
            (None, _) => true,
        };
        (data.len() == len && scales_fit).then_some(Tensor { data, element, rows, cols, row_scales })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `row` as f32 into `out` (`cols` long).
    pub fn read_row(&self, row: usize, out: &mut [f32]) {
        let width = self.cols * self.element.bytes();
        let bytes = &self.data[row * width..(row + 1) * width];
        convert(bytes, self.element, &mut out[..self.cols]);
        if let Some(scales) = &self.row_scales {
            let inv = 1.0 / scales[row];
            out[..self.cols].iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// Rows `first..first + out.len() / cols` as f32 into `out`.
    pub fn read_rows(&self, first: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.read_row(first + i, row);
        }
    }

    /// The values in f16 when the file stores exactly that (nothing is rounded), else None.
    pub fn to_f16(&self) -> Option<Vec<half::f16>> {
        (self.element == Element::F16 && self.row_scales.is_none())
            .then(|| self.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect())
    }

    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.read_rows(0, &mut out);
        out
    }
}

/// Little-endian `src` to f32; the 16-bit types go through `half`'s vectorized conversion.
fn convert(src: &[u8], element: Element, out: &mut [f32]) {
    const CHUNK: usize = 512;
    match element {
        Element::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Element::I8 => {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = f32::from(b as i8);
            }
        }
        Element::F16 | Element::BF16 => {
            let mut bits = [0u16; CHUNK];
            for (out, src) in out.chunks_mut(CHUNK).zip(src.chunks(2 * CHUNK)) {
                let bits = &mut bits[..out.len()];
                for (b, s) in bits.iter_mut().zip(src.chunks_exact(2)) {
                    *b = u16::from_le_bytes([s[0], s[1]]);
                }
                match element {
                    Element::F16 => bits.reinterpret_cast::<half::f16>().convert_to_f32_slice(out),
                    _ => bits.reinterpret_cast::<half::bf16>().convert_to_f32_slice(out),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_rows_convert_exactly() {
        let values = [1.5f32, -2.25, 0.0, 65504.0, 1e-3];
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let mut out = [0.0; 5];
        convert(&f16, Element::F16, &mut out);
        let want: Vec<f32> = values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(out.to_vec(), want);
        convert(&bf16, Element::BF16, &mut out);
        let want: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(out.to_vec(), want);
        // Longer than one conversion chunk.
        let long: Vec<u8> = (0..1300).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
        let mut out = vec![0.0; 1300];
        convert(&long, Element::F16, &mut out);
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
}
