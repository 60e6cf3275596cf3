//! The product with the transpose of a quantised matrix on burn-wgpu (`shaders/qmatmul_t.wgsl`):
//! the input gradient through a frozen base weight, `dy · W`, with the adapter's share `du · A`
//! fused in.

use burn::backend::wgpu::{BoolElement, IntElement, KernelSource, SourceTemplate};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use cubecl::prelude::KernelId;
use cubecl::{CubeCount, CubeDim};

use super::qmatmul::format_source;
use super::wgpu::WgpuCube;
use super::wgsl::{self, shader};
use super::{AdapterShare, QTensor};
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
        SourceTemplate::new(format!(
            "{}\n{}",
            shader!("qmatmul_t"),
            format_source(self.0)
        ))
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(self.0)
    }
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
    let dy = wgsl::float_input(dy);
    let out = wgsl::empty_f32(&dy, Shape::new([m, k]));
    let (du, a, rank) = match lora {
        Some((du, a)) => {
            let r = du.dims()[1];
            assert_eq!(du.dims(), [m, r], "q_matmul_t: du must be [m, r]");
            assert_eq!(a.dims(), [r, k], "q_matmul_t: A must be [r, k]");
            (wgsl::float_input(du), wgsl::float_input(a), r)
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
