//! Every WGSL kernel against its references on random inputs of odd sizes: the plain-tensor
//! reference (dequantise with int ops + matmul) and a naive CPU loop over the dequantised weights.

use burn::tensor::{Tensor, TensorData};
use codelsi_engine::kernels::qmatmul::{QShape, q_matmul_wgpu};
use codelsi_engine::kernels::{KernelBackend, QTensor, reference};
use codelsi_engine::quant::{QFormat, QMatrix};
use codelsi_tests::{B, assert_close, cols_for, device, random_values, to_vec, varied_weights};

const FORMATS: [QFormat; 10] = QFormat::EVERY;

fn cpu_matmul(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

#[test]
fn reference_dequantize_matches_cpu() {
    let dev = device();
    for format in FORMATS {
        let (rows, cols) = (13, cols_for(format, 96));
        let q = QMatrix::quantize(format, rows, cols, &varied_weights(rows, cols, 1));
        let cpu = q.dequantize();
        let gpu = to_vec(reference::dequantize(&QTensor::<B>::from_qmatrix(&q, &dev)));
        // Same integers and f16 scales; the reference builds 2^e as exp(e·ln 2), which is a few
        // ulp off on GPUs (WGSL's exp is not correctly rounded), so allow ~100 ulp.
        assert_close(&format!("{format:?} dequantize"), &gpu, &cpu, 1e-6, 1e-5);
    }
}

#[test]
fn q_matmul_kernels_match_references() {
    let dev = device();
    // Both shapes: m = 1..=4 runs the mat-vec kernel (GPU: 16 lanes per row; CPU: one); above,
    // the GPU shape runs the tiled kernel, the CPU shape the row-block one up to 32 rows and the
    // tiled one beyond. n and m not multiples of any workgroup dimension or row block; k
    // several blocks.
    let shapes = [
        (1, 45, 96),
        (3, 77, 160),
        (4, 33, 64),
        (5, 45, 96),
        (20, 45, 96),
        (37, 67, 128),
        (70, 129, 32),
    ];
    for format in FORMATS {
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let k = cols_for(format, k);
            let q = QMatrix::quantize(format, n, k, &varied_weights(n, k, 10 + si as u64));
            let x_host = random_values(m * k, 100 + si as u64);
            let x = Tensor::<B, 2>::from_data(TensorData::new(x_host.clone(), [m, k]), &dev);
            let qt = QTensor::<B>::from_qmatrix(&q, &dev);
            let kernel = to_vec(<B as KernelBackend>::q_matmul(x.clone(), &qt));
            // Both kernel choices, whichever this adapter picks by default. They sum in
            // different orders: the rounding grows with k.
            let tol = 1e-5 * (k as f32 / 160.0).max(1.0);
            for shape in [QShape::GPU, QShape::CPU] {
                let y = to_vec(q_matmul_wgpu(x.clone(), &qt, shape));
                assert_close(
                    &format!("{format:?} m={m} n={n} k={k} {shape:?}"),
                    &y,
                    &kernel,
                    tol,
                    tol,
                );
            }
            let plain = to_vec(reference::q_matmul(x, &qt));
            let cpu = cpu_matmul(&x_host, &q.dequantize(), m, n, k);
            let what = format!("{format:?} m={m} n={n} k={k}");
            // f32 sums of up to 1280 products of magnitude <= ~3.5: order-of-summation error.
            assert_close(&format!("{what} kernel vs CPU"), &kernel, &cpu, 1e-4, 1e-4);
            assert_close(
                &format!("{what} reference vs CPU"),
                &plain,
                &cpu,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn rms_norm_kernel_matches_references() {
    let dev = device();
    // dim not a multiple of the 64-thread workgroup; 70 000 rows exceed one grid dimension.
    for &(batch, seq, dim) in &[(2, 3, 77), (1, 1, 576), (1, 70_000, 3)] {
        let x_host = random_values(batch * seq * dim, 7);
        let w_host: Vec<f32> = random_values(dim, 8)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect();
        let x = Tensor::<B, 3>::from_data(TensorData::new(x_host.clone(), [batch, seq, dim]), &dev);
        let w = Tensor::<B, 1>::from_data(TensorData::new(w_host.clone(), [dim]), &dev);
        let eps = 1e-5;
        let kernel = to_vec(<B as KernelBackend>::rms_norm(x.clone(), &w, eps));
        let plain = to_vec(reference::rms_norm(x, &w, eps));
        let cpu: Vec<f32> = x_host
            .chunks(dim)
            .flat_map(|row| {
                let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                row.iter()
                    .zip(&w_host)
                    .map(move |(v, w)| (*v as f64 * inv * *w as f64) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let what = format!("rms_norm [{batch}, {seq}, {dim}]");
        assert_close(&format!("{what} kernel vs CPU"), &kernel, &cpu, 1e-5, 1e-5);
        assert_close(
            &format!("{what} reference vs CPU"),
            &plain,
            &cpu,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn rope_kernel_matches_references() {
    let dev = device();
    // Odd head counts and sequence lengths; the last case needs more than 65 535 workgroups.
    for &(batch, seq, heads, hd) in &[(2, 5, 3, 10), (1, 1, 9, 64), (1, 2049, 32, 64)] {
        let x_host = random_values(batch * seq * heads * hd, 11);
        let cos_host = random_values(seq * hd, 12);
        let sin_host = random_values(seq * hd, 13);
        let x = Tensor::<B, 3>::from_data(
            TensorData::new(x_host.clone(), [batch, seq, heads * hd]),
            &dev,
        );
        let cos = Tensor::<B, 2>::from_data(TensorData::new(cos_host.clone(), [seq, hd]), &dev);
        let sin = Tensor::<B, 2>::from_data(TensorData::new(sin_host.clone(), [seq, hd]), &dev);
        let kernel = to_vec(<B as KernelBackend>::rope(x.clone(), &cos, &sin, heads));
        let plain = to_vec(reference::rope(x, &cos, &sin, heads));
        let mut cpu = vec![0f32; x_host.len()];
        let half = hd / 2;
        for b in 0..batch {
            for s in 0..seq {
                for h in 0..heads {
                    let src = ((b * seq + s) * heads + h) * hd;
                    let dst = ((b * heads + h) * seq + s) * hd;
                    for d in 0..hd {
                        let rotated = if d < half {
                            -x_host[src + d + half]
                        } else {
                            x_host[src + d - half]
                        };
                        cpu[dst + d] =
                            x_host[src + d] * cos_host[s * hd + d] + rotated * sin_host[s * hd + d];
                    }
                }
            }
        }
        let what = format!("rope [{batch}, {seq}, {heads}x{hd}]");
        assert_close(&format!("{what} kernel vs CPU"), &kernel, &cpu, 1e-6, 1e-6);
        assert_close(
            &format!("{what} reference vs CPU"),
            &plain,
            &cpu,
            1e-6,
            1e-6,
        );
    }
}

/// The wgpu kernel draws `cpu::dropout_mask`'s bits (seeds with high words set, sizes not a
/// multiple of four, a grid past one dimension), and a mask depends on its seed alone: draws
/// from the backend's generator in between (another thread's, say) change nothing.
#[test]
fn dropout_mask_kernel_matches_cpu() {
    let dev = device();
    for &(rows, cols, keep, seed) in &[
        (3, 5, 0.9, 7u64),
        (17, 77, 0.5, 0xdead_beef_0123_4567),
        (1, 70_000 * 256 + 3, 0.95, u64::MAX),
        (4, 4, 1.0, 1),
    ] {
        <B as burn::tensor::backend::Backend>::seed(&dev, 1);
        let kernel = to_vec(<B as KernelBackend>::dropout_mask(
            [rows, cols],
            keep,
            seed,
            &dev,
        ));
        let _ = to_vec(Tensor::<B, 1>::random(
            [1000],
            burn::tensor::Distribution::Default,
            &dev,
        ));
        let again = to_vec(<B as KernelBackend>::dropout_mask(
            [rows, cols],
            keep,
            seed,
            &dev,
        ));
        let cpu = codelsi_engine::kernels::cpu::dropout_mask(rows * cols, keep, seed);
        let what = format!("dropout mask [{rows}, {cols}] keep {keep} seed {seed:#x}");
        assert!(
            kernel == cpu,
            "{what}: the kernel's bits differ from the CPU's"
        );
        assert!(
            again == kernel,
            "{what}: the generator's state changed the mask"
        );
        let kept = cpu.iter().filter(|&&v| v != 0.0).count() as f64 / cpu.len() as f64;
        assert!((kept - keep).abs() < 0.1, "{what}: kept {kept}");
    }
}
