//! Q5_1 blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! Layout (`QMatrix` in engine/src/quant.rs): 5 words per block, the 32 fifth bits (bit j for
//! weight j) then 4 words of nibbles (byte j holds weight j in its low and weight j + 16 in its
//! high nibble); the f16 pair (d, m) of a block in one scales word. Weight = q * d + m.
//! (The three functions: see q4_0.wgsl.)

/// (d, m, -, -) of block `block`.
fn unit_scales(block: u32) -> vec4<f32> {
    let dm = unpack2x16float(scales[block]);
    return vec4<f32>(dm.x, dm.y, 0.0, 0.0);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let base = block * 5u;
    let word = qs[base + 1u + (g & 3u)];
    let shift = select(vec4<u32>(0u, 8u, 16u, 24u), vec4<u32>(4u, 12u, 20u, 28u), g >= 4u);
    let low = (vec4<u32>(word) >> shift) & vec4<u32>(0xFu);
    let high = (vec4<u32>(qs[base]) >> (vec4<u32>(0u, 1u, 2u, 3u) + 4u * g)) & vec4<u32>(1u);
    return vec4<f32>(low | (high << vec4<u32>(4u))) * s.x + s.y;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
