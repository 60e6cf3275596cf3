//! The CPU path's kernels for decode steps: the product of few rows of x with a weight (the
//! projections, the head on last positions), and attention of few query rows over the KV cache.
//!
//! burn-flex multiplies with gemm, which packs both operands into panels on every call. With
//! a weight of `[out, in]` and a handful of rows of x, packing the weight costs about as much as
//! the product: a batch-16 decode step of the default model spent most of its 515 ms packing
//! (perf on the 2-core VM). Here each weight row is read straight from its row-major storage,
//! in register blocks of 6 rows of x by 2 weight rows, on every core (rayon), with AVX2/FMA
//! intrinsics where the processor has them. Attention reads keys and values where they lie in
//! the cache, which gemm would first copy out of the cache's view on one core.
//!
//! Training's loss and its dropout masks are here too: one pass a row over the logits, and a
//! counter-based generator for the masks.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::pool;

/// Rows of x up to which [`matmul_rows`] beats gemm (the default model's projections and head,
/// 1-32 rows, on the 2-core VM; gemm's packing is amortised from about 64 rows on).
pub const MAX_ROWS: usize = 32;

/// Output columns (rows of W) one task computes: enough work per task to hide rayon's cost,
/// enough tasks (n / 64) to share among the cores.
const COLS_PER_TASK: usize = 64;

/// `x · Wᵀ` with `x: [m, k]` and `W: [n, k]`, both row-major; returns `[m, n]` row-major.
pub fn matmul_rows(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "W is not [n, k]");
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // Each task writes its columns as `[cols, m]` (contiguous per task); transposed at the end.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * COLS_PER_TASK;
            let cols = out.len() / m;
            let rows = &w[first * k..(first + cols) * k];
            dot_rows(x, m, k, rows, out);
        });
    transpose(out_t, m, n)
}

/// `[n, m]` row-major values as `[m, n]`.
pub(crate) fn transpose(values: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return values;
    }
    // Tasks of 16 output rows on the pool, each in 8 × 8 blocks of registers where it can (a
    // prefill's `[8960, 512]` is 18 MB: one core moving one value at a time took 5–8 % of it).
    const BLOCK: usize = 16;
    let mut out = vec![0f32; m * n];
    let rows = |t: usize, out: &mut [f32]| {
        let i0 = t * BLOCK;
        #[cfg(target_arch = "x86_64")]
        let j0 = if has_avx2_fma_f16c() {
            // SAFETY: the processor has AVX2 (checked above).
            unsafe { transpose_eights_avx2(&values, m, n, i0, out) }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let j0 = 0;
        let rows = out.len() / n;
        for j in j0..n {
            for (i, v) in values[j * m + i0..j * m + i0 + rows].iter().enumerate() {
                out[i * n + j] = *v;
            }
        }
    };
    if m * n < 1 << 16 {
        out.chunks_mut(BLOCK * n)
            .enumerate()
            .for_each(|(t, out)| rows(t, out));
    } else {
        super::pool::for_each_chunk(&mut out, BLOCK * n, &rows);
    }
    out
}

/// [`transpose`]'s output rows `i0..` (as many as `out` holds, `[rows, n]`) from `values`
/// (`[n, m]`), in 8 × 8 blocks of registers where 8 rows are left; returns the first column
/// it did not fill (the caller fills the rest).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose_eights_avx2(values: &[f32], m: usize, n: usize, i0: usize, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let rows = out.len() / n;
    assert!(
        i0 + rows <= m && values.len() >= n * m,
        "rows outside the values"
    );
    let full = n - n % LANES;
    for ib in (0..rows - rows % LANES).step_by(LANES) {
        for j0 in (0..full).step_by(LANES) {
            // SAFETY: rows j0..j0 + 8 < n of `values`, 8 values from column i0 + ib + 8 <= m.
            let r: [__m256i; LANES] = std::array::from_fn(|q| unsafe {
                _mm256_loadu_si256(values.as_ptr().add((j0 + q) * m + i0 + ib).cast())
            });
            for (q, v) in super::cpu_quant::transpose_words(r).into_iter().enumerate() {
                let o = &mut out[(ib + q) * n + j0..][..LANES];
                // SAFETY: writes the 8 floats of `o`.
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
            }
        }
    }
    // Rows short of 8 at the end: one value at a time.
    for i in rows - rows % LANES..rows {
        for j in 0..full {
            out[i * n + j] = values[j * m + i0 + i];
        }
    }
    full
}

/// Lanes of each accumulator: one AVX register of f32.
const LANES: usize = 8;
/// Rows of x and rows of W in one register block: 6 × 2 accumulators, two weight vectors and
/// one x vector take 15 of AVX2's 16 registers, and the twelve independent FMA chains hide the
/// FMA latency. (Four rows of x against one weight row, four chains, ran at half the core's
/// FMA rate: batch-16 decode of the default model went from 293 to 224 ms a step.)
const XROWS: usize = 6;
const WROWS: usize = 2;

/// `out[j * m + i] = x_i · w_j` for every row `w_j` of `rows`.
pub(crate) fn dot_rows(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        blocks(&avx2, x, m, k, rows, out);
        return;
    }
    blocks(&Portable, x, m, k, rows, out);
}

/// Computes one register block of [`dot_rows`].
trait BlockKernel {
    /// `out[(j + q) * m + i + r] = x_{i+r} · w_{j+q}` for `r < XR`, `q < WR`.
    fn run<const XR: usize, const WR: usize>(&self, at: &Block<'_>, out: &mut [f32]);
}

/// Where a register block starts: rows `i..` of x (`[m, k]`) against rows `j..` of `w`.
struct Block<'a> {
    x: &'a [f32],
    k: usize,
    w: &'a [f32],
    i: usize,
    j: usize,
    m: usize,
}

