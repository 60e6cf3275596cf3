//! Product with the transpose of a quantised matrix, for the backward pass through a frozen
//! base weight: dx[m, c] = sum_o dy[m, o] * W[o, c] (+ sum_r du[m, r] * la[r, c] with a LoRA
//! adapter: the gradient reaching x through the adapter, fused in the epilogue). Launched by
//! `q_matmul_t_wgpu` in engine/src/kernels/qmatmul_t.rs; the format's `dequant4` is appended from
//! shaders/common/.
//!
//! W is stored row-major in blocks of 32 along c, so a row o of a 64-column tile is two blocks:
//! a workgroup of 16x16 threads computes a 64x64 tile of dx (4x4 per thread, the four columns as
//! one vec4), staging 16 rows of W (dequantised) and the matching 16 columns of dy per step.

// Keep in sync with `QMatmulTParams` in engine/src/kernels/qmatmul_t.rs.
struct Params {
    /// Rows of dy and dx.
    m: u32,
    /// Rows of W = columns of dy.
    n: u32,
    /// Columns of W = columns of dx (a multiple of 32).
    k: u32,
    /// k / 32.
    blocks_per_row: u32,
    /// LoRA rank; 0 when there is no adapter (`du` and `la` are then placeholders).
    rank: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> dy: array<f32>;
@group(0) @binding(1) var<storage, read_write> qs: array<u32>;
@group(0) @binding(2) var<storage, read_write> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<vec4<f32>>;
/// `[m, rank]`: the gradient at u = x · Aᵀ.
@group(0) @binding(4) var<storage, read_write> du: array<f32>;
/// `[rank, k]`: the adapter's A.
@group(0) @binding(5) var<storage, read_write> la: array<vec4<f32>>;
@group(0) @binding(6) var<uniform> params: Params;

const TILE: u32 = 64u;
const STEP: u32 = 16u;

var<workgroup> dy_tile: array<f32, 1024>; // [64 rows of dy][16 columns]
var<workgroup> w_tile: array<vec4<f32>, 256>; // [16 rows of W][16 vec4 = 64 columns]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c0 = wg.x * TILE;
    let m0 = wg.y * TILE;
    let k4 = params.k / 4u;
    var acc: array<vec4<f32>, 4>; // acc[i]: row m0 + 4 local.y + i, columns c0 + 4 local.x ..+4
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var o0 = 0u; o0 < params.n; o0 += STEP) {
        for (var t = 0u; t < 4u; t++) {
            let idx = lid + t * 256u;
            let r = idx / STEP;
            let o = o0 + idx % STEP;
            var v = 0.0;
            if (m0 + r < params.m && o < params.n) {
                v = dy[(m0 + r) * params.n + o];
            }
            dy_tile[idx] = v;
        }
        {
            let o = o0 + lid / 16u;
            let c = c0 + (lid % 16u) * 4u;
            var wv = vec4<f32>(0.0);
            if (o < params.n && c < params.k) {
                wv = dequant4(o * params.blocks_per_row + c / 32u, (c % 32u) / 4u);
            }
            w_tile[lid] = wv;
        }
        workgroupBarrier();
        for (var oo = 0u; oo < STEP; oo++) {
            let wv = w_tile[oo * 16u + local.x];
            for (var i = 0u; i < 4u; i++) {
                acc[i] += dy_tile[(local.y * 4u + i) * STEP + oo] * wv;
            }
        }
        workgroupBarrier();
    }
    let c = c0 + local.x * 4u;
    if (c >= params.k) {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + local.y * 4u + i;
        if (m < params.m) {
            var lora = vec4<f32>(0.0);
            for (var r = 0u; r < params.rank; r++) {
                lora += du[m * params.rank + r] * la[r * k4 + c / 4u];
            }
            dx[m * k4 + c / 4u] = acc[i] + lora;
        }
    }
}
