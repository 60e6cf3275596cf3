//! Fuzz the GGUF parser and the GGUF → `Config` mapping: any input must give `Ok` or `Err`,
//! never a panic, a hang or an allocation the input does not pay for.
//!
//! `cargo fuzz run --fuzz-dir tests/fuzz gguf_header -- -max_total_time=60`
//! (libFuzzer needs nightly, or `RUSTC_BOOTSTRAP=1` on stable).
#![no_main]
#![allow(
    dead_code,
    unused_imports,
    reason = "the engine's parser sources are included as they are; most of them is unused here"
)]

#[path = "../../../engine/src/error.rs"]
mod error;
#[path = "../../../engine/src/io/gguf.rs"]
mod gguf;
#[path = "../../../engine/src/quant.rs"]
mod quant;
mod io {
    pub(crate) use super::gguf;
}
#[path = "../../../engine/src/models/config.rs"]
mod config;
mod models {
    pub(crate) use super::config;
}

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = gguf::GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        let _ = models::config::Config::from_gguf(&g);
        for t in &g.tensors {
            let _ = g.tensor_bytes(t).len();
        }
    }
});