/// [`dot_rows`] in register blocks of up to [`XROWS`] rows of x by [`WROWS`] rows of W.
fn blocks(kernel: &impl BlockKernel, x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    let n = rows.len() / k;
    let mut j = 0;
    while j < n {
        let wr = WROWS.min(n - j);
        let mut i = 0;
        while i < m {
            let xr = XROWS.min(m - i);
            let at = Block {
                x,
                k,
                w: rows,
                i,
                j,
                m,
            };
            // Every block shape once, so each is compiled with its loops unrolled.
            match (xr, wr) {
                (6, 2) => kernel.run::<6, 2>(&at, out),
                (5, 2) => kernel.run::<5, 2>(&at, out),
                (4, 2) => kernel.run::<4, 2>(&at, out),
                (3, 2) => kernel.run::<3, 2>(&at, out),
                (2, 2) => kernel.run::<2, 2>(&at, out),
                (1, 2) => kernel.run::<1, 2>(&at, out),
                (6, _) => kernel.run::<6, 1>(&at, out),
                (5, _) => kernel.run::<5, 1>(&at, out),
                (4, _) => kernel.run::<4, 1>(&at, out),
                (3, _) => kernel.run::<3, 1>(&at, out),
                (2, _) => kernel.run::<2, 1>(&at, out),
                _ => kernel.run::<1, 1>(&at, out),
            }
            i += xr;
        }
        j += wr;
    }
}

/// Any processor: plain loops the compiler vectorises as it can.
struct Portable;

impl BlockKernel for Portable {
    fn run<const XR: usize, const WR: usize>(&self, at: &Block<'_>, out: &mut [f32]) {
        let Block { x, k, w, i, j, m } = *at;
        for r in 0..XR {
            let xr = &x[(i + r) * k..(i + r + 1) * k];
            for q in 0..WR {
                let wr = &w[(j + q) * k..(j + q + 1) * k];
                out[(j + q) * m + i + r] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            }
        }
    }
}

/// Whether the processor has AVX2, FMA and F16C, which every x86 kernel of the CPU path needs
/// (every processor with AVX2 has F16C, but the kernels that convert f16 rely on it; std caches
/// the answers).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma_f16c() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("f16c")
}

