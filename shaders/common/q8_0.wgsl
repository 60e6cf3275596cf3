//! Q8_0 blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! Layout (`QMatrix` in engine/src/quant.rs): 8 words of signed bytes per block; one f16 `d`
//! per block, two blocks per scales word. Weight = q * d. (The three functions: see q4_0.wgsl.)

/// (d, -, -, -) of block `block`.
fn unit_scales(block: u32) -> vec4<f32> {
    let pair = unpack2x16float(scales[block / 2u]);
    return vec4<f32>(select(pair.x, pair.y, (block & 1u) == 1u), 0.0, 0.0, 0.0);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let word = bitcast<i32>(qs[block * 8u + g]);
    // Move each byte to the top, then shift back arithmetically to sign-extend it.
    let q = (vec4<i32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
    return vec4<f32>(q) * s.x;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
