//! Prefill's tile products on Intel's Advanced Matrix Extensions (AMX-INT8: Xeon Sapphire
//! Rapids and later): one `tdpbusd` multiplies the tile's 16 weight rows by 16 rows of x over a
//! unit (Q6_K: a half), 8,192 byte products into a 16 × 16 block of i32 sums; AVX-512 then
//! weighs each block by its unit's scales and adds the offsets' terms, as the VNNI tiles do
//! lane by lane. llama.cpp's CPU backend takes the same route (`ggml-cpu/amx`: a tile product
//! per 32-value block, its sums stored and scaled in AVX-512); this is our own, on our tiles.
//!
//! - The A operand is the tile's codes laid out unit by unit ([`lay_out`]: 16 rows of 32
//!   bytes), unsigned with `tdpbusd`, or signed with `tdpbssd` where the format's offset is a
//!   multiple of its scale ([`signed_offset`]); the B operand is x laid out once per product in
//!   AMX's layout of four consecutive columns side by side ([`Acts`]).
//! - Each step's sums go through memory (AMX has no path to vector registers); two sets of tile
//!   registers alternate, so that one step's product runs while the previous step's sums are
//!   weighed.
//! - The tile state is the thread's: every product loads its configuration and releases the
//!   tiles at the end. Linux grants a process the tiles' 8 KB of state on request
//!   ([`granted`]); without that grant the instructions fault, so [`super::Isa::find`] offers
//!   AMX only after it.

use std::arch::asm;
use std::arch::x86_64::*;

use super::{QActs, QFormat, TILE_ROWS, Tile, UNIT};

/// Rows of x one tile product takes (a tile's rows; 16 i32 lanes of a 512-bit register).
const XROWS: usize = 16;

/// Whether this process may run AMX-INT8: the processor has AMX-TILE and AMX-INT8 (CPUID leaf
/// 7, EDX bits 24 and 25) and Linux granted the tile data state (`arch_prctl`'s
/// `ARCH_REQ_XCOMP_PERM`). Other systems: no (Windows enables the state by itself, but nothing
/// has run AMX there yet).
pub(super) fn granted() -> bool {
    #[cfg(target_os = "linux")]
    {
        // Leaf 7 exists on every processor with AVX2, which the caller checked.
        let leaf7 = __cpuid_count(7, 0);
        if (leaf7.edx >> 24) & 1 == 0 || (leaf7.edx >> 25) & 1 == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: the request reads nothing of ours; it fails (non-zero) where the kernel
        // cannot grant the state, e.g. a thread's signal stack too small for it.
        let asked = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        asked == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// x as the tiles' B operand, per group of [`XROWS`] rows (rows past x's are zero).
pub(super) struct Acts {
    /// `[groups, units, 8, 64]`: row `q` of unit `u` holds bytes `4q..4q + 4` of the unit in
    /// each of the group's 16 rows of x in turn (AMX's layout of B: four consecutive k of a
    /// column side by side). A half unit is rows `4h..4h + 4`.
    codes: Vec<i8>,
    /// `[groups, units, 16]`: each row's `d` for the unit.
    d: Vec<f32>,
    /// `[groups, units, 16]`: `d · Σ code` over the unit, what a weight's offset meets.
    unit_sums: Vec<f32>,
    /// `[groups, 2 · units, 16]`: the same per half (Q6_K).
    half_sums: Vec<f32>,
}

impl Acts {
    pub(super) fn new(x: &QActs) -> Self {
        let (m, k) = (x.rows, x.cols);
        let units = k / UNIT;
        let groups = m.div_ceil(XROWS);
        let mut codes = vec![0i8; groups * units * XROWS * UNIT];
        let mut d = vec![0f32; groups * units * XROWS];
        let mut unit_sums = vec![0f32; groups * units * XROWS];
        let mut half_sums = vec![0f32; groups * 2 * units * XROWS];
        for row in 0..m {
            let (g, n) = (row / XROWS, row % XROWS);
            for u in 0..units {
                let unit = &x.codes[row * k + u * UNIT..][..UNIT];
                let out = &mut codes[(g * units + u) * XROWS * UNIT..][..XROWS * UNIT];
                for (q, four) in unit.chunks_exact(4).enumerate() {
                    out[q * 4 * XROWS + 4 * n..][..4].copy_from_slice(four);
                }
                let at = (g * units + u) * XROWS + n;
                d[at] = x.d[row * units + u];
                unit_sums[at] = x.unit_sums[row * units + u];
                for h in 0..2 {
                    half_sums[(g * 2 * units + 2 * u + h) * XROWS + n] =
                        x.half_sums[(row * units + u) * 2 + h];
                }
            }
        }
        Self {
            codes,
            d,
            unit_sums,
            half_sums,
        }
    }
}

/// The tile registers' shapes (`ldtilecfg`'s 64-byte operand, palette 1).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile register.
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved_after: [u8; 16],
}

impl Config {
    /// Palette 1 with every register unused: the constructors below set theirs.
    fn palette_1() -> Self {
        Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
            reserved_after: [0; 16],
        }
    }

    /// Two alternating sets for a step of `bytes` codes a row (32, or 16 for a half unit):
    /// A in tmm0 and tmm4 (`[16, bytes]` of the tile's codes), B in tmm1 and tmm5 (`bytes / 4`
    /// rows of 64 bytes of x), the i32 sums in tmm2 and tmm3 (`[16, 16]`).
    fn steps_of(bytes: usize) -> Self {
        let mut c = Self::palette_1();
        for a in [0, 4] {
            c.colsb[a] = bytes as u16;
            c.rows[a] = TILE_ROWS as u8;
        }
        for b in [1, 5] {
            c.colsb[b] = (4 * XROWS) as u16;
            c.rows[b] = (bytes / 4) as u8;
        }
        for s in [2, 3] {
            c.colsb[s] = (4 * XROWS) as u16;
            c.rows[s] = TILE_ROWS as u8;
        }
        c
    }

    /// All eight registers 16 rows of 64 bytes: [`times_unit_bf16`]'s operands and sums.
    fn all_square() -> Self {
        let mut c = Self::palette_1();
        c.colsb[..8].fill(64);
        c.rows[..8].fill(BF16_ROWS as u8);
        c
    }
}

