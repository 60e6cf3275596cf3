//! The CPU path's product for few rows of x (decode steps, the head on last positions).
//!
//! burn-flex multiplies with gemm, which packs both operands into panels on every call. With
//! a weight of `[out, in]` and a handful of rows of x, packing the weight costs about as much as
//! the product: a batch-16 decode step of the default model spent most of its 515 ms packing
//! (perf on the 2-core VM). Here each weight row is read once, straight from its row-major
//! storage, against four rows of x at a time, on every core (rayon), with AVX2/FMA where the
//! processor has them.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

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
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// `out[j * m + i] = x_i · w_j` for every row `w_j` of `rows`.
fn dot_rows(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { dot_rows_avx2(x, m, k, rows, out) };
        return;
    }
    dot_rows_portable(x, m, k, rows, out);
}

/// [`dot_rows_portable`] compiled for AVX2/FMA, so its lanes become ymm registers and its
/// `mul_add`s single instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    dot_rows_portable(x, m, k, rows, out);
}

/// Lanes of each accumulator: one AVX register of f32.
const LANES: usize = 8;
/// Rows of x sharing one pass over a weight row.
const XROWS: usize = 4;

#[inline(always)]
fn dot_rows_portable(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    let body = k - k % LANES;
    for (j, wr) in rows.chunks_exact(k).enumerate() {
        let mut i = 0;
        while i < m {
            let block = XROWS.min(m - i);
            let mut acc = [[0f32; LANES]; XROWS];
            for c in (0..body).step_by(LANES) {
                let w8: &[f32; LANES] = wr[c..c + LANES].try_into().unwrap_or(&[0.0; LANES]);
                for (r, a) in acc.iter_mut().enumerate().take(block) {
                    let xo = (i + r) * k + c;
                    let x8: &[f32; LANES] = x[xo..xo + LANES].try_into().unwrap_or(&[0.0; LANES]);
                    for ((a, w), x) in a.iter_mut().zip(w8).zip(x8) {
                        *a = w.mul_add(*x, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(block) {
                let xr = &x[(i + r) * k..(i + r + 1) * k];
                let tail: f32 = (body..k).map(|c| wr[c] * xr[c]).sum();
                out[j * m + i + r] = a.iter().sum::<f32>() + tail;
            }
            i += block;
        }
    }
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
    let xp: FlexTensor = x.clone().into_primitive().tensor().to_contiguous();
    let x_rows = xp.as_slice::<f32>()?;
    let out = matmul_rows(x_rows, m, k, w_rows, n);
    Some(Tensor::from_primitive(TensorPrimitive::Float(
        FlexTensor::from_data(TensorData::new(out, [m, n])),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-0.5..0.5)).collect()
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
