//! Dropout's mask on burn-wgpu (`shaders/dropout_mask.wgsl`): the bits of
//! [`cpu::dropout_mask`](super::cpu::dropout_mask), made on the device instead of uploaded.

use burn::backend::wgpu::{BoolElement, CubeTensor, IntElement, WgpuDevice, WgpuRuntime};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use cubecl::CubeDim;

use super::cpu::dropout_threshold;
use super::wgpu::WgpuCube;
use super::wgsl::{self, Plain, shader};

/// Keep in sync with `Params` in shaders/dropout_mask.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutParams {
    len: u32,
    threshold: u32,
    seed_lo: u32,
    seed_hi: u32,
    value: f32,
    _pad: [u32; 3],
}

/// # Shapes
/// → `dims`
pub fn dropout_mask_wgpu<I: IntElement, BT: BoolElement>(
    dims: [usize; 2],
    keep: f64,
    seed: u64,
    device: &WgpuDevice,
) -> Tensor<WgpuCube<I, BT>, 2> {
    let len = dims[0] * dims[1];
    let client = <WgpuRuntime as cubecl::Runtime>::client(device);
    let handle = client.empty(len.max(1) * size_of::<f32>());
    let mask =
        CubeTensor::new_contiguous(client, device.clone(), Shape::new(dims), handle, DType::F32);
    if len == 0 {
        return Tensor::from_primitive(TensorPrimitive::Float(mask));
    }
    let params = DropoutParams {
        // The caller keeps `len` under 2^31 (`WgpuCube::dropout_mask`).
        len: len as u32,
        threshold: dropout_threshold(keep) as u32,
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        value: (1.0 / keep) as f32,
        _pad: [0; 3],
    };
    const WG: usize = 64;
    wgsl::launch(
        Plain(shader!("dropout_mask")),
        CubeDim {
            x: WG as u32,
            y: 1,
            z: 1,
        },
        wgsl::grid_for(len.div_ceil(4).div_ceil(WG)),
        &[&mask],
        params,
    );
    Tensor::from_primitive(TensorPrimitive::Float(mask))
}
