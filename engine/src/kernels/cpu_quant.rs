//! The CPU path's quantised products: weights stay in their ggml blocks (as [`QMatrix`] lays
//! them out) and the inner loop is an integer dot product of bytes, as in llama.cpp's CPU
//! backend.
//!
//! - x is quantised to 8 bits per 32-value unit ([`QActs`]: `x ≈ d · code`, `d = max|x| / 127`),
//!   or per 256-value super-block for the K-quants' decode kernel, whose weights' integer unit
//!   scales then multiply the byte products before any conversion to float.
//! - Every format's 32-weight unit is `a · code + c` with unsigned codes (Q8_0: signed), `a` and
//!   `c` per 16-weight half (Q6_K has a scale per 16 weights; every other format one per unit).
//!   A task unpacks [`TILE_ROWS`] weight rows into a [`Tile`] of codes and per-unit scales once,
//!   then runs every row of x against it, so prefill decodes each weight once per task.
//! - `x · w = Σ_units d · Σ_halves a · (code_x · code_w) + Σ_halves c · d · Σ code_x`: the byte
//!   products go through `vpmaddubsw`/`vpmaddwd` (AVX2), `vpdpbusd` (AVX-512 VNNI) or `sdot`
//!   (aarch64 with the dot-product extension). On AVX2 the tile holds its codes a second time
//!   with 8 weight rows interleaved, so that a register's lanes are 8 weight rows and four rows
//!   of x take a register block with no horizontal sum ([`gemm_avx2`]); VNNI and `sdot` take
//!   four rows of x against two weight rows; a portable loop serves other processors. On
//!   processors with AMX-INT8 the tiles take one `tdpbusd` per unit for 16 weight rows by 16
//!   rows of x instead ([`amx`]).
//! - The backward's `dy · W` ([`q_matmul_t`]) dequantises one 32-column unit of every weight
//!   row at a time and multiplies in f32: gradients are not quantised. On AMX-BF16, each f32
//!   operand is split into two bf16 values and the tiles take three of the four cross terms,
//!   which keeps each product to about 2⁻¹⁷ of its size (`amx::times_unit_bf16`).
//! - 16-bit float weights (F16, BF16) are widened to f32 a tile at a time and multiplied with
//!   f32 x (`half_matmul`).
//!
//! [`QMatrix`]: crate::quant::QMatrix

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use crate::kernels::cpu::{contiguous, dot, dot_rows, flex, transpose};
use crate::kernels::{QTensor, pool};
use crate::quant::{QFormat, QMatrix};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Values per unit: every format's blocks are whole units (a K-quant super-block holds 8).
const UNIT: usize = 32;

/// Weight rows one task unpacks and multiplies: the tile of the widest projection of the 1.5B
/// model (8,960 columns) takes 420 KB of codes and scales, inside a core's L2.
pub const TILE_ROWS: usize = 16;

/// A quantised weight `[rows, cols]` as [`QMatrix`](crate::quant::QMatrix) lays it out, borrowed
/// as bytes (the words are little-endian; so are the processors this runs on).
#[derive(Clone, Copy)]
pub struct QWeights<'a> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    /// Block `i`'s quant bytes at `i * 4 * qs_words_per_block`.
    pub qs: &'a [u8],
    /// Block `i`'s scale bytes at `i * 2 * scale_halves_per_block`.
    pub scales: &'a [u8],
}

impl<'a> From<&'a QMatrix> for QWeights<'a> {
    /// The matrix's words as bytes, in place.
    fn from(q: &'a QMatrix) -> Self {
        Self {
            format: q.format,
            rows: q.rows,
            cols: q.cols,
            qs: bytemuck::cast_slice(&q.qs),
            scales: bytemuck::cast_slice(&q.scales),
        }
    }
}

impl QWeights<'_> {
    /// Whether the byte arrays hold what the shape needs (the caller's tensors could be short).
    fn is_whole(&self) -> bool {
        let f = self.format;
        let blocks = self.rows * self.cols / f.block_len();
        self.cols.is_multiple_of(f.block_len())
            && self.qs.len() >= blocks * block_sizes(f).0
            && self.scales.len() >= blocks * block_sizes(f).1
    }
}

/// Rows of x quantised to 8 bits with one scale per block of values: a 32-value unit, or for
/// the K-quant decode kernel a 256-value super-block (`x ≈ d · code`, `d = max|x| / 127` over
/// the block).
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    /// Values per scale: [`UNIT`] or 256.
    pub block: usize,
    /// `[rows * cols]`
    codes: Vec<i8>,
    /// `[rows * units]`: the scale `d` of each unit's block.
    d: Vec<f32>,
    /// `[rows * units * 2]`: `Σ code` over each 16-value half (x86's fused K-quant kernel).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    half_isums: Vec<i16>,
    /// `[rows * units]`: `d · Σ code` over each unit (what a weight's `c` meets).
    unit_sums: Vec<f32>,
    /// `[rows * units * 2]`: the same over each half (what Q6_K's per-half `c` meets).
    half_sums: Vec<f32>,
    /// `half_sums` and `unit_sums` transposed, `[2 * units, rows]` and `[units, rows]`, so
    /// that the weights' offsets meet 32 rows of x in four registers ([`add_min_terms`]); made
    /// on first use, as the AVX2 tiles add the offsets in their own loop.
    sums_t: std::sync::OnceLock<(Vec<f32>, Vec<f32>)>,
    /// x laid out for AMX's tile products, made on first use.
    #[cfg(target_arch = "x86_64")]
    amx: std::sync::OnceLock<amx::Acts>,
}

impl QActs {
    /// Quantise `[rows, cols]` row-major values per 32-value unit (`cols` a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::quantize_blocks(x, rows, cols, UNIT)
    }

    /// Quantise `[rows, cols]` row-major values with a scale per `block` values: [`UNIT`], or 256
    /// (a K-quant super-block; `cols` a multiple of it).
    pub fn quantize_blocks(x: &[f32], rows: usize, cols: usize, block: usize) -> Self {
        assert_eq!(x.len(), rows * cols, "x is not [rows, cols]");
        assert!(
            (block == UNIT || block == 256) && cols.is_multiple_of(block),
            "cols {cols} is not a whole number of {block}-value blocks"
        );
        let units = rows * cols / UNIT;
        let mut codes = vec![0i8; rows * cols];
        let mut d = vec![0f32; units];
        let mut half_isums = vec![0i16; 2 * units];
        let (c, ds) = (&mut codes, &mut d);
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Portable {
            // SAFETY: `detect` found AVX2 and FMA.
            unsafe {
                match block {
                    UNIT => quantize_blocks_avx2::<UNIT>(x, c, ds),
                    _ => quantize_blocks_avx2::<256>(x, c, ds),
                }
            }
        } else {
            match block {
                UNIT => quantize_blocks::<UNIT>(x, c, ds),
                _ => quantize_blocks::<256>(x, c, ds),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        match block {
            UNIT => quantize_blocks::<UNIT>(x, c, ds),
            _ => quantize_blocks::<256>(x, c, ds),
        }
        for (s, half) in half_isums.iter_mut().zip(codes.chunks_exact(UNIT / 2)) {
            // At most 16 · 127 in size.
            *s = half.iter().map(|&c| c as i16).sum();
        }
        let half_sums: Vec<f32> = half_isums
            .iter()
            .enumerate()
            .map(|(i, &s)| d[i / 2] * s as f32)
            .collect();
        let unit_sums: Vec<f32> = half_sums.chunks_exact(2).map(|h| h[0] + h[1]).collect();
        Self {
            rows,
            cols,
            block,
            codes,
            d,
            half_isums,
            half_sums,
            unit_sums,
            sums_t: std::sync::OnceLock::new(),
            #[cfg(target_arch = "x86_64")]
            amx: std::sync::OnceLock::new(),
        }
    }

    /// [`amx`](Self::amx): x as AMX's B operand.
    #[cfg(target_arch = "x86_64")]
    fn amx(&self) -> &amx::Acts {
        self.amx.get_or_init(|| amx::Acts::new(self))
    }

    /// [`sums_t`](Self::sums_t): `(half sums, unit sums)` transposed.
    fn sums_t(&self) -> &(Vec<f32>, Vec<f32>) {
        self.sums_t.get_or_init(|| {
            let per_row = self.cols / UNIT;
            (
                transpose(self.half_sums.clone(), 2 * per_row, self.rows),
                transpose(self.unit_sums.clone(), per_row, self.rows),
            )
        })
    }

    /// The values the codes stand for: what the products multiply exactly (tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .chunks_exact(UNIT)
            .zip(&self.d)
            .flat_map(|(c, d)| c.iter().map(move |&c| c as f32 * d))
            .collect()
    }
}

/// [`QActs::quantize_blocks`]'s loop: per `B` values, the scale (written to each of its units)
/// and the codes.
#[inline(always)]
fn quantize_blocks<const B: usize>(x: &[f32], codes: &mut [i8], d: &mut [f32]) {
    codes
        .chunks_exact_mut(B)
        .zip(x.chunks_exact(B))
        .zip(d.chunks_exact_mut(B / UNIT))
        .for_each(|((codes, x), d)| {
            let x: &[f32; B] = x.try_into().unwrap_or_else(|_| unreachable!());
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            d.fill(amax / 127.0);
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (c, v) in codes.iter_mut().zip(x) {
                // Rounded to the nearest, ties to even, by the float addition itself: adding
                // 1.5 · 2²³ leaves no fraction bits (|v · inv| <= 127). `round` and
                // `round_ties_even` compile to a call per value (`roundf`, `rintf`).
                const SHIFT: f32 = 12_582_912.0;
                *c = ((v * inv + SHIFT) - SHIFT) as i8;
            }
        });
}

/// [`quantize_blocks`] compiled for AVX2: its loops become vector instructions (a prefill
/// quantises every row of x for each product).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_blocks_avx2<const B: usize>(x: &[f32], codes: &mut [i8], d: &mut [f32]) {
    quantize_blocks::<B>(x, codes, d);
}

/// Weight rows unpacked for the integer products.
#[derive(Default)]
struct Tile {
    rows: usize,
    /// `[rows * cols]`: unsigned codes (Q8_0: signed bytes).
    codes: Vec<u8>,
    /// `[rows * units * per]`: `a` of each unit, or of each half where the format has a scale
    /// per 16 weights (`per` = [`scales_per_unit`]).
    scales: Vec<f32>,
    /// `[rows * units * per]`: `c`, likewise.
    mins: Vec<f32>,
    /// The codes again for [`gemm_avx2`] and [`gemm_vnni`], [`LANES`] rows interleaved: per
    /// group of 8 rows and unit, 8 steps of 32 bytes, step `j` holding bytes `4j..4j + 4` of
    /// each row in turn, so that a register's eight i32 lanes are eight weight rows (rows past
    /// the tile are zero). x86 only, as the two below. On AMX, the codes unit by unit instead:
    /// `[units, 16 rows, 32]` ([`amx::lay_out`]).
    #[cfg(target_arch = "x86_64")]
    lanes: Vec<u8>,
    /// `scales` and `mins` likewise: `[groups * units * per * LANES]`.
    #[cfg(target_arch = "x86_64")]
    lane_scales: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    lane_mins: Vec<f32>,
}

impl Tile {
    #[inline(always)]
    fn unpack(&mut self, isa: Isa, w: &QWeights<'_>, first: usize, rows: usize) {
        // One copy of the loop per format, so that every `match` on it below folds away.
        match w.format {
            QFormat::Q4_0 => self.unpack_as::<0>(isa, w, first, rows),
            QFormat::Q4_1 => self.unpack_as::<1>(isa, w, first, rows),
            QFormat::Q5_0 => self.unpack_as::<2>(isa, w, first, rows),
            QFormat::Q5_1 => self.unpack_as::<3>(isa, w, first, rows),
            QFormat::Q8_0 => self.unpack_as::<4>(isa, w, first, rows),
            QFormat::Q4K => self.unpack_as::<5>(isa, w, first, rows),
            QFormat::Q5K => self.unpack_as::<6>(isa, w, first, rows),
            QFormat::Q6K => self.unpack_as::<7>(isa, w, first, rows),
            QFormat::F16 | QFormat::Bf16 => unreachable!("16-bit weights take half_matmul"),
        }
    }

