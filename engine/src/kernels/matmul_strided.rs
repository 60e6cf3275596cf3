//! Small dense products with either operand transposed in place, on burn-wgpu
//! (`shaders/matmul_strided.wgsl`): LoRA's `u = x·Aᵀ` and the adapter's gradients.

use burn::backend::wgpu::{BoolElement, IntElement, KernelSource, SourceTemplate};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use cubecl::prelude::KernelId;
use cubecl::{CubeCount, CubeDim};

use super::wgpu::WgpuCube;
use super::wgsl::{self, shader};

/// Keep in sync with `Params` in shaders/matmul_strided.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StridedParams {
    m: u32,
    n: u32,
    k: u32,
    a_m: u32,
    a_k: u32,
    b_k: u32,
    b_n: u32,
    alpha: f32,
}

#[derive(Debug)]
struct Strided;

impl KernelSource for Strided {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(shader!("matmul_strided"))
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
    }
}

/// `alpha · op(a) · op(b)`, where `op` transposes when asked: `op(a): [m, k]`, `op(b): [k, n]`.
pub fn matmul_strided_wgpu<I: IntElement, BT: BoolElement>(
    a: Tensor<WgpuCube<I, BT>, 2>,
    b: Tensor<WgpuCube<I, BT>, 2>,
    transpose_a: bool,
    transpose_b: bool,
    alpha: f32,
) -> Tensor<WgpuCube<I, BT>, 2> {
    let [a0, a1] = a.dims();
    let [b0, b1] = b.dims();
    // Row-major storage: a stored [a0, a1]; op(a)(i, j) is a[i, j] or a[j, i].
    let (m, k, a_m, a_k) = if transpose_a {
        (a1, a0, 1, a1)
    } else {
        (a0, a1, a1, 1)
    };
    let (kb, n, b_k, b_n) = if transpose_b {
        (b1, b0, 1, b1)
    } else {
        (b0, b1, b1, 1)
    };
    assert_eq!(k, kb, "matmul_strided: inner sizes {k} and {kb} differ");
    let a = wgsl::float_input(a);
    let b = wgsl::float_input(b);
    let out = wgsl::empty_f32(&a, Shape::new([m, n]));
    let params = StridedParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        a_m: a_m as u32,
        a_k: a_k as u32,
        b_k: b_k as u32,
        b_n: b_n as u32,
        alpha,
    };
    wgsl::launch(
        Strided,
        CubeDim { x: 16, y: 16, z: 1 },
        CubeCount::Static(n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
        &[&a, &b, &out],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