/// AVX2 and FMA intrinsics. Only [`Avx2::detect`] makes one, so holding one proves the
/// processor has both. (Plain loops compiled for AVX2 came out badly: LLVM's SLP vectoriser
/// packed the 1-row blocks of batch-1 decode across weight rows, 2x slower than before.)
#[cfg(target_arch = "x86_64")]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Self> {
        has_avx2_fma_f16c().then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl BlockKernel for Avx2 {
    fn run<const XR: usize, const WR: usize>(&self, at: &Block<'_>, out: &mut [f32]) {
        // SAFETY: an `Avx2` exists only where the processor has AVX2 and FMA.
        unsafe { block_avx2::<XR, WR>(at, out) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2<const XR: usize, const WR: usize>(at: &Block<'_>, out: &mut [f32]) {
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps};
    let Block { x, k, w, i, j, m } = *at;
    assert!(
        (i + XR) * k <= x.len() && (j + WR) * k <= w.len(),
        "block outside x or W"
    );
    let body = k - k % LANES;
    let (xp, wp) = (x[i * k..].as_ptr(), w[j * k..].as_ptr());
    let mut acc: [[__m256; WR]; XR] = [[_mm256_setzero_ps(); WR]; XR];
    let mut c = 0;
    while c < body {
        let mut wv = [_mm256_setzero_ps(); WR];
        for (q, wv) in wv.iter_mut().enumerate() {
            // SAFETY: row j + q of W has k elements from `wp + q k` (asserted above), and
            // c + LANES <= body <= k.
            *wv = unsafe { _mm256_loadu_ps(wp.add(q * k + c)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for row i + r of x.
            let xv = unsafe { _mm256_loadu_ps(xp.add(r * k + c)) };
            for (a, wv) in acc.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(*wv, xv, *a);
            }
        }
        c += LANES;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (q, a) in acc.iter().enumerate() {
            // SAFETY: `__m256` is eight f32 lanes.
            let lanes: [f32; LANES] = unsafe { std::mem::transmute(*a) };
            let (xr, wr) = ((i + r) * k, (j + q) * k);
            let tail: f32 = (body..k).map(|c| w[wr + c] * x[xr + c]).sum();
            out[(j + q) * m + i + r] = lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// `log Σ exp(v)` over a row, from its maximum.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
    max + sum.ln() as f32
}

/// The contiguous f32 values of `[rows, vocab]` logits when `labels` has one entry a row and
/// every label is below `vocab`; `None` otherwise.
fn logits_for(logits: &Tensor<Flex, 2>, labels: &[Option<u32>]) -> Option<FlexTensor> {
    let [rows, vocab] = logits.dims();
    let fits = rows == labels.len() && labels.iter().flatten().all(|&l| (l as usize) < vocab);
    contiguous(logits).filter(|_| fits)
}

/// [`KernelBackend::nll`](super::KernelBackend::nll) on the CPU: a task a row (log-sum-exp
/// less the label's logit); rows without a label cost nothing. `None` as for [`logits_for`].
pub fn try_nll(logits: &Tensor<Flex, 2>, labels: &[Option<u32>]) -> Option<Tensor<Flex, 1>> {
    let vocab = logits.dims()[1];
    let p = logits_for(logits, labels)?;
    let v = p.as_slice::<f32>()?;
    let mut losses = vec![0f64; labels.len()];
    pool::for_each_chunk(&mut losses, 1, &|i, loss| {
        if let Some(l) = labels[i] {
            let row = &v[i * vocab..(i + 1) * vocab];
            loss[0] = f64::from(log_sum_exp(row) - row[l as usize]);
        }
    });
    Some(flex(vec![losses.iter().sum::<f64>() as f32], [1]))
}

/// [`KernelBackend::nll_backward`](super::KernelBackend::nll_backward) on the CPU: each
/// labelled row's softmax times `grad`, less `grad` at the label, in one pass a row.
pub fn try_nll_backward(
    logits: &Tensor<Flex, 2>,
    labels: &[Option<u32>],
    grad: &Tensor<Flex, 1>,
) -> Option<Tensor<Flex, 2>> {
    let [rows, vocab] = logits.dims();
    let g = grad.clone().into_data().iter::<f32>().next()?;
    let p = logits_for(logits, labels)?;
    let v = p.as_slice::<f32>()?;
    let mut out = vec![0f32; rows * vocab];
    if vocab > 0 {
        pool::for_each_chunk(&mut out, vocab, &|i, d| {
            let Some(l) = labels[i] else { return };
            let row = &v[i * vocab..(i + 1) * vocab];
            let lse = log_sum_exp(row);
            for (d, &x) in d.iter_mut().zip(row) {
                *d = g * (x - lse).exp();
            }
            d[l as usize] -= g;
        });
    }
    Some(flex(out, [rows, vocab]))
}

/// SplitMix64's finaliser: a bijection of 64-bit values whose every output bit depends on every
/// input bit. Dropout's seeds are mixed with it (step, row, layer, projection).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A mask of `len` values for inverted dropout: each `1 / keep` with probability `keep` (to
/// 1/65536), else 0. Counter-based: each four values take 16 bits apiece of SplitMix64's mix
/// of `seed` and their index, so a seed gives one mask, filled in any order
/// (`shaders/dropout_mask.wgsl` computes the same bits on wgpu).
pub fn dropout_mask(len: usize, keep: f64, seed: u64) -> Vec<f32> {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let threshold = dropout_threshold(keep);
    let value = (1.0 / keep) as f32;
    let mut out = vec![0f32; len];
    for (i, four) in out.chunks_mut(4).enumerate() {
        let mut z = mix64(seed.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        for v in four {
            if z & 0xffff < threshold {
                *v = value;
            }
            z >>= 16;
        }
    }
    out
}

/// A value of 16 random bits is kept when below this.
pub fn dropout_threshold(keep: f64) -> u64 {
    (keep.clamp(0.0, 1.0) * 65536.0).round() as u64
}

/// `x · w` on the CPU path when `w` (`[k, n]`) is the transposed view of a row-major `[n, k]`
/// matrix (a dense [`Linear`](crate::models::Linear) weight) and x has at most [`MAX_ROWS`]
/// f32 rows; `None` otherwise (the caller uses gemm).
pub fn try_matmul(x: &Tensor<Flex, 2>, w: &Tensor<Flex, 2>) -> Option<Tensor<Flex, 2>> {
    let [m, k] = x.dims();
    let [k2, n] = w.dims();
    if m > MAX_ROWS || k != k2 || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    let wp: FlexTensor = w.clone().into_primitive().tensor();
    let layout = wp.layout();
    // [k, n] viewing [n, k] row-major: stride 1 along k, k along n.
    if layout.strides() != [1, k as isize] {
        return None;
    }
    let start = layout.start_offset();
    let w_rows = wp.storage::<f32>().get(start..start + n * k)?;
    let xp = contiguous(x)?;
    let x_rows = xp.as_slice::<f32>()?;
    let out = matmul_rows(x_rows, m, k, w_rows, n);
    Some(Tensor::from_primitive(TensorPrimitive::Float(
        FlexTensor::from_data(TensorData::new(out, [m, n])),
    )))
}

/// Query rows one task of [`try_attention`] takes: a decode step's few rows are one task per
/// (batch row, KV head); a prefill's are split so that every core has work.
const ROWS_PER_TASK: usize = 32;

/// What the KV cache holds its keys and values in: f32, or f16 (half the bytes a decode step
/// streams from the cache; [`try_attention`] widens them as it reads them).
pub(crate) trait CacheElem: burn::tensor::Element + bytemuck::Pod {
    const DTYPE: DType;

    /// `row` as f32: the row itself, or widened into `buf` (at least as long).
    fn widen<'b>(row: &'b [Self], buf: &'b mut [f32]) -> &'b [f32];

    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// Eight values are readable at `p`, and the processor has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl CacheElem for f32 {
    const DTYPE: DType = DType::F32;

    #[inline(always)]
    fn widen<'b>(row: &'b [f32], _: &'b mut [f32]) -> &'b [f32] {
        row
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl CacheElem for half::f16 {
    const DTYPE: DType = DType::F16;

    #[inline]
    fn widen<'b>(row: &'b [half::f16], buf: &'b mut [f32]) -> &'b [f32] {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..row.len()];
        row.convert_to_f32_slice(buf);
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's (eight f16 are 16 bytes).
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }
}

/// A `[batch, heads, positions, head_dim]` view of `T` storage with unit stride along
/// `head_dim` (the KV cache's slice of filled positions is one).
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    /// Strides of batch, head and position.
    strides: [usize; 3],
}

impl<'a, T: CacheElem> View<'a, T> {
    /// `None` unless of dtype `T`, with non-negative strides, unit along the last dimension,
    /// and every element inside the storage.
    fn of(t: &'a FlexTensor, dims: [usize; 4]) -> Option<Self> {
        if t.dtype() != T::DTYPE {
            return None;
        }
        let layout = t.layout();
        let &[s0, s1, s2, 1] = layout.strides() else {
            return None;
        };
        let strides = [
            usize::try_from(s0).ok()?,
            usize::try_from(s1).ok()?,
            usize::try_from(s2).ok()?,
        ];
        let start = layout.start_offset();
        let data = t.storage::<T>();
        let last = dims
            .iter()
            .zip(strides.iter().chain([&1]))
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>();
        (dims.contains(&0) || start + last < data.len()).then_some(View {
            data,
            start,
            strides,
        })
    }

    /// The `d`-long row at `(b, h, p)`.
    #[inline(always)]
    fn row(&self, b: usize, h: usize, p: usize, d: usize) -> &'a [T] {
        let at = self.start + b * self.strides[0] + h * self.strides[1] + p * self.strides[2];
        &self.data[at..at + d]
    }
}

/// `softmax(q·kᵀ·scale + mask)·v`, reading keys and values where they lie in the KV cache (f32
/// or f16, widened as they are read) and holding one row of scores per task (the reference
/// materialises `[b, h, rows, total]` of them, gigabytes for a batch of long prompts);
/// positions the mask hides are skipped. Tasks of up to [`ROWS_PER_TASK`] query rows of one
/// (batch row, KV head), on every core. `None` where the shapes, dtypes or layouts are not
/// these (the caller uses the reference): `q`: `[b, h, rows, d]` f32, `keys`/`values`:
/// `[b, h, total, d]`, both f32 or both f16, `mask`: `[b or 1, 1, rows, total]` f32.
pub fn try_attention(
    q: &Tensor<Flex, 4>,
    keys: &Tensor<Flex, 4>,
    values: &Tensor<Flex, 4>,
    mask: Option<&Tensor<Flex, 4>>,
    scale: f32,
) -> Option<Tensor<Flex, 4>> {
    let [b, h, rows, d] = q.dims();
    let [kb, kh, total, kd] = keys.dims();
    if [kb, kh, kd] != [b, h, d] || values.dims() != keys.dims() {
        return None;
    }
    let qp: FlexTensor = q.clone().into_primitive().tensor().to_contiguous();
    let kp: FlexTensor = keys.clone().into_primitive().tensor();
    let vp: FlexTensor = values.clone().into_primitive().tensor();
    let q = View::<f32>::of(&qp, [b, h, rows, d])?;
    let mp: Option<FlexTensor> = mask.map(|m| m.clone().into_primitive().tensor().to_contiguous());
    let mask = match (&mp, mask.map(|m| m.dims())) {
        (Some(mp), Some([mb, 1, mr, mt])) if (mb == 1 || mb == b) && [mr, mt] == [rows, total] => {
            Some((mp.as_slice::<f32>()?, mb))
        }
        (None, None) => None,
        _ => return None,
    };
    let shape = [b, h, rows, d];
    let out = match kp.dtype() {
        DType::F16 => attention_over::<half::f16>(&q, &kp, &vp, mask, scale, shape, total)?,
        _ => attention_over::<f32>(&q, &kp, &vp, mask, scale, shape, total)?,
    };
    Some(flex(out, shape))
}

/// [`try_attention`] over keys and values of `T`: `[b, h, rows, d]` of outputs, or `None` where
/// `keys` or `values` is not a view of `T`.
fn attention_over<T: CacheElem>(
    q: &View<'_, f32>,
    keys: &FlexTensor,
    values: &FlexTensor,
    mask: Option<(&[f32], usize)>,
    scale: f32,
    [b, h, rows, d]: [usize; 4],
    total: usize,
) -> Option<Vec<f32>> {
    let k = View::<T>::of(keys, [b, h, total, d])?;
    let v = View::<T>::of(values, [b, h, total, d])?;
    let mut out = vec![0f32; b * h * rows * d];
    let out_len = out.len();
    if out_len == 0 {
        return Some(out);
    }
    // A task takes query rows `first..first + n` of (batch row, head) `bh`.
    let task = |bh: usize, first: usize, out: &mut [f32]| {
        let (bi, hi) = (bh / h, bh % h);
        let n = out.len() / d;
        let mask = mask.map(|(m, mb)| {
            let at = if mb == 1 { 0 } else { bi * rows * total } + first * total;
            &m[at..at + n * total]
        });
        let task = Task {
            q,
            k: &k,
            v: &v,
            at: (bi, hi, first),
            shape: (n, total, d),
            mask,
            scale,
        };
        attend(&task, out);
    };
    if out_len * total < 1 << 12 {
        // A few microseconds of work in all.
        for (bh, out) in out.chunks_mut(rows * d).enumerate() {
            task(bh, 0, out);
        }
    } else if rows <= ROWS_PER_TASK {
        // A decode step: the pool's workers are awake between its products. With few (batch
        // row, head) pairs, one task a query row, so that every core has work.
        let split = if b * h >= 8 { rows } else { 1 };
        pool::for_each_chunk(&mut out, split * d, &|i, out| {
            let per = rows / split;
            task(i / per, i % per * split, out);
        });
    } else {
        // Prefill: chunks of whole rows that never straddle two (batch row, head) pairs.
        let blocks = rows.div_ceil(ROWS_PER_TASK);
        out.par_chunks_mut(rows * d)
            .enumerate()
            .flat_map(|(bh, o)| {
                o.par_chunks_mut(ROWS_PER_TASK * d)
                    .enumerate()
                    .map(move |(block, o)| (bh * blocks + block, o))
            })
            .for_each(|(i, out)| task(i / blocks, i % blocks * ROWS_PER_TASK, out));
    }
    Some(out)
}

/// The views and shape of one [`try_attention`] task.
struct Task<'a, T> {
    q: &'a View<'a, f32>,
    k: &'a View<'a, T>,
    v: &'a View<'a, T>,
    /// Batch row, KV head, and the first query row.
    at: (usize, usize, usize),
    /// Query rows, positions, head dim.
    shape: (usize, usize, usize),
    /// `[rows, total]`, added to the scores.
    mask: Option<&'a [f32]>,
    scale: f32,
}

/// One (batch row, KV head) of [`try_attention`]: `out` is `[rows, d]`.
fn attend<T: CacheElem>(task: &Task<'_, T>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2, FMA and F16C (checked above), all this function needs.
        unsafe { attend_avx2(task, out) };
        return;
    }
    attend_portable(task, out);
}

/// [`attend_portable`] compiled for AVX2/FMA/F16C: inlined here, its loops get ymm registers
/// and its `mul_add`s become single instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: CacheElem>(task: &Task<'_, T>, out: &mut [f32]) {
    attend_with::<T, true>(task, out);
}

fn attend_portable<T: CacheElem>(task: &Task<'_, T>, out: &mut [f32]) {
    attend_with::<T, false>(task, out);
}

/// The rows of a task, `AVX2` when the caller is compiled for it (and then up to
/// [`QUERY_BLOCK`] query rows at a time).
#[inline(always)]
fn attend_with<T: CacheElem, const AVX2: bool>(task: &Task<'_, T>, out: &mut [f32]) {
    match task.shape.2 {
        64 => attend_rows::<T, 64, AVX2>(task, out),
        128 => attend_rows::<T, 128, AVX2>(task, out),
        _ => attend_rows::<T, 0, AVX2>(task, out),
    }
}

/// The rows of a task, for head dim `D` (0: any, read from the task). A known `D` keeps a
/// query row, a key row's product and the output row in registers.
#[inline(always)]
fn attend_rows<T: CacheElem, const D: usize, const AVX2: bool>(
    task: &Task<'_, T>,
    out: &mut [f32],
) {
    let Task {
        q,
        k,
        v,
        at: (bi, hi, first),
        shape: (rows, total, d),
        mask,
        scale,
    } = *task;
    debug_assert!(D == 0 || D == d);
    debug_assert_eq!(out.len(), rows * d);
    let mut p = vec![0f32; QUERY_BLOCK * total];
    #[cfg(target_arch = "x86_64")]
    if AVX2 && D != 0 && D.is_multiple_of(8 * LANES) {
        // Blocks of up to four query rows, the last one shorter.
        for r0 in (0..rows).step_by(QUERY_BLOCK) {
            let n = QUERY_BLOCK.min(rows - r0);
            let out = &mut out[r0 * d..(r0 + n) * d];
            // About eight sums in flight: `N · P` scores, `N · W` vectors of output.
            // SAFETY: `AVX2` only from `attend_avx2`, called where the processor has AVX2, FMA
            // and F16C.
            unsafe {
                match n {
                    1 => attend_block_avx2::<T, D, 1, 8, 8>(task, r0, &mut p, out),
                    2 => attend_block_avx2::<T, D, 2, 4, 4>(task, r0, &mut p, out),
                    3 => attend_block_avx2::<T, D, 3, 2, 2>(task, r0, &mut p, out),
                    _ => attend_block_avx2::<T, D, QUERY_BLOCK, 2, 2>(task, r0, &mut p, out),
                }
            }
        }
        return;
    }
    let p = &mut p[..total];
    // A key or value row widened to f32 (f16 caches).
    let mut buf = vec![0f32; d];
    for (r, out) in out.chunks_exact_mut(d).enumerate() {
        let qr = q.row(bi, hi, first + r, d);
        let mask = mask.map(|m| &m[r * total..(r + 1) * total]);
        for (j, pj) in p.iter_mut().enumerate() {
            let m = mask.map_or(0.0, |m| m[j]);
            *pj = if m == f32::NEG_INFINITY {
                m
            } else {
                dot_n::<D>(qr, T::widen(k.row(bi, hi, j, d), &mut buf)) * scale + m
            };
        }
        let Some(inv) = exp_scores(p) else {
            // Nothing visible (no mask of ours does this): the reference would give NaN.
            out.fill(f32::NAN);
            continue;
        };
        if D == 0 {
            out.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    let vr = T::widen(v.row(bi, hi, j, d), &mut buf);
                    for (o, x) in out.iter_mut().zip(vr) {
                        *o = pj.mul_add(*x, *o);
                    }
                }
            }
            out.iter_mut().for_each(|o| *o *= inv);
        } else {
            let mut acc = [0f32; D];
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    let vr: &[f32; D] = T::widen(v.row(bi, hi, j, d), &mut buf)
                        .try_into()
                        .unwrap_or_else(|_| unreachable!());
                    for (o, x) in acc.iter_mut().zip(vr) {
                        *o = pj.mul_add(*x, *o);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a * inv;
            }
        }
    }
}