    /// [`unpack`](Self::unpack) for `QFormat::ALL[F]`.
    #[inline(always)]
    fn unpack_as<const F: usize>(&mut self, isa: Isa, w: &QWeights<'_>, first: usize, rows: usize) {
        let f = QFormat::ALL[F];
        debug_assert_eq!(f, w.format);
        let units = w.cols / UNIT;
        let per_block = f.block_len() / UNIT;
        self.rows = rows;
        // AMX's tile products read a whole tile of 16 rows whatever `rows`.
        #[cfg(target_arch = "x86_64")]
        let stored = if isa == Isa::Amx {
            rows.max(TILE_ROWS)
        } else {
            rows
        };
        #[cfg(not(target_arch = "x86_64"))]
        let stored = rows;
        self.codes.resize(stored * w.cols, 0);
        let per = scales_per_unit(f);
        self.scales.resize(stored * units * per, 0.0);
        self.mins.resize(stored * units * per, 0.0);
        let blocks = first * units / per_block..(first + rows) * units / per_block;
        let (qb, sb) = block_sizes(f);
        let q = &w.qs[qb * blocks.start..qb * blocks.end];
        let s = &w.scales[sb * blocks.start..sb * blocks.end];
        let bl = f.block_len();
        let codes = self.codes.chunks_exact_mut(bl);
        match isa {
            #[cfg(target_arch = "x86_64")]
            _ if isa.has_avx2() => {
                for (q, codes) in q.chunks_exact(qb).zip(codes) {
                    // SAFETY: `Isa::detect` chose these only where the processor has AVX2.
                    unsafe { block_codes_avx2(f, q, codes) };
                }
            }
            _ => {
                for (q, codes) in q.chunks_exact(qb).zip(codes) {
                    for (u, codes) in codes.chunks_exact_mut(UNIT).enumerate() {
                        let codes = codes.try_into().unwrap_or_else(|_| unreachable!());
                        unit_codes(f, q, u, codes);
                    }
                }
            }
        }
        let scales = self.scales.chunks_exact_mut(per * per_block);
        let mins = self.mins.chunks_exact_mut(per * per_block);
        for ((s, scales), mins) in s.chunks_exact(sb).zip(scales).zip(mins) {
            block_scales(f, s, scales, mins);
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::Vnni) {
            // SAFETY: `Isa::detect` chose these only where the processor has AVX2.
            unsafe { self.interleave_avx2(w.cols, per) };
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Amx {
            amx::lay_out(self, f, w.cols);
        }
    }

    /// Fills [`lanes`](Self::lanes), [`lane_scales`](Self::lane_scales) and
    /// [`lane_mins`](Self::lane_mins) from the row-major codes, scales and offsets: each unit of
    /// 8 rows is an 8 × 8 transpose of 4-byte words.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    fn interleave_avx2(&mut self, k: usize, per: usize) {
        use std::arch::x86_64::*;
        let units = k / UNIT;
        let groups = self.rows.div_ceil(LANES);
        self.lanes.resize(groups * LANES * k, 0);
        self.lane_scales.resize(groups * units * per * LANES, 0.0);
        self.lane_mins.resize(groups * units * per * LANES, 0.0);
        let codes = &self.codes[..self.rows * k];
        for (g, out) in self.lanes.chunks_exact_mut(LANES * k).enumerate() {
            let rows = (self.rows - g * LANES).min(LANES);
            for (u, out) in out.chunks_exact_mut(LANES * UNIT).enumerate() {
                let mut r = [_mm256_setzero_si256(); LANES];
                for (i, r) in r.iter_mut().enumerate().take(rows) {
                    let row = bytes::<UNIT>(&codes[(g * LANES + i) * k + UNIT * u..]);
                    // SAFETY: reads the 32 bytes of `row`.
                    *r = unsafe { _mm256_loadu_si256(row.as_ptr().cast()) };
                }
                for (j, out) in transpose_words(r).iter().zip(out.chunks_exact_mut(UNIT)) {
                    let out: &mut [u8; UNIT] = out.try_into().unwrap_or_else(|_| unreachable!());
                    // SAFETY: writes the 32 bytes of `out`.
                    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), *j) };
                }
            }
        }
        let n = units * per;
        for (lanes, rows) in [
            (&mut self.lane_scales, &self.scales),
            (&mut self.lane_mins, &self.mins),
        ] {
            for (g, lanes) in lanes.chunks_exact_mut(n * LANES).enumerate() {
                let rows = &rows[g * LANES * n..(g * LANES * n + LANES * n).min(self.rows * n)];
                for (s, lanes) in lanes.chunks_exact_mut(LANES).enumerate() {
                    for (i, o) in lanes.iter_mut().enumerate() {
                        *o = rows.get(i * n + s).copied().unwrap_or(0.0);
                    }
                }
            }
        }
    }
}

/// Weight rows in one register of [`gemm_avx2`]: an i32 or f32 lane each.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 8;

/// The 8 × 8 transpose of 4-byte words: word `j` of register `i` becomes word `i` of register
/// `j`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn transpose_words(
    r: [std::arch::x86_64::__m256i; LANES],
) -> [std::arch::x86_64::__m256i; LANES] {
    use std::arch::x86_64::*;
    // Pairs of rows, then fours, within each 128-bit half; the halves are swapped last.
    let t = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    let q = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    [
        _mm256_permute2x128_si256::<0x20>(q[0], q[4]),
        _mm256_permute2x128_si256::<0x20>(q[1], q[5]),
        _mm256_permute2x128_si256::<0x20>(q[2], q[6]),
        _mm256_permute2x128_si256::<0x20>(q[3], q[7]),
        _mm256_permute2x128_si256::<0x31>(q[0], q[4]),
        _mm256_permute2x128_si256::<0x31>(q[1], q[5]),
        _mm256_permute2x128_si256::<0x31>(q[2], q[6]),
        _mm256_permute2x128_si256::<0x31>(q[3], q[7]),
    ]
}

/// The f16 at bytes `at..at + 2`, converted in integer instructions without a branch (half's
/// conversion is a call through a run-time feature check, once per unit here; scaling the
/// magnitude's bits by 2¹¹² in float takes a microcode assist for the many subnormal scales of
/// Q6_K, whose f32 form is denormal): exponent rebiased, a subnormal's mantissa normalised by
/// its leading zeros, infinity and NaN kept, the sign copied.
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]) as u32;
    let (e, m) = ((h >> 10) & 0x1f, h & 0x3ff);
    // A subnormal is m · 2⁻²⁴: its top bit p becomes the implicit one.
    let p = 31 - (m | 1).leading_zeros();
    let bits = match (e, m) {
        (31, _) => 0x7f80_0000 | (m << 13),
        (0, 0) => 0,
        (0, _) => ((p + 103) << 23) | ((m << (23 - p)) & 0x7f_ffff),
        _ => ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// Scale and minimum of unit `j` of a Q4_K/Q5_K super-block (6 bits each in 12 bytes).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (s, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (s as f32, m as f32)
}

/// Unit `unit` (counted over the whole matrix) of `w`: its 32 codes into `codes`, and `(a, c)`
/// of its two halves (value = `a · code + c`).
fn unpack_unit(w: &QWeights<'_>, unit: usize, codes: &mut [u8; UNIT]) -> ([f32; 2], [f32; 2]) {
    let per_block = w.format.block_len() / UNIT;
    let (q, s) = block_bytes(w, unit / per_block);
    unit_codes(w.format, q, unit % per_block, codes);
    unit_scales(w.format, s, unit % per_block)
}

/// The quant bytes and the scale bytes of block `block` of `w`.
#[inline(always)]
fn block_bytes<'a>(w: &QWeights<'a>, block: usize) -> (&'a [u8], &'a [u8]) {
    let (qb, sb) = block_sizes(w.format);
    (
        &w.qs[block * qb..(block + 1) * qb],
        &w.scales[block * sb..(block + 1) * sb],
    )
}

/// A block of `f`'s quant bytes and scale bytes in the [`QWeights`] layout.
#[inline(always)]
fn block_sizes(f: QFormat) -> (usize, usize) {
    (4 * f.qs_words_per_block(), 2 * f.scale_halves_per_block())
}

/// The first `N` bytes of `b` as an array (fixed sizes let the loops below vectorise).
#[inline(always)]
fn bytes<const N: usize>(b: &[u8]) -> &[u8; N] {
    b[..N].try_into().unwrap_or_else(|_| unreachable!())
}

/// The 32 codes of unit `u` of a ggml block of `f` whose quant bytes are `q`: unsigned (Q8_0:
/// signed bytes), in weight order.
#[inline(always)]
fn unit_codes(f: QFormat, q: &[u8], u: usize, codes: &mut [u8; UNIT]) {
    let nibbles = |q: &[u8; 16], codes: &mut [u8; UNIT]| {
        for j in 0..16 {
            codes[j] = q[j] & 0xF;
            codes[j + 16] = q[j] >> 4;
        }
    };
    match f {
        QFormat::Q4_0 | QFormat::Q4_1 => nibbles(bytes(q), codes),
        QFormat::Q5_0 | QFormat::Q5_1 => {
            nibbles(bytes(&q[4..]), codes);
            let qh = u32::from_le_bytes(*bytes(q));
            for (j, c) in codes.iter_mut().enumerate() {
                *c |= (((qh >> j) & 1) << 4) as u8;
            }
        }
        QFormat::Q8_0 => codes.copy_from_slice(bytes::<UNIT>(q)),
        QFormat::Q4K | QFormat::Q5K => {
            // Q5_K: qh[32] first. Unit u is chunk u / 2's low or high nibbles.
            let at = if f == QFormat::Q4K { 0 } else { 32 } + 32 * (u / 2);
            let (ql, shift): (&[u8; 32], usize) = (bytes(&q[at..]), 4 * (u % 2));
            for (c, &b) in codes.iter_mut().zip(ql) {
                *c = (b >> shift) & 0xF;
            }
            if f == QFormat::Q5K {
                let qh: &[u8; 32] = bytes(q);
                for (c, &h) in codes.iter_mut().zip(qh) {
                    *c |= ((h >> u) & 1) << 4;
                }
            }
        }
        QFormat::Q6K => {
            // ql[128], qh[64]: unit 4h + t takes ql's nibbles and two bits of qh of half h.
            let (h, t) = (u / 4, u % 4);
            let ql: &[u8; 32] = bytes(&q[64 * h + 32 * (t & 1)..]);
            let qh: &[u8; 32] = bytes(&q[128 + 32 * h..]);
            let (shift, hshift) = (4 * (t / 2), 2 * t);
            for ((c, &l), &hb) in codes.iter_mut().zip(ql).zip(qh) {
                *c = ((l >> shift) & 0xF) | (((hb >> hshift) & 3) << 4);
            }
        }
        QFormat::F16 | QFormat::Bf16 => unreachable!("16-bit weights have no codes"),
    }
}

/// The codes of a block of a one-unit format ([`unit_codes`]) in one AVX2 register: nibbles
/// split with shifts and masks, Q5's fifth bits spread from their u32 to bytes with a shuffle
/// and a compare.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn unit_codes_avx2(f: QFormat, q: &[u8]) -> std::arch::x86_64::__m256i {
    assert!(q.len() >= block_sizes(f).0, "not a whole block");
    // SAFETY: a whole block's bytes (asserted); the caller's AVX2.
    unsafe { unit_codes_at(f, q.as_ptr()) }
}

/// [`unit_codes_avx2`] of the block whose quant bytes start at `q`.
///
/// # Safety
/// `q` is valid for a whole block of `f`'s quant bytes; AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unit_codes_at(f: QFormat, q: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(0xF);
    let nibbles = |b: *const u8| {
        // SAFETY: 16 bytes of the caller's block (Q4: from its start; Q5: after the fifth bits).
        let v = unsafe { _mm_loadu_si128(b.cast()) };
        let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
        _mm256_and_si256(both, low4)
    };
    match f {
        QFormat::Q4_0 | QFormat::Q4_1 => nibbles(q),
        QFormat::Q5_0 | QFormat::Q5_1 => {
            // SAFETY: a Q5 block starts with its 4 bytes of fifth bits.
            let qh = u32::from_le(unsafe { q.cast::<u32>().read_unaligned() });
            // Byte j takes byte j / 8 of qh, then its bit j % 8.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            let fifth = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
            _mm256_or_si256(nibbles(q.wrapping_add(4)), fifth)
        }
        // SAFETY: a Q8_0 block's quant bytes are its 32 codes.
        QFormat::Q8_0 => unsafe { _mm256_loadu_si256(q.cast()) },
        QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => {
            unreachable!("a K-quant block's units come from `for_each_unit_avx2`")
        }
        QFormat::F16 | QFormat::Bf16 => unreachable!("16-bit weights have no codes"),
    }
}

/// The codes of a whole block (see [`unit_codes_avx2`]) into `codes`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn block_codes_avx2(f: QFormat, q: &[u8], codes: &mut [u8]) {
    use std::arch::x86_64::*;
    for_each_unit_avx2(f, q, |u, v| {
        let out: &mut [u8; UNIT] = (&mut codes[UNIT * u..UNIT * u + UNIT])
            .try_into()
            .unwrap_or_else(|_| unreachable!());
        // SAFETY: writes the 32 bytes of `out`.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) }
    });
}

