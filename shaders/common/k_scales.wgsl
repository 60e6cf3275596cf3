//! The scales of Q4_K and Q5_K super-blocks, appended with `q4_k.wgsl` or `q5_k.wgsl` by
//! `engine/src/kernels/qmatmul.rs`. Layout (`QMatrix` in engine/src/quant.rs): 4 scales words
//! per super-block, the f16 pair (d, dmin) then ggml's 12 bytes of 6-bit scales and minimums.

/// Byte `i` (0..12) of super-block `sb`'s packed scales.
fn k_scale_byte(sb: u32, i: u32) -> u32 {
    return (scales[sb * 4u + 1u + i / 4u] >> ((i % 4u) * 8u)) & 0xFFu;
}

/// (d * scale, dmin * min, -, -) of 32-weight unit `block`: unit `block % 8` of super-block
/// `block / 8` (ggml's `get_scale_min_k4`).
fn unit_scales(block: u32) -> vec4<f32> {
    let sb = block / 8u;
    let j = block % 8u;
    let dm = unpack2x16float(scales[sb * 4u]);
    var sc: u32;
    var m: u32;
    if (j < 4u) {
        sc = k_scale_byte(sb, j) & 63u;
        m = k_scale_byte(sb, j + 4u) & 63u;
    } else {
        let both = k_scale_byte(sb, j + 4u);
        sc = (both & 0xFu) | ((k_scale_byte(sb, j - 4u) >> 6u) << 4u);
        m = (both >> 4u) | ((k_scale_byte(sb, j) >> 6u) << 4u);
    }
    return vec4<f32>(dm.x * f32(sc), dm.y * f32(m), 0.0, 0.0);
}
