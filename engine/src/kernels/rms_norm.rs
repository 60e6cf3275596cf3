//! RMSNorm over the last dimension on burn-wgpu (`shaders/rms_norm.wgsl`): one workgroup per row.

use burn::backend::wgpu::{BoolElement, IntElement, into_contiguous};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use cubecl::CubeDim;

use super::wgpu::WgpuCube;
use super::wgsl::{self, Plain, shader};

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
    let kernel = Plain(shader!("rms_norm"));
    wgsl::launch(
        kernel,
        CubeDim { x: 64, y: 1, z: 1 },
        wgsl::grid_for(rows),
        &[&x, &weight, &out],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