/// `each(u, codes)` for every unit of a block in order, the codes in a register: a K-quant's
/// eight units with every shift a constant and each 32 bytes of quants loaded once for the two
/// or four units they hold.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn for_each_unit_avx2(
    f: QFormat,
    q: &[u8],
    mut each: impl FnMut(usize, std::arch::x86_64::__m256i),
) {
    use std::arch::x86_64::*;
    let load = |b: &[u8]| {
        // SAFETY: reads the 32 bytes `bytes` checked are inside the slice.
        unsafe { _mm256_loadu_si256(bytes::<32>(b).as_ptr().cast()) }
    };
    let (low4, low2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    let (lo, hi) = (
        |v: __m256i| _mm256_and_si256(v, low4),
        |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4),
    );
    match f {
        QFormat::Q4K | QFormat::Q5K => {
            let (ql, qh) = if f == QFormat::Q4K {
                (q, None)
            } else {
                (&q[32..], Some(load(q)))
            };
            let one = _mm256_set1_epi8(1);
            // Unit u's fifth bits are bit u of each qh byte, moved to bit 4.
            let fifth = |qh: __m256i, u: i32| {
                let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(u)), one);
                _mm256_slli_epi16::<4>(bit)
            };
            for c in 0..4 {
                let v = load(&ql[32 * c..]);
                let (a, b) = match qh {
                    Some(qh) => (
                        _mm256_or_si256(lo(v), fifth(qh, 2 * c as i32)),
                        _mm256_or_si256(hi(v), fifth(qh, 2 * c as i32 + 1)),
                    ),
                    None => (lo(v), hi(v)),
                };
                each(2 * c, a);
                each(2 * c + 1, b);
            }
        }
        QFormat::Q6K => {
            for h in 0..2 {
                let (l0, l1) = (load(&q[64 * h..]), load(&q[64 * h + 32..]));
                let qh = load(&q[128 + 32 * h..]);
                let high = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, low2));
                each(4 * h, _mm256_or_si256(lo(l0), high(qh)));
                each(
                    4 * h + 1,
                    _mm256_or_si256(lo(l1), high(_mm256_srli_epi16::<2>(qh))),
                );
                each(
                    4 * h + 2,
                    _mm256_or_si256(hi(l0), high(_mm256_srli_epi16::<4>(qh))),
                );
                each(
                    4 * h + 3,
                    _mm256_or_si256(hi(l1), high(_mm256_srli_epi16::<6>(qh))),
                );
            }
        }
        _ => each(0, unit_codes_avx2(f, q)),
    }
}

/// `(a, c)` of the two halves of unit `u` of a ggml block of `f` whose scale bytes are `s`:
/// value = `a · code + c`.
#[inline(always)]
fn unit_scales(f: QFormat, s: &[u8], u: usize) -> ([f32; 2], [f32; 2]) {
    match f {
        QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q8_0 => {
            let m = if matches!(f, QFormat::Q4_1 | QFormat::Q5_1) {
                f16_at(s, 2)
            } else {
                0.0
            };
            let (a, c) = unit_affine(f, f16_at(s, 0), m);
            ([a, a], [c, c])
        }
        QFormat::Q4K | QFormat::Q5K => {
            let (d, dmin) = (f16_at(s, 0), f16_at(s, 2));
            let (scale, min) = scale_min_k4(u, bytes::<12>(&s[4..]));
            let (a, c) = (d * scale, -dmin * min);
            ([a, a], [c, c])
        }
        QFormat::Q6K => {
            // 16 signed scales, then d.
            let d = f16_at(s, 16);
            let (h, t) = (u / 4, u % 4);
            let a0 = d * s[8 * h + 2 * t] as i8 as f32;
            let a1 = d * s[8 * h + 2 * t + 1] as i8 as f32;
            ([a0, a1], [-32.0 * a0, -32.0 * a1])
        }
        QFormat::F16 | QFormat::Bf16 => unreachable!("16-bit weights have no codes"),
    }
}

/// `(a, c)` (value = `a · code + c`) of a block of a one-unit format whose f16 scale is `d`
/// and, in Q4_1 and Q5_1, whose offset is `m`.
#[inline(always)]
fn unit_affine(f: QFormat, d: f32, m: f32) -> (f32, f32) {
    match f {
        QFormat::Q4_0 => (d, -8.0 * d),
        QFormat::Q5_0 => (d, -16.0 * d),
        QFormat::Q4_1 | QFormat::Q5_1 => (d, m),
        _ => (d, 0.0),
    }
}

/// Scale values per 32-weight unit: Q6_K has a scale per 16 weights, every other format one.
#[inline(always)]
fn scales_per_unit(f: QFormat) -> usize {
    if f == QFormat::Q6K { 2 } else { 1 }
}

/// `a` and `c` of each unit (Q6_K: each half) of a block whose scale bytes are `s`, the block's
/// own scales decoded once, in straight lines that vectorise.
#[inline(always)]
fn block_scales(f: QFormat, s: &[u8], scales: &mut [f32], mins: &mut [f32]) {
    match f {
        QFormat::Q4K | QFormat::Q5K => {
            let (d, dmin) = (f16_at(s, 0), f16_at(s, 2));
            let q = bytes::<12>(&s[4..]);
            // `scale_min_k4` for all eight units at once.
            let mut sc = [0u8; 8];
            let mut mn = [0u8; 8];
            for j in 0..4 {
                sc[j] = q[j] & 63;
                mn[j] = q[j + 4] & 63;
                sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
                mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
            }
            scales[..8].copy_from_slice(&sc.map(|v| d * v as f32));
            mins[..8].copy_from_slice(&mn.map(|v| -dmin * v as f32));
        }
        QFormat::Q6K => {
            // Half i of the block's 16 is unit i / 2's: scale 8h + 2t + i % 2 (see
            // `unit_scales`), which is i itself.
            let (d, sc) = (f16_at(s, 16), bytes::<16>(s));
            let a = sc.map(|v| d * v as i8 as f32);
            scales[..16].copy_from_slice(&a);
            mins[..16].copy_from_slice(&a.map(|a| -32.0 * a));
        }
        _ => {
            let ([a, _], [c, _]) = unit_scales(f, s, 0);
            scales[0] = a;
            mins[0] = c;
        }
    }
}

/// The instruction set the products run on, detected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// VNNI, with prefill's tiles on AMX-INT8 (Xeon Sapphire Rapids and later, on Linux).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// aarch64 with the dot-product extension (`sdot`: Armv8.4, optional from 8.2; Apple M1 and
    /// later, Cortex-A76 and later, Neoverse).
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Isa {
    /// Every instruction set, ordered by what each adds: a processor runs a prefix of it.
    const ALL: &[Isa] = &[
        Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2,
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni,
        #[cfg(target_arch = "x86_64")]
        Isa::Amx,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon,
    ];

    /// The instruction set the products run on: the best this processor has, or a lesser one
    /// that `CODELSI_CPU_ISA` names (`portable`, `avx2`, `vnni`, `amx`, `neon`), to compare
    /// them or to step around one.
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::find();
            let isa = match std::env::var("CODELSI_CPU_ISA") {
                Ok(name) => Self::at_most(best, &name),
                Err(_) => best,
            };
            tracing::debug!(isa = isa.name(), "the CPU path's integer products");
            isa
        })
    }

    /// The instruction set `name` names if this processor runs it, else `best` (with a warning).
    fn at_most(best: Self, name: &str) -> Self {
        let runs = &Self::ALL[..=Self::ALL.iter().position(|&i| i == best).unwrap_or(0)];
        match runs
            .iter()
            .find(|i| i.short_name() == name.trim().to_lowercase())
        {
            Some(&isa) => isa,
            None => {
                tracing::warn!(
                    asked = name,
                    using = best.short_name(),
                    "CODELSI_CPU_ISA names no instruction set this processor runs"
                );
                best
            }
        }
    }

    /// `CODELSI_CPU_ISA`'s name for it.
    pub fn short_name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => "vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
        }
    }

    /// The best instruction set this processor has.
    fn find() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if crate::kernels::cpu::has_avx2_fma_f16c() {
                if has!("avx512f") && has!("avx512vnni") && has!("avx512vl") {
                    if amx::granted() {
                        return Isa::Amx;
                    }
                    return Isa::Vnni;
                }
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Isa::Neon;
        }
        Isa::Portable
    }

    /// For reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable integer products",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "AVX2 integer products (vpmaddubsw)",
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => "AVX-512 VNNI integer products (vpdpbusd)",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "AMX-INT8 tile products (tdpbusd), VNNI for decode",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "NEON integer products (sdot)",
        }
    }

    /// Whether the products have fused decode kernels on this instruction set (x86's; the
    /// others take every product through tiles).
    fn fuses(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.has_avx2() {
            return true;
        }
        false
    }

    /// x86 with AVX2, FMA and F16C: every instruction set past the portable one.
    #[cfg(target_arch = "x86_64")]
    fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Vnni | Isa::Amx)
    }

    /// x86 with AVX-512F: the VNNI sets, which ask for it.
    #[cfg(target_arch = "x86_64")]
    fn has_avx512(self) -> bool {
        matches!(self, Isa::Vnni | Isa::Amx)
    }

    /// Every instruction set this processor can run (tests compare them).
    pub fn available() -> Vec<Self> {
        let best = Self::ALL
            .iter()
            .position(|&i| i == Self::detect())
            .unwrap_or(0);
        Self::ALL[..=best].to_vec()
    }
}

thread_local! {
    /// Set while [`rows_as_alone`] runs its closure on this thread.
    static ROWS_AS_ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the products of this thread giving each row of x the bits it gets alone: past
/// [`FUSED_MAX_ROWS`] rows, x goes through the fused kernels that many rows at a time instead
/// of through the tiles (whose sums run in another order, and, for the K-quants, whose x is
/// quantised per unit instead of per super-block). A running batch of decode rows computes with
/// this, so that a sequence generates the same tokens in any batch as alone.
pub fn rows_as_alone<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back however `f` ends: the server's model thread outlives a panic in a
    /// step, and its next prompt must not run with the flag left on.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROWS_AS_ALONE.set(self.0);
        }
    }
    let _restore = Restore(ROWS_AS_ALONE.replace(true));
    f()
}

/// Under [`rows_as_alone`], the rows of x the fused kernels take at once, where they would
/// take fewer than `m`.
fn alone_chunk(isa: Isa, m: usize) -> Option<usize> {
    (ROWS_AS_ALONE.get() && m > FUSED_MAX_ROWS && isa.fuses()).then_some(FUSED_MAX_ROWS)
}

/// `x · Wᵀ` with `x: [m, k]` row-major f32 and `W: [n, k]` quantised or 16-bit; returns
/// `[m, n]`.
pub fn q_matmul(x: &[f32], m: usize, w: &QWeights<'_>) -> Vec<f32> {
    if w.format.is_half() {
        return half_matmul(x, m, w);
    }
    let isa = Isa::detect();
    if let Some(rows) = alone_chunk(isa, m) {
        return x
            .chunks(rows * w.cols)
            .flat_map(|x| q_matmul(x, x.len() / w.cols, w))
            .collect();
    }
    let block = block_for(isa, m, w.format);
    q_matmul_on(isa, &QActs::quantize_blocks(x, m, w.cols, block), w)
}

/// [`q_matmul`] of one x with several weights of its width (a layer's q, k and v; gate and
/// up): x quantised once per block size and every weight's tasks in one pool job, so a decode
/// step waits for its threads half as often. Weights whose rows do not fill whole tasks, and
/// 16-bit ones, take [`q_matmul`] one by one.
pub fn q_matmul_many(x: &[f32], m: usize, ws: &[QWeights<'_>]) -> Vec<Vec<f32>> {
    let whole = ws.iter().all(|w| {
        !w.format.is_half()
            && w.rows.is_multiple_of(TILE_ROWS)
            && w.cols == ws[0].cols
            && w.is_whole()
    });
    if !whole || ws.len() < 2 || m == 0 {
        return ws.iter().map(|w| q_matmul(x, m, w)).collect();
    }
    let isa = Isa::detect();
    if let Some(rows) = alone_chunk(isa, m) {
        let k = ws[0].cols;
        let mut outs = vec![Vec::with_capacity(m * ws[0].rows); ws.len()];
        for x in x.chunks(rows * k) {
            for (out, part) in outs.iter_mut().zip(q_matmul_many(x, x.len() / k, ws)) {
                out.extend(part);
            }
        }
        return outs;
    }
    let k = ws[0].cols;
    let mut acts: Vec<QActs> = Vec::new();
    let which: Vec<usize> = ws
        .iter()
        .map(|w| {
            let block = block_for(isa, m, w.format);
            acts.iter()
                .position(|a| a.block == block)
                .unwrap_or_else(|| {
                    acts.push(QActs::quantize_blocks(x, m, k, block));
                    acts.len() - 1
                })
        })
        .collect();
    // Weight i's tasks start at task `starts[i]`, its outputs at `starts[i] * TILE_ROWS * m`.
    let starts: Vec<usize> = ws
        .iter()
        .scan(0, |at, w| {
            let start = *at;
            *at += w.rows / TILE_ROWS;
            Some(start)
        })
        .collect();
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let mut out_t = vec![0f32; total * m];
    pool::for_each_chunk(&mut out_t, TILE_ROWS * m, &|t, out| {
        let i = starts.partition_point(|&s| s <= t) - 1;
        task(
            isa,
            &acts[which[i]],
            &ws[i],
            (t - starts[i]) * TILE_ROWS,
            out,
        );
    });
    let mut rest = out_t.as_slice();
    ws.iter()
        .map(|w| {
            let (mine, after) = rest.split_at(w.rows * m);
            rest = after;
            transpose(mine.to_vec(), m, w.rows)
        })
        .collect()
}

/// The block x is quantised by for `m` rows against weights of `format`: the K-quants' fused
/// kernel (x86) takes x per super-block, everything else per unit.
fn block_for(isa: Isa, m: usize, format: QFormat) -> usize {
    if m <= FUSED_MAX_ROWS && isa.fuses() {
        format.block_len()
    } else {
        UNIT
    }
}

/// [`q_matmul`] for 16-bit float weights: each task widens [`TILE_ROWS`] weight rows to f32 and
/// takes f32 dot products with every row of x (x stays f32: the weights keep 11 or 8 bits,
/// which 8-bit activations would throw away).
fn half_matmul(x: &[f32], m: usize, w: &QWeights<'_>) -> Vec<f32> {
    assert!(w.is_whole(), "W's arrays are shorter than its shape");
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    by_weight_rows(m, n, |first, out| {
        let rows = out.len() / m;
        let bytes = &w.qs[2 * first * k..2 * (first + rows) * k];
        WIDE.with_borrow_mut(|wide| {
            wide.resize(rows * k, 0.0);
            widen(w.format, bytes, wide);
            dot_rows(x, m, k, wide, out);
        });
    })
}

/// The frame every product here shares: `[m, n]` from parallel tasks of [`TILE_ROWS`] weight
/// rows, `task(first, out)` writing weight rows `first..first + out.len() / m` as `[rows, m]`
/// (contiguous per task), transposed after.
fn by_weight_rows(m: usize, n: usize, task: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let mut out_t = vec![0f32; n * m];
    pool::for_each_chunk(&mut out_t, TILE_ROWS * m, &|t, out| {
        task(t * TILE_ROWS, out)
    });
    transpose(out_t, m, n)
}

thread_local! {
    /// A task's weight rows widened to f32 by [`half_matmul`], kept from call to call.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// 16-bit floats (little-endian bytes) of `format` to f32.
fn widen(format: QFormat, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx2() {
        // SAFETY: the processor has AVX2 (`Isa::detect`).
        unsafe { widen_avx2(format, bytes, out) };
        return;
    }
    widen_portable(format, bytes, out);
}

/// [`widen_portable`] compiled for AVX2 (its branch-free loops vectorise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn widen_avx2(format: QFormat, bytes: &[u8], out: &mut [f32]) {
    widen_portable(format, bytes, out);
}

#[inline(always)]
fn widen_portable(format: QFormat, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), 2 * out.len());
    match format {
        QFormat::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_at(b, 0);
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
    }
}

