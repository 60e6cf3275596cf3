//! The CPU path's row-wise ops: RMSNorm, RoPE, SwiGLU and softmax, each one pass over its rows
//! instead of the reference's chain of tensor ops.
//!
//! A decode step of SmolLM2-135M runs 30 layers of a few hundred values a row: there the
//! reference's ops (six for RMSNorm, ten for RoPE, three for SwiGLU, each allocating its output
//! and walking burn-flex's strided iterators) cost more than the arithmetic. These read their
//! inputs once, write one output, and compute SiLU's `exp` with a polynomial the compiler turns
//! into vector instructions instead of a call to `expf` per value.
//!
//! In training (`Autodiff<Flex>`) all four have backward ops of their own (`autodiff.rs`),
//! whose gradients are one pass each here.

use burn::backend::Flex;
use burn::tensor::Tensor;

use super::cpu::{contiguous, flex};
use super::pool;

/// Values of output one task of the pool takes: below that, a step's op runs on the calling
/// thread (waking the workers costs more than a few microseconds of work).
const VALUES_PER_TASK: usize = 1 << 15;

/// Runs `task(first_row, out_rows)` over `out`, cut into whole rows of `width`: on the pool
/// when there is enough work, else on this thread.
fn rows_of(out: &mut [f32], width: usize, task: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    if width == 0 || out.is_empty() {
        return;
    }
    let rows_per_task = (VALUES_PER_TASK / width).max(1);
    if out.len() <= VALUES_PER_TASK {
        task(0, out);
    } else {
        pool::for_each_chunk(out, rows_per_task * width, &|i, chunk| {
            task(i * rows_per_task, chunk)
        });
    }
}

/// [`KernelBackend::rms_norm`](super::KernelBackend::rms_norm) on the CPU: the mean of squares
/// in f32 lanes, then each value scaled and times the weight. `None` unless f32 with a weight
/// of the row's width.
pub fn try_rms_norm(
    x: &Tensor<Flex, 3>,
    weight: &Tensor<Flex, 1>,
    eps: f64,
) -> Option<Tensor<Flex, 3>> {
    let dims = x.dims();
    let dim = dims[2];
    if weight.dims() != [dim] {
        return None;
    }
    let (xp, wp) = (contiguous(x)?, contiguous(weight)?);
    let (xs, ws) = (xp.as_slice::<f32>()?, wp.as_slice::<f32>()?);
    let mut out = vec![0f32; xs.len()];
    rows_of(&mut out, dim, &|first, out| {
        let x = &xs[first * dim..first * dim + out.len()];
        rms_norm_rows(x, ws, eps as f32, out);
    });
    Some(flex(out, dims))
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { rms_norm_avx2(x, w, eps, out) };
        return;
    }
    rms_norm_portable(x, w, eps, out);
}

/// [`rms_norm_portable`] compiled for AVX2/FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_portable(x, w, eps, out);
}

#[inline(always)]
fn rms_norm_portable(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (x, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let inv = inv_rms(x, eps);
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            *o = x * inv * w;
        }
    }
}

/// `1 / √(mean(x²) + eps)` of a row: RMSNorm's scale, which its forward and backward share.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (super::cpu::dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// [`KernelBackend::rms_norm_backward`](super::KernelBackend::rms_norm_backward) on the CPU:
/// a row's statistics and its gradient in one pass over it. `None` unless all are f32 of
/// matching shapes.
pub fn try_rms_norm_backward(
    x: &Tensor<Flex, 3>,
    weight: &Tensor<Flex, 1>,
    dy: &Tensor<Flex, 3>,
    eps: f64,
) -> Option<Tensor<Flex, 3>> {
    let dims = x.dims();
    let dim = dims[2];
    if weight.dims() != [dim] || dy.dims() != dims {
        return None;
    }
    let (xp, wp, gp) = (contiguous(x)?, contiguous(weight)?, contiguous(dy)?);
    let (xs, ws, gs) = (
        xp.as_slice::<f32>()?,
        wp.as_slice::<f32>()?,
        gp.as_slice::<f32>()?,
    );
    let mut out = vec![0f32; xs.len()];
    rows_of(&mut out, dim, &|first, out| {
        let at = first * dim..first * dim + out.len();
        rms_norm_backward_rows(&xs[at.clone()], ws, &gs[at], eps as f32, out);
    });
    Some(flex(out, dims))
}

