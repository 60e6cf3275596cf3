//! Q5_K super-blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! The kernels step over units of 32 weights: `block` is unit `block % 8` of super-block
//! `block / 8`. Layout (`QMatrix` in engine/src/quant.rs), per super-block of 256 weights:
//! 4 scales words (the f16 pair d, dmin, then ggml's 12 bytes of 6-bit scales and minimums) and
//! 40 quant words: `qh` (byte l, bit j: the fifth bit of weight l of unit j), then the nibbles
//! (32-byte chunk c holds unit 2c in its low and unit 2c + 1 in its high nibbles).
//! Weight = d * scale * q - dmin * min. (The three functions: see q4_0.wgsl.)

// `unit_scales` comes from k_scales.wgsl.

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let sb = block / 8u;
    let j = block % 8u;
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let low = (vec4<u32>(qs[sb * 40u + 8u + (j / 2u) * 8u + g]) >> (bytes + 4u * (j & 1u))) & vec4<u32>(0xFu);
    let high = (vec4<u32>(qs[sb * 40u + g]) >> (bytes + j)) & vec4<u32>(1u);
    let q = vec4<f32>(low | (high << vec4<u32>(4u)));
    return q * s.x - s.y;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