/// Rows of x up to which the products skip the tile (decode, small batches): each unit's codes
/// are built in a register and multiplied at once, so the weights are read once and nothing is
/// written back; past it, a tile's unpacking is shared by enough rows of x to pay for itself.
pub const FUSED_MAX_ROWS: usize = 4;

/// Whether a fused kernel takes `format` with x quantised per `block` values: the formats of
/// one unit a block (`fused_unit_*`) whatever the block, the K-quants (`fused_kquant_*`)
/// with x per super-block.
pub fn fuses(format: QFormat, block: usize) -> bool {
    !format.is_half() && (format.block_len() == UNIT || block == format.block_len())
}

/// [`q_matmul`] of quantised rows of x on a chosen instruction set: fused for up to
/// [`FUSED_MAX_ROWS`] rows where the instruction set and the format have a fused kernel, else
/// through tiles.
pub fn q_matmul_on(isa: Isa, x: &QActs, w: &QWeights<'_>) -> Vec<f32> {
    assert_eq!(x.cols, w.cols, "x and W differ in k");
    assert!(w.is_whole(), "W's arrays are shorter than its shape");
    by_weight_rows(x.rows, w.rows, |first, out| task(isa, x, w, first, out))
}

/// [`q_matmul_on`] through [`TILE_ROWS`]-row tiles of unpacked weights whatever the rows of x
/// (the benchmarks compare it with the fused path).
pub fn q_matmul_tiled(isa: Isa, x: &QActs, w: &QWeights<'_>) -> Vec<f32> {
    assert_eq!(x.cols, w.cols, "x and W differ in k");
    assert!(w.is_whole(), "W's arrays are shorter than its shape");
    by_weight_rows(x.rows, w.rows, |first, out| {
        tiled_task(isa, x, w, first, out)
    })
}

/// One task of [`q_matmul_tiled`]: weight rows `first..` unpacked into the thread's tile and
/// multiplied with every row of x into `out` (`[rows, m]`).
fn tiled_task(isa: Isa, x: &QActs, w: &QWeights<'_>, first: usize, out: &mut [f32]) {
    let rows = (first, out.len() / x.rows);
    // Each thread keeps its tile's buffers from call to call (a decode step makes about
    // 170 products, each of dozens of tasks).
    TILE.with_borrow_mut(|tile| match isa {
        Isa::Portable => unpack_and_multiply(isa, w, rows, x, tile, out),
        // SAFETY: `Isa::detect` chose these only where the processor has their features
        // (`available` lists no more than `detect` found).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { unpack_and_multiply_avx2(isa, w, rows, x, tile, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => unsafe { unpack_and_multiply_vnni(isa, w, rows, x, tile, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => unsafe { unpack_and_multiply_amx(isa, w, rows, x, tile, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { unpack_and_multiply_neon(isa, w, rows, x, tile, out) },
    });
}

/// One task of [`q_matmul_on`]: fused where [`q_matmul_on`] would be, else through a tile.
fn task(isa: Isa, x: &QActs, w: &QWeights<'_>, first: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x.rows <= FUSED_MAX_ROWS && isa.fuses() && fuses(w.format, x.block) {
        return fused_task(isa, x, w, first, out);
    }
    tiled_task(isa, x, w, first, out);
}

thread_local! {
    static TILE: std::cell::RefCell<Tile> = std::cell::RefCell::new(Tile::default());
}

/// The fused products for up to [`FUSED_MAX_ROWS`] rows of x on AVX2 or VNNI, one task:
/// weight rows `first..` walked once, each unit's codes built in a register
/// (`unit_codes_avx2`) and its scales from the block's bytes, and multiplied with every row of
/// x there and then, into `out` (`[rows, m]`).
#[cfg(target_arch = "x86_64")]
fn fused_task(isa: Isa, x: &QActs, w: &QWeights<'_>, first: usize, out: &mut [f32]) {
    let m = x.rows;
    let rows = first..first + out.len() / m;
    macro_rules! formats {
        ($unit:ident, $kquant:ident, $xr:literal) => {
            match w.format {
                QFormat::Q4_0 => $unit::<$xr, 0>(w, rows, x, out),
                QFormat::Q4_1 => $unit::<$xr, 1>(w, rows, x, out),
                QFormat::Q5_0 => $unit::<$xr, 2>(w, rows, x, out),
                QFormat::Q5_1 => $unit::<$xr, 3>(w, rows, x, out),
                QFormat::Q8_0 => $unit::<$xr, 4>(w, rows, x, out),
                QFormat::Q4K => $kquant::<$xr, 5>(w, rows, x, out),
                QFormat::Q5K => $kquant::<$xr, 6>(w, rows, x, out),
                QFormat::Q6K => $kquant::<$xr, 7>(w, rows, x, out),
                _ => unreachable!("`fuses` admits no other format"),
            }
        };
    }
    macro_rules! shapes {
        ($unit:ident, $kquant:ident) => {
            match m {
                1 => formats!($unit, $kquant, 1),
                2 => formats!($unit, $kquant, 2),
                3 => formats!($unit, $kquant, 3),
                _ => formats!($unit, $kquant, 4),
            }
        };
    }
    // SAFETY: `Isa::detect` chose these only where the processor has their features
    // (`available` lists no more than `detect` found); the kernels check the shapes.
    unsafe {
        match isa {
            Isa::Vnni | Isa::Amx => shapes!(fused_unit_vnni, fused_kquant_vnni),
            _ => shapes!(fused_unit_avx2, fused_kquant_avx2),
        }
    }
}

/// How far ahead of their reads the fused decode kernels ask for the codes, in bytes: the
/// hardware's prefetchers alone left the 1.5B's decode at 13.5 of 21 GB/s on an Intel VM.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 1024;

/// Asks for the `bytes` bytes [`PREFETCH`] past `at`, a cache line at a time (a prefetch reads
/// nothing into registers and faults on no address, so they may lie past the weights' end).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_ahead(at: *const u8, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line + PREFETCH).cast());
    }
}

/// Stamps out the fused kernel of the K-quants for one way of weighing byte-product pairs by
/// their unit's scale.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_fused_kquant {
    ($name:ident, $features:literal, $weigh:ident) => {
        /// The fused kernel of the K-quants (Q4_K, Q5_K, Q6_K) for up to four rows of x
        /// quantised per 256-value super-block (`x.block`), as llama.cpp's `q4_K · q8_K`:
        /// weight rows `rows` times the `XR` rows of x, into `out` (`[rows, XR]`). A
        /// super-block shares x's scale, so the weights' 6- or 8-bit unit scales multiply the
        /// byte products as integers (`$weigh`) and each super-block ends in one conversion and
        /// one multiply-add a row of x. The minimums (Q6_K: its offset of 32) meet x's integer
        /// sums per 16. (VNNI's `vpdpbusd` would sum the products in fours before the scales
        /// could weigh its pairs: VNNI keeps `vpmaddubsw` and weighs with `vpdpwssd`.)
        #[target_feature(enable = $features)]
        fn $name<const XR: usize, const F: usize>(
            w: &QWeights<'_>,
            rows: std::ops::Range<usize>,
            x: &QActs,
            out: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let f = QFormat::ALL[F];
            let k = w.cols;
            let units = k / UNIT;
            let blocks = k / 256;
            let (qb, sb) = block_sizes(f);
            assert!(
                matches!(f, QFormat::Q4K | QFormat::Q5K | QFormat::Q6K)
                    && x.block == 256
                    && x.rows == XR
                    && x.codes.len() == XR * k
                    && out.len() == rows.len() * XR,
                "x, out or the format is not what the kernel was chosen for"
            );
            let q6 = f == QFormat::Q6K;
            // Unit u's scale in every i16 lane: Q4_K and Q5_K pick i16 u of a register holding the
            // eight scales in both halves; Q6_K picks bytes 2u and 2u + 1 (one scale per 16 weights)
            // of its sixteen, widened after.
            let pick: [__m256i; 8] =
                std::array::from_fn(|u| _mm256_set1_epi16((((2 * u + 1) << 8) | (2 * u)) as i16));
            let pick6: [__m128i; 8] = std::array::from_fn(|u| {
                let byte = |b: usize| (b as u64) * 0x0101_0101_0101_0101;
                _mm_set_epi64x(byte(2 * u + 1) as i64, byte(2 * u) as i64)
            });
            let row_of_x = |p: usize, unit: usize| -> __m256i {
                let xc: &[i8; UNIT] = x.codes[p * k + UNIT * unit..][..UNIT]
                    .try_into()
                    .unwrap_or_else(|_| unreachable!());
                // SAFETY: reads the 32 bytes of `xc`.
                unsafe { _mm256_loadu_si256(xc.as_ptr().cast()) }
            };
            for (row, out) in rows.zip(out.chunks_exact_mut(XR)) {
                let q = &w.qs[qb * blocks * row..qb * blocks * (row + 1)];
                let s = &w.scales[sb * blocks * row..sb * blocks * (row + 1)];
                let mut acc = [_mm256_setzero_ps(); XR];
                let mut acc_min = [_mm_setzero_ps(); XR];
                for (b, (q, s)) in q.chunks_exact(qb).zip(s.chunks_exact(sb)).enumerate() {
                    let first = 8 * b;
                    // (The task's rows lie one after another: this runs into the next row.)
                    prefetch_ahead(q.as_ptr(), qb);
                    // The block's d (and dmin), its unit scales and (Q4_K, Q5_K) minimums as bytes.
                    let (d, dmin, scale_bytes) = if q6 {
                        // SAFETY: reads the 16 scale bytes.
                        let sc = unsafe { _mm_loadu_si128(bytes::<16>(s).as_ptr().cast()) };
                        (f16c(u16::from_le_bytes(*bytes::<2>(&s[16..]))).0, 0.0, sc)
                    } else {
                        // `scale_min_k4` for all eight units at once, four bytes a word.
                        let word = |i: usize| u32::from_le_bytes(*bytes::<4>(&s[4 + 4 * i..]));
                        let (w0, w1, w2) = (word(0), word(1), word(2));
                        let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
                        let scales_lo = w0 & six;
                        let mins_lo = w1 & six;
                        let scales_hi = (w2 & four) | (((w0 >> 6) & two) << 4);
                        let mins_hi = ((w2 >> 4) & four) | (((w1 >> 6) & two) << 4);
                        let sc = _mm_set_epi32(
                            mins_hi as i32,
                            mins_lo as i32,
                            scales_hi as i32,
                            scales_lo as i32,
                        );
                        let (d, dmin) = f16c(u32::from_le_bytes(*bytes::<4>(s)));
                        (d, dmin, sc)
                    };
                    let scales16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scale_bytes));
                    let mut sumi = [_mm256_setzero_si256(); XR];
                    for_each_unit_avx2(f, q, |u, wv| {
                        let scale = if q6 {
                            _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scale_bytes, pick6[u]))
                        } else {
                            _mm256_shuffle_epi8(scales16, pick[u])
                        };
                        for (p, sumi) in sumi.iter_mut().enumerate() {
                            let pairs = _mm256_maddubs_epi16(wv, row_of_x(p, first + u));
                            *sumi = $weigh(*sumi, pairs, scale);
                        }
                    });
                    for p in 0..XR {
                        let at = p * units + first;
                        let xd = x.d[at];
                        let sums: &[i16; 16] = x.half_isums[2 * at..][..16]
                            .try_into()
                            .unwrap_or_else(|_| unreachable!());
                        // SAFETY: reads the 32 bytes of `sums`.
                        let sums = unsafe { _mm256_loadu_si256(sums.as_ptr().cast()) };
                        if q6 {
                            // The offset of 32: Σ_halves scale · 32 · Σ x codes.
                            let offset = _mm256_madd_epi16(sums, _mm256_cvtepi8_epi16(scale_bytes));
                            sumi[p] = _mm256_sub_epi32(sumi[p], _mm256_slli_epi32::<5>(offset));
                        } else {
                            // The minimums (bytes 8-15, widened) times the units' sums (pairs of halves).
                            let unit_sums = _mm_hadd_epi16(
                                _mm256_castsi256_si128(sums),
                                _mm256_extracti128_si256::<1>(sums),
                            );
                            let mins = _mm_cvtepu8_epi16(_mm_srli_si128::<8>(scale_bytes));
                            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, unit_sums));
                            acc_min[p] = _mm_fmadd_ps(_mm_set1_ps(dmin * xd), m, acc_min[p]);
                        }
                        let sumf = _mm256_cvtepi32_ps(sumi[p]);
                        acc[p] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd), sumf, acc[p]);
                    }
                }
                for p in 0..XR {
                    let m = acc_min[p];
                    let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                    out[p] = hsum8(acc[p]) - _mm_cvtss_f32(m);
                }
            }
        }
    };
}

