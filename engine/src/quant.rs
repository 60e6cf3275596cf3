//! GGML tensor types: block layouts, dequantisation on the host, quantisation for `--quantize`,
//! and the repacking of quantised blocks into the layout our WGSL kernels read.
//!
//! Block layouts follow ggml (`ggml-common.h`, `ggml-quants.c`): Q4_0, Q4_1 and Q8_0 hold 32
//! weights per block with f16 scales; the K-quants hold 256 weights per super-block.

use half::{bf16, f16};

/// A GGML tensor data type. The discriminants are ggml's `ggml_type` values, as stored in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Bf16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// ggml's type id, as stored in GGUF.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
        }
    }

    /// ggml's name for a type id, also for the ids we do not support (for error messages).
    pub fn name_of_id(id: u32) -> String {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES
            .get(id as usize)
            .map_or_else(|| format!("type {id}"), |n| (*n).to_string())
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Bf16 => "BF16",
        }
    }

    /// Number of weights in one block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let block_len = self.block_len() as u64;
        if !n.is_multiple_of(block_len) {
            return None;
        }
        (n / block_len).checked_mul(self.block_bytes() as u64)
    }

    /// The formats our WGSL kernels compute on natively (weights stay quantised on the GPU).
    pub fn gpu_format(self) -> Option<QFormat> {
        match self {
            Self::Q4_0 => Some(QFormat::Q4_0),
            Self::Q4_1 => Some(QFormat::Q4_1),
            Self::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantise `bytes` (a whole number of blocks of `ty`) into f32, appending to `out`.
///
/// The caller has checked that `bytes.len()` is a multiple of the block size.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let bb = ty.block_bytes();
    out.reserve(bytes.len() / bb * ty.block_len());
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0xF) as f32 - 8.0) * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(bb) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4K => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_q4k_block(b, out)),
        GgmlType::Q5K => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_q5k_block(b, out)),
        GgmlType::Q6K => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_q6k_block(b, out)),
    }
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// Q4_K: d f16, dmin f16, scales[12], qs[128].
fn dequant_q4k_block(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        out.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - m1));
        out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - m2));
    }
}

// Q5_K: d f16, dmin f16, scales[12], qh[32], qs[128].
fn dequant_q5k_block(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        out.extend((0..32).map(|l| {
            let hi = if qh[l] & u1 != 0 { 16.0 } else { 0.0 };
            d1 * ((ql[l] & 0xF) as f32 + hi) - m1
        }));
        out.extend((0..32).map(|l| {
            let hi = if qh[l] & u2 != 0 { 16.0 } else { 0.0 };
            d2 * ((ql[l] >> 4) as f32 + hi) - m2
        }));
    }
}

// Q6_K: ql[128], qh[64], scales[16] (i8), d f16.
fn dequant_q6k_block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + 256, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// The quantised formats our WGSL kernels read. See [`QMatrix`] for their GPU layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub const BLOCK_LEN: usize = 32;

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q8_0 => GgmlType::Q8_0,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "q4_0" => Some(Self::Q4_0),
            "q4_1" => Some(Self::Q4_1),
            "q8_0" => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// u32 words of packed quants per block.
    pub fn qs_words_per_block(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 4,
            Self::Q8_0 => 8,
        }
    }

    /// f16 scale values per block: `d`, or `d` and `m` for Q4_1.
    pub fn scales_per_block(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 1,
            Self::Q4_1 => 2,
        }
    }
}

/// A quantised matrix `[rows, cols]` (row-major: each row is `cols / 32` blocks), repacked from
/// ggml's array-of-blocks into two arrays so that every GPU load is an aligned u32:
/// - `qs`: the packed quants of block `i` at words `i * qs_words_per_block ..`, byte for byte as
///   in ggml (Q4: byte `j` holds weight `j` in its low nibble and `j + 16` in its high nibble;
///   Q8: one signed byte per weight);
/// - `scales`: the f16 scales, block `i`'s `d` (and `m` for Q4_1) at half-word
///   `i * scales_per_block ..` (little-endian halves of each u32).
///
/// This takes exactly the bytes the GGUF file does (rounded up to a u32), so the weights stay
/// as small on the GPU as on disk.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<u32>,
    pub scales: Vec<u32>,
}

