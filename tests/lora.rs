//! The LoRA kernels and their backward pass: each kernel against the plain-tensor reference,
//! the hand-written backward against burn's autodiff of the reference, and both against finite
//! differences on tiny shapes.

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use codelsi_engine::kernels::matmul_strided::matmul_strided_wgpu;
use codelsi_engine::kernels::qmatmul::{QShape, q_matmul_lora_wgpu};
use codelsi_engine::kernels::qmatmul_t::q_matmul_t_wgpu;
use codelsi_engine::kernels::{KernelBackend, LoraEpilogue, QTensor, reference};
use codelsi_engine::quant::{QFormat, QMatrix};
use codelsi_tests::{B, assert_close, cols_for, device, random_values, to_vec, varied_weights};

type AD = Autodiff<B>;

const FORMATS: [QFormat; 10] = QFormat::EVERY;

fn tensor<Bk: Backend>(values: Vec<f32>, shape: [usize; 2], dev: &Bk::Device) -> Tensor<Bk, 2> {
    Tensor::from_data(TensorData::new(values, shape), dev)
}

fn rand<Bk: Backend>(shape: [usize; 2], seed: u64, dev: &Bk::Device) -> Tensor<Bk, 2> {
    tensor(random_values(shape[0] * shape[1], seed), shape, dev)
}

fn qweight<Bk: Backend>(
    format: QFormat,
    n: usize,
    k: usize,
    seed: u64,
    dev: &Bk::Device,
) -> QTensor<Bk> {
    let q = QMatrix::quantize(format, n, k, &varied_weights(n, k, seed));
    QTensor::from_qmatrix(&q, dev)
}

/// (m, n, k, r): m = 1..4 runs the mat-vec kernel; sizes off every tile edge; k several blocks.
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 45, 96, 8),
    (3, 77, 160, 1),
    (13, 33, 64, 8),
    (37, 67, 128, 16),
    (70, 129, 32, 5),
    (130, 64, 96, 64),
];

#[test]
fn lora_forward_kernel_matches_reference() {
    let dev = device();
    for format in FORMATS {
        for (i, &(m, n, k, r)) in SHAPES.iter().enumerate() {
            let k = cols_for(format, k);
            let seed = 10 * i as u64;
            let w = qweight::<B>(format, n, k, seed, &dev);
            let x = rand::<B>([m, k], seed + 1, &dev);
            let lora = LoraEpilogue {
                u: rand([m, r], seed + 2, &dev),
                b: rand([n, r], seed + 3, &dev),
                scale: 1.7,
            };
            let want = to_vec(reference::q_matmul_lora(x.clone(), &w, &lora));
            for shape in [QShape::GPU, QShape::CPU] {
                let got = to_vec(q_matmul_lora_wgpu(x.clone(), &w, Some(&lora), shape));
                let what = format!("{format:?} m={m} n={n} k={k} r={r} {shape:?}");
                assert_close(&what, &got, &want, 1e-4, 1e-4);
            }
        }
    }
}