/// One step's sums: `[weight row, row of x]`, as `tilestored` writes them.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Sums([[i32; XROWS]; TILE_ROWS]);

/// `out[r * m + i] = x_i · w_r` for every row of the tile (the offsets' terms included), with
/// every row of x in the tile products.
///
/// # Safety
/// The processor has AVX-512F and VL, and [`granted`] said yes.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
pub(super) unsafe fn product(format: QFormat, x: &QActs, tile: &Tile, out: &mut [f32]) {
    // SAFETY: as the caller's.
    unsafe {
        match (format, signed_offset(format).is_some()) {
            (QFormat::Q6K, _) => product_as::<true, 2>(x, tile, out),
            (_, true) => product_as::<true, 1>(x, tile, out),
            (_, false) => product_as::<false, 1>(x, tile, out),
        }
    }
}

/// What the tiles subtract from `format`'s unsigned codes to make them signed bytes, where its
/// offset is that many times its scale (Q4_0: `d · (q − 8)`, Q5_0: `d · (q − 16)`, Q6_K:
/// `d · s · (q − 32)`; Q8_0's codes are signed already): the offset then lies inside the
/// integer sums, exactly, and the weighing skips its term. The other formats' offsets are
/// floats of their own (Q4_1, Q5_1: `m`; Q4_K, Q5_K: `dmin · m`).
pub(super) fn signed_offset(format: QFormat) -> Option<u8> {
    match format {
        QFormat::Q8_0 => Some(0),
        QFormat::Q4_0 => Some(8),
        QFormat::Q5_0 => Some(16),
        QFormat::Q6K => Some(32),
        _ => None,
    }
}

