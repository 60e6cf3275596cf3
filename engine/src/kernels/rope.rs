//! Rotary position embedding on burn-wgpu (`shaders/rope.wgsl`): rotate-half, as HF
//! `modeling_llama.py`, with the split into heads fused in.

use burn::backend::wgpu::{BoolElement, IntElement, into_contiguous};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use cubecl::CubeDim;

use super::wgpu::WgpuCube;
use super::wgsl::{self, Plain, shader};

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
    let kernel = Plain(shader!("rope"));
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
