//! Parameters and bindings shared by the quantised products `qmatvec.wgsl`, `qmatmul.wgsl` and
//! `qmatmul_rows.wgsl` (one launcher, `q_matmul_lora_wgpu` in engine/src/kernels/qmatmul.rs,
//! binds the same buffers for all three), appended to each with the format's `dequant4`.

// Keep in sync with `QMatmulParams` in engine/src/kernels/qmatmul.rs.
struct Params {
    /// Rows of x and y.
    m: u32,
    /// Rows of W = columns of y.
    n: u32,
    /// Columns of x and W.
    k: u32,
    /// k / 32.
    blocks_per_row: u32,
    /// LoRA rank; 0 when there is no adapter (`u` and `lb` are then placeholders).
    rank: u32,
    /// LoRA scale, alpha / r.
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> qs: array<u32>;
@group(0) @binding(2) var<storage, read_write> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
/// `[m, rank]`: x · Aᵀ.
@group(0) @binding(4) var<storage, read_write> u: array<f32>;
/// `[n, rank]`: the adapter's B.
@group(0) @binding(5) var<storage, read_write> lb: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;