/// AVX2's weighing: `vpmaddwd` of the pairs by the scales, added to the sums.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn weigh_avx2(
    sums: std::arch::x86_64::__m256i,
    pairs: std::arch::x86_64::__m256i,
    scale: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, scale))
}

/// VNNI's: the same in one `vpdpwssd`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn weigh_vnni(
    sums: std::arch::x86_64::__m256i,
    pairs: std::arch::x86_64::__m256i,
    scale: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpwssd_epi32(sums, pairs, scale)
}

#[cfg(target_arch = "x86_64")]
x86_fused_kquant!(fused_kquant_avx2, "avx2,fma,f16c", weigh_avx2);
#[cfg(target_arch = "x86_64")]
x86_fused_kquant!(
    fused_kquant_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    weigh_vnni
);

/// Units whose scales [`x86_fused_unit`]'s kernels decode at once (one register of f32).
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 8;

/// Stamps out the fused kernel of the formats of one unit a block (Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0) for one byte-product instruction sequence.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_fused_unit {
    ($name:ident, $features:literal, $dot:ident) => {
        /// Weight rows `rows` of `QFormat::ALL[F]` times the `XR` rows of x, into `out`
        /// (`[rows, XR]`). Per [`GROUP`] blocks: their f16 scales (and offsets) converted by
        /// one F16C instruction and multiplied by x's `d` in one register, the offsets'
        /// `c · d_x · Σ x codes` in one multiply-add. Per block: its codes built in a register
        /// and `a · d_x · (codes · x codes)` in eight lanes, even and odd blocks in separate
        /// accumulators. Lengths are checked once, so the loop reads through pointers (a
        /// block's bounds checks were more instructions than its products).
        #[target_feature(enable = $features)]
        fn $name<const XR: usize, const F: usize>(
            w: &QWeights<'_>,
            rows: std::ops::Range<usize>,
            x: &QActs,
            out: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let f = QFormat::ALL[F];
            let k = w.cols;
            let units = k / UNIT;
            let (qb, sb) = block_sizes(f);
            assert!(
                f.block_len() == UNIT
                    && x.rows == XR
                    && x.codes.len() == XR * k
                    && x.d.len() == XR * units
                    && x.unit_sums.len() == XR * units
                    && out.len() == rows.len() * XR
                    && w.qs.len() >= qb * units * rows.end
                    && w.scales.len() >= sb * units * rows.end,
                "x, out, W or the format is not what the kernel was chosen for"
            );
            let signed = f == QFormat::Q8_0;
            for (row, out) in rows.zip(out.chunks_exact_mut(XR)) {
                // SAFETY: row < rows.end, whose blocks lie inside both arrays (asserted).
                let q = unsafe { w.qs.as_ptr().add(qb * units * row) };
                let s = &w.scales[sb * units * row..sb * units * (row + 1)];
                let mut acc = [[_mm256_setzero_ps(); XR]; 2];
                let mut off = [_mm256_setzero_ps(); XR];
                let mut g = 0;
                while g < units {
                    let n = GROUP.min(units - g);
                    prefetch_ahead(q.wrapping_add(qb * g), qb * n);
                    // `a` and `c` of blocks g.. (lanes past the row's end are zero).
                    let (a, c) = if n == GROUP {
                        // SAFETY: GROUP blocks' scale bytes of this row.
                        unsafe { group_affine(f, s[sb * g..sb * (g + GROUP)].as_ptr()) }
                    } else {
                        let mut padded = [0u8; 4 * GROUP];
                        padded[..sb * n].copy_from_slice(&s[sb * g..sb * (g + n)]);
                        // SAFETY: `padded` holds 4 · GROUP bytes.
                        unsafe { group_affine(f, padded.as_ptr()) }
                    };
                    let mask = lanes_below(n);
                    let mut ad = [[0f32; GROUP]; XR];
                    for p in 0..XR {
                        let at = p * units + g;
                        // SAFETY: the mask reads lanes at + j, j < n, inside x's rows.
                        let (xd, sums) = unsafe {
                            (
                                _mm256_maskload_ps(x.d.as_ptr().add(at), mask),
                                _mm256_maskload_ps(x.unit_sums.as_ptr().add(at), mask),
                            )
                        };
                        // SAFETY: `ad[p]` holds GROUP floats.
                        unsafe { _mm256_storeu_ps(ad[p].as_mut_ptr(), _mm256_mul_ps(a, xd)) };
                        if !signed {
                            off[p] = _mm256_fmadd_ps(c, sums, off[p]);
                        }
                    }
                    let step = |j: usize, acc: &mut [__m256; XR]| {
                        let unit = g + j;
                        // SAFETY: unit < units: a whole block of this row.
                        let wv = unsafe { unit_codes_at(f, q.add(qb * unit)) };
                        for p in 0..XR {
                            // SAFETY: 32 codes of row p of x, inside its k.
                            let xv = unsafe {
                                _mm256_loadu_si256(x.codes.as_ptr().add(p * k + UNIT * unit).cast())
                            };
                            let dot = if signed {
                                $dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
                            } else {
                                $dot(wv, xv)
                            };
                            let scale = _mm256_set1_ps(ad[p][j]);
                            acc[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[p]);
                        }
                    };
                    // One call of `step` in the code, so that it is inlined whatever else grows.
                    for pair in (0..n).step_by(2) {
                        for (h, acc) in acc.iter_mut().enumerate() {
                            if pair + h < n {
                                step(pair + h, acc);
                            }
                        }
                    }
                    g += n;
                }
                for p in 0..XR {
                    out[p] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0][p], acc[1][p]), off[p]));
                }
            }
        }
    };
}

/// A mask of the first `n` of eight i32 lanes (for `vmaskmovps`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn lanes_below(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let n = _mm256_set1_epi32(n as i32);
    _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `(a, c)` of [`GROUP`] consecutive blocks of a one-unit format ([`unit_affine`] in eight
/// lanes) from their scale bytes at `s`: f16 `d` each, or `d` and `m` interleaved (Q4_1,
/// Q5_1).
///
/// # Safety
/// `s` is valid for 2 · GROUP bytes, or 4 · GROUP where the format has an offset; F16C and AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn group_affine(
    f: QFormat,
    s: *const u8,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bytes.
    let lo = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.cast()) });
    match f {
        QFormat::Q4_0 => (lo, _mm256_mul_ps(lo, _mm256_set1_ps(-8.0))),
        QFormat::Q5_0 => (lo, _mm256_mul_ps(lo, _mm256_set1_ps(-16.0))),
        QFormat::Q4_1 | QFormat::Q5_1 => {
            // d0 m0 d1 m1 .. d3 m3, then d4 m4 .. d7 m7.
            // SAFETY: as above (4 · GROUP bytes for these formats).
            let hi = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.add(16).cast()) });
            // d0 d1 d4 d5 | d2 d3 d6 d7 (and m), then the 64-bit pairs in order.
            let d = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
            let m = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
            let order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            (order(d), order(m))
        }
        _ => (lo, _mm256_setzero_ps()),
    }
}

#[cfg(target_arch = "x86_64")]
x86_fused_unit!(fused_unit_avx2, "avx2,fma,f16c", dot_avx2);
#[cfg(target_arch = "x86_64")]
x86_fused_unit!(
    fused_unit_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_vnni
);

/// The two f16 in `bits` (low half first) by F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
fn f16c(bits: impl Into<u32>) -> (f32, f32) {
    use std::arch::x86_64::*;
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits.into() as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The sum of the eight lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// Rows of x and weight rows in one register block.
const XROWS: usize = 4;
const WROWS: usize = 2;

/// Where a register block starts and what it reads.
struct Block<'a> {
    x: &'a QActs,
    tile: &'a Tile,
    /// First row of x, first row of the tile.
    i: usize,
    r: usize,
}

#[cfg(target_arch = "aarch64")]
impl<'a> Block<'a> {
    /// What a register block of `xr` rows of x by `wr` weight rows reads, checked once to lie
    /// inside x and the tile: x's codes and the tile's codes from their first rows (pointers for
    /// the vector loads, `k` codes a row), x's `d` and the tile's scales (`per` a unit) from
    /// theirs.
    #[inline(always)]
    fn operands(
        &self,
        xr: usize,
        wr: usize,
        per: usize,
    ) -> (*const i8, *const u8, &'a [f32], &'a [f32]) {
        let k = self.x.cols;
        let units = k / UNIT;
        assert!(
            (self.i + xr) * k <= self.x.codes.len()
                && (self.r + wr) * k <= self.tile.codes.len()
                && (self.i + xr) * units <= self.x.d.len()
                && per * (self.r + wr) * units <= self.tile.scales.len(),
            "block outside x or the tile"
        );
        (
            self.x.codes[self.i * k..].as_ptr(),
            self.tile.codes[self.r * k..].as_ptr(),
            &self.x.d[self.i * units..],
            &self.tile.scales[per * self.r * units..],
        )
    }
}

/// One task of [`q_matmul_on`]: weight rows `first..first + rows` unpacked into `tile`, then
/// multiplied with every row of x into `out` (`[rows, m]`).
#[inline(always)]
fn unpack_and_multiply(
    isa: Isa,
    w: &QWeights<'_>,
    (first, rows): (usize, usize),
    x: &QActs,
    tile: &mut Tile,
    out: &mut [f32],
) {
    tile.unpack(isa, w, first, rows);
    tile_product(isa, w.format, x, tile, out);
}

/// [`unpack_and_multiply`] compiled for AVX2 (the unpacking and the minimums vectorised, the
/// register-block kernels inlined).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_and_multiply_avx2(
    isa: Isa,
    w: &QWeights<'_>,
    rows: (usize, usize),
    x: &QActs,
    tile: &mut Tile,
    out: &mut [f32],
) {
    unpack_and_multiply(isa, w, rows, x, tile, out);
}

/// The same with AVX-512 VNNI for the products; the unpacking is AVX2's (with AVX-512 on, LLVM
/// turns the per-unit scale stores into scatters, many times slower on the processors that have
/// it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn unpack_and_multiply_vnni(
    isa: Isa,
    w: &QWeights<'_>,
    (first, rows): (usize, usize),
    x: &QActs,
    tile: &mut Tile,
    out: &mut [f32],
) {
    unpack_avx2(isa, w, (first, rows), tile);
    tile_product(isa, w.format, x, tile, out);
}

/// The same with AMX for the products ([`amx::product`]); the unpacking is AVX2's, as VNNI's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_and_multiply_amx(
    isa: Isa,
    w: &QWeights<'_>,
    (first, rows): (usize, usize),
    x: &QActs,
    tile: &mut Tile,
    out: &mut [f32],
) {
    unpack_avx2(isa, w, (first, rows), tile);
    // SAFETY: `Isa::Amx` is chosen only where the processor has AVX-512F and VL and the tiles
    // were granted (`Isa::find`).
    unsafe { amx::product(w.format, x, tile, out) };
}

/// [`unpack_and_multiply`] compiled with the dot-product extension (the register-block
/// kernels inlined; the unpacking is NEON's, which aarch64 always has).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
fn unpack_and_multiply_neon(
    isa: Isa,
    w: &QWeights<'_>,
    rows: (usize, usize),
    x: &QActs,
    tile: &mut Tile,
    out: &mut [f32],
) {
    unpack_and_multiply(isa, w, rows, x, tile, out);
}

/// [`Tile::unpack`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_avx2(isa: Isa, w: &QWeights<'_>, (first, rows): (usize, usize), tile: &mut Tile) {
    tile.unpack(isa, w, first, rows);
}

/// What the kernels need to know of a format: whether its codes are signed bytes (Q8_0) and
/// whether it has a scale per half unit (Q6_K). The kernels take it as a const parameter.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unsigned,
    Signed,
    UnsignedHalves,
}

impl Kind {
    fn of(f: QFormat) -> Self {
        match f {
            QFormat::Q8_0 => Self::Signed,
            QFormat::Q6K => Self::UnsignedHalves,
            _ => Self::Unsigned,
        }
    }
}

/// [`Kind`]s as const parameters.
const UNSIGNED: u8 = 0;
const SIGNED: u8 = 1;
const HALVES: u8 = 2;

