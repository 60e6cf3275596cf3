//! Fuzz the safetensors header parse as our loader uses it: `Ok` or `Err`, never a panic.
//!
//! `cargo fuzz run --fuzz-dir tests/fuzz safetensors_header -- -max_total_time=60`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(st) = safetensors::SafeTensors::deserialize(data) {
        for name in st.names() {
            if let Ok(view) = st.tensor(name) {
                let _ = (view.dtype(), view.shape(), view.data().len());
            }
        }
    }
});
