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
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
    Iq4Xs,
    Bf16,
}

impl GgmlType {
    /// Every type codelsi reads.
    pub const ALL: [Self; 15] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Iq4Nl,
        Self::Iq4Xs,
        Self::Bf16,
    ];

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's type id, as stored in GGUF.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Iq4Nl => 20,
            Self::Iq4Xs => 23,
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
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Iq4Nl => "IQ4_NL",
            Self::Iq4Xs => "IQ4_XS",
            Self::Bf16 => "BF16",
        }
    }

    /// Number of weights in one block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Iq4Nl => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Iq4Xs => 256,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 | Self::Iq4Nl => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Iq4Xs => 136,
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
    /// The format the kernels compute on for this type, if any.
    pub fn gpu_format(self) -> Option<QFormat> {
        QFormat::EVERY.into_iter().find(|f| f.ggml() == self)
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
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in bytes.chunks_exact(bb) {
                let (d, m, at) = if ty == GgmlType::Q5_0 {
                    (f16_at(b, 0), -16.0 * f16_at(b, 0), 2)
                } else {
                    (f16_at(b, 0), f16_at(b, 2), 4)
                };
                // Bit j of qh is the fifth bit of weight j.
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                let fifth = |j: usize| if qh >> j & 1 == 1 { 16.0 } else { 0.0 };
                out.extend((0..16).map(|j| ((qs[j] & 0xF) as f32 + fifth(j)) * d + m));
                out.extend((0..16).map(|j| ((qs[j] >> 4) as f32 + fifth(j + 16)) * d + m));
            }
        }
        GgmlType::Iq4Nl => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(
                    qs.iter()
                        .map(|&q| d * IQ4_VALUES[(q & 0xF) as usize] as f32),
                );
                out.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
            }
        }
        GgmlType::Q2K => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_q2k_block(b, out)),
        GgmlType::Q3K => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_q3k_block(b, out)),
        GgmlType::Iq4Xs => bytes
            .chunks_exact(bb)
            .for_each(|b| dequant_iq4xs_block(b, out)),
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

/// The 16 levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`), non-uniform.
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

// Q2_K: scales[16] (scale low nibble, min high nibble), qs[64] (2 bits), d f16, dmin f16.
fn dequant_q2k_block(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let scales = &b[..16];
    let mut is = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                let q = &q[16 * part..16 * part + 16];
                out.extend(q.iter().map(|&v| dl * ((v >> shift) & 3) as f32 - ml));
            }
        }
    }
}

// Q3_K: hmask[32], qs[64] (low 2 bits), scales[12] (16 six-bit scales), d f16.
fn dequant_q3k_block(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, d) = (&b[..32], f16_at(b, 108));
    let s = &b[96..108];
    // ggml packs scale i's low 4 bits in s[i % 8] (low or high nibble: i / 8) and its high 2
    // bits in s[8 + i % 4] (bits 2 * (i / 4)).
    let scale = |i: usize| {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0xF;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (lo | hi << 4) as i32 - 32
    };
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scale(is) as f32;
                is += 1;
                out.extend((16 * part..16 * part + 16).map(|l| {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let high = if hmask[l] & m != 0 { 0 } else { 4 };
                    dl * (low - high) as f32
                }));
            }
            m <<= 1;
        }
    }
}

// IQ4_XS: d f16, scales_h u16, scales_l[4], qs[128]: eight sub-blocks of 32 with 6-bit scales.
fn dequant_iq4xs_block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    for (ib, qs) in b[8..136].chunks_exact(16).enumerate() {
        let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * ((lo | hi << 4) as i32 - 32) as f32;
        out.extend(
            qs.iter()
                .map(|&q| dl * IQ4_VALUES[(q & 0xF) as usize] as f32),
        );
        out.extend(
            qs.iter()
                .map(|&q| dl * IQ4_VALUES[(q >> 4) as usize] as f32),
        );
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

/// Bytes `start..end` of a ggml block.
type ByteRange = (usize, usize);

/// The quantised formats our WGSL kernels read. See [`QMatrix`] for their GPU layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// 16-bit floats, kept 16-bit (read in units of 32 as the blocks are).
    F16,
    Bf16,
}

