//! Quantised matrix-matrix product for prefill, launched by `q_matmul` in
//! engine/src/kernels/qmatmul.rs; the format's `dequant` is appended from shaders/common/.
//!
//! y[m, n] = sum_k x[m, k] * W[n, k]. A workgroup of 16x16 threads computes a 32x32 tile of y,
//! each thread 2x2 outputs; per block of 32 along k it stages x and the dequantised W in
//! workgroup memory. W stays quantised in GPU memory.

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
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> qs: array<u32>;
@group(0) @binding(2) var<storage, read_write> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const TILE: u32 = 32u;

var<workgroup> x_tile: array<f32, 1024>; // [TILE rows of x][32]
var<workgroup> w_tile: array<f32, 1024>; // [TILE rows of W][32]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n0 = wg.x * TILE;
    let m0 = wg.y * TILE;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var kb = 0u; kb < params.blocks_per_row; kb++) {
        // 1024 values of each tile, 4 per thread.
        for (var t = 0u; t < 4u; t++) {
            let idx = lid + t * 256u;
            let r = idx / 32u;
            let c = idx % 32u;
            let m = m0 + r;
            var xv = 0.0;
            if (m < params.m) {
                xv = x[m * params.k + kb * 32u + c];
            }
            x_tile[idx] = xv;
            let n = n0 + r;
            var wv = 0.0;
            if (n < params.n) {
                wv = dequant(n * params.blocks_per_row + kb, c);
            }
            w_tile[idx] = wv;
        }
        workgroupBarrier();
        for (var c = 0u; c < 32u; c++) {
            let x0 = x_tile[(local.y * 2u) * 32u + c];
            let x1 = x_tile[(local.y * 2u + 1u) * 32u + c];
            let w0 = w_tile[(local.x * 2u) * 32u + c];
            let w1 = w_tile[(local.x * 2u + 1u) * 32u + c];
            acc[0] += x0 * w0;
            acc[1] += x0 * w1;
            acc[2] += x1 * w0;
            acc[3] += x1 * w1;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 2u; i++) {
        for (var j = 0u; j < 2u; j++) {
            let m = m0 + local.y * 2u + i;
            let n = n0 + local.x * 2u + j;
            if (m < params.m && n < params.n) {
                y[m * params.n + n] = acc[i * 2u + j];
            }
        }
    }
}
