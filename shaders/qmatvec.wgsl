//! Quantised matrix-vector product for decode, launched by `q_matmul` in
//! engine/src/kernels/qmatmul.rs; the format's `unit_scales` and `dequant4s` are appended from
//! shaders/common/.
//!
//! y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m of x. Each row of W is reduced by
//! LANES threads striding over its 32-weight units, dequantised in registers (what a unit's
//! weights share, such as a K-quant's 6-bit scale, decoded once per unit): W stays
//! quantised in GPU memory and is read once per row of x. LANES is 16 on GPUs (neighbouring
//! threads read neighbouring blocks) and 1 on CPU adapters such as lavapipe, where a thread per
//! row needs no reduction and every SIMD lane reads the same x.
//!
//! With a LoRA adapter (`rank > 0`) lane 0 adds `scale * sum_r u[m, r] * lb[n, r]` to its row,
//! `u = x · Aᵀ` having been computed beforehand.

// `Params` and the bindings come from shaders/common/qmatmul_io.wgsl.

const LANES: u32 = {{ lanes }}u;
const ROWS: u32 = {{ rows }}u;
const WG: u32 = {{ workgroup }}u; // LANES * ROWS

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let n = wg.x * ROWS + lid / LANES;
    let m = wg.y;
    var acc = 0.0;
    if (n < params.n) {
        let x_row = m * params.k / 4u; // in vec4s
        for (var b = lane; b < params.blocks_per_row; b += LANES) {
            let block = n * params.blocks_per_row + b;
            let xb = x_row + b * 8u;
            let s = unit_scales(block);
            for (var g = 0u; g < 8u; g++) {
                acc += dot(dequant4s(block, g, s), x[xb + g]);
            }
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && n < params.n) {
        var lora = 0.0;
        for (var r = 0u; r < params.rank; r++) {
            lora += u[m * params.rank + r] * lb[n * params.rank + r];
        }
        y[m * params.n + n] = partial[lid] + params.scale * lora;
    }
}