impl QFormat {
    /// The quantised formats (8-bit codes and scales; the CPU path's integer products).
    pub const ALL: [Self; 8] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The 16-bit float formats.
    pub const HALF: [Self; 2] = [Self::F16, Self::Bf16];

    /// Every format: [`ALL`](Self::ALL), then [`HALF`](Self::HALF).
    pub const EVERY: [Self; 10] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::F16,
        Self::Bf16,
    ];

    /// Weights per unit the kernels step over (`dequant4` reads a quarter-vec of one): every
    /// format's blocks split into units of 32 (a K-quant super-block holds 8).
    pub const BLOCK_LEN: usize = 32;

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4K => GgmlType::Q4K,
            Self::Q5K => GgmlType::Q5K,
            Self::Q6K => GgmlType::Q6K,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::EVERY
            .into_iter()
            .find(|f| f.ggml().name().eq_ignore_ascii_case(name))
    }

    /// The names `parse` takes, for messages.
    pub fn names() -> String {
        Self::EVERY
            .map(|f| f.ggml().name().to_ascii_lowercase())
            .join(", ")
    }

    pub fn is_half(self) -> bool {
        matches!(self, Self::F16 | Self::Bf16)
    }

    /// Weights per block: 32, or 256 for the K-quants (the 16-bit formats, one weight per ggml
    /// element, are laid out in blocks of 32). A row is a whole number of blocks.
    pub fn block_len(self) -> usize {
        if self.is_half() {
            Self::BLOCK_LEN
        } else {
            self.ggml().block_len()
        }
    }

    /// Bytes per block in ggml's layout.
    pub fn block_bytes(self) -> usize {
        self.ggml().block_bytes() * self.block_len() / self.ggml().block_len()
    }

    /// Whether the plain-tensor reference (`kernels::reference`) dequantises this format on the
    /// device with tensor ops; the others it dequantises on the host.
    pub fn has_tensor_reference(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1 | Self::Q8_0)
    }

    /// Where a ggml block's bytes go in [`QMatrix`]: the byte ranges copied, in order, to the
    /// scales array (f16 values and packed 6/8-bit scales) and to the quants array.
    fn split(self) -> (&'static [ByteRange], &'static [ByteRange]) {
        match self {
            Self::Q4_0 => (&[(0, 2)], &[(2, 18)]),
            Self::Q4_1 => (&[(0, 4)], &[(4, 20)]),
            Self::Q5_0 => (&[(0, 2)], &[(2, 22)]),
            Self::Q5_1 => (&[(0, 4)], &[(4, 24)]),
            Self::Q8_0 => (&[(0, 2)], &[(2, 34)]),
            Self::Q4K => (&[(0, 16)], &[(16, 144)]),
            Self::Q5K => (&[(0, 16)], &[(16, 176)]),
            // The 16 scales first, then d: the scales fill whole words.
            Self::Q6K => (&[(192, 208), (208, 210)], &[(0, 192)]),
            Self::F16 | Self::Bf16 => (&[], &[(0, 64)]),
        }
    }

    /// u32 words of packed quants per ggml block.
    pub fn qs_words_per_block(self) -> usize {
        self.split().1.iter().map(|(a, b)| b - a).sum::<usize>() / 4
    }

    /// 16-bit halves of scales per ggml block: one f16 `d` (two blocks share a word), `d` and
    /// `m`, or for the K-quants whole words (Q6_K's 18 bytes padded to 20).
    pub fn scale_halves_per_block(self) -> usize {
        let bytes: usize = self.split().0.iter().map(|(a, b)| b - a).sum();
        let halves = bytes / 2;
        if self.block_len() > 32 {
            halves.next_multiple_of(2)
        } else {
            halves
        }
    }
}