#[test]
fn transposed_kernel_matches_reference() {
    let dev = device();
    for format in FORMATS {
        for (i, &(m, n, k, r)) in SHAPES.iter().enumerate() {
            let k = cols_for(format, k);
            let seed = 100 + 10 * i as u64;
            let w = qweight::<B>(format, n, k, seed, &dev);
            let dy = rand::<B>([m, n], seed + 1, &dev);
            let du = rand::<B>([m, r], seed + 2, &dev);
            let a = rand::<B>([r, k], seed + 3, &dev);
            let what = format!("{format:?} m={m} n={n} k={k} r={r}");
            let got = to_vec(q_matmul_t_wgpu(dy.clone(), &w, None));
            let want = to_vec(reference::q_matmul_t(dy.clone(), &w, None));
            assert_close(&what, &got, &want, 1e-4, 1e-4);
            let lora = Some((du, a));
            let got = to_vec(q_matmul_t_wgpu(dy.clone(), &w, lora.clone()));
            let want = to_vec(reference::q_matmul_t(dy, &w, lora));
            assert_close(&format!("{what} with LoRA"), &got, &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn strided_kernel_matches_reference() {
    let dev = device();
    for &(m, n, k) in &[(1, 1, 1), (17, 5, 33), (64, 16, 300), (3, 200, 17)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a_shape = if ta { [k, m] } else { [m, k] };
                let b_shape = if tb { [n, k] } else { [k, n] };
                let a = rand::<B>(a_shape, (m * n) as u64, &dev);
                let b = rand::<B>(b_shape, (m + n + k) as u64, &dev);
                let got = to_vec(matmul_strided_wgpu(a.clone(), b.clone(), ta, tb, -0.5));
                let want = to_vec(reference::matmul_small(a, b, ta, tb, -0.5));
                let what = format!("m={m} n={n} k={k} ta={ta} tb={tb}");
                assert_close(&what, &got, &want, 1e-4, 1e-4);
            }
        }
    }
}

/// Gradients of `sum(y ⊙ probe)` for x, A and B, with the kernels' backward pass or burn's
/// autodiff of the reference; `dropout` gives a fixed mask on the down-projection's input.
fn lora_grads(
    kernels: bool,
    w: &QTensor<AD>,
    host: &[Vec<f32>; 4],
    (m, n, k, r): (usize, usize, usize, usize),
    dropout: Option<&[f32]>,
) -> [Vec<f32>; 4] {
    let dev = device();
    let x = tensor::<AD>(host[0].clone(), [m, k], &dev).require_grad();
    let a = tensor::<AD>(host[1].clone(), [r, k], &dev).require_grad();
    let b = tensor::<AD>(host[2].clone(), [n, r], &dev).require_grad();
    let probe = tensor::<AD>(host[3].clone(), [m, n], &dev);
    let x_drop = dropout.map(|mask| x.clone() * tensor::<AD>(mask.to_vec(), [m, k], &dev));
    let y = if kernels {
        <AD as KernelBackend>::lora_matmul(x.clone(), x_drop, w, a.clone(), b.clone(), 2.0)
    } else {
        reference::lora_matmul(x.clone(), x_drop, w, a.clone(), b.clone(), 2.0)
    };
    let loss = (y.clone() * probe).sum();
    let grads = loss.backward();
    let g = |t: &Tensor<AD, 2>| match t.grad(&grads) {
        Some(g) => to_vec(g),
        None => panic!("no gradient"),
    };
    [to_vec(y.inner()), g(&x), g(&a), g(&b)]
}

#[test]
fn lora_backward_matches_autodiff_of_reference() {
    let dev = device();
    for format in FORMATS {
        for (i, &(m, n, k, r)) in SHAPES.iter().enumerate() {
            let k = cols_for(format, k);
            let seed = 1000 + 10 * i as u64;
            let w = qweight::<AD>(format, n, k, seed, &dev);
            let host = [
                random_values(m * k, seed + 1),
                random_values(r * k, seed + 2),
                random_values(n * r, seed + 3),
                random_values(m * n, seed + 4),
            ];
            let mask: Vec<f32> = random_values(m * k, seed + 5)
                .iter()
                .map(|v| if *v > -0.6 { 1.25 } else { 0.0 })
                .collect();
            for dropout in [None, Some(mask.as_slice())] {
                let got = lora_grads(true, &w, &host, (m, n, k, r), dropout);
                let want = lora_grads(false, &w, &host, (m, n, k, r), dropout);
                for (j, name) in ["y", "dx", "dA", "dB"].iter().enumerate() {
                    let what = format!(
                        "{format:?} m={m} n={n} k={k} r={r} dropout={} {name}",
                        dropout.is_some()
                    );
                    assert_close(&what, &got[j], &want[j], 1e-3, 1e-4);
                }
            }
        }
    }
}

#[test]
fn lora_backward_matches_finite_differences() {
    let dev = device();
    let (m, n, k, r) = (3, 5, 32, 2);
    let w = qweight::<AD>(QFormat::Q8_0, n, k, 7, &dev);
    let host = [
        random_values(m * k, 71),
        random_values(r * k, 72),
        random_values(n * r, 73),
        random_values(m * n, 74),
    ];
    let grads = lora_grads(true, &w, &host, (m, n, k, r), None);
    let loss = |h: &[Vec<f32>; 4]| -> f64 {
        let y = lora_grads(true, &w, h, (m, n, k, r), None)[0].clone();
        y.iter()
            .zip(&h[3])
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    // Central differences in f32 arithmetic: step 1e-2 keeps rounding (~1e-6 / 1e-2) well
    // under the tolerance; the loss is linear in each of x, A and B, so truncation error is nil.
    let eps = 1e-2f32;
    for (which, name) in [(0, "dx"), (1, "dA"), (2, "dB")] {
        for idx in [0, host[which].len() / 2, host[which].len() - 1] {
            let mut plus = host.clone();
            plus[which][idx] += eps;
            let mut minus = host.clone();
            minus[which][idx] -= eps;
            let fd = ((loss(&plus) - loss(&minus)) / (2.0 * eps as f64)) as f32;
            let got = grads[which + 1][idx];
            assert_close(
                &format!("{name}[{idx}] vs finite difference"),
                &[got],
                &[fd],
                2e-3,
                1e-2,
            );
        }
    }
}