/// A row of scores to unnormalised probabilities in place, `exp(p − max)` with the polynomial
/// `exp` (vectorised; `expf` is a call a value) and `-∞` exactly 0; returns `1 / Σ`, or `None`
/// where every score is `-∞`.
///
/// The sum's lanes start at the first visible position, so a row left-padded in a batch sums
/// its probabilities in the order it does alone (its bits do not depend on its padding; with
/// 8-bit activations downstream, a last-bit change moves logits by a quantisation step).
#[inline(always)]
pub(crate) fn exp_scores(p: &mut [f32]) -> Option<f32> {
    let first = p.iter().position(|&x| x != f32::NEG_INFINITY)?;
    let (hidden, p) = p.split_at_mut(first);
    hidden.fill(0.0);
    let max = lanes(p, f32::NEG_INFINITY, f32::max);
    for pj in p.iter_mut() {
        *pj = if *pj == f32::NEG_INFINITY {
            0.0
        } else {
            super::cpu_rows::exp(*pj - max)
        };
    }
    Some(1.0 / lanes(p, 0.0, |a, b| a + b))
}

/// Query rows [`attend_block_avx2`] takes at most at once.
const QUERY_BLOCK: usize = 4;

/// Query rows `r0..r0 + N` of a task together (`N` ≤ [`QUERY_BLOCK`]): each key and value row
/// is read once for the `N` of them (a prefill's rows each streamed the whole cache: a KV
/// head's keys and values at 1,000 positions pass a core's L2), and f16 rows are widened as
/// they are loaded. The scores go to `p` (`[N, total]`), the outputs to `out` (`[N, D]`).
///
/// Both passes keep about eight independent sums in flight: scores for `P` positions at once,
/// outputs `8·W` columns at a time. One chain of FMAs a row (a position's score, or 16
/// columns of output) waited on each FMA's latency: attention was a quarter of SmolLM2's
/// decode at 1,000 positions. Every value is still the same chain as [`attend_rows`]' single
/// rows (scores in 8 lanes summed in [`sum_lanes`]' order, outputs one FMA a position), so
/// the bits do not depend on `N`, `P` or `W`. Intrinsics: plain loops came out packed across
/// the query rows, slower than one row at a time.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_block_avx2<
    T: CacheElem,
    const D: usize,
    const N: usize,
    const P: usize,
    const W: usize,
