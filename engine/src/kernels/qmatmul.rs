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
use super::wgsl::{self, shader};
use super::{LoraEpilogue, QTensor};
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

/// Rows of x up to which every adapter uses the mat-vec kernel (it reads W once per row of x).
/// On CPU adapters too: the row-block kernel does 8 rows' work for 2 (`codelsi measure --suite
/// kernels` on lavapipe: mat-vec layouts 2-3x faster than it at 2 and 4 rows; a decode step of
/// the default model at batch 2 took 1.74 s with it, 0.53 s without, at batch 4 1.62 → 1.15 s).
pub const MATVEC_MAX_ROWS: usize = 4;
/// Rows of x up to which CPU adapters use the row-block kernel. It costs about what the mat-vec
/// does per row, while the tiled kernel costs as much for 8 rows as for 64 (lavapipe: 4-5x
/// slower than the row-block kernel at 8 rows, 1.5x faster at 128).
pub const ROW_BLOCK_MAX_ROWS: usize = 32;

/// Which kernels suit the adapter, and their thread layout. The mat-vec kernel splits rows of W
/// over threads: `lanes` threads per row, `rows` rows per workgroup. Every adapter runs it up
/// to [`MATVEC_MAX_ROWS`] rows of x; beyond, GPUs run the tiled kernel, CPU adapters the
/// row-block kernel (`row_blocks`) up to [`ROW_BLOCK_MAX_ROWS`] (batched decode) and the tiled
/// kernel beyond (prefill).
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

/// One way to run `x · Wᵀ`: a kernel and its thread layout. [`QShape::plan`] picks one from the
/// rows of x; `codelsi measure --suite kernels` times every one ([`super::sweep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QPlan {
    /// qmatvec.wgsl: `lanes` threads per row of W (a power of two), `rows` rows of W per
    /// workgroup; W is read once per row of x.
    Vector { lanes: u32, rows: u32 },
    /// qmatmul_rows.wgsl: a thread per row of W and block of 8 rows of x.
    RowBlocks,
    /// qmatmul.wgsl: 64×64 tiles of y, 16×16 threads, in workgroup memory.
    Tiled,
}

/// Threads per workgroup every WebGPU adapter allows (`maxComputeInvocationsPerWorkgroup`).
pub const MAX_WORKGROUP: u32 = 256;

impl QPlan {
    /// The shader file (under shaders/).
    pub fn shader(self) -> &'static str {
        match self {
            Self::Vector { .. } => "qmatvec.wgsl",
            Self::RowBlocks => "qmatmul_rows.wgsl",
            Self::Tiled => "qmatmul.wgsl",
        }
    }

    /// Whether the kernel can run this layout: lanes a power of two (the reduction halves them)
    /// and the workgroup within [`MAX_WORKGROUP`].
    pub fn is_valid(self) -> bool {
        match self {
            Self::Vector { lanes, rows } => {
                lanes.is_power_of_two() && rows > 0 && lanes * rows <= MAX_WORKGROUP
            }
            Self::RowBlocks | Self::Tiled => true,
        }
    }

    /// The workgroup size and the number of workgroups for `m` rows of x and `n` rows of W.
    pub fn launch(self, m: usize, n: usize) -> (CubeDim, [u32; 3]) {
        match self {
            Self::Vector { lanes, rows } => (
                CubeDim {
                    x: lanes * rows,
                    y: 1,
                    z: 1,
                },
                [n.div_ceil(rows as usize) as u32, m as u32, 1],
            ),
            // Keep in sync with ROWS in shaders/qmatmul_rows.wgsl.
            Self::RowBlocks => (
                CubeDim { x: 64, y: 1, z: 1 },
                [n.div_ceil(64) as u32, m.div_ceil(8) as u32, 1],
            ),
            Self::Tiled => (
                CubeDim { x: 16, y: 16, z: 1 },
                [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
            ),
        }
    }
}

