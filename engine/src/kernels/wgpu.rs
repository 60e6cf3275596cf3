//! burn-wgpu's implementation of [`KernelBackend`]: the quantised products (`qmatmul.rs`) and the
//! fused RMSNorm and RoPE kernels (`shaders/rms_norm.wgsl`, `shaders/rope.wgsl`).

use burn::backend::wgpu::{
    BoolElement, CubeBackend, IntElement, KernelSource, SourceTemplate, WgpuRuntime,
    into_contiguous,
};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use cubecl::CubeDim;
use cubecl::prelude::KernelId;

use super::lora::{matmul_strided_wgpu, q_matmul_t_wgpu};
use super::qmatmul::{QShape, q_matmul_lora_wgpu, q_matmul_wgpu};
use super::{AdapterShare, KernelBackend, LoraEpilogue, QTensor, to_dtype, wgsl, widen};

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
        "WGSL (qmatvec, qmatmul, qmatmul_rows, qmatmul_t, matmul_strided, rms_norm, rope)"
    }
}

/// A kernel whose WGSL source has no template parameters.
#[derive(Debug)]
struct Plain(&'static str);

impl KernelSource for Plain {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(self.0)
    }
    fn id(&self) -> KernelId {
        // The source is a static string, unique per kernel.
        KernelId::new::<Self>().info(self.0.as_ptr() as usize)
    }
}

/// Keep in sync with `Params` in shaders/rms_norm.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RmsNormParams {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

/// # Shapes
/// - `x`: `[batch, seq, dim]`, `weight`: `[dim]` → `[batch, seq, dim]`
pub fn rms_norm_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 3>,
    weight: &Tensor<WgpuCube<I, BT>, 1>,
    eps: f64,
) -> Tensor<WgpuCube<I, BT>, 3> {
    let [batch, seq, dim] = x.dims();
    let x = into_contiguous(x.into_primitive().tensor());
    let weight = into_contiguous(weight.clone().into_primitive().tensor());
    let out = wgsl::empty_f32(&x, Shape::new([batch, seq, dim]));
    let rows = batch * seq;
    let params = RmsNormParams {
        rows: rows as u32,
        dim: dim as u32,
        eps: eps as f32,
        _pad: 0,
    };
    let kernel = Plain(include_str!("../../../shaders/rms_norm.wgsl"));
    wgsl::launch(
        kernel,
        CubeDim { x: 64, y: 1, z: 1 },
        wgsl::grid_for(rows),
        &[&x, &weight, &out],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Keep in sync with `Params` in shaders/rope.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    batch: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
}

/// # Shapes
/// - `x`: `[batch, seq, heads * head_dim]`, `cos`/`sin`: `[seq, head_dim]`
///   → `[batch, heads, seq, head_dim]`
pub fn rope_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 3>,
    cos: &Tensor<WgpuCube<I, BT>, 2>,
    sin: &Tensor<WgpuCube<I, BT>, 2>,
    heads: usize,
) -> Tensor<WgpuCube<I, BT>, 4> {
    let [batch, seq, width] = x.dims();
    let head_dim = width / heads;
    let x = into_contiguous(x.into_primitive().tensor());
    let cos = into_contiguous(cos.clone().into_primitive().tensor());
    let sin = into_contiguous(sin.clone().into_primitive().tensor());
    let out = wgsl::empty_f32(&x, Shape::new([batch, heads, seq, head_dim]));
    let params = RopeParams {
        batch: batch as u32,
        seq: seq as u32,
        heads: heads as u32,
        head_dim: head_dim as u32,
    };
    let kernel = Plain(include_str!("../../../shaders/rope.wgsl"));
    let workgroups = (batch * width * seq).div_ceil(64);
    wgsl::launch(
        kernel,
        CubeDim { x: 64, y: 1, z: 1 },
        wgsl::grid_for(workgroups),
        &[&x, &cos, &sin, &out],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
