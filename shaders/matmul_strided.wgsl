//! Small dense products of the LoRA path: C[M, N] = alpha * sum_k A(m, k) * B(k, n), each
//! operand read through strides so transposes cost no copy. Launched by `matmul_strided_wgpu`
//! in engine/src/kernels/matmul_strided.rs for u = x·Aᵀ, du = s·dy·B, dB = s·dyᵀ·u and dA = duᵀ·x: one
//! side is the rank r (≤ 64 in practice), the other up to the hidden or token count.
//!
//! A workgroup of 16x16 threads computes a 16x16 tile of C, one output per thread, staging a
//! 16x16 tile of each operand per step of 16 along k.

// Keep in sync with `StridedParams` in engine/src/kernels/matmul_strided.rs.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    /// A(m, k) = a[m * a_m + k * a_k]
    a_m: u32,
    a_k: u32,
    /// B(k, n) = b[k * b_k + n * b_n]
    b_k: u32,
    b_n: u32,
    alpha: f32,
}

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

var<workgroup> a_tile: array<f32, 256>; // [16 rows m][16 k]
var<workgroup> b_tile: array<f32, 256>; // [16 k][16 columns n]

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
) {
    let row = wg.y * 16u + local.y;
    let col = wg.x * 16u + local.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < params.k; k0 += 16u) {
        // Thread (x, y) loads A(row, k0 + x) and B(k0 + y, col).
        let ka = k0 + local.x;
        var av = 0.0;
        if (row < params.m && ka < params.k) {
            av = a[row * params.a_m + ka * params.a_k];
        }
        a_tile[local.y * 16u + local.x] = av;
        let kb = k0 + local.y;
        var bv = 0.0;
        if (kb < params.k && col < params.n) {
            bv = b[kb * params.b_k + col * params.b_n];
        }
        b_tile[local.y * 16u + local.x] = bv;
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            acc += a_tile[local.y * 16u + kk] * b_tile[kk * 16u + local.x];
        }
        workgroupBarrier();
    }
    if (row < params.m && col < params.n) {
        c[row * params.n + col] = params.alpha * acc;
    }
}
