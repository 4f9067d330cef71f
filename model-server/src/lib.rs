//! Kiln's model server.
//!
//! With default features off this crate is only [`manifest`] and [`quantity`]: the types the
//! operator writes and the server reads. The `server` feature adds the rest:
//! - `families/`: what a pod serves (text embedding, text generation): routes, request types,
//!   scheduling, loaded models; `families::serve` is the registry;
//! - `models/`: architectures (BERT and XLM-RoBERTa, Llama), chosen from the checkpoint;
//! - `kernels/` and `weights/`: what architectures share (GEMM, quantized matmul, row kernels;
//!   safetensors, JSON configs, GGUF metadata);
//! - `api`, `listener`, `queue`, `loader`, `state`, `serve`, `metrics`: the server around them;
//! - `device`: where models compute (the CPU, or a CUDA GPU with the `cuda` feature);
//! - `images`: images in requests, decoded with limits and preprocessed as a checkpoint says;
//! - `pull`: the verified model cache.

pub mod manifest;
pub mod quantity;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod device;
#[cfg(feature = "server")]
pub mod failpoint;
#[cfg(feature = "server")]
pub mod families;
#[cfg(feature = "server")]
pub mod images;
#[cfg(feature = "server")]
pub mod kernels;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
pub mod loader;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod models;
#[cfg(feature = "server")]
pub mod pull;
#[cfg(feature = "server")]
pub mod queue;
#[cfg(feature = "server")]
pub mod residency;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
pub mod state;
#[cfg(feature = "server")]
pub mod weights;
