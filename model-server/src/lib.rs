//! Kiln's model server.
//!
//! With default features off this crate is only [`manifest`]: the types the operator writes and
//! the server reads. The `server` feature adds the engine, batching, HTTP API and puller.

pub mod manifest;
pub mod quantity;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod batching;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod failpoint;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
pub mod loader;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod pull;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
pub mod state;