>(
    task: &Task<'_, T>,
    r0: usize,
    p: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let Task {
        q,
        k,
        v,
        at: (bi, hi, first),
        shape: (_, total, d),
        mask,
        scale,
    } = *task;
    let row = |r: usize| -> &[f32; D] {
        q.row(bi, hi, first + r0 + r, d)
            .try_into()
            .unwrap_or_else(|_| unreachable!())
    };
    let qs: [&[f32; D]; N] = std::array::from_fn(row);
    let masks: [Option<&[f32]>; N] =
        std::array::from_fn(|r| mask.map(|m| &m[(r0 + r) * total..(r0 + r + 1) * total]));
    let p = &mut p[..N * total];
    let out = &mut out[..N * D];
    for j0 in (0..total).step_by(P) {
        // Positions past the end repeat the last one; their scores are dropped.
        let js: [usize; P] = std::array::from_fn(|i| (j0 + i).min(total - 1));
        let m: [[f32; P]; N] = std::array::from_fn(|r| js.map(|j| masks[r].map_or(0.0, |m| m[j])));
        if m.iter().flatten().all(|&m| m == f32::NEG_INFINITY) {
            for r in 0..N {
                p[r * total + j0..r * total + (j0 + P).min(total)].fill(f32::NEG_INFINITY);
            }
            continue;
        }
        let krs: [&[T; D]; P] = js.map(|j| {
            k.row(bi, hi, j, d)
                .try_into()
                .unwrap_or_else(|_| unreachable!())
        });
        let mut acc = [[_mm256_setzero_ps(); P]; N];
        for c in (0..D).step_by(LANES) {
            // SAFETY: c + 8 <= D, the length of every row here; AVX2 and F16C (this
            // function's).
            let qv: [__m256; N] = qs.map(|qr| unsafe { _mm256_loadu_ps(qr.as_ptr().add(c)) });
            for (i, kr) in krs.iter().enumerate() {
                // SAFETY: as above.
                let kv = unsafe { T::load8(kr.as_ptr().add(c)) };
                for (acc, qv) in acc.iter_mut().zip(&qv) {
                    acc[i] = _mm256_fmadd_ps(*qv, kv, acc[i]);
                }
            }
        }
        for (r, (acc, m)) in acc.iter().zip(&m).enumerate() {
            let sums = sum_lanes_avx2(acc);
            for (i, (&sum, &m)) in sums.iter().zip(m).enumerate().take(total - j0) {
                p[r * total + j0 + i] = if m == f32::NEG_INFINITY {
                    m
                } else {
                    sum * scale + m
                };
            }
        }
    }
    let mut inv = [0f32; N];
    for (p, inv) in p.chunks_exact_mut(total).zip(&mut inv) {
        *inv = exp_scores(p).unwrap_or_else(|| {
            // Nothing visible: NaN, as the single rows (zeros times NaN below).
            p.fill(0.0);
            f32::NAN
        });
    }
    // The positions any of the rows sees (a causal mask hides the end of most rows' span, left
    // padding its start), found once for the passes below.
    let seen = |j: usize| (0..N).any(|r| p[r * total + j] != 0.0);
    let start = (0..total).find(|&j| seen(j)).unwrap_or(total);
    let end = (start..total)
        .rev()
        .find(|&j| seen(j))
        .map_or(start, |j| j + 1);
    for c0 in (0..D).step_by(W * LANES) {
        let mut acc = [[_mm256_setzero_ps(); W]; N];
        for j in start..end {
            let pj: [f32; N] = std::array::from_fn(|r| p[r * total + j]);
            if pj.iter().all(|&x| x == 0.0) {
                continue;
            }
            let vr: &[T; D] = v
                .row(bi, hi, j, d)
                .try_into()
                .unwrap_or_else(|_| unreachable!());
            // SAFETY: c0 + 8·W <= D (D a multiple of 8·W); AVX2 and F16C.
            let vv: [__m256; W] =
                std::array::from_fn(|w| unsafe { T::load8(vr.as_ptr().add(c0 + w * LANES)) });
            for (acc, &pj) in acc.iter_mut().zip(&pj) {
                if pj != 0.0 {
                    let b = _mm256_set1_ps(pj);
                    for (a, v) in acc.iter_mut().zip(&vv) {
                        *a = _mm256_fmadd_ps(b, *v, *a);
                    }
                }
            }
        }
        for (r, (acc, inv)) in acc.iter().zip(inv).enumerate() {
            let inv = _mm256_set1_ps(inv);
            for (w, a) in acc.iter().enumerate() {
                let o = &mut out[r * D + c0 + w * LANES..][..LANES];
                // SAFETY: writes the 8 floats of `o`.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(*a, inv)) };
            }
        }
    }
}

