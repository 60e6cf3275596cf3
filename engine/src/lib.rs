//! codelsi engine: loads Llama-family models (GGUF, HF safetensors), runs them on burn-wgpu with
//! hand-written WGSL kernels for quantised products, and samples text from them.
//!
//! The library never prints: long work reports through callbacks and honours a
//! [`generate::CancelToken`]. See ARCHITECTURE.md for the path a request takes.

pub mod adapter;
pub mod device;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod import;
pub mod io;
pub mod kernels;
pub mod merge;
pub mod model;
pub mod models;
pub mod par;
pub mod quant;
pub mod regress;
pub mod sampling;
pub mod train;

pub use error::{Error, Result};