fn rms_norm_backward_rows(x: &[f32], w: &[f32], dy: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { rms_norm_backward_avx2(x, w, dy, eps, out) };
        return;
    }
    rms_norm_backward_portable(x, w, dy, eps, out);
}

/// [`rms_norm_backward_portable`] compiled for AVX2/FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_backward_avx2(x: &[f32], w: &[f32], dy: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_backward_portable(x, w, dy, eps, out);
}

#[inline(always)]
fn rms_norm_backward_portable(x: &[f32], w: &[f32], dy: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for ((x, dy), out) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(out.chunks_exact_mut(dim))
    {
        let r = inv_rms(x, eps);
        // mean(g · x) with g = dy · w, in `g`'s place: `out` holds g first.
        for ((o, &dy), &w) in out.iter_mut().zip(dy).zip(w) {
            *o = dy * w;
        }
        let c = r * r * r * super::cpu::dot(out, x) / dim as f32;
        for (o, &x) in out.iter_mut().zip(x) {
            *o = *o * r - x * c;
        }
    }
}

/// [`KernelBackend::rope`](super::KernelBackend::rope) on the CPU: each head of each position
/// rotated and written head-major in one pass. `None` unless f32 with tables of `[seq, d]`
/// and an even head dim.
pub fn try_rope(
    x: &Tensor<Flex, 3>,
    cos: &Tensor<Flex, 2>,
    sin: &Tensor<Flex, 2>,
    heads: usize,
) -> Option<Tensor<Flex, 4>> {
    let [b, s, width] = x.dims();
    if heads == 0 || !width.is_multiple_of(heads) {
        return None;
    }
    let d = width / heads;
    if !d.is_multiple_of(2) || cos.dims() != [s, d] || sin.dims() != [s, d] {
        return None;
    }
    let (xp, cp, sp) = (contiguous(x)?, contiguous(cos)?, contiguous(sin)?);
    let (xs, cs, ss) = (
        xp.as_slice::<f32>()?,
        cp.as_slice::<f32>()?,
        sp.as_slice::<f32>()?,
    );
    let mut out = vec![0f32; xs.len()];
    // Output row r is (batch, head, position) = (r / (heads s), r / s % heads, r % s).
    rows_of(&mut out, d, &|first, out| {
        for (i, out) in out.chunks_exact_mut(d).enumerate() {
            let r = first + i;
            let (bi, hi, t) = (r / (heads * s), r / s % heads, r % s);
            let at = (bi * s + t) * width + hi * d;
            rotate(
                &xs[at..at + d],
                &cs[t * d..(t + 1) * d],
                &ss[t * d..(t + 1) * d],
                out,
            );
        }
    });
    Some(flex(out, [b, heads, s, d]))
}

/// [`KernelBackend::rope_backward`](super::KernelBackend::rope_backward) on the CPU: each head
/// of each position rotated back and written to `x`'s layout in one pass. `None` unless f32
/// with tables of `[seq, d]`.
pub fn try_rope_backward(
    dy: &Tensor<Flex, 4>,
    cos: &Tensor<Flex, 2>,
    sin: &Tensor<Flex, 2>,
) -> Option<Tensor<Flex, 3>> {
    let [b, heads, s, d] = dy.dims();
    if !d.is_multiple_of(2) || cos.dims() != [s, d] || sin.dims() != [s, d] {
        return None;
    }
    let (gp, cp, sp) = (contiguous(dy)?, contiguous(cos)?, contiguous(sin)?);
    let (gs, cs, ss) = (
        gp.as_slice::<f32>()?,
        cp.as_slice::<f32>()?,
        sp.as_slice::<f32>()?,
    );
    let mut out = vec![0f32; gs.len()];
    // Output row r is (batch, position, head) = (r / (s heads), r / heads % s, r % heads).
    rows_of(&mut out, d, &|first, out| {
        for (i, out) in out.chunks_exact_mut(d).enumerate() {
            let r = first + i;
            let (bi, t, hi) = (r / (s * heads), r / heads % s, r % heads);
            let at = ((bi * heads + hi) * s + t) * d;
            unrotate(
                &gs[at..at + d],
                &cs[t * d..(t + 1) * d],
                &ss[t * d..(t + 1) * d],
                out,
            );
        }
    });
    Some(flex(out, [b, s, heads * d]))
}