/// The lanes of each of `acc` summed in [`sum_lanes`]' order, four vectors at a time:
/// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))` is the halves added, then two
/// horizontal adds.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn sum_lanes_avx2<const P: usize>(acc: &[std::arch::x86_64::__m256; P]) -> [f32; P] {
    use std::arch::x86_64::*;
    let halves = |a: __m256| _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let mut sums = [0f32; P];
    for (i, out) in sums.chunks_mut(4).enumerate() {
        let s: [__m128; 4] =
            std::array::from_fn(|k| acc.get(4 * i + k).map_or(_mm_setzero_ps(), |&a| halves(a)));
        let h = _mm_hadd_ps(_mm_hadd_ps(s[0], s[1]), _mm_hadd_ps(s[2], s[3]));
        // SAFETY: `__m128` is four f32 lanes.
        let h = unsafe { std::mem::transmute::<__m128, [f32; 4]>(h) };
        out.copy_from_slice(&h[..out.len()]);
    }
    sums
}

/// The sum of 8 lanes in [`dot_n`]'s order.
#[inline(always)]
fn sum_lanes([a0, a1, a2, a3, a4, a5, a6, a7]: [f32; LANES]) -> f32 {
    ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))
}

/// [`dot`] for rows of a known length `D` (0: any).
#[inline(always)]
fn dot_n<const D: usize>(a: &[f32], b: &[f32]) -> f32 {
    if D == 0 || !D.is_multiple_of(LANES) {
        return dot(a, b);
    }
    let a: &[f32; D] = a.try_into().unwrap_or_else(|_| unreachable!());
    let b: &[f32; D] = b.try_into().unwrap_or_else(|_| unreachable!());
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a = x.mul_add(*y, *a);
        }
    }
    sum_lanes(acc)
}

/// `a` folded by `f` in 8 lanes, then across them (a reduction the compiler vectorises).
#[inline(always)]
fn lanes(a: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |x, &y| f(x, y));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    acc.into_iter().fold(tail, f)
}

