//! codelsi engine: loads Llama-family models (GGUF, HF safetensors), runs them on burn-wgpu with
//! hand-written WGSL kernels for quantised products, and samples text from them.
//!
//! The library never prints: long work reports through callbacks and honours a
//! [`cancel::CancelToken`]. See ARCHITECTURE.md for the path a request takes.

pub mod adapter;
pub mod cancel;
pub mod dataset;
pub mod device;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod files;
pub mod generate;
pub mod import;
pub mod io;
pub mod kernels;
#[cfg(test)]
mod layers;
pub mod merge;
pub mod model;
pub mod models;
pub mod par;
pub mod quant;
pub mod regress;
pub mod sampling;
pub mod train;

pub use error::{Error, Result};