/// [`rotate`]'s transpose: `out₁ = g₁ · cos₁ + g₂ · sin₂`, `out₂ = g₂ · cos₂ − g₁ · sin₁`.
#[inline(always)]
fn unrotate(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for j in 0..half {
        o1[j] = g1[j] * cos[j] + g2[j] * sin[half + j];
        o2[j] = g2[j] * cos[half + j] - g1[j] * sin[j];
    }
}

/// Rotate-half: `out = x · cos + [-x₂, x₁] · sin`.
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for j in 0..half {
        o1[j] = x1[j] * cos[j] - x2[j] * sin[j];
        o2[j] = x2[j] * cos[half + j] + x1[j] * sin[half + j];
    }
}

/// [`KernelBackend::swiglu`](super::KernelBackend::swiglu) on the CPU: `silu(gate) · up` in
/// one pass. `None` unless both are f32 of one shape.
pub fn try_swiglu(gate: &Tensor<Flex, 3>, up: &Tensor<Flex, 3>) -> Option<Tensor<Flex, 3>> {
    let dims = gate.dims();
    if up.dims() != dims {
        return None;
    }
    let (gp, up_) = (contiguous(gate)?, contiguous(up)?);
    let (gs, us) = (gp.as_slice::<f32>()?, up_.as_slice::<f32>()?);
    let mut out = vec![0f32; gs.len()];
    rows_of(&mut out, dims[2], &|first, out| {
        let at = first * dims[2];
        swiglu_values(&gs[at..at + out.len()], &us[at..at + out.len()], out);
    });
    Some(flex(out, dims))
}

/// [`KernelBackend::swiglu_backward`](super::KernelBackend::swiglu_backward) on the CPU: the
/// gradient at the gate in one pass, at `up` in another. `None` unless all three are f32 of
/// one shape.
pub fn try_swiglu_backward(
    gate: &Tensor<Flex, 3>,
    up: &Tensor<Flex, 3>,
    dy: &Tensor<Flex, 3>,
) -> Option<(Tensor<Flex, 3>, Tensor<Flex, 3>)> {
    let dims = gate.dims();
    if up.dims() != dims || dy.dims() != dims {
        return None;
    }
    let (gp, upp, dyp) = (contiguous(gate)?, contiguous(up)?, contiguous(dy)?);
    let (gs, us, ds) = (
        gp.as_slice::<f32>()?,
        upp.as_slice::<f32>()?,
        dyp.as_slice::<f32>()?,
    );
    let grad = |of_gate: bool| {
        let mut out = vec![0f32; gs.len()];
        rows_of(&mut out, dims[2], &|first, out| {
            let at = first * dims[2];
            let span = at..at + out.len();
            let (g, u, d) = (&gs[span.clone()], &us[span.clone()], &ds[span]);
            swiglu_grad_values(of_gate, g, u, d, out);
        });
        flex(out, dims)
    };
    Some((grad(true), grad(false)))
}

fn swiglu_grad_values(of_gate: bool, gate: &[f32], up: &[f32], dy: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { swiglu_grad_avx2(of_gate, gate, up, dy, out) };
        return;
    }
    swiglu_grad_portable(of_gate, gate, up, dy, out);
}

