//! The 5-bit codes of Q5_0 and Q5_1 blocks, appended with `q5_0.wgsl` or `q5_1.wgsl` by
//! `engine/src/kernels/qmatmul.rs`. Layout (`QMatrix` in engine/src/quant.rs): 5 words per
//! block, the 32 fifth bits (bit j for weight j) then 4 words of nibbles (byte j holds weight j
//! in its low and weight j + 16 in its high nibble).

/// The codes (0..32) of weights 4g .. 4g + 3 (g in 0..8) of block `block`.
fn q5_codes(block: u32, g: u32) -> vec4<u32> {
    let base = block * 5u;
    let word = qs[base + 1u + (g & 3u)];
    let shift = select(vec4<u32>(0u, 8u, 16u, 24u), vec4<u32>(4u, 12u, 20u, 28u), g >= 4u);
    let low = (vec4<u32>(word) >> shift) & vec4<u32>(0xFu);
    let high = (vec4<u32>(qs[base]) >> (vec4<u32>(0u, 1u, 2u, 3u) + 4u * g)) & vec4<u32>(1u);
    return low | (high << vec4<u32>(4u));
}
