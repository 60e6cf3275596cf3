//! burn-wgpu's implementation of [`KernelBackend`]: each op handed to the launcher of its shader
//! family (`qmatmul.rs`, `qmatmul_t.rs`, `matmul_strided.rs`, `rms_norm.rs`, `rope.rs`,
//! `dropout.rs`).

use burn::backend::wgpu::{BoolElement, CubeBackend, IntElement, WgpuRuntime};
use burn::tensor::Tensor;

use super::dropout::dropout_mask_wgpu;
use super::matmul_strided::matmul_strided_wgpu;
use super::qmatmul::{QShape, q_matmul_lora_wgpu, q_matmul_wgpu};
use super::qmatmul_t::q_matmul_t_wgpu;
use super::rms_norm::rms_norm_wgpu;
use super::rope::rope_wgpu;
use super::{AdapterShare, KernelBackend, LoraEpilogue, QTensor, to_dtype, widen};

pub type WgpuCube<I, BT> = CubeBackend<WgpuRuntime, f32, I, BT>;

impl<I: IntElement, BT: BoolElement> KernelBackend for WgpuCube<I, BT> {
    // The WGSL kernels compute in f32: f16 activations are widened on the way in and the
    // result takes the activation's type (see `widen`).
    fn q_matmul(x: Tensor<Self, 2>, w: &QTensor<Self>) -> Tensor<Self, 2> {
        let dtype = x.dtype();
        to_dtype(q_matmul_wgpu(widen(x), w, QShape::for_adapter()), dtype)
    }

    fn q_matmul_lora(
        x: Tensor<Self, 2>,
        w: &QTensor<Self>,
        lora: &LoraEpilogue<Self>,
    ) -> Tensor<Self, 2> {
        let dtype = x.dtype();
        let lora = LoraEpilogue {
            u: widen(lora.u.clone()),
            b: widen(lora.b.clone()),
            scale: lora.scale,
        };
        let y = q_matmul_lora_wgpu(widen(x), w, Some(&lora), QShape::for_adapter());
        to_dtype(y, dtype)
    }

    fn q_matmul_t(
        dy: Tensor<Self, 2>,
        w: &QTensor<Self>,
        lora: Option<AdapterShare<Self>>,
    ) -> Tensor<Self, 2> {
        let dtype = dy.dtype();
        let lora = lora.map(|(du, a)| (widen(du), widen(a)));
        to_dtype(q_matmul_t_wgpu(widen(dy), w, lora), dtype)
    }

    /// The result has `a`'s type.
    fn matmul_small(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
        alpha: f32,
    ) -> Tensor<Self, 2> {
        let dtype = a.dtype();
        let y = matmul_strided_wgpu(widen(a), widen(b), transpose_a, transpose_b, alpha);
        to_dtype(y, dtype)
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        let dtype = x.dtype();
        to_dtype(rms_norm_wgpu(widen(x), weight, eps), dtype)
    }

    fn rope(
        x: Tensor<Self, 3>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 4> {
        let dtype = x.dtype();
        let (cos, sin) = (widen(cos.clone()), widen(sin.clone()));
        to_dtype(rope_wgpu(widen(x), &cos, &sin, heads), dtype)
    }

    fn dropout_mask(
        dims: [usize; 2],
        keep: f64,
        seed: u64,
        device: &Self::Device,
    ) -> Tensor<Self, 2> {
        if dims[0] * dims[1] < 1 << 31 {
            dropout_mask_wgpu(dims, keep, seed, device)
        } else {
            super::host_dropout_mask(dims, keep, seed, device)
        }
    }

    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        let client = <WgpuRuntime as cubecl::Runtime>::client(device);
        client.memory_usage().ok().map(|u| u.bytes_reserved)
    }

    fn supports_f16(device: &Self::Device) -> bool {
        use cubecl::ir::{ElemType, FloatKind};
        let client = <WgpuRuntime as cubecl::Runtime>::client(device);
        client
            .properties()
            .supports_type(ElemType::Float(FloatKind::F16))
    }

    fn computes(_format: crate::quant::QFormat) -> bool {
        true
    }

    fn max_tensor_bytes(_device: &Self::Device) -> Option<u64> {
        crate::device::max_binding_bytes()
    }

    fn kernels_impl() -> &'static str {
        "WGSL (qmatvec, qmatmul, qmatmul_rows, qmatmul_t, matmul_strided, rms_norm, rope, dropout_mask)"
    }
}