/// `a · b` in 8 lanes (vectorised by the compiler where the caller is compiled for AVX2/FMA;
/// head dims are multiples of 8).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a = x.mul_add(*y, *a);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `cache` (`[b, h, capacity, d]`, f32 or f16) with `values` (`[b, h, seq, d]`, f32) written
/// at positions `past..`: in place where the cache's buffer is contiguous and not shared (f16
/// rounded to nearest), else through `slice_assign` (which copies the buffer).
pub fn write_positions(
    cache: Tensor<Flex, 4>,
    past: usize,
    values: Tensor<Flex, 4>,
) -> Tensor<Flex, 4> {
    let [b, h, cap, d] = cache.dims();
    let [vb, vh, seq, vd] = values.dims();
    let fits = [vb, vh, vd] == [b, h, d] && past + seq <= cap;
    let mut p: FlexTensor = cache.into_primitive().tensor();
    let dtype = p.dtype();
    let whole = matches!(dtype, DType::F32 | DType::F16)
        && p.is_contiguous()
        && p.layout().start_offset() == 0
        && p.bytes().len() == dtype.size() * b * h * cap * d;
    if let Some(src) = contiguous(&values).filter(|_| fits && whole) {
        let rows = src.storage::<f32>().chunks_exact(seq * d).enumerate();
        let at = |bh: usize| (bh * cap + past) * d..(bh * cap + past + seq) * d;
        // (`try_storage_mut` panics on another dtype.)
        let written = if dtype == DType::F32 {
            p.try_storage_mut::<f32>()
                .map(|dst| rows.for_each(|(bh, rows)| dst[at(bh)].copy_from_slice(rows)))
        } else {
            use half::slice::HalfFloatSliceExt;
            p.try_storage_mut::<half::f16>()
                .map(|dst| rows.for_each(|(bh, rows)| dst[at(bh)].convert_from_f32_slice(rows)))
        };
        if written.is_some() {
            return Tensor::from_primitive(TensorPrimitive::Float(p));
        }
    }
    Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(p))
        .slice_assign([0..vb, 0..vh, past..past + seq, 0..vd], values.cast(dtype))
}

/// The contiguous f32 values of `t`, or `None` for another dtype.
pub(crate) fn contiguous<const D: usize>(t: &Tensor<Flex, D>) -> Option<FlexTensor> {
    let p: FlexTensor = t.clone().into_primitive().tensor().to_contiguous();
    (p.dtype() == DType::F32).then_some(p)
}

