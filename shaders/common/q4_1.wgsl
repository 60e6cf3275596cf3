//! Q4_1 blocks for `qmatvec.wgsl` / `qmatmul.wgsl`, appended by `engine/src/kernels/qmatmul.rs`.
//! Layout (`QMatrix` in engine/src/quant.rs): 4 words of nibbles per block (byte j of the block
//! holds weight j in its low and weight j + 16 in its high nibble); the f16 pair (d, m) of a
//! block in one scales word. Weight = q * d + m.

/// Weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    let dm = unpack2x16float(scales[block]);
    let word = qs[block * 4u + (g & 3u)];
    let shift = select(vec4<u32>(0u, 8u, 16u, 24u), vec4<u32>(4u, 12u, 20u, 28u), g >= 4u);
    let q = vec4<f32>((vec4<u32>(word) >> shift) & vec4<u32>(0xFu));
    return q * dm.x + dm.y;
}