/// Issues step `$s`'s product into the sums' buffer `$sums` on one set of tile registers:
/// `$a` and `$b` the operands, `$c` the sums, `$op` the byte product (`tdpbusd` for unsigned
/// codes, `tdpbssd` for signed ones).
macro_rules! tile_step {
    ($op:literal, $a:literal, $b:literal, $c:literal, $wp:expr, $k:expr, $xp:expr, $sums:expr) => {
        asm!(
            concat!("tilezero ", $c),
            concat!("tileloadd ", $a, ", [{w} + {k}*1]"),
            concat!("tileloadd ", $b, ", [{x} + {xs}*1]"),
            concat!($op, " ", $c, ", ", $a, ", ", $b),
            concat!("tilestored [{s} + {ss}*1], ", $c),
            w = in(reg) $wp,
            k = in(reg) $k,
            x = in(reg) $xp,
            xs = in(reg) 4 * XROWS,
            s = in(reg) $sums,
            ss = in(reg) 4 * XROWS,
            options(nostack),
        )
    };
}

/// Fills the tile's `lanes` with its codes unit by unit, `[units, 16 rows, 32]`, so that a
/// step's A operand is 512 bytes in a row (read from the row-major codes, a unit's 16 rows lie
/// `k` bytes apart, and at `k` a multiple of 4 KB they fall in one set of the L1 cache, more
/// lines than it has ways); signed where [`signed_offset`] says.
pub(super) fn lay_out(tile: &mut Tile, format: QFormat, k: usize) {
    let units = k / UNIT;
    let offset = signed_offset(format).unwrap_or(0);
    tile.lanes.resize(units * TILE_ROWS * UNIT, 0);
    for (r, row) in tile.codes.chunks_exact(k).take(TILE_ROWS).enumerate() {
        for (u, unit) in row.chunks_exact(UNIT).enumerate() {
            let lane = &mut tile.lanes[(u * TILE_ROWS + r) * UNIT..][..UNIT];
            for (l, &c) in lane.iter_mut().zip(unit) {
                *l = c.wrapping_sub(offset);
            }
        }
    }
}

