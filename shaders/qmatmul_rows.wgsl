//! Quantised matrix-matrix product of a few rows (batched decode) for CPU adapters (lavapipe),
//! launched by `q_matmul` in engine/src/kernels/qmatmul.rs; the format's `unit_scales` and
//! `dequant4s` are appended from shaders/common/.
//!
//! y[m, n] = sum_k x[m, k] * W[n, k]. One thread per row n of W and block of ROWS rows of x:
//! it dequantises each 32-weight block of W once, into registers, and applies it to all ROWS
//! rows of x. No workgroup memory and no barriers: on a CPU a workgroup's threads are SIMD lanes
//! looped over by one core, and a barrier means switching between all of them. The tiled
//! kernel (qmatmul.wgsl) costs as much for 8 rows as for 64; this one costs about what the
//! mat-vec kernel does per row (measured on lavapipe: reading x per SIMD lane, not the
//! arithmetic, bounds it, so a hand-unrolled 4-row variant was no faster).
//!
//! With a LoRA adapter (`rank > 0`) the epilogue adds `scale * sum_r u[m, r] * lb[n, r]`, where
//! `u = x · Aᵀ` was computed beforehand.

// `Params` and the bindings come from shaders/common/qmatmul_io.wgsl.

/// Rows of x per thread.
const ROWS: u32 = 8u;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wg.x * 64u + lid;
    let m0 = wg.y * ROWS;
    if (n >= params.n) {
        return;
    }
    let k4 = params.k / 4u;
    // Rows past the end of x repeat its last row (always in bounds, never written back), so
    // the inner loop has no branch.
    var x_row: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        x_row[r] = min(m0 + r, params.m - 1u) * k4;
    }
    var acc: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        acc[r] = 0.0;
    }
    for (var b = 0u; b < params.blocks_per_row; b++) {
        let block = n * params.blocks_per_row + b;
        var w: array<vec4<f32>, 8>;
        let s = unit_scales(block);
        for (var g = 0u; g < 8u; g++) {
            w[g] = dequant4s(block, g, s);
        }
        for (var r = 0u; r < ROWS; r++) {
            let xb = x_row[r] + b * 8u;
            var s = vec4<f32>(0.0);
            for (var g = 0u; g < 8u; g++) {
                s += w[g] * x[xb + g];
            }
            acc[r] += s.x + s.y + s.z + s.w;
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        let m = m0 + r;
        if (m < params.m) {
            var lora = 0.0;
            for (var i = 0u; i < params.rank; i++) {
                lora += u[m * params.rank + i] * lb[n * params.rank + i];
            }
            y[m * params.n + n] = acc[r] + params.scale * lora;
        }
    }
}
