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
                watch_faults();
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
                let msg = panic_message(panic.as_ref());
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

/// What a panic said (its `String` or `&str` payload).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The CUDA device `--device cuda:N` chose (0 until set).
static CUDA_INDEX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Choose the CUDA device the CUDA backend opens by default (`--device cuda:N`).
pub fn set_cuda_index(index: usize) {
    CUDA_INDEX.store(index, std::sync::atomic::Ordering::Relaxed);
}

/// The CUDA device chosen with [`set_cuda_index`].
pub fn cuda_index() -> usize {
    CUDA_INDEX.load(std::sync::atomic::Ordering::Relaxed)
}

/// Open CUDA device `index` (burn-cuda), checked with a first allocation: without a driver or
/// with no such device, cubecl panics, which becomes an error the user can act on.
#[cfg(feature = "cuda")]
pub fn open_cuda(index: usize) -> Result<(burn::backend::cuda::CudaDevice, GpuInfo)> {
    use burn::tensor::Tensor;
    let device = burn::backend::cuda::CudaDevice::new(index);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        Tensor::<burn::backend::Cuda, 1>::zeros([1], &device)
            .into_data()
            .as_bytes()
            .len()
    });
    std::panic::set_hook(hook);
    match probe {
        Ok(_) => Ok((
            device,
            GpuInfo {
                name: format!("cuda:{index}"),
                backend: "CUDA".into(),
                device_type: "DiscreteGpu".into(),
                driver: "burn-cuda (CubeCL)".into(),
            },
        )),
        Err(panic) => {
            let msg = panic_message(panic.as_ref());
            Err(Error::NoAdapter(format!(
                "CUDA device {index} could not be opened: {}. It needs an NVIDIA GPU and its \
                 driver (libcuda)",
                msg.lines().next().unwrap_or_default()
            )))
        }
    }
}

/// The first failure of a device thread since the process started (see [`watch_faults`]).
static FAULT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Catch failures of burn's device threads. cubecl runs each wgpu device on a thread of its own
/// (named `DSD-…`) and an allocation that does not fit panics there: the caller's thread goes
/// on reading zeros. The panic hook records such a panic (without printing it) for
/// [`check_device`] to turn into [`Error::DeviceFault`]; panics of other threads print as before.
fn watch_faults() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let device_thread = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("DSD-"));
            if !device_thread {
                return previous(info);
            }
            let msg = panic_message(info.payload());
            // cubecl's messages end with a backtrace note; the first line says what failed.
            let first = msg.lines().next().unwrap_or_default();
            let first = first
                .strip_prefix("called `Result::unwrap()` on an `Err` value: ")
                .unwrap_or(first)
                .to_string();
            let mut fault = FAULT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fault.get_or_insert(first);
        }));
    });
}

/// `Err(DeviceFault)` when a device thread failed since the process started: results read
/// from the device since then are not to be trusted. `context` says what was being done.
pub fn check_device(context: impl FnOnce() -> String) -> Result<()> {
    let fault = FAULT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match fault {
        Some(fault) => Err(Error::DeviceFault {
            fault,
            context: context(),
        }),
        None => Ok(()),
    }
}

/// The largest storage buffer binding the opened adapter allows (`None` before [`init_wgpu`]
/// succeeded): every tensor a kernel reads must fit in one.
pub fn max_binding_bytes() -> Option<u64> {
    SETUP
        .get()
        .map(|s| s.device.limits().max_storage_buffer_binding_size)
}

/// Whether the opened adapter is a CPU implementation (lavapipe, SwiftShader, WARP): kernels pick
/// shapes that suit SIMD lanes on a few cores rather than thousands of GPU threads.
pub fn adapter_is_cpu() -> bool {
    matches!(GPU.get(), Some(Ok(info)) if info.device_type == "Cpu")
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
    let threads = rayon::current_num_threads();
    GpuInfo {
        name: format!("CPU, {threads} threads"),
        backend: CPU_BACKEND.into(),
        device_type: "Cpu".into(),
        driver: format!("{} {}", std::env::consts::ARCH, std::env::consts::OS),
    }
}

impl GpuInfo {
    /// The engine behind this device, for reports: `burn-flex` on the CPU path, `burn-cuda` on
    /// CUDA, else `wgpu/<graphics API>`.
    pub fn engine(&self) -> String {
        if self.backend == CPU_BACKEND {
            self.backend.clone()
        } else if self.backend == "CUDA" {
            "burn-cuda".into()
        } else {
            format!("wgpu/{}", self.backend)
        }
    }
}

/// Sizes the thread pool the CPU path computes on (rayon's global pool, which burn-flex's gemm
/// and our kernels share): `threads`, or one per physical core (a second hardware thread of a
/// core adds little to memory-bound products and slows the compute-bound ones). Takes effect
/// before the pool's first use; returns the pool's size.
pub fn set_cpu_threads(threads: Option<usize>) -> usize {
    let n = threads.unwrap_or_else(num_cpus::get_physical).max(1);
    // An error means the pool already started (a test harness, an earlier call): it keeps its
    // size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    let n = rayon::current_num_threads();
    tracing::debug!(threads = n, "the CPU path's thread pool");
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Tensor, TensorData};

    /// A buffer one element over the device's largest binding (128 MiB on lavapipe) fails in burn's device thread; `check_device` turns
    /// that into a typed error instead of the zeros the caller reads. The fault is sticky for the
    /// process, so this is the engine's only unit test on the wgpu device.
    #[test]
    fn a_failed_allocation_is_a_device_fault() {
        let Ok((device, _)) = init_wgpu() else {
            return; // no adapter at all: `NoAdapter` is tested elsewhere
        };
        check_device(String::new).unwrap();
        let limit = max_binding_bytes().unwrap_or(u64::MAX);
        if limit > 1 << 30 {
            return; // the tensor would take as much host memory: lavapipe's case is the test
        }
        let n = (limit / 4 + 1) as usize;
        let t = Tensor::<Wgpu, 1>::from_data(TensorData::new(vec![1f32; n], [n]), &device);
        let _ = (t * 2.0).slice(0..4).into_data();
        match check_device(|| "doubling a big tensor".into()) {
            Err(Error::DeviceFault { fault, context }) => {
                assert!(fault.contains("allocate"), "{fault}");
                assert_eq!(context, "doubling a big tensor");
            }
            other => panic!("expected a device fault, got {other:?}"),
        }
    }
}