/// [`product`] for signed or unsigned codes and `PER` scales a unit (Q6_K: 2); unsigned
/// codes' offsets are weighed with x's sums.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn product_as<const SIGNED: bool, const PER: usize>(
    x: &QActs,
    tile: &Tile,
    out: &mut [f32],
) {
    let (m, k) = (x.rows, x.cols);
    let units = k / UNIT;
    let per = PER;
    let steps = units * per;
    let bytes = UNIT / per;
    let acts = x.amx();
    let groups = m.div_ceil(XROWS);
    // The tile's operand is always 16 rows (unpacking pads its arrays to them); rows past
    // `tile.rows` are multiplied and never written.
    assert!(
        tile.lanes.len() >= units * TILE_ROWS * UNIT
            && tile.scales.len() >= TILE_ROWS * steps
            && tile.mins.len() >= TILE_ROWS * steps
            && out.len() >= tile.rows * m
            && acts.codes.len() >= groups * units * XROWS * UNIT
            && acts.d.len() >= groups * units * XROWS
            && acts.unit_sums.len() >= groups * units * XROWS
            && acts.half_sums.len() >= groups * 2 * units * XROWS,
        "tile product outside x or the tile"
    );
    let config = Config::steps_of(bytes);
    // SAFETY: `granted` asked for the tile state; the configuration is 64 readable bytes.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) std::ptr::from_ref(&config), options(nostack, readonly))
    };
    let mut sums = [Sums([[0; XROWS]; TILE_ROWS]); 2];
    let offsets = if PER == 2 {
        &acts.half_sums
    } else {
        &acts.unit_sums
    };
    let (scales, mins) = (tile.scales.as_ptr(), tile.mins.as_ptr());
    for g in 0..groups {
        // `acc[r]`: weight row r against the group's 16 rows of x.
        let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
        let issue = |s: usize, sums: &mut [Sums; 2]| {
            let (u, h) = (s / per, s % per);
            // A: the unit's 16 rows of codes, 32 bytes apart; B: the step's rows of x's layout.
            let wp = tile.lanes[u * TILE_ROWS * UNIT + h * bytes..].as_ptr();
            let xp = acts.codes[((g * units + u) * 8 + h * 4) * 4 * XROWS..].as_ptr();
            let into = sums[s % 2].0.as_mut_ptr();
            // SAFETY: A reads 16 rows of `bytes` bytes 32 apart inside the unit's 512 bytes, B
            // `bytes / 4` rows of 64 bytes inside the group's unit (both asserted); the sums
            // fill the 1 KB buffer. The configuration is loaded.
            unsafe {
                match (SIGNED, s % 2) {
                    (false, 0) => tile_step!("tdpbusd", "tmm0", "tmm1", "tmm2", wp, UNIT, xp, into),
                    (false, _) => tile_step!("tdpbusd", "tmm4", "tmm5", "tmm3", wp, UNIT, xp, into),
                    (true, 0) => tile_step!("tdpbssd", "tmm0", "tmm1", "tmm2", wp, UNIT, xp, into),
                    (true, _) => tile_step!("tdpbssd", "tmm4", "tmm5", "tmm3", wp, UNIT, xp, into),
                }
            }
        };
        issue(0, &mut sums);
        for s in 0..steps {
            if s + 1 < steps {
                issue(s + 1, &mut sums);
            }
            let (u, h) = (s / per, s % per);
            let d = &acts.d[(g * units + u) * XROWS..][..XROWS];
            let xs = &offsets[(g * steps + s) * XROWS..][..XROWS];
            // SAFETY: 16 floats each.
            let (d, xs) = unsafe { (_mm512_loadu_ps(d.as_ptr()), _mm512_loadu_ps(xs.as_ptr())) };
            let block = &sums[s % 2].0;
            // Written out row by row, so that the 16 accumulators stay in registers.
            macro_rules! rows {
                ($($r:literal)*) => {$(
                    let at = ($r * units + u) * per + h;
                    // SAFETY: row r's scale and offset for the step, inside the tile's 16 rows
                    // (asserted); a row of the sums, 64 bytes on a 64-byte boundary.
                    let (a, c, sum) = unsafe {
                        (
                            *scales.add(at),
                            *mins.add(at),
                            _mm512_load_si512(block[$r].as_ptr().cast()),
                        )
                    };
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(a));
                    acc[$r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[$r]);
                    if !SIGNED {
                        acc[$r] = _mm512_fmadd_ps(_mm512_set1_ps(c), xs, acc[$r]);
                    }
                )*};
            }
            rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        let lanes = (m - g * XROWS).min(XROWS);
        let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
        for (r, acc) in acc.iter().enumerate().take(tile.rows) {
            let o = &mut out[r * m + g * XROWS..][..lanes];
            // SAFETY: writes the first `lanes` floats of `o`.
            unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), mask, *acc) };
        }
    }
    // SAFETY: no tile register is read after this.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Whether the processor has AMX-BF16 too (CPUID leaf 7, EDX bit 22), for the backward's
/// `dy · W` ([`times_unit_bf16`]). Asked only where [`granted`] said yes.
pub(super) fn has_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: leaf 7 exists on every processor with AVX2, which `granted`'s caller checked.
    *HAS.get_or_init(|| (__cpuid_count(7, 0).edx >> 22) & 1 == 1)
}

/// Rows of `dy` a bf16 tile takes, and the values along `n` one step takes (a tile row's 64
/// bytes of bf16).
const BF16_ROWS: usize = 16;
const BF16_STEP: usize = 32;

/// `x` as the sum of two bf16 values, `hi + lo`, each in the low 16 bits of its lane: `hi` is
/// `x` rounded to nearest even, `lo` the remainder (exact in f32) rounded the same way, so the
/// pair holds `x` to 2⁻¹⁷ of its size.
#[target_feature(enable = "avx512f")]
fn split_bf16(x: __m512) -> (__m512i, __m512i) {
    #[target_feature(enable = "avx512f")]
    fn round(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
        _mm512_srli_epi32::<16>(up)
    }
    let hi = round(x);
    let rest = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)));
    (hi, round(rest))
}

/// `dy` (`[m, n]` f32) split as [`split_bf16`] does, as the tiles' A operand: `hi` and `lo`
/// are bf16 laid out tile by tile, `[rows / 16, cols / 32, 16, 32]`, so that a step reads 1 KB
/// in a row; `rows` and `cols` are `m` and `n` rounded up to 16 and 32, with zeros.
pub(super) struct SplitRows {
    hi: Vec<u16>,
    lo: Vec<u16>,
    m: usize,
    rows: usize,
    cols: usize,
}

