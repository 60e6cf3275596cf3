//! Q4_0 block helpers, appended to `qmatvec.wgsl` / `qmatmul.wgsl` by `engine/src/kernels/qmatmul.rs`.
//! Layout (see `QMatrix` in engine/src/quant.rs): 4 words of nibbles per block; one f16 `d`
//! per block, two blocks per scales word. Weight = (q - 8) * d.

fn block_scale(block: u32) -> f32 {
    let pair = unpack2x16float(scales[block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}

/// Dot product of block `block` with x[xi .. xi + 32].
fn block_dot(block: u32, xi: u32) -> f32 {
    var qx = 0.0;
    var sx = 0.0;
    for (var w = 0u; w < 4u; w++) {
        let word = qs[block * 4u + w];
        for (var j = 0u; j < 4u; j++) {
            let byte = (word >> (8u * j)) & 0xFFu;
            let i = w * 4u + j;
            let x_lo = x[xi + i];
            let x_hi = x[xi + i + 16u];
            qx += f32(byte & 0xFu) * x_lo + f32(byte >> 4u) * x_hi;
            sx += x_lo + x_hi;
        }
    }
    return block_scale(block) * (qx - 8.0 * sx);
}

/// Weight `i` (0..32) of block `block`.
fn dequant(block: u32, i: u32) -> f32 {
    let word = qs[block * 4u + (i % 16u) / 4u];
    let byte = (word >> (8u * (i % 4u))) & 0xFFu;
    let q = select(byte & 0xFu, byte >> 4u, i >= 16u);
    return (f32(q) - 8.0) * block_scale(block);
}