/// `out[r * m + i] = x_i · w_r` for every row of the tile.
#[inline(always)]
fn tile_product(isa: Isa, format: QFormat, x: &QActs, tile: &Tile, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa::detect` chose these only where the processor has their features
        // (`available` lists no more than `detect` found).
        Isa::Avx2 => return unsafe { lanes_product_avx2(format, x, tile, out) },
        // SAFETY: as above.
        Isa::Vnni => return unsafe { lanes_product_vnni(format, x, tile, out) },
        // SAFETY: as above (`Isa::Amx` implies AVX-512F and VL, and the tiles granted).
        Isa::Amx => return unsafe { amx::product(format, x, tile, out) },
        Isa::Portable => {}
    }
    let kind = Kind::of(format);
    let m = x.rows;
    let mut r = 0;
    while r < tile.rows {
        let wr = WROWS.min(tile.rows - r);
        let mut i = 0;
        while i < m {
            let xr = XROWS.min(m - i);
            let at = Block { x, tile, i, r };
            let mut acc = [[0f32; WROWS]; XROWS];
            block(isa, kind, xr, wr, &at, &mut acc);
            for (q, row) in out[r * m..].chunks_mut(m).take(wr).enumerate() {
                for (p, acc) in acc.iter().take(xr).enumerate() {
                    row[i + p] = acc[q];
                }
            }
            i += xr;
        }
        r += wr;
    }
    add_min_terms(x, tile, out);
}

/// Stamps out [`tile_product`]'s scaled byte products from the tile's interleaved codes
/// ([`Tile::lanes`]) for one byte-product instruction: `$gemm` for each group of [`LANES`]
/// weight rows and [`XROWS`] rows of x, each register block's lanes written to their weight
/// rows. `$step(pairs, w, x)` adds one step's byte products of unsigned `w` and signed `x` to
/// `pairs`, and `$widen` turns a run of such steps into i32 sums.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_lanes_product {
    ($product:ident, $gemm:ident, $features:literal, $step:ident, $widen:ident) => {
        #[target_feature(enable = $features)]
        fn $product(format: QFormat, x: &QActs, tile: &Tile, out: &mut [f32]) {
            let m = x.rows;
            for g in 0..tile.rows.div_ceil(LANES) {
                let rows = (tile.rows - g * LANES).min(LANES);
                let mut i = 0;
                while i < m {
                    let xr = XROWS.min(m - i);
                    let mut acc = [[0f32; LANES]; XROWS];
                    macro_rules! shapes {
                        ($kind:expr, $run:literal) => {
                            match xr {
                                4 => $gemm::<4, { $kind }, $run>(x, tile, g, i, &mut acc),
                                3 => $gemm::<3, { $kind }, $run>(x, tile, g, i, &mut acc),
                                2 => $gemm::<2, { $kind }, $run>(x, tile, g, i, &mut acc),
                                _ => $gemm::<1, { $kind }, $run>(x, tile, g, i, &mut acc),
                            }
                        };
                    }
                    // AVX2 sums pairs of byte products in i16 for as many steps as the codes'
                    // width allows: 8 · 2 · 15 · 127, 4 · 2 · 31 · 127 and 2 · 2 · 63 · 127 stay
                    // below 2¹⁵, as does Q8_0's one step of 2 · 128 · 127. (VNNI sums in i32
                    // from the first step; the runs only group its adds.)
                    match format {
                        QFormat::Q8_0 => shapes!(SIGNED, 1),
                        QFormat::Q6K => shapes!(HALVES, 2),
                        QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q5K => shapes!(UNSIGNED, 4),
                        _ => shapes!(UNSIGNED, 8),
                    }
                    for (p, acc) in acc.iter().enumerate().take(xr) {
                        for (l, &a) in acc.iter().enumerate().take(rows) {
                            out[(g * LANES + l) * m + i + p] = a;
                        }
                    }
                    i += xr;
                }
            }
        }

        /// One register block of the product above: weight rows `8g..8g + 8` of the tile, one
        /// per lane, against rows `i..i + XR` of x. Per 4 columns, one load of the 8 rows'
        /// bytes and a broadcast of each row of x's 4 bytes into the byte product, summed for
        /// `RUN` such steps, then widened to i32; each unit (Q6_K: each half) ends in one
        /// conversion and one multiply-add by its scales, and one multiply-add of its offsets
        /// by x's sum (a pass of its own over x's sums, per weight row, cost a fifth of the
        /// products). No lane is summed across: lane `l` is weight row `8g + l`, so a row of x
        /// costs 5 registers and no horizontal sum.
        #[inline]
        #[target_feature(enable = $features)]
        fn $gemm<const XR: usize, const KIND: u8, const RUN: usize>(
            x: &QActs,
            tile: &Tile,
            g: usize,
            i: usize,
            out: &mut [[f32; LANES]; XROWS],
        ) {
            use std::arch::x86_64::*;
            let k = x.cols;
            let units = k / UNIT;
            let per = if KIND == HALVES { 2 } else { 1 };
            // 4-byte steps under one scale.
            let steps = LANES / per;
            assert!(
                (i + XR) * k <= x.codes.len()
                    && (i + XR) * units <= x.d.len()
                    && (g + 1) * LANES * k <= tile.lanes.len()
                    && (g + 1) * units * per * LANES <= tile.lane_scales.len()
                    && (g + 1) * units * per * LANES <= tile.lane_mins.len(),
                "block outside x or the tile"
            );
            let wp = tile.lanes[g * LANES * k..].as_ptr();
            let sp = tile.lane_scales[g * units * per * LANES..].as_ptr();
            let mp = tile.lane_mins[g * units * per * LANES..].as_ptr();
            let xsums = if per == 2 {
                &x.half_sums[i * units * 2..(i + XR) * units * 2]
            } else {
                &x.unit_sums[i * units..(i + XR) * units]
            };
            let xp = x.codes[i * k..].as_ptr();
            let xd = &x.d[i * units..(i + XR) * units];
            let mut acc = [_mm256_setzero_ps(); XR];
            for u in 0..units {
                for h in 0..per {
                    let mut sums = [_mm256_setzero_si256(); XR];
                    for run in (h * steps..(h + 1) * steps).step_by(RUN) {
                        let mut pairs = [_mm256_setzero_si256(); XR];
                        for j in run..run + RUN {
                            // SAFETY: step j of unit u of group g lies inside `lanes` (asserted).
                            let w = unsafe {
                                _mm256_loadu_si256(wp.add((u * LANES + j) * UNIT).cast())
                            };
                            let wu = if KIND == SIGNED {
                                _mm256_sign_epi8(w, w)
                            } else {
                                w
                            };
                            for (p, pairs) in pairs.iter_mut().enumerate() {
                                // SAFETY: 4 bytes of row i + p of x, inside its k columns
                                // (asserted).
                                let word = unsafe {
                                    xp.add(p * k + UNIT * u + 4 * j)
                                        .cast::<i32>()
                                        .read_unaligned()
                                };
                                let xv = _mm256_set1_epi32(word);
                                let xv = if KIND == SIGNED {
                                    _mm256_sign_epi8(xv, w)
                                } else {
                                    xv
                                };
                                *pairs = $step(*pairs, wu, xv);
                            }
                        }
                        for (s, p) in sums.iter_mut().zip(&pairs) {
                            *s = _mm256_add_epi32(*s, $widen(*p));
                        }
                    }
                    // SAFETY: the 8 scales of unit u's half h in group g (asserted).
                    let s = unsafe { _mm256_loadu_ps(sp.add((u * per + h) * LANES)) };
                    // SAFETY: as the scales.
                    let c = unsafe { _mm256_loadu_ps(mp.add((u * per + h) * LANES)) };
                    for (p, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                        let scale = _mm256_mul_ps(s, _mm256_set1_ps(xd[p * units + u]));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*sums), scale, *acc);
                        if KIND != SIGNED {
                            let xs = _mm256_set1_ps(xsums[(p * units + u) * per + h]);
                            *acc = _mm256_fmadd_ps(c, xs, *acc);
                        }
                    }
                }
            }
            for (out, acc) in out.iter_mut().zip(&acc) {
                // SAFETY: writes the 8 floats of `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *acc) };
            }
        }
    };
}

/// AVX2's step: `vpmaddubsw` sums byte products in pairs (i16), added to the run's pairs.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn pairs_avx2(
    pairs: std::arch::x86_64::__m256i,
    w: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w, x))
}

/// AVX2's widening: the run's i16 pairs summed in fours by `vpmaddwd` with ones.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn widen_pairs_avx2(pairs: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// VNNI's step: one `vpdpbusd`, the four byte products of each lane added to its i32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn quads_vnni(
    sums: std::arch::x86_64::__m256i,
    w: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_dpbusd_epi32(sums, w, x)
}

/// VNNI's sums are i32 already.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn as_sums(sums: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    sums
}

#[cfg(target_arch = "x86_64")]
x86_lanes_product!(
    lanes_product_avx2,
    gemm_avx2,
    "avx2,fma",
    pairs_avx2,
    widen_pairs_avx2
);
#[cfg(target_arch = "x86_64")]
x86_lanes_product!(
    lanes_product_vnni,
    gemm_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    quads_vnni,
    as_sums
);

/// Adds `Σ c · d · Σ code_x` over the units (or halves) to each output: the weight row's
/// offsets `c` times x's sums. Per weight row, 32 rows of x at a time with x's sums stored
/// unit-major, so that the lanes are rows of x and no output needs a horizontal sum (per
/// output, that sum cost more than the dot product it ended).
#[inline(always)]
fn add_min_terms(x: &QActs, tile: &Tile, out: &mut [f32]) {
    // Rows of x a pass takes.
    const PASS: usize = 32;
    let m = x.rows;
    let units = x.cols / UNIT;
    let (half_sums_t, unit_sums_t) = x.sums_t();
    let (n, sums_t) = if tile.mins.len() == 2 * tile.rows * units {
        (2 * units, half_sums_t)
    } else {
        (units, unit_sums_t)
    };
    for (mins, row) in tile.mins.chunks_exact(n).zip(out.chunks_mut(m)) {
        if mins.iter().all(|&c| c == 0.0) {
            continue;
        }
        for (chunk, outs) in row.chunks_mut(PASS).enumerate() {
            let at = chunk * PASS;
            if let Ok(outs) = <&mut [f32; PASS]>::try_from(&mut *outs) {
                let mut acc = [0f32; PASS];
                for (u, &c) in mins.iter().enumerate() {
                    let sums: &[f32; PASS] = sums_t[u * m + at..u * m + at + PASS]
                        .try_into()
                        .unwrap_or_else(|_| unreachable!("a slice of PASS values"));
                    for (a, s) in acc.iter_mut().zip(sums) {
                        *a += c * s;
                    }
                }
                for (o, a) in outs.iter_mut().zip(&acc) {
                    *o += a;
                }
            } else if m == 1 {
                // One row of x (decode): its sums lie in a row, and eight partial sums keep the
                // additions from waiting on each other.
                outs[0] += dot(mins, sums_t);
            } else {
                let mut acc = [0f32; PASS];
                let acc = &mut acc[..outs.len()];
                for (u, &c) in mins.iter().enumerate() {
                    for (a, s) in acc.iter_mut().zip(&sums_t[u * m + at..]) {
                        *a += c * s;
                    }
                }
                for (o, a) in outs.iter_mut().zip(acc.iter()) {
                    *o += a;
                }
            }
        }
    }
}

/// One register block of up to [`XROWS`] × [`WROWS`] scaled byte products, on `isa`.
#[inline(always)]
fn block(
    isa: Isa,
    kind: Kind,
    xr: usize,
    wr: usize,
    at: &Block<'_>,
    acc: &mut [[f32; WROWS]; XROWS],
) {
    macro_rules! shapes {
        ($kernel:ident, $kind:expr) => {
            match (xr, wr) {
                (4, 2) => $kernel::<4, 2, { $kind }>(at, acc),
                (3, 2) => $kernel::<3, 2, { $kind }>(at, acc),
                (2, 2) => $kernel::<2, 2, { $kind }>(at, acc),
                (1, 2) => $kernel::<1, 2, { $kind }>(at, acc),
                (4, _) => $kernel::<4, 1, { $kind }>(at, acc),
                (3, _) => $kernel::<3, 1, { $kind }>(at, acc),
                (2, _) => $kernel::<2, 1, { $kind }>(at, acc),
                _ => $kernel::<1, 1, { $kind }>(at, acc),
            }
        };
    }
    macro_rules! kinds {
        ($kernel:ident) => {
            match kind {
                Kind::Unsigned => shapes!($kernel, UNSIGNED),
                Kind::Signed => shapes!($kernel, SIGNED),
                Kind::UnsignedHalves => shapes!($kernel, HALVES),
            }
        };
    }
    match isa {
        Isa::Portable => kinds!(block_portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Vnni | Isa::Amx => {
            unreachable!("x86 multiplies its tiles in lanes_product_* or amx::product")
        }
        // SAFETY: `Isa::detect` chose it only where the processor has the dot-product
        // extension (`available` lists no more than `detect` found).
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { kinds!(block_neon) },
    }
}

/// Any processor: integer sums per half in plain loops.
fn block_portable<const XR: usize, const WR: usize, const KIND: u8>(
    at: &Block<'_>,
    acc: &mut [[f32; WROWS]; XROWS],
) {
    let k = at.x.cols;
    let units = k / UNIT;
    for (p, acc) in acc.iter_mut().enumerate().take(XR) {
        let row = at.i + p;
        let xc = &at.x.codes[row * k..(row + 1) * k];
        let xd = &at.x.d[row * units..(row + 1) * units];
        for (q, acc) in acc.iter_mut().enumerate().take(WR) {
            let wrow = at.r + q;
            let wc = &at.tile.codes[wrow * k..(wrow + 1) * k];
            let per = if KIND == HALVES { 2 } else { 1 };
            let ws = &at.tile.scales[per * wrow * units..per * (wrow + 1) * units];
            let mut sum = 0f32;
            for (((xc, wc), d), s) in xc
                .chunks_exact(UNIT)
                .zip(wc.chunks_exact(UNIT))
                .zip(xd)
                .zip(ws.chunks_exact(per))
            {
                let half = |h: usize| -> i32 {
                    (16 * h..16 * h + 16)
                        .map(|l| {
                            let w = if KIND == SIGNED {
                                wc[l] as i8 as i32
                            } else {
                                wc[l] as i32
                            };
                            w * xc[l] as i32
                        })
                        .sum()
                };
                sum += d * if KIND == HALVES {
                    s[0] * half(0) as f32 + s[1] * half(1) as f32
                } else {
                    s[0] * (half(0) + half(1)) as f32
                };
            }
            *acc = sum;
        }
    }
}

/// Unsigned bytes times signed bytes, summed in fours into eight i32 lanes: `vpmaddubsw` then
/// `vpmaddwd` with ones. No pair saturates: codes are at most 63 (Q8_0's absolute values 128
/// meet x's at most 127, 2 · 128 · 127 < 2¹⁵).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn dot_avx2(
    w: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    widen_pairs_avx2(std::arch::x86_64::_mm256_maddubs_epi16(w, x))
}

