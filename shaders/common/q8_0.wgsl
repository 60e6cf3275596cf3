//! Q8_0 block helpers, appended to `qmatvec.wgsl` / `qmatmul.wgsl` by `engine/src/kernels/qmatmul.rs`.
//! Layout (see `QMatrix` in engine/src/quant.rs): 8 words of signed bytes per block; one f16
//! `d` per block, two blocks per scales word. Weight = q * d.

fn block_scale(block: u32) -> f32 {
    let pair = unpack2x16float(scales[block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}

/// Signed byte `j` (0..4) of `word`.
fn sbyte(word: u32, j: u32) -> f32 {
    return f32(bitcast<i32>(word << (24u - 8u * j)) >> 24u);
}

/// Dot product of block `block` with x[xi .. xi + 32].
fn block_dot(block: u32, xi: u32) -> f32 {
    var acc = 0.0;
    for (var w = 0u; w < 8u; w++) {
        let word = qs[block * 8u + w];
        for (var j = 0u; j < 4u; j++) {
            acc += sbyte(word, j) * x[xi + w * 4u + j];
        }
    }
    return block_scale(block) * acc;
}

/// Weight `i` (0..32) of block `block`.
fn dequant(block: u32, i: u32) -> f32 {
    return sbyte(qs[block * 8u + i / 4u], i % 4u) * block_scale(block);
}