/// [`swiglu_grad_portable`] compiled for AVX2/FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_grad_avx2(of_gate: bool, gate: &[f32], up: &[f32], dy: &[f32], out: &mut [f32]) {
    swiglu_grad_portable(of_gate, gate, up, dy, out);
}

/// `dy · up · σ(g) · (1 + g · (1 − σ(g)))` (the gate's), or `dy · g · σ(g)` (up's).
#[inline(always)]
fn swiglu_grad_portable(of_gate: bool, gate: &[f32], up: &[f32], dy: &[f32], out: &mut [f32]) {
    let values = out.iter_mut().zip(gate).zip(up).zip(dy);
    if of_gate {
        for (((o, &g), &u), &d) in values {
            let s = 1.0 / (1.0 + exp(-g));
            *o = d * u * (s * (1.0 + g * (1.0 - s)));
        }
    } else {
        for (((o, &g), _), &d) in values {
            *o = d * (g / (1.0 + exp(-g)));
        }
    }
}

/// [`KernelBackend::row_softmax`](super::KernelBackend::row_softmax) on the CPU: per row, the
/// maximum, `exp` in lanes and the scaling by the sum; `-∞` gives exactly 0, a row of nothing
/// but `-∞` NaN (as burn's). `None` unless f32.
pub fn try_softmax(x: &Tensor<Flex, 4>) -> Option<Tensor<Flex, 4>> {
    let dims = x.dims();
    let xp = contiguous(x)?;
    let xs = xp.as_slice::<f32>()?;
    let mut out = vec![0f32; xs.len()];
    rows_of(&mut out, dims[3], &|first, out| {
        let at = first * dims[3];
        softmax_rows(&xs[at..at + out.len()], dims[3], out);
    });
    Some(flex(out, dims))
}

/// [`KernelBackend::row_softmax_backward`](super::KernelBackend::row_softmax_backward) on the CPU:
/// per row, `Σ dy · y`, then `y · (dy − Σ)`. `None` unless both are f32 of one shape.
pub fn try_softmax_backward(y: &Tensor<Flex, 4>, dy: &Tensor<Flex, 4>) -> Option<Tensor<Flex, 4>> {
    let dims = y.dims();
    if dy.dims() != dims {
        return None;
    }
    let (yp, dp) = (contiguous(y)?, contiguous(dy)?);
    let (ys, ds) = (yp.as_slice::<f32>()?, dp.as_slice::<f32>()?);
    let width = dims[3];
    let mut out = vec![0f32; ys.len()];
    rows_of(&mut out, width, &|first, out| {
        let span = first * width..first * width + out.len();
        softmax_grad_rows(&ys[span.clone()], &ds[span], width, out);
    });
    Some(flex(out, dims))
}

fn softmax_rows(x: &[f32], width: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { softmax_rows_avx2(x, width, out) };
        return;
    }
    softmax_rows_portable(x, width, out);
}

/// [`softmax_rows_portable`] compiled for AVX2/FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(x: &[f32], width: usize, out: &mut [f32]) {
    softmax_rows_portable(x, width, out);
}

#[inline(always)]
fn softmax_rows_portable(x: &[f32], width: usize, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        out.copy_from_slice(x);
        match super::cpu::exp_scores(out) {
            Some(inv) => out.iter_mut().for_each(|o| *o *= inv),
            None => out.fill(f32::NAN),
        }
    }
}

fn softmax_grad_rows(y: &[f32], dy: &[f32], width: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { softmax_grad_rows_avx2(y, dy, width, out) };
        return;
    }
    softmax_grad_rows_portable(y, dy, width, out);
}

/// [`softmax_grad_rows_portable`] compiled for AVX2/FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_grad_rows_avx2(y: &[f32], dy: &[f32], width: usize, out: &mut [f32]) {
    softmax_grad_rows_portable(y, dy, width, out);
}