/// A quantised matrix `[rows, cols]` (row-major: each row is `cols / block_len` ggml blocks),
/// repacked from ggml's array-of-blocks into two arrays so that every GPU load is an aligned u32:
/// - `qs`: the packed quants of block `i` at words `i * qs_words_per_block ..`, byte for byte as
///   in ggml (Q4: byte `j` holds weight `j` in its low nibble and `j + 16` in its high nibble;
///   Q5: the 32 fifth bits, then the nibbles; Q8: one signed byte per weight; the K-quants their
///   `qh` then `qs` arrays, Q6_K `ql` then `qh`);
/// - `scales`: block `i`'s scale bytes (see [`QFormat::split`]) at half-word
///   `i * scale_halves_per_block ..` (little-endian halves of each u32).
///
/// This takes the bytes the GGUF file does (rounded up to a u32; Q6_K 2 bytes more per 256
/// weights), so the weights stay as small on the GPU as on disk.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<u32>,
    pub scales: Vec<u32>,
}

impl QMatrix {
    /// Repack ggml blocks. `bytes` must hold `rows * cols / block_len` blocks of `format`, and
    /// `cols` must be a whole number of blocks (the caller checks both).
    pub fn from_ggml_blocks(format: QFormat, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        let bb = format.block_bytes();
        let n_blocks = rows * cols / format.block_len();
        debug_assert_eq!(bytes.len(), n_blocks * bb);
        let (scale_ranges, quant_ranges) = format.split();
        let halves_per_block = format.scale_halves_per_block();
        let mut qs = Vec::with_capacity(n_blocks * format.qs_words_per_block());
        let mut scale_bytes: Vec<u8> = Vec::with_capacity(2 * n_blocks * halves_per_block + 4);
        for block in bytes.chunks_exact(bb) {
            let start = scale_bytes.len();
            for &(a, b) in scale_ranges {
                scale_bytes.extend_from_slice(&block[a..b]);
            }
            scale_bytes.resize(start + 2 * halves_per_block, 0);
            for &(a, b) in quant_ranges {
                qs.extend(le_words(&block[a..b]));
            }
        }
        let scales = le_words(&scale_bytes);
        Self {
            format,
            rows,
            cols,
            qs,
            scales,
        }
    }

    /// Quantise a row-major f32 matrix (`cols` a whole number of blocks) with
    /// [`quantize_blocks`].
    pub fn quantize(format: QFormat, rows: usize, cols: usize, values: &[f32]) -> Self {
        let bytes = quantize_blocks(format, values);
        Self::from_ggml_blocks(format, rows, cols, &bytes)
    }

