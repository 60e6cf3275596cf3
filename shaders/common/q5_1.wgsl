//! Q5_1 blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! Layout (`QMatrix` in engine/src/quant.rs): 5 words per block, the 32 fifth bits (bit j for
//! weight j) then 4 words of nibbles (byte j holds weight j in its low and weight j + 16 in its
//! high nibble); the f16 pair (d, m) of a block in one scales word. Weight = q * d + m.
//! (The three functions: see q4_0.wgsl; `q5_codes` comes from q5_codes.wgsl.)

/// (d, m, -, -) of block `block`.
fn unit_scales(block: u32) -> vec4<f32> {
    let dm = unpack2x16float(scales[block]);
    return vec4<f32>(dm.x, dm.y, 0.0, 0.0);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(q5_codes(block, g)) * s.x + s.y;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
