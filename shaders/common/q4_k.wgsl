//! Q4_K super-blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! The kernels step over units of 32 weights: `block` is unit `block % 8` of super-block
//! `block / 8`. Layout (`QMatrix` in engine/src/quant.rs), per super-block of 256 weights:
//! 4 scales words (the f16 pair d, dmin, then ggml's 12 bytes of 6-bit scales and minimums) and
//! 32 words of nibbles (32-byte chunk c holds unit 2c in its low and unit 2c + 1 in its high
//! nibbles). Weight = d * scale * q - dmin * min. (The three functions: see q4_0.wgsl.)

// `unit_scales` comes from k_scales.wgsl.

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let sb = block / 8u;
    let j = block % 8u;
    let word = qs[sb * 32u + (j / 2u) * 8u + g];
    let shift = vec4<u32>(0u, 8u, 16u, 24u) + 4u * (j & 1u);
    let q = vec4<f32>((vec4<u32>(word) >> shift) & vec4<u32>(0xFu));
    return q * s.x - s.y;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
