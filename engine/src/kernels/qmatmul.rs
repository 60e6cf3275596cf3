//! Launchers of `shaders/qmatvec.wgsl` (decode), `shaders/qmatmul.wgsl` (prefill on GPUs) and
//! `shaders/qmatmul_rows.wgsl` (prefill and batched decode on CPU adapters) on burn-wgpu,
//! through burn's template route (`KernelSource` → `SourceKernel`).

use burn::backend::wgpu::{
    BoolElement, CubeTensor, IntElement, KernelSource, SourceTemplate, WgpuRuntime, into_contiguous,
};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use cubecl::prelude::KernelId;
use cubecl::{CubeCount, CubeDim};

use super::wgpu::WgpuCube;
use super::{LoraEpilogue, QTensor, wgsl};
use crate::quant::QFormat;

/// Uniform parameters of the three kernels. Keep in sync with `Params` in
/// shaders/common/qmatmul_io.wgsl.
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

/// Rows of x up to which GPUs use the mat-vec kernel (it reads W once per row of x).
pub const MATVEC_MAX_ROWS: usize = 4;
/// Rows of x up to which CPU adapters use the row-block kernel. It costs about what the mat-vec
/// does per row, while the tiled kernel costs as much for 8 rows as for 64 (lavapipe: 4-5x
/// slower than the row-block kernel at 8 rows, 1.5x faster at 128).
pub const ROW_BLOCK_MAX_ROWS: usize = 32;

/// Which kernels suit the adapter, and their thread layout. The mat-vec kernel splits rows of W
/// over threads: `lanes` threads per row, `rows` rows per workgroup. Above one row of x, GPUs
/// run the mat-vec kernel up to [`MATVEC_MAX_ROWS`] and the tiled kernel beyond; CPU adapters
/// run the row-block kernel (`row_blocks`) up to [`ROW_BLOCK_MAX_ROWS`] (batched decode), and
/// the tiled kernel beyond (prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QShape {
    pub lanes: u32,
    pub rows: u32,
    pub row_blocks: bool,
}

impl QShape {
    pub const GPU: Self = Self {
        lanes: 16,
        rows: 8,
        row_blocks: false,
    };
    pub const CPU: Self = Self {
        lanes: 1,
        rows: 64,
        row_blocks: true,
    };

    /// GPUs: 16 lanes per row, so neighbouring threads read neighbouring blocks, and 64×64
    /// tiles in workgroup memory. CPU adapters (lavapipe): one thread per row, no reduction
    /// (measured 1.6-2x faster there), and no workgroup memory or barriers (benches/, README).
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
    /// qmatvec.wgsl
    Vector,
    /// qmatmul.wgsl
    Tiled,
    /// qmatmul_rows.wgsl
    RowBlocks,
}

#[derive(Debug)]
struct QKernel {
    op: Op,
    format: QFormat,
    shape: QShape,
}

impl KernelSource for QKernel {
    fn source(&self) -> SourceTemplate {
        // WGSL has no includes: the op, its parameters and bindings, and the format's helpers
        // are concatenated.
        let op = match self.op {
            Op::Vector => include_str!("../../../shaders/qmatvec.wgsl"),
            Op::Tiled => include_str!("../../../shaders/qmatmul.wgsl"),
            Op::RowBlocks => include_str!("../../../shaders/qmatmul_rows.wgsl"),
        };
        let io = include_str!("../../../shaders/common/qmatmul_io.wgsl");
        let format = format_source(self.format);
        SourceTemplate::new(format!("{op}\n{io}\n{format}"))
            .register("lanes", self.shape.lanes.to_string())
            .register("rows", self.shape.rows.to_string())
            .register(
                "workgroup",
                (self.shape.lanes * self.shape.rows).to_string(),
            )
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.op, self.format, self.shape))
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

/// `x · Wᵀ` on burn-wgpu with the WGSL kernels. `x: [m, k]` f32, `W: [n, k]`. `shape` picks the
/// kernels and their thread layout (tests run both on any adapter).
pub fn q_matmul_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    shape: QShape,
) -> Tensor<WgpuCube<I, BT>, 2> {
    q_matmul_lora_wgpu(x, w, None, shape)
}

/// `x · Wᵀ + scale · u · Bᵀ`: the quantised product with a LoRA adapter's up-projection fused
/// into its epilogue.
pub fn q_matmul_lora_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    lora: Option<&LoraEpilogue<WgpuCube<I, BT>>>,
    shape: QShape,
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
    let (op, cube_dim, count) = if m == 1 || (m <= MATVEC_MAX_ROWS && !shape.row_blocks) {
        let wg = shape.lanes * shape.rows;
        let count = CubeCount::Static(n.div_ceil(shape.rows as usize) as u32, m as u32, 1);
        (Op::Vector, CubeDim { x: wg, y: 1, z: 1 }, count)
    } else if shape.row_blocks && m <= ROW_BLOCK_MAX_ROWS {
        // Keep in sync with ROWS in shaders/qmatmul_rows.wgsl.
        let count = CubeCount::Static(n.div_ceil(64) as u32, m.div_ceil(8) as u32, 1);
        (Op::RowBlocks, CubeDim { x: 64, y: 1, z: 1 }, count)
    } else {
        let count = CubeCount::Static(n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1);
        (Op::Tiled, CubeDim { x: 16, y: 16, z: 1 }, count)
    };
    let kernel = QKernel {
        op,
        format: w.format,
        shape,
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
