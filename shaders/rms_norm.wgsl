//! RMSNorm over the last dimension, launched by `rms_norm_wgpu` in engine/src/kernels/rms_norm.rs.
//!
//! y = x / sqrt(mean(x²) + eps) * weight, one workgroup per row: one launch instead of the six
//! elementwise ops of the plain-tensor reference.

// Keep in sync with `RmsNormParams` in engine/src/kernels/rms_norm.rs.
struct Params {
    /// Rows (batch × seq).
    rows: u32,
    /// Elements per row (hidden size).
    dim: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

const WG: u32 = 64u;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Rows are spread over x and y (see `grid_for`); the row is uniform across the workgroup.
    let row = wg.x + wg.y * 65535u;
    if (row >= params.rows) {
        return;
    }
    let base = row * params.dim;
    var acc = 0.0;
    for (var i = lid; i < params.dim; i += WG) {
        let v = x[base + i];
        acc += v * v;
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    let inv_rms = 1.0 / sqrt(partial[0] / f32(params.dim) + params.eps);
    for (var i = lid; i < params.dim; i += WG) {
        y[base + i] = x[base + i] * inv_rms * weight[i];
    }
}