impl SplitRows {
    /// # Safety
    /// The processor has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn new(dy: &[f32], m: usize, n: usize) -> Self {
        assert_eq!(dy.len(), m * n, "dy is not [m, n]");
        let (rows, cols) = (m.next_multiple_of(BF16_ROWS), n.next_multiple_of(BF16_STEP));
        let mut hi = vec![0u16; rows * cols];
        let mut lo = vec![0u16; rows * cols];
        for i in 0..m {
            let row = &dy[i * n..(i + 1) * n];
            for j in (0..n).step_by(16) {
                let lanes = (n - j).min(16);
                let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
                // The 16 values lie in one tile row: `j` is a multiple of 16.
                let (g, r, s, c) = (i / BF16_ROWS, i % BF16_ROWS, j / BF16_STEP, j % BF16_STEP);
                let at = ((g * (cols / BF16_STEP) + s) * BF16_ROWS + r) * BF16_STEP + c;
                // SAFETY: the first `lanes` floats from `j` lie in the row, and the 16 u16 at
                // `at` inside `hi` and `lo` (`c + 16 ≤ 32`, the tile inside the arrays).
                unsafe {
                    let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(j));
                    let (h, l) = split_bf16(x);
                    _mm256_storeu_si256(hi.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi16(h));
                    _mm256_storeu_si256(lo.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi16(l));
                }
            }
        }
        Self {
            hi,
            lo,
            m,
            rows,
            cols,
        }
    }
}