    /// Back to ggml's block bytes (for GGUF export and tests).
    pub fn to_ggml_blocks(&self) -> Vec<u8> {
        let format = self.format;
        let n_blocks = self.rows * self.cols / format.block_len();
        let (scale_ranges, quant_ranges) = format.split();
        let scale_block = 2 * format.scale_halves_per_block();
        let quant_block = 4 * format.qs_words_per_block();
        let (scale_bytes, quant_bytes) = (le_bytes(&self.scales), le_bytes(&self.qs));
        let mut out = vec![0u8; n_blocks * format.block_bytes()];
        for (i, block) in out.chunks_exact_mut(format.block_bytes()).enumerate() {
            let mut from = i * scale_block;
            for &(a, b) in scale_ranges {
                block[a..b].copy_from_slice(&scale_bytes[from..from + b - a]);
                from += b - a;
            }
            let mut from = i * quant_block;
            for &(a, b) in quant_ranges {
                block[a..b].copy_from_slice(&quant_bytes[from..from + b - a]);
                from += b - a;
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

    /// Rows `start..end` as a matrix of their own (rows are whole blocks).
    pub fn rows(&self, start: usize, end: usize) -> Self {
        let blocks_per_row = self.cols / self.format.block_len();
        let (b0, b1) = (start * blocks_per_row, end * blocks_per_row);
        let wpb = self.format.qs_words_per_block();
        let spb = self.format.scale_halves_per_block();
        let scale_bytes = le_bytes(&self.scales);
        Self {
            format: self.format,
            rows: end - start,
            cols: self.cols,
            qs: self.qs[wpb * b0..wpb * b1].to_vec(),
            scales: le_words(&scale_bytes[2 * spb * b0..2 * spb * b1]),
        }
    }
}

/// Little-endian u32 words of `bytes`, the last one zero-padded.
fn le_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|w| {
            let mut word = [0u8; 4];
            word[..w.len()].copy_from_slice(w);
            u32::from_le_bytes(word)
        })
        .collect()
}

/// The bytes of little-endian u32 `words`.
fn le_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Quantise values (a whole number of blocks of `format`) to ggml's block bytes. The 32-weight
/// formats follow ggml's reference quantisers (`quantize_row_*_ref`); the K-quants use a simpler
/// search than ggml's (sub-block scales and minimums from each sub-block's range, then quantised
/// to 6 or 8 bits against the super-block's scale), which is as exact to within a few percent.
/// The 16-bit formats round each value to nearest.
pub fn quantize_blocks(format: QFormat, values: &[f32]) -> Vec<u8> {
    let block_len = format.block_len();
    let mut out = Vec::with_capacity(values.len() / block_len * format.block_bytes());
    for x in values.chunks_exact(block_len) {
        match format {
            QFormat::F16 => out.extend(x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            QFormat::Bf16 => out.extend(x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
            QFormat::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QFormat::Q4_0 | QFormat::Q5_0 => {
                // The value of largest magnitude, with its sign, maps to the lowest level.
                let levels = if format == QFormat::Q4_0 { 16.0 } else { 32.0 };
                let max = x
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -(levels / 2.0);
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| {
                    ((v * id + levels / 2.0 + 0.5) as i32).clamp(0, levels as i32 - 1) as u8
                };
                push_nibbles(
                    format == QFormat::Q5_0,
                    &x.iter().map(|&v| q(v)).collect::<Vec<_>>(),
                    &mut out,
                );
            }
            QFormat::Q4_1 | QFormat::Q5_1 => {
                let levels = if format == QFormat::Q4_1 { 15.0 } else { 31.0 };
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, levels as i32) as u8;
                push_nibbles(
                    format == QFormat::Q5_1,
                    &x.iter().map(|&v| q(v)).collect::<Vec<_>>(),
                    &mut out,
                );
            }
            QFormat::Q4K | QFormat::Q5K => quantize_k_block(format == QFormat::Q5K, x, &mut out),
            QFormat::Q6K => quantize_q6k_block(x, &mut out),
        }
    }
    out
}

/// 32 codes of 4 or 5 bits as ggml packs them: for 5 bits the fifth bits first (bit j of a
/// u32 for weight j), then byte j holding weight j's low nibble and weight j + 16's high one.
fn push_nibbles(five_bits: bool, q: &[u8], out: &mut Vec<u8>) {
    if five_bits {
        let qh = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) & 1) as u32) << j);
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0xF) | (q[j + 16] & 0xF) << 4));
}

