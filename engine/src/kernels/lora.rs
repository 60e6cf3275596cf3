//! Launchers of the LoRA-path kernels on burn-wgpu: the product with the transpose of a quantised
//! matrix (`shaders/qmatmul_t.wgsl`, the input gradient through a frozen base weight, with the
//! adapter's share fused in) and the strided small products (`shaders/matmul_strided.wgsl`) that
//! give u = x·Aᵀ and the adapter's gradients. The forward's up-projection is fused into the
//! quantised product itself (`qmatmul.rs`).

use burn::backend::wgpu::{
    BoolElement, CubeTensor, IntElement, KernelSource, SourceTemplate, WgpuRuntime, into_contiguous,
};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use cubecl::prelude::KernelId;
use cubecl::{CubeCount, CubeDim};

use super::qmatmul::format_source;
use super::wgpu::WgpuCube;
use super::{AdapterShare, QTensor, wgsl};
use crate::quant::QFormat;

/// Keep in sync with `Params` in shaders/qmatmul_t.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QMatmulTParams {
    m: u32,
    n: u32,
    k: u32,
    blocks_per_row: u32,
    rank: u32,
    _pad: [u32; 3],
}

#[derive(Debug)]
struct QMatmulT(QFormat);

impl KernelSource for QMatmulT {
    fn source(&self) -> SourceTemplate {
        let op = include_str!("../../../shaders/qmatmul_t.wgsl");
        SourceTemplate::new(format!("{op}\n{}", format_source(self.0)))
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(self.0)
    }
}

fn float<I: IntElement, BT: BoolElement>(t: Tensor<WgpuCube<I, BT>, 2>) -> CubeTensor<WgpuRuntime> {
    let t = into_contiguous(t.into_primitive().tensor());
    assert_eq!(t.dtype, DType::F32, "the LoRA kernels take f32 tensors");
    t
}

/// `dy · W (+ du · A)`: `dy: [m, n]`, `W: [n, k]` quantised, `du: [m, r]`, `A: [r, k]`;
/// returns `[m, k]`.
pub fn q_matmul_t_wgpu<I: IntElement, BT: BoolElement>(
    dy: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    lora: Option<AdapterShare<WgpuCube<I, BT>>>,
) -> Tensor<WgpuCube<I, BT>, 2> {
    let [m, n] = dy.dims();
    assert_eq!(
        n, w.rows,
        "q_matmul_t: dy has {n} columns, W has {} rows",
        w.rows
    );
    let k = w.cols;
    let dy = float(dy);
    let out = wgsl::empty_f32(&dy, Shape::new([m, k]));
    let (du, a, rank) = match lora {
        Some((du, a)) => {
            let r = du.dims()[1];
            assert_eq!(du.dims(), [m, r], "q_matmul_t: du must be [m, r]");
            assert_eq!(a.dims(), [r, k], "q_matmul_t: A must be [r, k]");
            (float(du), float(a), r)
        }
        None => (
            wgsl::empty_f32(&dy, Shape::new([4])),
            wgsl::empty_f32(&dy, Shape::new([4])),
            0,
        ),
    };
    let params = QMatmulTParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        blocks_per_row: (k / QFormat::BLOCK_LEN) as u32,
        rank: rank as u32,
        _pad: [0; 3],
    };
    let qs = w.qs.clone().into_primitive();
    let scales = w.scales.clone().into_primitive();
    wgsl::launch(
        QMatmulT(w.format),
        CubeDim { x: 16, y: 16, z: 1 },
        CubeCount::Static(k.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        &[&dy, &qs, &scales, &out, &du, &a],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

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
        SourceTemplate::new(include_str!("../../../shaders/matmul_strided.wgsl"))
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
    let a = float(a);
    let b = float(b);
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
