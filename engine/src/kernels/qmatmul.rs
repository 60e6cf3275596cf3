//! Launchers of `shaders/qmatvec.wgsl` (decode) and `shaders/qmatmul.wgsl` (prefill) on
//! burn-wgpu, through burn's template route (`KernelSource` → `SourceKernel`).

use burn::backend::wgpu::{
    BoolElement, CubeTensor, IntElement, KernelSource, SourceTemplate, WgpuRuntime, into_contiguous,
};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use cubecl::prelude::KernelId;
use cubecl::{CubeCount, CubeDim};

use super::wgpu::WgpuCube;
use super::{LoraEpilogue, QTensor, wgsl};
use crate::quant::QFormat;

/// Uniform parameters of both kernels. Keep in sync with `Params` in shaders/qmatvec.wgsl and
/// shaders/qmatmul.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct QMatmulParams {
    /// Rows of x and y.
    pub m: u32,
    /// Rows of W = columns of y.
    pub n: u32,
    /// Columns of x and W.
    pub k: u32,
    /// k / 32.
    pub blocks_per_row: u32,
    /// LoRA rank, 0 without an adapter.
    pub rank: u32,
    /// LoRA scale (alpha / r).
    pub scale: f32,
    pub _pad: [u32; 2],
}

/// Rows of x up to which the mat-vec kernel is used (it reads W once per row of x).
pub const MATVEC_MAX_ROWS: usize = 4;
/// How the mat-vec kernel splits rows of W over threads: `lanes` threads per row, `rows` rows per
/// workgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatVecShape {
    pub lanes: u32,
    pub rows: u32,
}

impl MatVecShape {
    pub const GPU: Self = Self { lanes: 16, rows: 8 };
    pub const CPU: Self = Self { lanes: 1, rows: 64 };

    /// GPUs: 16 lanes per row, so neighbouring threads read neighbouring blocks. CPU adapters
    /// (lavapipe): one thread per row, no reduction; measured 1.6-2x faster there
    /// (benches/, README).
    pub fn for_adapter() -> Self {
        if crate::device::adapter_is_cpu() {
            Self::CPU
        } else {
            Self::GPU
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    MatVec,
    MatMul,
}

#[derive(Debug)]
struct QKernel {
    op: Op,
    format: QFormat,
    matvec: MatVecShape,
}

impl KernelSource for QKernel {
    fn source(&self) -> SourceTemplate {
        // WGSL has no includes: the op and the format's helpers are concatenated.
        let op = match self.op {
            Op::MatVec => include_str!("../../../shaders/qmatvec.wgsl"),
            Op::MatMul => include_str!("../../../shaders/qmatmul.wgsl"),
        };
        let format = format_source(self.format);
        SourceTemplate::new(format!("{op}\n{format}"))
            .register("lanes", self.matvec.lanes.to_string())
            .register("rows", self.matvec.rows.to_string())
            .register(
                "workgroup",
                (self.matvec.lanes * self.matvec.rows).to_string(),
            )
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.op, self.format, self.matvec))
    }
}

/// The `dequant4` helper of a format, appended to the kernels that read quantised blocks (WGSL
/// has no includes).
pub(crate) fn format_source(format: QFormat) -> &'static str {
    match format {
        QFormat::Q4_0 => include_str!("../../../shaders/common/q4_0.wgsl"),
        QFormat::Q4_1 => include_str!("../../../shaders/common/q4_1.wgsl"),
        QFormat::Q8_0 => include_str!("../../../shaders/common/q8_0.wgsl"),
    }
}

/// `x · Wᵀ` on burn-wgpu with the WGSL kernels. `x: [m, k]` f32, `W: [n, k]`. `matvec` picks the
/// mat-vec kernel's thread layout (tests run both on any adapter).
pub fn q_matmul_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    matvec: MatVecShape,
) -> Tensor<WgpuCube<I, BT>, 2> {
    q_matmul_lora_wgpu(x, w, None, matvec)
}

/// `x · Wᵀ + scale · u · Bᵀ`: the quantised product with a LoRA adapter's up-projection fused
/// into its epilogue.
pub fn q_matmul_lora_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    lora: Option<&LoraEpilogue<WgpuCube<I, BT>>>,
    matvec: MatVecShape,
) -> Tensor<WgpuCube<I, BT>, 2> {
    let [m, k] = x.dims();
    assert_eq!(k, w.cols, "q_matmul: x has {k} columns, W has {}", w.cols);
    let n = w.rows;
    let x: CubeTensor<WgpuRuntime> = into_contiguous(x.into_primitive().tensor());
    assert_eq!(x.dtype, DType::F32, "q_matmul kernels take f32 activations");
    let qs = w.qs.clone().into_primitive();
    let scales = w.scales.clone().into_primitive();
    let out = wgsl::empty_f32(&x, Shape::new([m, n]));
    let (u, b, rank, scale) = match lora {
        Some(l) => {
            let r = l.u.dims()[1];
            assert_eq!(l.u.dims(), [m, r], "LoRA u must be [m, r]");
            assert_eq!(l.b.dims(), [n, r], "LoRA B must be [n, r]");
            (
                into_contiguous(l.u.clone().into_primitive().tensor()),
                into_contiguous(l.b.clone().into_primitive().tensor()),
                r,
                l.scale,
            )
        }
        None => (
            wgsl::empty_f32(&x, Shape::new([4])),
            wgsl::empty_f32(&x, Shape::new([4])),
            0,
            0.0,
        ),
    };
    let params = QMatmulParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        blocks_per_row: (k / 32) as u32,
        rank: rank as u32,
        scale,
        _pad: [0; 2],
    };
    let (op, cube_dim, count) = if m <= MATVEC_MAX_ROWS {
        let wg = matvec.lanes * matvec.rows;
        let count = CubeCount::Static(n.div_ceil(matvec.rows as usize) as u32, m as u32, 1);
        (Op::MatVec, CubeDim { x: wg, y: 1, z: 1 }, count)
    } else {
        let count = CubeCount::Static(n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1);
        (Op::MatMul, CubeDim { x: 16, y: 16, z: 1 }, count)
    };
    let kernel = QKernel {
        op,
        format: w.format,
        matvec,
    };
    wgsl::launch(
        kernel,
        cube_dim,
        count,
        &[&x, &qs, &scales, &out, &u, &b],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
