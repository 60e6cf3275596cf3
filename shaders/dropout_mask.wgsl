//! Dropout's mask, launched by `dropout_mask_wgpu` in engine/src/kernels/dropout.rs.
//!
//! The bits of `cpu::dropout_mask` (engine/src/kernels/cpu.rs): the four values of group i take
//! 16 bits apiece of SplitMix64's mix of `seed + (i + 1) · golden`. WGSL has no 64-bit integers,
//! so a u64 is a vec2<u32> (x: low word, y: high word). One invocation per group of four.

// Keep in sync with `DropoutParams` in engine/src/kernels/dropout.rs.
struct Params {
    /// Values in the mask.
    len: u32,
    /// A value whose 16 random bits are below this is kept.
    threshold: u32,
    seed_lo: u32,
    seed_hi: u32,
    /// What a kept value holds (1 / keep).
    value: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> mask: array<f32>;
@group(0) @binding(1) var<uniform> params: Params;

const WG: u32 = 64u;

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

/// The full 64-bit product of two u32, from 16-bit halves.
fn mul32_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (mid << 16u) | (p00 & 0xffffu);
    let hi = a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

/// a · b mod 2^64.
fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let p = mul32_wide(a.x, b.x);
    return vec2<u32>(p.x, p.y + a.x * b.y + a.y * b.x);
}

/// a >> n for 0 < n < 32.
fn shr64(a: vec2<u32>, n: u32) -> vec2<u32> {
    return vec2<u32>((a.x >> n) | (a.y << (32u - n)), a.y >> n);
}

fn mix64(z0: vec2<u32>) -> vec2<u32> {
    var z = mul64(z0 ^ shr64(z0, 30u), vec2<u32>(0x1ce4e5b9u, 0xbf58476du));
    z = mul64(z ^ shr64(z, 27u), vec2<u32>(0x133111ebu, 0x94d049bbu));
    return z ^ shr64(z, 31u);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Workgroups are spread over x and y (see `grid_for`).
    let group = (wg.x + wg.y * 65535u) * WG + lid;
    let first = group * 4u;
    if (first >= params.len) {
        return;
    }
    let golden = vec2<u32>(0x7f4a7c15u, 0x9e3779b9u);
    let z = mix64(add64(vec2<u32>(params.seed_lo, params.seed_hi), mul64(vec2<u32>(group + 1u, 0u), golden)));
    let bits = array<u32, 4>(z.x & 0xffffu, z.x >> 16u, z.y & 0xffffu, z.y >> 16u);
    for (var j = 0u; j < 4u; j++) {
        if (first + j < params.len) {
            mask[first + j] = select(0.0, params.value, bits[j] < params.threshold);
        }
    }
}