#[inline(always)]
fn softmax_grad_rows_portable(y: &[f32], dy: &[f32], width: usize, out: &mut [f32]) {
    let rows = y.chunks_exact(width).zip(dy.chunks_exact(width));
    for ((y, dy), out) in rows.zip(out.chunks_exact_mut(width)) {
        let dot = super::cpu::dot(y, dy);
        for ((o, &y), &d) in out.iter_mut().zip(y).zip(dy) {
            *o = y * (d - dot);
        }
    }
}

fn swiglu_values(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma_f16c() {
        // SAFETY: the processor has AVX2 and FMA (checked above), all this function needs.
        unsafe { swiglu_avx2(gate, up, out) };
        return;
    }
    swiglu_portable(gate, up, out);
}

/// [`swiglu_portable`] compiled for AVX2/FMA: [`exp`] becomes eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_portable(gate, up, out);
}

#[inline(always)]
fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// `eᵛ` within 2 ulp over the f32 range (Cephes' `expf`, branch-free so that loops of it
/// vectorise): `v = n ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `eʳ`, and `2ⁿ`
/// built in the exponent bits. Inputs are clamped to where `2ⁿ` is a normal float: below
/// -87.3 it returns about 1.2e-38 instead of a denormal or 0 (SiLU's `1 + e⁻ᵍ` cannot tell),
/// above 88.3 about 2.1e38 instead of infinity.
#[inline(always)]
pub(crate) fn exp(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds to an integer (ties to even) in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let v = v.clamp(-87.3, 88.3);
    let t = v.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, v));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e_r = p.mul_add(r * r, r) + 1.0;
    // n sits in t's low bits (t = 1.5 · 2²³ + n): 2ⁿ has the biased exponent n + 127.
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e_r * f32::from_bits(((n_bits + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference;
    use burn::tensor::TensorData;

    fn values(n: usize, seed: u64, range: f32) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    }

    fn close(a: Vec<f32>, b: Vec<f32>, tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "value {i}: {x} vs {y}"
            );
        }
    }

    fn data<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_over_the_range() {
        let mut v = -87.0f32;
        while v < 88.0 {
            let (got, want) = (exp(v), v.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({v}) = {got}, std {want} ({ulp} ulp)");
            v += 0.0137;
        }
        assert!(exp(-200.0) > 0.0 && exp(-200.0) < 2e-38);
        assert!(exp(200.0).is_finite() && exp(200.0) > 1e38);
    }

    /// Each op against the tensor-op reference, on a row count that takes the pool (3 × 37
    /// rows of 960) and on one row (a decode step, this thread).
    #[test]
    fn rows_ops_match_the_reference() {
        for (b, s, width) in [(3, 37, 960), (1, 1, 96)] {
            let n = b * s * width;
            let x = flex(values(n, 1, 2.0), [b, s, width]);
            let w = flex(values(width, 2, 1.5), [width]);
            let got = try_rms_norm(&x, &w, 1e-5).unwrap();
            close(
                data(got),
                data(reference::rms_norm(x.clone(), &w, 1e-5)),
                1e-5,
            );

            let up = flex(values(n, 3, 3.0), [b, s, width]);
            let gate = flex(values(n, 4, 12.0), [b, s, width]);
            let got = try_swiglu(&gate, &up).unwrap();
            let want = reference::swiglu(gate, up);
            close(data(got), data(want), 1e-6);

            // heads of 8 and 40 values; a slice of the input, so not contiguous.
            for heads in [width / 8, width / 40] {
                let d = width / heads;
                let tables = |seed| {
                    Tensor::<Flex, 2>::from_data(
                        TensorData::new(values(s * d, seed, 1.0), [s, d]),
                        &Default::default(),
                    )
                };
                let (cos, sin) = (tables(5), tables(6));
                let wide = flex(values(b * s * (width + 8), 7, 2.0), [b, s, width + 8]);
                let x = wide.slice([0..b, 0..s, 4..4 + width]);
                let got = try_rope(&x, &cos, &sin, heads).unwrap();
                let want = reference::rope(x, &cos, &sin, heads);
                assert_eq!(got.dims(), want.dims());
                close(data(got), data(want), 1e-6);
            }
        }
    }
}