impl QShape {
    /// The kernel for `m` rows of x: the mat-vec kernel up to [`MATVEC_MAX_ROWS`]; beyond, the
    /// row-block kernel up to [`ROW_BLOCK_MAX_ROWS`] where `row_blocks`, else the tiled one.
    pub fn plan(self, m: usize) -> QPlan {
        let plan = self.plan_for(m);
        tracing::trace!(rows = m, ?plan, "quantised product");
        plan
    }

    fn plan_for(self, m: usize) -> QPlan {
        if m <= MATVEC_MAX_ROWS {
            QPlan::Vector {
                lanes: self.lanes,
                rows: self.rows,
            }
        } else if self.row_blocks && m <= ROW_BLOCK_MAX_ROWS {
            QPlan::RowBlocks
        } else {
            QPlan::Tiled
        }
    }
}

#[derive(Debug)]
struct QKernel {
    plan: QPlan,
    format: QFormat,
}

impl KernelSource for QKernel {
    fn source(&self) -> SourceTemplate {
        // WGSL has no includes: the op, its parameters and bindings, and the format's helpers
        // are concatenated.
        let op = match self.plan {
            QPlan::Vector { .. } => shader!("qmatvec"),
            QPlan::Tiled => shader!("qmatmul"),
            QPlan::RowBlocks => shader!("qmatmul_rows"),
        };
        let io = shader!("common/qmatmul_io");
        let format = format_source(self.format);
        let template = SourceTemplate::new(format!("{op}\n{io}\n{format}"));
        match self.plan {
            QPlan::Vector { lanes, rows } => template
                .register("lanes", lanes.to_string())
                .register("rows", rows.to_string())
                .register("workgroup", (lanes * rows).to_string()),
            QPlan::RowBlocks | QPlan::Tiled => template,
        }
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.plan, self.format))
    }
}

/// The helpers of a format (`unit_scales`, `dequant4s`, `dequant4`, with the pieces Q5_0/Q5_1
/// and Q4_K/Q5_K share), appended to the kernels that read quantised blocks (WGSL has no
/// includes).
pub(crate) fn format_source(format: QFormat) -> &'static str {
    match format {
        QFormat::Q4_0 => shader!("common/q4_0"),
        QFormat::Q4_1 => shader!("common/q4_1"),
        QFormat::Q5_0 => shader!("common/q5_0", "common/q5_codes"),
        QFormat::Q5_1 => shader!("common/q5_1", "common/q5_codes"),
        QFormat::Q8_0 => shader!("common/q8_0"),
        QFormat::Q4K => shader!("common/q4_k", "common/k_scales"),
        QFormat::Q5K => shader!("common/q5_k", "common/k_scales"),
        QFormat::Q6K => shader!("common/q6_k"),
        QFormat::F16 => shader!("common/f16"),
        QFormat::Bf16 => shader!("common/bf16"),
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
/// into its epilogue, by the kernel `shape` picks for the rows of x.
pub fn q_matmul_lora_wgpu<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    lora: Option<&LoraEpilogue<WgpuCube<I, BT>>>,
    shape: QShape,
) -> Tensor<WgpuCube<I, BT>, 2> {
    let plan = shape.plan(x.dims()[0]);
    q_matmul_planned(x, w, lora, plan)
}

/// [`q_matmul_lora_wgpu`] by the kernel and layout of `plan` (which must be valid).
pub fn q_matmul_planned<I: IntElement, BT: BoolElement>(
    x: Tensor<WgpuCube<I, BT>, 2>,
    w: &QTensor<WgpuCube<I, BT>>,
    lora: Option<&LoraEpilogue<WgpuCube<I, BT>>>,
    plan: QPlan,
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
    assert!(plan.is_valid(), "q_matmul: invalid kernel layout {plan:?}");
    let (cube_dim, [gx, gy, gz]) = plan.launch(m, n);
    let kernel = QKernel {
        plan,
        format: w.format,
    };
    wgsl::launch(
        kernel,
        cube_dim,
        CubeCount::Static(gx, gy, gz),
        &[&x, &qs, &scales, &out, &u, &b],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
