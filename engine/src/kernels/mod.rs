//! Hand-written WGSL kernels (sources in `shaders/`) and the backend extension that exposes them.
//!
//! [`KernelBackend`] is what the model needs beyond burn's own ops: a product with a matrix that
//! stays quantised in device memory, and fused RMSNorm and RoPE. burn-wgpu implements them with
//! our WGSL kernels (`wgpu.rs`, `qmatmul.rs`); every other backend uses the reference built from
//! plain tensor ops (`reference.rs`), which is also what the kernels are tested against.

pub mod qmatmul;
pub mod reference;
pub mod wgpu;
pub mod wgsl;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::quant::{QFormat, QMatrix};

/// A quantised matrix `[rows, cols]` on a device, in the layout of [`QMatrix`]. The packed u32
/// words live in Int tensors (bit-cast to the backend's int type; the kernels read them as u32).
#[derive(Debug, Clone)]
pub struct QTensor<B: Backend> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    /// `[rows * cols / 32 * qs_words_per_block]`
    pub qs: Tensor<B, 1, Int>,
    /// `[ceil(rows * cols / 32 * scales_per_block / 2)]`
    pub scales: Tensor<B, 1, Int>,
}

impl<B: Backend> QTensor<B> {
    pub fn from_qmatrix(q: &QMatrix, device: &B::Device) -> Self {
        let words = |w: &[u32]| {
            let v: Vec<i32> = w.iter().map(|&x| x as i32).collect();
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        Self {
            format: q.format,
            rows: q.rows,
            cols: q.cols,
            qs: words(&q.qs),
            scales: words(&q.scales),
        }
    }

    /// Bytes taken in device memory (as the backend's int type stores the words).
    pub fn device_bytes(&self) -> usize {
        let words = self.qs.shape().num_elements() + self.scales.shape().num_elements();
        words * size_of::<B::IntElem>()
    }
}

/// Backends that can multiply by a quantised matrix.
pub trait KernelBackend: Backend {
    /// `x · Wᵀ` with `x: [m, k]`, `W: [n, k]` quantised; returns `[m, n]`.
    ///
    /// The default is the plain-tensor reference: dequantise, then matmul.
    fn q_matmul(x: Tensor<Self, 2>, w: &QTensor<Self>) -> Tensor<Self, 2> {
        reference::q_matmul(x, w)
    }

    /// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, dim]`, `weight`: `[dim]` → `[batch, seq, dim]`
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        reference::rms_norm(x, weight, eps)
    }

    /// RoPE (rotate-half) applied to the heads of a projection, returned head-major.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, heads * head_dim]`, `cos`/`sin`: `[seq, head_dim]`
    ///   → `[batch, heads, seq, head_dim]`
    fn rope(
        x: Tensor<Self, 3>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 4> {
        reference::rope(x, cos, sin, heads)
    }

    /// Short name of the implementation, for reports.
    fn kernels_impl() -> &'static str {
        "reference (plain tensor ops)"
    }
}

/// burn-cuda (the datacenter path) runs the plain-tensor reference until it has kernels of its own.
#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {}
