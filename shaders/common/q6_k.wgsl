//! Q6_K super-blocks for the quantised products, appended by `engine/src/kernels/qmatmul.rs`.
//! The kernels step over units of 32 weights: `block` is unit `block % 8` of super-block
//! `block / 8`. Layout (`QMatrix` in engine/src/quant.rs), per super-block of 256 weights:
//! 5 scales words (16 signed 8-bit scales, one per 16 weights, then the f16 `d`) and 48 quant
//! words, ggml's `ql` (low nibbles) then `qh` (high 2 bits). In ggml's order, weight
//! 128h + 32p + l (h half, p in 0..4, l in 0..32) has its low nibble in `ql` byte
//! 64h + 32(p % 2) + l (high nibble when p >= 2) and its high bits at 2p in `qh` byte 32h + l.
//! Weight = d * scale * (q - 32). (The three functions: see q4_0.wgsl.)

/// (d * scale of weights 0..15, d * scale of weights 16..31, -, -) of 32-weight unit `block`.
fn unit_scales(block: u32) -> vec4<f32> {
    let sb = block / 8u;
    let d = unpack2x16float(scales[sb * 5u + 4u]).x;
    // The scale of weights 16i .. 16i + 15 of the super-block is byte i: this unit's two are
    // bytes 2 * (block % 8) and the next, in one word.
    let i = 2u * (block % 8u);
    let word = bitcast<i32>(scales[sb * 5u + i / 4u]);
    let lo = (word << (24u - 8u * (i % 4u))) >> 24u;
    let hi = (word << (16u - 8u * (i % 4u))) >> 24u;
    return vec4<f32>(d * f32(lo), d * f32(hi), 0.0, 0.0);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`, whose `unit_scales` are `s`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let sb = block / 8u;
    let h = (block % 8u) / 4u;
    let p = block % 4u;
    let bytes = vec4<u32>(0u, 8u, 16u, 24u);
    let ql = qs[sb * 48u + h * 16u + (p % 2u) * 8u + g];
    let qh = qs[sb * 48u + 32u + h * 8u + g];
    let low = (vec4<u32>(ql) >> (bytes + 4u * (p / 2u))) & vec4<u32>(0xFu);
    let high = (vec4<u32>(qh) >> (bytes + 2u * p)) & vec4<u32>(3u);
    let q = vec4<i32>(low | (high << vec4<u32>(4u))) - vec4<i32>(32);
    return vec4<f32>(q) * select(s.x, s.y, g >= 4u);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of 32-weight unit `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
