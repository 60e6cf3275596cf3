//! Launching a hand-written WGSL kernel on burn-wgpu tensors: burn's template route
//! (`KernelSource` → `SourceKernel`), buffers in binding order, then the params struct as the
//! uniform binding after them.

use burn::backend::wgpu::{
    BoolElement, CubeTensor, IntElement, KernelSource, SourceKernel, SourceTemplate, WgpuRuntime,
    into_contiguous,
};
use burn::tensor::{DType, Shape, Tensor};
use cubecl::prelude::KernelId;
use cubecl::server::{KernelArguments, MetadataBindingInfo};
use cubecl::{CubeCount, CubeDim};

use super::wgpu::WgpuCube;

/// The source of `shaders/NAME.wgsl`, or of several concatenated in order (WGSL has no includes,
/// so a kernel's helpers are appended to it), embedded at compile time.
macro_rules! shader {
    ($($name:literal),+ $(,)?) => {
        concat!($(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders/", $name, ".wgsl"))),+)
    };
}
pub(crate) use shader;

/// A kernel whose WGSL source has no template parameters.
#[derive(Debug)]
pub struct Plain(pub &'static str);

impl KernelSource for Plain {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(self.0)
    }
    fn id(&self) -> KernelId {
        // The source is a static string, unique per kernel.
        KernelId::new::<Self>().info(self.0.as_ptr() as usize)
    }
}

/// A new contiguous f32 tensor on `like`'s device.
pub fn empty_f32(like: &CubeTensor<WgpuRuntime>, shape: Shape) -> CubeTensor<WgpuRuntime> {
    let bytes = shape.num_elements() * size_of::<f32>();
    let handle = like.client.empty(bytes);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        DType::F32,
    )
}

/// Launch `kernel` with `buffers` at bindings 0.. and `params` as the uniform binding after them.
/// `params` is a `#[repr(C)]` Pod struct mirroring the shader's; WGSL rounds uniform structs up
/// to 16 bytes, so its size must be a multiple of 16 for the buffer to cover the struct.
pub fn launch<K: KernelSource, P: bytemuck::Pod>(
    kernel: K,
    cube_dim: CubeDim,
    count: CubeCount,
    buffers: &[&CubeTensor<WgpuRuntime>],
    params: P,
) {
    debug_assert_eq!(
        size_of::<P>() % 16,
        0,
        "uniform params must fill whole 16-byte rows"
    );
    let client = buffers[0].client.clone();
    let info: Vec<u64> = bytemuck::pod_collect_to_vec(&[params]);
    let bindings = buffers.iter().map(|t| t.handle.clone().binding()).collect();
    client.launch(
        Box::new(SourceKernel::new(kernel, cube_dim)),
        count,
        KernelArguments::new()
            .with_buffers(bindings)
            .with_info(MetadataBindingInfo::custom(info)),
    );
}

/// Workgroups for `n` independent items (rows), spread over x and y so no dimension exceeds
/// WebGPU's 65535. Kernels recover the item as `wg.x + wg.y * 65535`.
pub fn grid_for(n: usize) -> CubeCount {
    const MAX: usize = 65_535;
    CubeCount::Static(n.min(MAX) as u32, n.div_ceil(MAX) as u32, 1)
}

/// `t` as a contiguous f32 device tensor, what the kernels bind. The LoRA kernels run in f32:
/// their callers widen f16 activations first.
pub fn float_input<I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<WgpuCube<I, BT>, D>,
) -> CubeTensor<WgpuRuntime> {
    let t = into_contiguous(t.into_primitive().tensor());
    assert_eq!(t.dtype, DType::F32, "the LoRA kernels take f32 tensors");
    t
}