thread_local! {
    /// [`times_unit_bf16`]'s B operands, kept from call to call.
    static UNIT_TILES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The unit's weights (`wu`: `[n, 32]` f32) split as [`split_bf16`] does, as the tiles' B
/// operand: per step of 32 rows, per 16-column half, `hi` then `lo`, each 16 rows of 16 pairs
/// (AMX's layout of B for bf16: row `p` holds rows `2p` and `2p + 1` of the step side by side,
/// column by column). Rows past `n` are zero.
#[target_feature(enable = "avx512f")]
fn lay_out_unit(wu: &[f32], steps: usize, b: &mut Vec<u32>) {
    let n = wu.len() / UNIT;
    // Every value is written below: the buffer only grows.
    b.resize(steps * 4 * BF16_ROWS * 16, 0);
    let row = |j: usize, h: usize| {
        if j < n {
            // SAFETY: 16 floats of row j's half h, inside `wu`.
            unsafe { _mm512_loadu_ps(wu.as_ptr().add(j * UNIT + 16 * h)) }
        } else {
            _mm512_setzero_ps()
        }
    };
    for s in 0..steps {
        for h in 0..2 {
            let block = (s * 2 + h) * 2 * BF16_ROWS * 16;
            for p in 0..BF16_ROWS {
                let j = s * BF16_STEP + 2 * p;
                // SAFETY: register arithmetic, and 16 u32 at each of the block's row `p` of
                // `hi` and of `lo`, inside `b`.
                unsafe {
                    let (h0, l0) = split_bf16(row(j, h));
                    let (h1, l1) = split_bf16(row(j + 1, h));
                    let hi = _mm512_or_si512(h0, _mm512_slli_epi32::<16>(h1));
                    let lo = _mm512_or_si512(l0, _mm512_slli_epi32::<16>(l1));
                    let at = b.as_mut_ptr().add(block + p * 16);
                    _mm512_storeu_si512(at.cast(), hi);
                    _mm512_storeu_si512(at.add(BF16_ROWS * 16).cast(), lo);
                }
            }
        }
    }
}

/// `out[i] = Σ_j dy[i, j] · wu[j]` (`out`: `[m, 32]`) on AMX-BF16: per 16 rows of `dy`, per
/// 16-column half and step of 32 along `n`, the terms `hi·hi`, `hi·lo` and `lo·hi` of the
/// split operands, each into f32 sums of its own that stay in a tile register over the whole of
/// `n`. The term left out, `lo·lo`, and the rounding of `lo` leave each product within about
/// 2⁻¹⁷ of f32's. On the development VM this runs the products about 1.3× as fast as
/// AVX-512's FMAs (which run near their peak); the tile loads bound it, not the products.
///
/// # Safety
/// The processor has AVX-512F, [`granted`] said yes and [`has_bf16`] too.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn times_unit_bf16(dy: &SplitRows, wu: &[f32], out: &mut [f32]) {
    let n = wu.len() / UNIT;
    let steps = dy.cols / BF16_STEP;
    assert!(
        n <= dy.cols && n + BF16_STEP > dy.cols && out.len() == dy.m * UNIT,
        "dy's split is not [m, n] against the unit's [n, 32]"
    );
    UNIT_TILES.with_borrow_mut(|b| {
        lay_out_unit(wu, steps, b);
        let config = Config::all_square();
        // SAFETY: `granted` asked for the tile state; the configuration is 64 readable bytes.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) std::ptr::from_ref(&config), options(nostack, readonly))
        };
        let stride = 2 * BF16_STEP;
        // Per 16-column half, three sums, one per term, so that no product waits on the one
        // before it (a tile product's latency is several times its issue interval).
        let mut sums = [FloatSums([[0f32; 16]; BF16_ROWS]); 3];
        for g in 0..dy.rows / BF16_ROWS {
            let rows = (dy.m - g * BF16_ROWS).min(BF16_ROWS);
            for h in 0..2 {
                // SAFETY: the sums' tiles are zeroed before the steps add to them.
                unsafe {
                    asm!(
                        "tilezero tmm4",
                        "tilezero tmm5",
                        "tilezero tmm6",
                        options(nostack, nomem)
                    )
                };
                for s in 0..steps {
                    let a = (g * steps + s) * BF16_ROWS * BF16_STEP;
                    let bp = b[(s * 2 + h) * 2 * BF16_ROWS * 16..].as_ptr();
                    // SAFETY: A reads the 1 KB tile of rows 16g.. and columns 32s.. of `hi` and
                    // `lo` (`SplitRows`' layout); B the half's two 1 KB blocks of the step inside
                    // `b` (`lay_out_unit`). The configuration is loaded.
                    unsafe {
                        asm!(
                            "tileloadd tmm0, [{ah} + {st}*1]",
                            "tileloadd tmm2, [{b} + {bs}*1]",
                            "tileloadd tmm3, [{b} + {bs}*1 + 1024]",
                            "tileloadd tmm1, [{al} + {st}*1]",
                            "tdpbf16ps tmm4, tmm0, tmm2",
                            "tdpbf16ps tmm5, tmm0, tmm3",
                            "tdpbf16ps tmm6, tmm1, tmm2",
                            ah = in(reg) dy.hi.as_ptr().add(a),
                            al = in(reg) dy.lo.as_ptr().add(a),
                            st = in(reg) stride,
                            b = in(reg) bp,
                            bs = in(reg) 64usize,
                            options(nostack, readonly),
                        )
                    };
                }
                // SAFETY: three blocks of 16 rows of 64 bytes, each its own `FloatSums`.
                unsafe {
                    asm!(
                        "tilestored [{a} + {ss}*1], tmm4",
                        "tilestored [{b} + {ss}*1], tmm5",
                        "tilestored [{c} + {ss}*1], tmm6",
                        a = in(reg) sums[0].0.as_mut_ptr(),
                        b = in(reg) sums[1].0.as_mut_ptr(),
                        c = in(reg) sums[2].0.as_mut_ptr(),
                        ss = in(reg) 64usize,
                        options(nostack),
                    )
                };
                for r in 0..rows {
                    let o = &mut out[(g * BF16_ROWS + r) * UNIT + 16 * h..][..16];
                    for (c, o) in o.iter_mut().enumerate() {
                        *o = sums[0].0[r][c] + (sums[1].0[r][c] + sums[2].0[r][c]);
                    }
                }
            }
        }
        // SAFETY: no tile register is read after this.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// A 16 × 16 block of f32 sums, as `tilestored` writes them.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct FloatSums([[f32; 16]; BF16_ROWS]);
