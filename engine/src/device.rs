//! Opening the wgpu device burn runs on, and what the user should know about it.

use std::sync::OnceLock;

use burn::backend::wgpu::{
    RuntimeOptions, WgpuDevice, WgpuRuntime, WgpuSetup, graphics::AutoGraphicsApi, init_setup,
};

use crate::error::{Error, Result};

/// The engine's wgpu backend: burn's CubeCL backend on wgpu, f32 floats, i32 ints.
pub type Wgpu = burn::backend::wgpu::CubeBackend<WgpuRuntime, f32, i32, u32>;

/// The adapter burn-wgpu runs on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, {})",
            self.name, self.backend, self.device_type, self.driver
        )
    }
}

static GPU: OnceLock<std::result::Result<GpuInfo, String>> = OnceLock::new();
/// The wgpu instance, adapter, device and queue burn runs on, for a renderer to share.
static SETUP: OnceLock<WgpuSetup> = OnceLock::new();

/// The wgpu objects of the engine's device (after [`init_wgpu`] succeeded): the desktop app
/// draws with the same device instead of opening a second one.
pub fn shared_setup() -> Option<WgpuSetup> {
    SETUP.get().cloned()
}

/// Open the default wgpu adapter once per process (later calls return the same one).
pub fn init_wgpu() -> Result<(WgpuDevice, GpuInfo)> {
    let device = WgpuDevice::DefaultDevice;
    let info = GPU.get_or_init(|| {
        // wgpu/cubecl panic when no adapter exists; turn that into an error the user can act on.
        // The default hook would first print the panic and a backtrace, which reads as a crash
        // where `--device auto` then goes on on the CPU, so it is silenced for this call. The
        // hook is global: a panic on another thread in that moment would go unprinted (its
        // thread still fails), which is the lesser evil at startup, when nothing else runs.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let setup = std::panic::catch_unwind(|| {
            init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, RuntimeOptions::default())
        });
        std::panic::set_hook(hook);
        match setup {
            Ok(setup) => {
                let i = setup.adapter.get_info();
                let _ = SETUP.set(setup.clone());
                Ok(GpuInfo {
                    name: i.name,
                    backend: format!("{:?}", i.backend),
                    device_type: format!("{:?}", i.device_type),
                    driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
                })
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".into());
                Err(format!(
                    "{msg}. Install a Vulkan driver (on Debian/Ubuntu without a GPU: \
                     `apt-get install mesa-vulkan-drivers libvulkan1` for the software one)"
                ))
            }
        }
    });
    match info {
        Ok(i) => Ok((device, i.clone())),
        Err(e) => Err(Error::NoAdapter(e.clone())),
    }
}

/// The largest storage buffer binding the opened adapter allows (`None` before [`init_wgpu`]
/// succeeded): every tensor a kernel reads must fit in one.
pub fn max_binding_bytes() -> Option<u64> {
    SETUP
        .get()
        .map(|s| s.device.limits().max_storage_buffer_binding_size as u64)
}

/// Whether the opened adapter is a CPU implementation (lavapipe, SwiftShader, WARP): kernels pick
/// shapes that suit SIMD lanes on a few cores rather than thousands of GPU threads.
pub fn adapter_is_cpu() -> bool {
    matches!(GPU.get(), Some(Ok(info)) if info.device_type == "Cpu")
}

/// A backend the engine can open a device of: the GPU path (wgpu), the CPU path (burn-flex), and
/// either under autodiff for training. Commands are generic over it and pick one at run time.
pub trait OpenDevice: crate::kernels::KernelBackend {
    /// The device to load onto, and what it is (for reports).
    fn open() -> Result<(Self::Device, GpuInfo)>;
}

impl OpenDevice for Wgpu {
    fn open() -> Result<(Self::Device, GpuInfo)> {
        init_wgpu()
    }
}

impl OpenDevice for burn::backend::Flex {
    fn open() -> Result<(Self::Device, GpuInfo)> {
        Ok((Default::default(), cpu_info()))
    }
}

impl<B: OpenDevice> OpenDevice for burn::backend::Autodiff<B> {
    fn open() -> Result<(Self::Device, GpuInfo)> {
        B::open()
    }
}

/// [`GpuInfo::backend`] of the CPU path.
const CPU_BACKEND: &str = "burn-flex";

/// Keep freed buffers in the process for reuse, for the CPU path. glibc's malloc serves each
/// allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as such blocks are
/// freed) with pages of its own and unmaps them on free, so every op that makes a large tensor
/// pays for fresh zeroed pages: the kernel clearing pages took 18% of a LoRA training step on
/// the CPU path (perf, 2-core VM). With the threshold at its 32 MiB ceiling and trimming off,
/// buffers are reused: the same two settings through `GLIBC_TUNABLES` took training at seq 256
/// from 52.6 to 62.4 tok/s (one run each, 2-core AMD EPYC VM, an evaluation running beside
/// them), the peak memory staying 1.63 GB. Process-wide, so the binaries call it first thing;
/// nothing off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets malloc's tunables, and takes its lock to do so.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The CPU as [`GpuInfo`] describes a device: burn-flex runs on every core (rayon).
pub fn cpu_info() -> GpuInfo {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    GpuInfo {
        name: format!("CPU, {threads} threads"),
        backend: CPU_BACKEND.into(),
        device_type: "Cpu".into(),
        driver: format!("{} {}", std::env::consts::ARCH, std::env::consts::OS),
    }
}

impl GpuInfo {
    /// The engine behind this device, for reports: `burn-flex` on the CPU path, else
    /// `wgpu/<graphics API>`.
    pub fn engine(&self) -> String {
        if self.backend == CPU_BACKEND {
            self.backend.clone()
        } else {
            format!("wgpu/{}", self.backend)
        }
    }
}
