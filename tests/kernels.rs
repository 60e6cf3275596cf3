//! Every WGSL kernel against its references on random inputs of odd sizes: the plain-tensor
//! reference (dequantise with int ops + matmul) and a naive CPU loop over the dequantised weights.

use burn::tensor::{Tensor, TensorData};
use codelsi_engine::kernels::qmatmul::{MatVecShape, q_matmul_wgpu};
use codelsi_engine::kernels::{QTensor, QuantBackend, reference};
use codelsi_engine::quant::{QFormat, QMatrix};
use codelsi_tests::{B, assert_close, device, random_values};

const FORMATS: [QFormat; 3] = [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0];

/// Weights whose scale varies from block to block (and some blocks of one sign, for Q4_1's min).
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    random_values(rows * cols, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let block = i / 32;
            let scale = 0.05 + (block % 11) as f32 * 0.3;
            if block % 5 == 0 {
                (v.abs() + 0.1) * scale
            } else {
                v * scale
            }
        })
        .collect()
}

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

fn to_vec(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn reference_dequantize_matches_cpu() {
    let dev = device();
    for format in FORMATS {
        let (rows, cols) = (13, 96);
        let q = QMatrix::quantize(format, rows, cols, &weights(rows, cols, 1));
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
    // m = 1..=4 runs the mat-vec kernel, larger m the tiled one; n and m not multiples of any
    // workgroup dimension; k several blocks.
    let shapes = [
        (1, 45, 96),
        (3, 77, 160),
        (4, 33, 64),
        (5, 45, 96),
        (37, 67, 128),
        (70, 129, 32),
    ];
    for format in FORMATS {
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let q = QMatrix::quantize(format, n, k, &weights(n, k, 10 + si as u64));
            let x_host = random_values(m * k, 100 + si as u64);
            let x = Tensor::<B, 2>::from_data(TensorData::new(x_host.clone(), [m, k]), &dev);
            let qt = QTensor::<B>::from_qmatrix(&q, &dev);
            let kernel = to_vec(<B as QuantBackend>::q_matmul(x.clone(), &qt));
            // Both mat-vec thread layouts, whichever this adapter picks by default.
            for shape in [MatVecShape::GPU, MatVecShape::CPU] {
                let y = to_vec(q_matmul_wgpu(x.clone(), &qt, shape));
                assert_close(
                    &format!("{format:?} m={m} n={n} k={k} {shape:?}"),
                    &y,
                    &kernel,
                    1e-5,
                    1e-5,
                );
            }
            let plain = to_vec(reference::q_matmul(x, &qt));
            let cpu = cpu_matmul(&x_host, &q.dequantize(), m, n, k);
            let what = format!("{format:?} m={m} n={n} k={k}");
            // f32 sums of up to 160 products of magnitude <= ~3.5: order-of-summation error.
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