/// A Q4_K or Q5_K super-block: per 32-weight sub-block a scale and a minimum (as a non-negative
/// offset), both quantised to 6 bits against the super-block's f16 `d` and `dmin`.
fn quantize_k_block(five_bits: bool, x: &[f32], out: &mut Vec<u8>) {
    let top = if five_bits { 31.0 } else { 15.0 };
    let mut scale = [0f32; 8];
    let mut offset = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().copied().fold(0f32, f32::min);
        let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (hi - lo) / top;
        offset[j] = -lo;
    }
    let max_scale = scale.iter().copied().fold(0f32, f32::max);
    let max_offset = offset.iter().copied().fold(0f32, f32::max);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_offset / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let six = |v: f32, unit: f32| {
        if unit > 0.0 {
            ((v / unit).round() as i32).clamp(0, 63) as u8
        } else {
            0
        }
    };
    // The scale rounds up, so the sub-block's range still fits in its levels.
    let ls: [u8; 8] = std::array::from_fn(|j| {
        if df > 0.0 {
            ((scale[j] / df).ceil() as i32).clamp(0, 63) as u8
        } else {
            0
        }
    });
    let lm: [u8; 8] = std::array::from_fn(|j| six(offset[j], dminf));
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0xF) | (lm[j] & 0xF) << 4;
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    let mut q = [0u8; 256];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let step = df * ls[j] as f32;
        let min = dminf * lm[j] as f32;
        for (l, &v) in sub.iter().enumerate() {
            q[32 * j + l] = if step > 0.0 {
                (((v + min) / step).round() as i32).clamp(0, top as i32) as u8
            } else {
                0
            };
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if five_bits {
        // qh[l]: bit j is the fifth bit of weight l of sub-block j.
        out.extend((0..32).map(|l| (0..8).fold(0u8, |h, j| h | ((q[32 * j + l] >> 4) & 1) << j)));
    }
    // Chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones.
    for c in 0..4 {
        out.extend((0..32).map(|l| (q[64 * c + l] & 0xF) | (q[64 * c + 32 + l] & 0xF) << 4));
    }
}

/// A Q6_K super-block: per 16 weights a signed 8-bit scale against the f16 `d`, codes -32..31.
fn quantize_q6k_block(x: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|i| {
        x[16 * i..16 * i + 16]
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()))
            / 31.0
    });
    let max_scale = scale.iter().copied().fold(0f32, f32::max);
    let d = f16::from_f32(max_scale / 127.0);
    let df = d.to_f32();
    let ls: [i8; 16] = std::array::from_fn(|i| {
        if df > 0.0 {
            ((scale[i] / df).ceil() as i32).clamp(0, 127) as i8
        } else {
            0
        }
    });
    let q: [u8; 256] = std::array::from_fn(|i| {
        let step = df * ls[i / 16] as f32;
        let code = if step > 0.0 {
            (x[i] / step).round() as i32
        } else {
            0
        };
        (code.clamp(-32, 31) + 32) as u8
    });
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let q = &q[128 * half..128 * half + 128];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l], q[l + 32], q[l + 64], q[l + 96]);
            ql[64 * half + l] = (q1 & 0xF) | (q3 & 0xF) << 4;
            ql[64 * half + l + 32] = (q2 & 0xF) | (q4 & 0xF) << 4;
            qh[32 * half + l] = (q1 >> 4) | (q2 >> 4) << 2 | (q3 >> 4) << 4 | (q4 >> 4) << 6;
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(ls.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
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
        let (rows, cols) = (7, 512);
        let v = values(rows * cols);
        for format in QFormat::EVERY {
            let bound = match format {
                QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q4K => Q4_RMSE_BOUND,
                QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q5K => Q4_RMSE_BOUND / 2.0,
                QFormat::Q6K => Q4_RMSE_BOUND / 4.0,
                QFormat::Q8_0 => Q8_RMSE_BOUND,
                // Rounding to 11 and 8 significant bits: relative errors of 2^-12 and 2^-9 at
                // most, less in RMS.
                QFormat::F16 => 2f32.powi(-12),
                QFormat::Bf16 => 2f32.powi(-9),
            };
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
            let part = q.rows(2, 5);
            assert_eq!(
                part.dequantize(),
                back[2 * cols..5 * cols],
                "{format:?} rows"
            );
        }
    }

    #[test]
    fn every_type_id_round_trips() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(GgmlType::name_of_id(ty.id()), ty.name());
        }
        for f in QFormat::EVERY {
            assert_eq!(QFormat::parse(f.ggml().name()), Some(f));
            assert_eq!(f.ggml().gpu_format(), Some(f));
        }
    }
}
