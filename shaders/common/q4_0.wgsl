//! Q4_0 blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! Layout (`QMatrix` in engine/src/quant.rs): 4 words of nibbles per block (byte j of the block
//! holds weight j in its low and weight j + 16 in its high nibble); one f16 `d` per block, two
//! blocks per scales word. Weight = (q - 8) * d.
//!
//! Every format offers the same three functions: `unit_scales` decodes what a 32-weight unit's
//! weights share (once per unit, where a kernel reads a whole unit), `dequant4s` four of its
//! weights from those, and `dequant4` both at once.

/// (d, -, -, -) of block `block`.
fn unit_scales(block: u32) -> vec4<f32> {
    let pair = unpack2x16float(scales[block / 2u]);
    return vec4<f32>(select(pair.x, pair.y, (block & 1u) == 1u), 0.0, 0.0, 0.0);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let word = qs[block * 4u + (g & 3u)];
    let shift = select(vec4<u32>(0u, 8u, 16u, 24u), vec4<u32>(4u, 12u, 20u, 28u), g >= 4u);
    let q = vec4<f32>((vec4<u32>(word) >> shift) & vec4<u32>(0xFu));
    return (q - 8.0) * s.x;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