/// A contiguous burn-flex tensor of `data`.
pub(crate) fn flex<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
        TensorData::new(data, shape),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference;

    /// The transpose on one thread (small) and on the pool (past 2¹⁶ values), rows short of
    /// a block at the end.
    #[test]
    fn transpose_moves_every_value() {
        for (m, n) in [(3, 5), (37, 2001), (64, 1030)] {
            let v: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
            let t = transpose(v, m, n);
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(t[i * n + j], (j * m + i) as f32, "[{m}, {n}]: ({i}, {j})");
                }
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-0.5..0.5)).collect()
    }

    /// The NLL and its gradient against the tensor-op reference, with a row without a label.
    #[test]
    fn nll_matches_the_reference() {
        let (rows, vocab) = (5, 37);
        let v: Vec<f32> = values(rows * vocab, 13).iter().map(|x| 8.0 * x).collect();
        let logits = flex(v, [rows, vocab]);
        let labels = [Some(3), None, Some(36), Some(0), Some(3)];
        let got = try_nll(&logits, &labels)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let want = reference::nll(logits.clone(), &labels)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(
            (got[0] - want[0]).abs() < 1e-4 * want[0].abs(),
            "{got:?} vs {want:?}"
        );
        let grad = flex(vec![0.5], [1]);
        let got = try_nll_backward(&logits, &labels, &grad)
            .unwrap()
            .into_data();
        let want = reference::nll_backward(logits.clone(), &labels, grad).into_data();
        for (g, w) in got.iter::<f32>().zip(want.iter::<f32>()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(try_nll(&logits, &[Some(37), None, None, None, None]).is_none());
    }

    /// The mask keeps its share of values, each at `1 / keep`, the same for a seed and another
    /// for another seed.
    #[test]
    fn dropout_mask_keeps_its_share() {
        let (len, keep) = (100_003, 0.95);
        let mask = dropout_mask(len, keep, 7);
        assert!(mask.iter().all(|&v| v == 0.0 || v == (1.0 / keep) as f32));
        let kept = mask.iter().filter(|&&v| v != 0.0).count() as f64 / len as f64;
        // The standard deviation of the share is 0.0007.
        assert!((kept - keep).abs() < 0.005, "kept {kept}");
        assert_eq!(mask, dropout_mask(len, keep, 7));
        let other = dropout_mask(len, keep, 8);
        let same = mask.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(same < len - 1000, "{same} of {len} the same across seeds");
        assert!(dropout_mask(len, 1.0, 7).iter().all(|&v| v == 1.0));
    }

    /// Against a plain triple loop in f64, at row counts that fill, split and miss the blocks
    /// of four and widths with and without a tail of the 8 lanes.
    #[test]
    fn rows_product_matches_the_definition() {
        for (m, k, n) in [
            (1, 64, 130),
            (3, 20, 7),
            (4, 576, 65),
            (17, 13, 129),
            (32, 96, 64),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let got = matmul_rows(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                    let g = got[i * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "m {m} k {k} n {n}: [{i}, {j}] {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The KV cache's append writes where `slice_assign` would, into the same buffer (f32, and
    /// f16 rounded as burn-flex's cast rounds), and leaves a buffer another tensor shares as it
    /// was.
    #[test]
    fn positions_are_written_in_place() {
        for dtype in [DType::F32, DType::F16] {
            let shape = [2, 3, 7, 8];
            let cache = flex(values(2 * 3 * 7 * 8, 1), shape).cast(dtype);
            let new = flex(values(2 * 3 * 2 * 8, 2), [2, 3, 2, 8]);
            let want = cache
                .clone()
                .slice_assign([0..2, 0..3, 4..6, 0..8], new.clone().cast(dtype));
            let ptr = |t: &Tensor<Flex, 4>| {
                let p: FlexTensor = t.clone().into_primitive().tensor();
                p.bytes().as_ptr() as usize
            };
            let before = ptr(&cache);
            let shared = cache.clone();
            let copied = write_positions(cache, 4, new.clone());
            assert_eq!(copied.to_data(), want.to_data(), "{dtype:?}");
            assert_ne!(
                ptr(&copied),
                before,
                "wrote into a buffer another tensor shares"
            );
            let unique = shared.clone();
            let shared_data = shared.to_data();
            drop(shared);
            let before = ptr(&unique);
            let got = write_positions(unique, 4, new);
            assert_eq!(ptr(&got), before, "the buffer was copied ({dtype:?})");
            assert_eq!(got.to_data(), want.to_data(), "{dtype:?}");
            assert_ne!(shared_data, got.to_data(), "nothing was written");
        }
    }

    /// Against the reference on a view of a larger cache (as `LayerCache::append` returns
    /// it), with a per-row mask, a broadcast mask, a causal one and none, for decode-sized and
    /// prefill-sized queries.
    #[test]
    fn attention_on_a_cache_view_matches_the_reference() {
        // Small enough to run on one thread; decode steps on the pool, a task a query row
        // (few heads) or a task a head (many).
        attention_case(1, 2, 3, 8, 10, 7);
        attention_case(3, 2, 3, 16, 40, 29);
        attention_case(4, 3, 3, 64, 600, 520);
        // Rows split into tasks of 32 with a short last one.
        attention_case(2, 3, 70, 16, 100, 90);
        // Blocks of four query rows (head dims 64 and 128) and a shorter last block: 70 rows
        // end in 2, decode's 7 (a task a row) in 1, 43 in 3.
        attention_case(2, 2, 70, 64, 100, 90);
        attention_case(1, 2, 7, 64, 700, 650);
        attention_case(1, 1, 43, 128, 50, 45);
    }

    /// [`attention_case`] over an f16 cache (burn-flex's kernel state for it), against the
    /// reference on the same values widened to f32.
    #[test]
    fn attention_on_an_f16_cache_matches_the_reference() {
        let f16 = Some(DType::F16);
        attention_case_in(1, 2, 3, 8, 10, 7, f16);
        attention_case_in(4, 3, 3, 64, 600, 520, f16);
        attention_case_in(2, 3, 70, 16, 100, 90, f16);
        attention_case_in(1, 2, 7, 64, 700, 650, f16);
        attention_case_in(1, 1, 43, 128, 50, 45, f16);
    }

    fn attention_case(b: usize, h: usize, rows: usize, d: usize, cap: usize, total: usize) {
        attention_case_in(b, h, rows, d, cap, total, None);
    }

    /// `try_attention` against the reference, the keys and values a view of a cache of
    /// `cap` positions (of `dtype`, f32 where `None`).
    fn attention_case_in(
        b: usize,
        h: usize,
        rows: usize,
        d: usize,
        cap: usize,
        total: usize,
        dtype: Option<DType>,
    ) {
        let dev = Default::default();
        let t = |n: usize, seed: u64, shape: [usize; 4]| {
            Tensor::<Flex, 4>::from_data(TensorData::new(values(n, seed), shape), &dev)
        };
        let q = t(b * h * rows * d, 5, [b, h, rows, d]);
        let view = |seed| {
            let cache = t(b * h * cap * d, seed, [b, h, cap, d]);
            dtype
                .map_or(cache.clone(), |dt| cache.cast(dt))
                .slice([0..b, 0..h, 0..total, 0..d])
        };
        let (keys, vals) = (view(6), view(7));
        // Row `bi` sees positions `bi..`, as left padding hides a row's first positions.
        let per_row: Vec<f32> = (0..b * rows * total)
            .map(|i| {
                if (i % total) < i / (rows * total) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let per_row =
            Tensor::<Flex, 4>::from_data(TensorData::new(per_row, [b, 1, rows, total]), &dev);
        let broadcast = t(rows * total, 8, [1, 1, rows, total]);
        // Query row r at position total - rows + r sees the positions up to its own.
        let causal: Vec<f32> = (0..rows * total)
            .map(|i| {
                if i % total > total - rows + i / total {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal =
            Tensor::<Flex, 4>::from_data(TensorData::new(causal, [1, 1, rows, total]), &dev);
        for mask in [Some(&per_row), Some(&broadcast), Some(&causal), None] {
            let Some(got) = try_attention(&q, &keys, &vals, mask, 0.25) else {
                panic!("a query on a cache view should take the CPU kernel");
            };
            let [k, v] = [&keys, &vals].map(|t| t.clone().cast(DType::F32));
            let want = reference::attention(q.clone(), k, v, mask, 0.25);
            let diff = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "max |diff| {diff}");
        }
    }

    /// The tensor entry point takes a dense weight as `Linear::load` stores it and agrees with
    /// burn-flex's gemm; other layouts are left to gemm.
    #[test]
    fn transposed_weight_view_matches_gemm() {
        let dev = Default::default();
        let (m, k, n) = (5, 48, 70);
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(values(m * k, 3), [m, k]), &dev);
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(values(n * k, 4), [n, k]), &dev)
            .transpose();
        let Some(got) = try_matmul(&x, &w) else {
            panic!("a transposed row-major weight should take the rows kernel");
        };
        let want = x.clone().matmul(w.clone());
        let diff = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "max |diff| {diff}");
        let contiguous = w.clone().transpose().transpose().into_data();
        let w2 = Tensor::<Flex, 2>::from_data(contiguous, &dev);
        assert!(
            try_matmul(&x, &w2).is_none(),
            "a contiguous [k, n] is gemm's"
        );
        let tall = Tensor::<Flex, 2>::zeros([MAX_ROWS + 1, k], &dev);
        assert!(try_matmul(&tall, &w).is_none(), "many rows are gemm's");
    }
}
