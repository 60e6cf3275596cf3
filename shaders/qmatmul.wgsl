//! Quantised matrix-matrix product for prefill, launched by `q_matmul` in
//! engine/src/kernels/qmatmul.rs; the format's `dequant4` is appended from shaders/common/.
//!
//! y[m, n] = sum_k x[m, k] * W[n, k]. A workgroup of 16x16 threads computes a 64x64 tile of y,
//! each thread a 4x4 register tile; per block of 32 along k it stages 64 rows of x and 64 rows
//! of W, dequantised, in workgroup memory (16 KiB, wgpu's default limit). W stays quantised in
//! GPU memory.
//!
//! With a LoRA adapter (`rank > 0`) the epilogue adds `scale * sum_r u[m, r] * lb[n, r]`, where
//! `u = x · Aᵀ` was computed beforehand: the adapter costs no extra pass over y.

// `Params` and the bindings come from shaders/common/qmatmul_io.wgsl.

const TILE: u32 = 64u;

var<workgroup> x_tile: array<vec4<f32>, 512>; // [64 rows of x][8 vec4 = 32 columns]
var<workgroup> w_tile: array<vec4<f32>, 512>; // [64 rows of W][8 vec4]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n0 = wg.x * TILE;
    let m0 = wg.y * TILE;
    var acc: array<vec4<f32>, 4>; // acc[i][j]: row m0 + 4 local.y + i, column n0 + 4 local.x + j
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    let k4 = params.k / 4u;
    for (var kb = 0u; kb < params.blocks_per_row; kb++) {
        // 512 vec4 of each tile, 2 per thread.
        for (var t = 0u; t < 2u; t++) {
            let idx = lid + t * 256u;
            let r = idx / 8u;
            let g = idx % 8u;
            var xv = vec4<f32>(0.0);
            if (m0 + r < params.m) {
                xv = x[(m0 + r) * k4 + kb * 8u + g];
            }
            x_tile[idx] = xv;
            var wv = vec4<f32>(0.0);
            if (n0 + r < params.n) {
                wv = dequant4((n0 + r) * params.blocks_per_row + kb, g);
            }
            w_tile[idx] = wv;
        }
        workgroupBarrier();
        for (var g = 0u; g < 8u; g++) {
            var xs: array<vec4<f32>, 4>;
            var ws: array<vec4<f32>, 4>;
            for (var i = 0u; i < 4u; i++) {
                xs[i] = x_tile[(local.y * 4u + i) * 8u + g];
                ws[i] = w_tile[(local.x * 4u + i) * 8u + g];
            }
            for (var i = 0u; i < 4u; i++) {
                acc[i] += vec4<f32>(dot(xs[i], ws[0]), dot(xs[i], ws[1]), dot(xs[i], ws[2]), dot(xs[i], ws[3]));
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + local.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + local.x * 4u + j;
            if (m < params.m && n < params.n) {
                var lora = 0.0;
                for (var r = 0u; r < params.rank; r++) {
                    lora += u[m * params.rank + r] * lb[n * params.rank + r];
                }
                y[m * params.n + n] = acc[i][j] + params.scale * lora;
            }
        }
    }
}
