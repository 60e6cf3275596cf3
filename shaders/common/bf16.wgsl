//! bfloat16 weights (BF16) for the quantised products, appended by
//! `engine/src/kernels/qmatmul.rs`. Layout as f16.wgsl; a bf16 value is the top half of an f32,
//! so each half moves to the top of a word. (The three functions: see q4_0.wgsl.)

/// No scales. `scales` is read once so that the binding every product declares stays in use.
fn unit_scales(block: u32) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 0.0, 0.0) + 0.0 * f32(scales[0] & 1u);
}

/// Weights 4g .. 4g + 3 (g in 0..8) of unit `block`.
fn dequant4s(block: u32, g: u32, s: vec4<f32>) -> vec4<f32> {
    let at = block * 16u + 2u * g;
    let w = vec4<u32>(qs[at], qs[at], qs[at + 1u], qs[at + 1u]);
    let top = (w << vec4<u32>(16u, 0u, 16u, 0u)) & vec4<u32>(0xFFFF0000u);
    return bitcast<vec4<f32>>(top) * s.x;
}

/// Weights 4g .. 4g + 3 (g in 0..8) of unit `block`.
fn dequant4(block: u32, g: u32) -> vec4<f32> {
    return dequant4s(block, g, unit_scales(block));
}
