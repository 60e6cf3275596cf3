//! 16-bit float weights (F16) for the quantised products, appended by
//! `engine/src/kernels/qmatmul.rs`. Layout (`QMatrix` in engine/src/quant.rs): 16 words per
//! 32-weight unit, weight 2j in the low half of word j and 2j + 1 in the high half; no scales
//! (the array holds one placeholder word). (The three functions: see q4_0.wgsl.)

/// No scales. `scales` is read once so that the binding every product declares stays in use.
fn unit_scales(block: u32) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 0.0, 0.0) + 0.0 * f32(scales[0] & 1u);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of unit `block`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let at = block * 16u + 2u * g;
    return vec4<f32>(unpack2x16float(qs[at]), unpack2x16float(qs[at + 1u])) * s.x;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of unit `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