/// The same in one `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn dot_vnni(
    w: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    quads_vnni(std::arch::x86_64::_mm256_setzero_si256(), w, x)
}

/// The scaled byte products of one register block on aarch64: per unit, the codes of `WR`
/// weight rows are loaded once (two 16-byte registers each) and multiplied with each of `XR`
/// rows of x by `sdot`, which sums four byte products into each i32 lane. Every kind is one
/// signed product here: the unsigned codes are at most 63, so they are signed bytes too. A
/// unit's first register holds its first half, so Q6_K's two scales need no shuffle.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
fn block_neon<const XR: usize, const WR: usize, const KIND: u8>(
    at: &Block<'_>,
    out: &mut [[f32; WROWS]; XROWS],
) {
    use std::arch::aarch64::*;
    let k = at.x.cols;
    let units = k / UNIT;
    let per = if KIND == HALVES { 2 } else { 1 };
    let (xp, wp, xd, ws) = at.operands(XR, WR, per);
    let mut acc = [[vdupq_n_f32(0.0); WR]; XR];
    for u in 0..units {
        let mut w = [[vdupq_n_s8(0); 2]; WR];
        for (q, w) in w.iter_mut().enumerate() {
            for (h, w) in w.iter_mut().enumerate() {
                // SAFETY: row r + q of the tile has k codes (asserted above), and
                // 32 u + 32 <= k.
                *w = unsafe { vld1q_s8(wp.add(q * k + UNIT * u + 16 * h).cast()) };
            }
        }
        for p in 0..XR {
            // SAFETY: as above, for row i + p of x.
            let xv = unsafe {
                let at = xp.add(p * k + UNIT * u);
                [vld1q_s8(at), vld1q_s8(at.add(16))]
            };
            let d = xd[p * units + u];
            for q in 0..WR {
                let zero = vdupq_n_s32(0);
                if KIND == HALVES {
                    let (a0, a1) = (ws[2 * (q * units + u)], ws[2 * (q * units + u) + 1]);
                    let h0 = vcvtq_f32_s32(sdot(zero, w[q][0], xv[0]));
                    let h1 = vcvtq_f32_s32(sdot(zero, w[q][1], xv[1]));
                    acc[p][q] = vfmaq_n_f32(acc[p][q], h0, a0 * d);
                    acc[p][q] = vfmaq_n_f32(acc[p][q], h1, a1 * d);
                } else {
                    let both = sdot(sdot(zero, w[q][0], xv[0]), w[q][1], xv[1]);
                    let scale = ws[q * units + u] * d;
                    acc[p][q] = vfmaq_n_f32(acc[p][q], vcvtq_f32_s32(both), scale);
                }
            }
        }
    }
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = vaddvq_f32(*a);
        }
    }
}

/// `acc + Σ a · b` over each lane's four bytes: Arm's `sdot` (its intrinsic, `vdotq_s32`, is
/// not stable Rust yet).
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(
    mut acc: std::arch::aarch64::int32x4_t,
    a: std::arch::aarch64::int8x16_t,
    b: std::arch::aarch64::int8x16_t,
) -> std::arch::aarch64::int32x4_t {
    // SAFETY: `sdot` reads and writes registers only; the caller's features include dotprod.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `dy · W` with `dy: [m, n]` row-major f32 and `W: [n, k]` quantised or 16-bit; returns
/// `[m, k]`. One task per 32-column unit: every weight row's unit dequantised to f32 once, then
/// the `m` rows of `dy` against it, [`ROW_BLOCK`] rows at a time so that each weight value
/// loaded feeds that many products.
pub fn q_matmul_t(dy: &[f32], m: usize, w: &QWeights<'_>) -> Vec<f32> {
    assert!(w.is_whole(), "W's arrays are shorter than its shape");
    let (n, k) = (w.rows, w.cols);
    assert_eq!(dy.len(), m * n, "dy is not [m, n]");
    let units = k / UNIT;
    if m == 0 || n == 0 || units == 0 {
        return vec![0.0; m * k];
    }
    // On AMX-BF16, dy is split into two bf16 halves once for every task (`amx::SplitRows`).
    #[cfg(target_arch = "x86_64")]
    let split = (m >= AMX_BF16_MIN_ROWS && Isa::detect() == Isa::Amx && amx::has_bf16())
        // SAFETY: AMX implies AVX-512F (`Isa::find`).
        .then(|| unsafe { amx::SplitRows::new(dy, m, n) });
    // Task u writes columns 32u.. of every row as `[m, 32]`.
    let mut strips = vec![0f32; units * m * UNIT];
    pool::for_each_chunk(&mut strips, m * UNIT, &|u, strip| {
        UNIT_ROWS.with_borrow_mut(|wu| {
            wu.resize(n * UNIT, 0.0);
            dequantize_unit_column(w, u, wu);
            #[cfg(target_arch = "x86_64")]
            if let Some(split) = &split {
                // SAFETY: the processor has AMX-BF16, granted, and AVX-512F (checked above).
                unsafe { amx::times_unit_bf16(split, wu, strip) };
                return;
            }
            times_unit(dy, n, wu, strip);
        })
    });
    let mut out = vec![0f32; m * k];
    for (u, strip) in strips.chunks_exact(m * UNIT).enumerate() {
        for (i, cols) in strip.chunks_exact(UNIT).enumerate() {
            out[i * k + u * UNIT..i * k + u * UNIT + UNIT].copy_from_slice(cols);
        }
    }
    out
}

/// Rows of `dy` from which [`q_matmul_t`] takes AMX-BF16's tiles (16 rows each) over
/// AVX-512's FMAs.
#[cfg(target_arch = "x86_64")]
const AMX_BF16_MIN_ROWS: usize = 16;

thread_local! {
    /// [`q_matmul_t`]'s unit of every weight row in f32, kept from call to call.
    static UNIT_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Unit `u` (columns `32u..32u + 32`) of every row of `w`, as `[rows, 32]` f32.
fn dequantize_unit_column(w: &QWeights<'_>, u: usize, wu: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx2() {
        // SAFETY: the processor has AVX2 and FMA (`Isa::detect`).
        unsafe { dequantize_unit_column_avx2(w, u, wu) };
        return;
    }
    dequantize_unit_column_in(w, u, wu);
}

/// [`dequantize_unit_column`] compiled for AVX2: the codes' widening and scaling vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dequantize_unit_column_avx2(w: &QWeights<'_>, u: usize, wu: &mut [f32]) {
    dequantize_unit_column_in(w, u, wu);
}

#[inline(always)]
fn dequantize_unit_column_in(w: &QWeights<'_>, u: usize, wu: &mut [f32]) {
    let units = w.cols / UNIT;
    let mut codes = [0u8; UNIT];
    for (j, values) in wu.chunks_exact_mut(UNIT).enumerate() {
        let unit = j * units + u;
        if w.format.is_half() {
            widen(
                w.format,
                &w.qs[2 * UNIT * unit..2 * UNIT * (unit + 1)],
                values,
            );
            continue;
        }
        let (a, c) = unpack_unit(w, unit, &mut codes);
        let signed = w.format == QFormat::Q8_0;
        for (h, (values, codes)) in values
            .chunks_exact_mut(16)
            .zip(codes.chunks_exact(16))
            .enumerate()
        {
            let (a, c) = (a[h], c[h]);
            if signed {
                for (v, &q) in values.iter_mut().zip(codes) {
                    *v = a * (q as i8 as f32) + c;
                }
            } else {
                for (v, &q) in values.iter_mut().zip(codes) {
                    *v = a * (q as f32) + c;
                }
            }
        }
    }
}

/// Rows of `dy` the transposed product takes at once: with two 8-lane halves of a 16-column
/// pass, 12 accumulators, two weight registers and a broadcast fill AVX2's 16.
const ROW_BLOCK: usize = 6;

/// [`ROW_BLOCK`] with AVX-512: the whole unit is two 16-lane registers, and 12 rows' 24
/// accumulators, two weight registers and a broadcast fit in its 32.
#[cfg(target_arch = "x86_64")]
const ROW_BLOCK_AVX512: usize = 12;

/// `out[i] = Σ_j dy[i, j] · wu[j]` for every row `i` of `dy` (`[rows, n]`) over the 32-wide
/// rows `wu[j]`; `out` is `[rows, 32]`.
fn times_unit(dy: &[f32], n: usize, wu: &[f32], out: &mut [f32]) {
    assert_eq!(wu.len(), n * UNIT, "the unit column is not [n, 32]");
    assert_eq!(dy.len() / n * UNIT, out.len(), "out is not [rows, 32]");
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx512() {
        for (dy, out) in dy
            .chunks(ROW_BLOCK_AVX512 * n)
            .zip(out.chunks_mut(ROW_BLOCK_AVX512 * UNIT))
        {
            // SAFETY: the processor has AVX-512F (`Isa::detect`).
            unsafe {
                match dy.len() / n {
                    12 => rows_times_unit_avx512::<12>(dy, wu, out),
                    11 => rows_times_unit_avx512::<11>(dy, wu, out),
                    10 => rows_times_unit_avx512::<10>(dy, wu, out),
                    9 => rows_times_unit_avx512::<9>(dy, wu, out),
                    8 => rows_times_unit_avx512::<8>(dy, wu, out),
                    7 => rows_times_unit_avx512::<7>(dy, wu, out),
                    6 => rows_times_unit_avx512::<6>(dy, wu, out),
                    5 => rows_times_unit_avx512::<5>(dy, wu, out),
                    4 => rows_times_unit_avx512::<4>(dy, wu, out),
                    3 => rows_times_unit_avx512::<3>(dy, wu, out),
                    2 => rows_times_unit_avx512::<2>(dy, wu, out),
                    _ => rows_times_unit_avx512::<1>(dy, wu, out),
                }
            }
        }
        return;
    }
    for (dy, out) in dy
        .chunks(ROW_BLOCK * n)
        .zip(out.chunks_mut(ROW_BLOCK * UNIT))
    {
        match dy.len() / n {
            6 => rows_times_unit::<6>(dy, wu, out),
            5 => rows_times_unit::<5>(dy, wu, out),
            4 => rows_times_unit::<4>(dy, wu, out),
            3 => rows_times_unit::<3>(dy, wu, out),
            2 => rows_times_unit::<2>(dy, wu, out),
            _ => rows_times_unit::<1>(dy, wu, out),
        }
    }
}

/// [`rows_times_unit`] in AVX-512: the unit as two registers, `R` rows × two accumulators,
/// each weight register used by `R` FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn rows_times_unit_avx512<const R: usize>(dy: &[f32], wu: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = wu.len() / UNIT;
    assert!(dy.len() == R * n && out.len() == R * UNIT);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for j in 0..n {
        // SAFETY: `j < n`, so the 32 floats at `j · 32` lie inside `wu` (`[n, 32]`); `r < R`,
        // inside `dy` (`[R, n]`), as asserted above.
        unsafe {
            let w = wu.as_ptr().add(j * UNIT);
            let (w0, w1) = (_mm512_loadu_ps(w), _mm512_loadu_ps(w.add(16)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let g = _mm512_set1_ps(*dy.as_ptr().add(r * n + j));
                acc[0] = _mm512_fmadd_ps(g, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(g, w1, acc[1]);
            }
        }
    }
    for (o, acc) in out.chunks_exact_mut(UNIT).zip(&acc) {
        // SAFETY: `o` holds 32 floats.
        unsafe {
            _mm512_storeu_ps(o.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), acc[1]);
        }
    }
}