impl QMatrix {
    /// Repack ggml blocks. `bytes` must hold `rows * cols / 32` blocks of `format`, and
    /// `cols % 32 == 0` (the caller checks both).
    pub fn from_ggml_blocks(format: QFormat, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        let bb = format.ggml().block_bytes();
        let n_blocks = rows * cols / QFormat::BLOCK_LEN;
        debug_assert_eq!(bytes.len(), n_blocks * bb);
        let scale_bytes = 2 * format.scales_per_block();
        let mut qs = Vec::with_capacity(n_blocks * format.qs_words_per_block());
        let mut halves: Vec<u16> = Vec::with_capacity(n_blocks * format.scales_per_block() + 1);
        for block in bytes.chunks_exact(bb) {
            for h in block[..scale_bytes].chunks_exact(2) {
                halves.push(u16::from_le_bytes([h[0], h[1]]));
            }
            for w in block[scale_bytes..].chunks_exact(4) {
                qs.push(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        if halves.len() % 2 == 1 {
            halves.push(0);
        }
        let scales = halves
            .chunks_exact(2)
            .map(|p| p[0] as u32 | (p[1] as u32) << 16)
            .collect();
        Self {
            format,
            rows,
            cols,
            qs,
            scales,
        }
    }

    /// Quantise a row-major f32 matrix (`cols % 32 == 0`), as ggml's reference quantisers do.
    pub fn quantize(format: QFormat, rows: usize, cols: usize, values: &[f32]) -> Self {
        let bytes = quantize_blocks(format, values);
        Self::from_ggml_blocks(format, rows, cols, &bytes)
    }

    /// Back to ggml's block bytes (for GGUF export and tests).
    pub fn to_ggml_blocks(&self) -> Vec<u8> {
        let n_blocks = self.rows * self.cols / QFormat::BLOCK_LEN;
        let spb = self.format.scales_per_block();
        let wpb = self.format.qs_words_per_block();
        let mut out = Vec::with_capacity(n_blocks * self.format.ggml().block_bytes());
        for i in 0..n_blocks {
            for s in 0..spb {
                let half = i * spb + s;
                let word = self.scales[half / 2];
                let h = if half.is_multiple_of(2) {
                    word as u16
                } else {
                    (word >> 16) as u16
                };
                out.extend_from_slice(&h.to_le_bytes());
            }
            for w in &self.qs[i * wpb..(i + 1) * wpb] {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Dequantise the whole matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::new();
        dequantize_into(self.format.ggml(), &self.to_ggml_blocks(), &mut out);
        out
    }

    /// Bytes the matrix takes on the GPU.
    pub fn gpu_bytes(&self) -> usize {
        4 * (self.qs.len() + self.scales.len())
    }
}

/// ggml's reference quantisation (`quantize_row_*_ref`) of values whose length is a multiple of 32.
pub fn quantize_blocks(format: QFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * format.ggml().block_bytes());
    for x in values.chunks_exact(32) {
        match format {
            QFormat::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QFormat::Q4_0 => {
                // The value of largest magnitude, with its sign, maps to -8.
                let max = x
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
            }
            QFormat::Q4_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-trip RMSE bounds relative to the RMS of uniform [-1, 1) data: a b-bit uniform
    /// quantiser with step Δ = range / (2^b - 1) has error RMS Δ/√12 (Δ ≈ 2/15 for 4 bits, 2/255
    /// for 8); blocks adapt their range, so these bounds hold with margin (candle's
    /// `quantized_tests.rs` uses the same idea).
    const Q4_RMSE_BOUND: f32 = 0.045;
    const Q8_RMSE_BOUND: f32 = 0.005;

    fn values(n: usize) -> Vec<f32> {
        // Deterministic, non-trivial data with a scale that varies per block.
        (0..n)
            .map(|i| {
                let block_scale = 0.25 + (i / 32 % 7) as f32 * 0.3;
                ((i as f32 * 0.618_034).fract() * 2.0 - 1.0) * block_scale
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let (rows, cols) = (7, 96);
        let v = values(rows * cols);
        for (format, bound) in [
            (QFormat::Q4_0, Q4_RMSE_BOUND),
            (QFormat::Q4_1, Q4_RMSE_BOUND),
            (QFormat::Q8_0, Q8_RMSE_BOUND),
        ] {
            let q = QMatrix::quantize(format, rows, cols, &v);
            let back = q.dequantize();
            let rms_x = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            let rmse = (v
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                / v.len() as f32)
                .sqrt();
            assert!(
                rmse / rms_x < bound * 2.0,
                "{format:?}: relative RMSE {}",
                rmse / rms_x
            );
            assert_eq!(
                q.to_ggml_blocks(),
                quantize_blocks(format, &v),
                "{format:?} repack"
            );
        }
    }
}
