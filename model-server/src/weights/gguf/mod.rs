//! GGUF metadata, typed, with errors that name the key.

pub mod tokenizer;

use candle_core::Device;
use candle_core::quantized::{QTensor, gguf_file};

use crate::models::ModelError;

pub fn metadata_string(ct: &gguf_file::Content, key: &str) -> Result<String, ModelError> {
    match ct.metadata.get(key) {
        Some(gguf_file::Value::String(s)) => Ok(s.clone()),
        Some(other) => {
            Err(ModelError::Unsupported(format!("GGUF metadata {key} is {other:?}, not a string")))
        }
        None => Err(ModelError::Unsupported(format!("GGUF metadata has no {key}"))),
    }
}

pub fn metadata_u32(ct: &gguf_file::Content, key: &str) -> Result<u32, ModelError> {
    let v =
        ct.metadata.get(key).ok_or_else(|| ModelError::Unsupported(format!("GGUF metadata has no {key}")))?;
    v.to_u32()
        .or_else(|_| v.to_i32().map(|i| i.max(0) as u32))
        .or_else(|_| v.to_u64().map(|i| i.min(u64::from(u32::MAX)) as u32))
        .map_err(|_| ModelError::Unsupported(format!("GGUF metadata {key} is {v:?}, not an integer")))
}

pub fn metadata_f32(ct: &gguf_file::Content, key: &str) -> Result<f32, ModelError> {
    let v =
        ct.metadata.get(key).ok_or_else(|| ModelError::Unsupported(format!("GGUF metadata has no {key}")))?;
    v.to_f32()
        .or_else(|_| v.to_f64().map(|f| f as f32))
        .map_err(|_| ModelError::Unsupported(format!("GGUF metadata {key} is {v:?}, not a number")))
}

pub fn tensor<R: std::io::Read + std::io::Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    name: &str,
) -> Result<QTensor, ModelError> {
    let t = ct
        .tensor(reader, name, device)
        .map_err(|e| ModelError::Unsupported(format!("GGUF tensor {name}: {e}")))?;
    super::progress::read(t.storage_size_in_bytes());
    Ok(t)
}