/// [`times_unit`] for exactly `R` rows.
fn rows_times_unit<const R: usize>(dy: &[f32], wu: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx2() {
        // SAFETY: the processor has AVX2 and FMA (`Isa::detect`).
        unsafe { rows_times_unit_avx2::<R>(dy, wu, out) };
        return;
    }
    rows_times_unit_portable::<R>(dy, wu, out);
}

/// [`rows_times_unit`] in AVX2/FMA: a 16-column half of the unit at a time, `R` rows × two
/// registers of accumulators, each weight register used by `R` FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_times_unit_avx2<const R: usize>(dy: &[f32], wu: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = wu.len() / UNIT;
    assert!(dy.len() == R * n && out.len() == R * UNIT);
    for half in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for j in 0..n {
            // SAFETY: `j < n` and `half · 16 + 16 <= 32`, inside `wu` (`[n, 32]`); `r < R`,
            // inside `dy` (`[R, n]`), as asserted above.
            unsafe {
                let w = wu.as_ptr().add(j * UNIT + half * 16);
                let (w0, w1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let g = _mm256_broadcast_ss(&*dy.as_ptr().add(r * n + j));
                    acc[0] = _mm256_fmadd_ps(g, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(g, w1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = &mut out[r * UNIT + half * 16..r * UNIT + half * 16 + 16];
            // SAFETY: `o` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(o.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), acc[1]);
            }
        }
    }
}

fn rows_times_unit_portable<const R: usize>(dy: &[f32], wu: &[f32], out: &mut [f32]) {
    let n = wu.len() / UNIT;
    let mut acc = [[0f32; UNIT]; R];
    for (j, w) in wu.chunks_exact(UNIT).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let g = dy[r * n + j];
            for (a, w) in acc.iter_mut().zip(w) {
                *a = g.mul_add(*w, *a);
            }
        }
    }
    for (o, acc) in out.chunks_exact_mut(UNIT).zip(&acc) {
        o.copy_from_slice(acc);
    }
}

/// Runs `f` on the weights of `w` as the kernels read them; `None` unless both word arrays are
/// contiguous i32 tensors as `QTensor::from_qmatrix` makes them, as long as the shape needs.
fn with_weights<T>(w: &QTensor<Flex>, f: impl FnOnce(&QWeights<'_>) -> T) -> Option<T> {
    let words = words_of(w);
    weights_of(w, &words).map(|w| f(&w))
}

/// The word arrays of `w` as burn-flex tensors (shared, not copied).
fn words_of(w: &QTensor<Flex>) -> (FlexTensor, FlexTensor) {
    (
        w.qs.clone().into_primitive(),
        w.scales.clone().into_primitive(),
    )
}

/// `w`'s weights over its words ([`words_of`]): `None` unless both are contiguous i32 tensors
/// as long as the shape needs.
fn weights_of<'a>(
    w: &QTensor<Flex>,
    (qs, scales): &'a (FlexTensor, FlexTensor),
) -> Option<QWeights<'a>> {
    let weights = QWeights {
        format: w.format,
        rows: w.rows,
        cols: w.cols,
        qs: bytemuck::cast_slice(qs.as_slice::<i32>()?),
        scales: bytemuck::cast_slice(scales.as_slice::<i32>()?),
    };
    weights.is_whole().then_some(weights)
}

/// `x · Wᵀ` on burn-flex with the integer kernels; `None` where the words are not laid out as
/// `QTensor::from_qmatrix` makes them or x is not f32 (the caller uses the reference).
pub fn try_q_matmul(x: &Tensor<Flex, 2>, w: &QTensor<Flex>) -> Option<Tensor<Flex, 2>> {
    on_flex(x, (w.cols, w.rows), w, q_matmul)
}

/// [`q_matmul_many`] on burn-flex: `x · Wᵢᵀ` for each weight; `None` as for [`try_q_matmul`].
pub fn try_q_matmul_many(
    x: &Tensor<Flex, 2>,
    ws: &[&QTensor<Flex>],
) -> Option<Vec<Tensor<Flex, 2>>> {
    let [rows, k] = x.dims();
    if ws.iter().any(|w| w.cols != k) {
        return None;
    }
    let xp = contiguous(x)?;
    let values = xp.as_slice::<f32>()?;
    let words: Vec<_> = ws.iter().map(|w| words_of(w)).collect();
    let weights = ws
        .iter()
        .zip(&words)
        .map(|(w, words)| weights_of(w, words))
        .collect::<Option<Vec<_>>>()?;
    let outs = q_matmul_many(values, rows, &weights);
    Some(
        outs.into_iter()
            .zip(ws)
            .map(|(out, w)| flex(out, [rows, w.rows]))
            .collect(),
    )
}

/// `dy · W` on burn-flex ([`q_matmul_t`]); `None` as for [`try_q_matmul`].
pub fn try_q_matmul_t(dy: &Tensor<Flex, 2>, w: &QTensor<Flex>) -> Option<Tensor<Flex, 2>> {
    on_flex(dy, (w.rows, w.cols), w, q_matmul_t)
}

/// `product(a, rows, W)` on burn-flex tensors, `a` being `[rows, inner]` and the result
/// `[rows, out]`; `None` where `a`'s width is not `inner` or as for [`try_q_matmul`].
fn on_flex(
    a: &Tensor<Flex, 2>,
    (inner, out): (usize, usize),
    w: &QTensor<Flex>,
    product: fn(&[f32], usize, &QWeights<'_>) -> Vec<f32>,
) -> Option<Tensor<Flex, 2>> {
    let [rows, k] = a.dims();
    if k != inner {
        return None;
    }
    let ap = contiguous(a)?;
    let values = ap.as_slice::<f32>()?;
    let result = with_weights(w, |w| product(values, rows, w))?;
    Some(flex(result, [rows, out]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern converts as `half` does (NaNs stay NaN).
    #[test]
    fn f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_at(&h.to_le_bytes(), 0);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// `CODELSI_CPU_ISA` picks an instruction set at most as far as the processor goes, and a
    /// name it does not run leaves the best (names are trimmed, any case).
    #[test]
    fn a_named_instruction_set_is_at_most_the_best() {
        assert_eq!(Isa::at_most(Isa::detect(), "Portable "), Isa::Portable);
        assert_eq!(Isa::at_most(Isa::detect(), "no such set"), Isa::detect());
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(Isa::at_most(Isa::Avx2, "amx"), Isa::Avx2);
            assert_eq!(Isa::at_most(Isa::Amx, "vnni"), Isa::Vnni);
        }
        for isa in Isa::available() {
            assert_eq!(Isa::at_most(Isa::detect(), isa.short_name()), isa);
        }
    }

    /// Every format on every instruction set against the f64 product of the dequantised weight
    /// and the values x's codes stand for, on row counts that fill and miss the register blocks
    /// and tiles; and against the f32 x within what 8-bit activations lose.
    #[test]
    fn products_match_the_dequantised_weight() {
        for format in QFormat::ALL {
            // One-unit formats: 19 units, two whole groups of the fused kernel and a part.
            let k = 2 * format.block_len() + if format.block_len() == 32 { 17 * 32 } else { 0 };
            for (m, n) in [(1, 3), (3, 37), (5, 37), (9, 16), (37, 5)] {
                let wv = values(n * k, 7);
                let q = QMatrix::quantize(format, n, k, &wv);
                let dense = q.dequantize();
                let w = QWeights::from(&q);
                let x = values(m * k, 8);
                // x per unit (prefill), and per super-block (the K-quants' decode kernel).
                let blocks = [UNIT, format.block_len()];
                let all = blocks
                    .iter()
                    .flat_map(|&b| Isa::available().into_iter().map(move |i| (b, i)));
                for (block, isa) in all {
                    let acts = QActs::quantize_blocks(&x, m, k, block);
                    let xq = acts.dequantize();
                    let got = q_matmul_on(isa, &acts, &w);
                    // AMX sums the same byte products as VNNI's tiles and weighs them in the
                    // same order (where it takes the codes signed, its offsets' terms are exact
                    // and differ).
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Amx && amx::signed_offset(format).is_none_or(|o| o == 0) {
                        let vnni = q_matmul_on(Isa::Vnni, &acts, &w);
                        let same = got
                            .iter()
                            .zip(&vnni)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{format:?} m {m} n {n}: AMX differs from VNNI");
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let dot = |x: &[f32]| -> f64 {
                                (0..k)
                                    .map(|c| x[i * k + c] as f64 * dense[j * k + c] as f64)
                                    .sum()
                            };
                            let (want, exact) = (dot(&xq), dot(&x));
                            let g = got[i * n + j] as f64;
                            assert!(
                                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{format:?} {isa:?} x per {block}, m {m} n {n}: [{i}, {j}] {g} vs {want}"
                            );
                            assert!(
                                (g - exact).abs() <= 0.02 * (k as f64).sqrt(),
                                "{format:?}: 8-bit x lost too much: {g} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Several weights in one job give each weight's own product bit for bit: mixed formats
    /// (x quantised per unit and per super-block in one call), decode and prefill rows, and
    /// weights that fall back to one product each (rows short of a task, 16-bit).
    #[test]
    fn products_in_one_job_match_one_at_a_time() {
        let k = 512;
        let sets: [&[(QFormat, usize)]; 2] = [
            &[
                (QFormat::Q5_0, 48),
                (QFormat::Q4K, 16),
                (QFormat::Q8_0, 32),
                (QFormat::Q6K, 16),
            ],
            &[(QFormat::Q4_1, 48), (QFormat::Q4K, 21), (QFormat::F16, 16)],
        ];
        for set in sets {
            let mats: Vec<QMatrix> = set
                .iter()
                .enumerate()
                .map(|(i, &(f, n))| QMatrix::quantize(f, n, k, &values(n * k, 20 + i as u64)))
                .collect();
            let ws: Vec<QWeights<'_>> = mats.iter().map(QWeights::from).collect();
            for m in [1, 3, 5, 37] {
                let x = values(m * k, 30 + m as u64);
                let together = q_matmul_many(&x, m, &ws);
                for (w, got) in ws.iter().zip(&together) {
                    let want = q_matmul(&x, m, w);
                    assert!(
                        got.len() == want.len()
                            && got
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?} [{}, {k}], m {m}",
                        w.format,
                        w.rows
                    );
                }
            }
        }
    }

    /// 16-bit weights: the product with f32 x against the f64 product with the widened weight,
    /// on row counts that fill and miss the tiles.
    #[test]
    fn half_products_match_the_widened_weight() {
        for format in QFormat::HALF {
            let k = 96;
            for (m, n) in [(1, 3), (5, 37)] {
                let q = QMatrix::quantize(format, n, k, &values(n * k, 11));
                let dense = q.dequantize();
                let x = values(m * k, 12);
                let got = q_matmul(&x, m, &QWeights::from(&q));
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * dense[j * k + c] as f64)
                            .sum();
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{format:?} m {m} n {n}: [{i}, {j}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Every build of the transposed product's row block against f64 sums: the best this
    /// processor has for every block height and a remainder past two blocks, AVX2's and the
    /// portable one.
    #[test]
    fn row_blocks_of_the_transposed_product_agree() {
        let n = 37;
        let rows = 2 * 12 + 1;
        let wu = values(n * UNIT, 11);
        let dy = values(rows * n, 12);
        let check = |r: usize, got: &[f32]| {
            for i in 0..r {
                for c in 0..UNIT {
                    let want: f64 = (0..n)
                        .map(|j| dy[i * n + j] as f64 * wu[j * UNIT + c] as f64)
                        .sum();
                    let g = got[i * UNIT + c] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "r {r} [{i}, {c}]"
                    );
                }
            }
        };
        for r in 1..=rows {
            let mut out = vec![0f32; r * UNIT];
            times_unit(&dy[..r * n], n, &wu, &mut out);
            check(r, &out);
        }
        let mut out = vec![0f32; 4 * UNIT];
        rows_times_unit::<4>(&dy[..4 * n], &wu, &mut out);
        check(4, &out);
        rows_times_unit_portable::<4>(&dy[..4 * n], &wu, &mut out);
        check(4, &out);
    }

    /// The transposed product against the f64 product with the dequantised weight: 13 rows
    /// of `dy` (FMAs, to f32's rounding), and 37 over 45 weight rows (AMX-BF16's tiles where the
    /// processor has them: rows and `n` past whole tiles), each product within 2⁻¹⁶ of its size.
    #[test]
    fn transposed_product_matches_the_dequantised_weight() {
        for format in QFormat::EVERY {
            for (m, n) in [(13, 5), (37, 45)] {
                let k = 2 * format.block_len();
                let q = QMatrix::quantize(format, n, k, &values(n * k, 9));
                let dense = q.dequantize();
                let w = QWeights::from(&q);
                let dy = values(m * n, 10);
                let got = q_matmul_t(&dy, m, &w);
                for i in 0..m {
                    for c in 0..k {
                        let terms = (0..n).map(|j| dy[i * n + j] as f64 * dense[j * k + c] as f64);
                        let want: f64 = terms.clone().sum();
                        let size: f64 = terms.map(f64::abs).sum();
                        let g = got[i * k + c] as f64;
                        // f32's FMAs below 16 rows, as before; the split bf16 terms above.
                        let tol = if m < 16 {
                            1e-5 * (1.0 + want.abs())
                        } else {
                            1.5e-5 * size + 1e-7
                        };
                        assert!(
                            (g - want).abs() <= tol,
                            "{format:?} m {m} [{i}, {c}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
