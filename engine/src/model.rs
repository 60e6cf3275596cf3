//! Loading a model from what a user points at: a GGUF file, an HF directory, or `default`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::device;
use crate::error::{Error, Result};
use crate::fetch::{FetchStep, ensure_model, is_catalogue_name};
use crate::io::gguf::GgufFile;
use crate::io::safetensors::SafetensorsWeights;
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::config::Config;
use crate::models::llama::Llama;
use crate::quant::QFormat;

/// A backend the engine can open a device of: the GPU path (wgpu), the CPU path (burn-flex), and
/// either under autodiff for training. Commands are generic over it and pick one at run time.
pub trait OpenDevice: KernelBackend {
    /// The device to load onto, and what it is (for reports).
    fn open() -> Result<(Self::Device, device::GpuInfo)>;

    /// Device `index` of this backend (`cuda:1`), for data-parallel replicas. A backend with
    /// one device opens only index 0.
    fn open_index(index: usize) -> Result<(Self::Device, device::GpuInfo)> {
        match index {
            0 => Self::open(),
            _ => Err(Error::Setting(format!(
                "device {index}: this backend opens one device per process (the wgpu path \
                 uses the first adapter; several wgpu adapters are not supported yet)"
            ))),
        }
    }
}

impl OpenDevice for device::Wgpu {
    fn open() -> Result<(Self::Device, device::GpuInfo)> {
        device::init_wgpu()
    }
}

impl OpenDevice for burn::backend::Flex {
    fn open() -> Result<(Self::Device, device::GpuInfo)> {
        Ok((Default::default(), device::cpu_info()))
    }

    /// The CPU is one device: every index is it (logical replicas, which share its cores).
    fn open_index(_index: usize) -> Result<(Self::Device, device::GpuInfo)> {
        Self::open()
    }
}

#[cfg(feature = "cuda")]
impl OpenDevice for burn::backend::Cuda {
    fn open() -> Result<(Self::Device, device::GpuInfo)> {
        Self::open_index(device::cuda_index())
    }

    fn open_index(index: usize) -> Result<(Self::Device, device::GpuInfo)> {
        device::open_cuda(index)
    }
}

impl<B: OpenDevice> OpenDevice for burn::backend::Autodiff<B> {
    fn open() -> Result<(Self::Device, device::GpuInfo)> {
        B::open()
    }

    fn open_index(index: usize) -> Result<(Self::Device, device::GpuInfo)> {
        B::open_index(index)
    }
}

/// What a loaded model is, for reports and the app.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub format: &'static str,
    pub architecture: &'static str,
    pub parameters: usize,
    /// Tensor types and their counts as stored in the file, e.g. `Q4_1 ×210`.
    pub quantization: String,
    pub context_length: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Bytes of weights in device memory.
    pub device_bytes: usize,
    /// Bytes of the token embedding table, which stays on the host in its file format.
    pub host_bytes: usize,
    /// Bytes of tensor data in the file (GGUF; 0 for safetensors, which hold f32/f16 the
    /// device does not keep).
    pub file_tensor_bytes: usize,
}

impl ModelInfo {
    /// The model file's (or folder's) name: what an adapter records as its base model.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The model's name where one is asked for (the server's model id): the catalogue's name
    /// when the file is a catalogue model's, else the file's name less `.gguf` (an HF folder's
    /// name as it is).
    pub fn id(&self) -> String {
        let file = self.file_name();
        let listed = crate::fetch::catalogue()
            .ok()
            .and_then(|all| all.into_iter().find(|m| m.file == file));
        match listed {
            Some(m) => m.name,
            None => file.strip_suffix(".gguf").unwrap_or(&file).to_string(),
        }
    }
}

pub struct LoadedModel<B: KernelBackend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

/// Progress events while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadEvent {
    Fetch(FetchStep),
    /// Tensors uploaded so far (`done`, `total` layers + embeddings + head).
    Upload {
        done: usize,
        total: usize,
    },
}

/// Turn a `--model` argument into a path: a catalogue name (or `default`) fetches that model
/// on first use; anything else is a path.
pub fn resolve_model(spec: &str, progress: &mut dyn FnMut(LoadEvent)) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if is_catalogue_name(spec) && !p.exists() {
        return ensure_model(spec, &mut |s| progress(LoadEvent::Fetch(s)));
    }
    if !p.exists() {
        return Err(Error::io(
            &p,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    Ok(p)
}

fn type_census(gguf: &GgufFile) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &gguf.tensors {
        *counts.entry(t.ty.name()).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
    v.iter()
        .map(|(n, c)| format!("{n} ×{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The frozen base's type on the device, as `--base-dtype` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseDtype {
    /// Every linear weight widened to bf16 once, at load.
    Bf16,
    /// Every linear weight widened to f16 once, at load.
    F16,
    /// The file's quantised blocks kept as they are (QLoRA-style).
    Quantized,
}

impl BaseDtype {
    pub const ALL: [Self; 3] = [Self::Bf16, Self::F16, Self::Quantized];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Quantized => "quantized",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The format [`load_model`] takes for this base and `quantize` (`--quantize`) on
    /// `device` (`None`: the file's blocks). Neither named: the backend's
    /// [`KernelBackend::default_base`]. A 16-bit base with a quantised `quantize`, or a quantised
    /// base with a 16-bit one, is refused.
    pub fn format<B: KernelBackend>(
        base: Option<Self>,
        quantize: Option<QFormat>,
        device: &B::Device,
    ) -> Result<Option<QFormat>> {
        Ok(match (base, quantize) {
            (None, None) => B::default_base(device),
            (None, q) => q,
            (Some(Self::Quantized), None) => None,
            (Some(Self::Quantized), Some(q)) if !q.is_half() => Some(q),
            (Some(Self::Bf16), None) => Some(QFormat::Bf16),
            (Some(Self::F16), None) => Some(QFormat::F16),
            (Some(base), Some(q)) => {
                return Err(Error::Setting(format!(
                    "--base-dtype {} with --quantize {}: a 16-bit base holds every weight in 16 \
                     bits, and --quantize applies to a quantized base; give one of them",
                    base.name(),
                    q.ggml().name().to_lowercase(),
                )));
            }
        })
    }
}

/// Load a model and its tokenizer onto `device`. `quantize`: the format of the base's linear
/// weights (see [`Linear::load`](crate::models::Linear::load) and [`BaseDtype::format`]).
pub fn load_model<B: KernelBackend>(
    path: &Path,
    quantize: Option<QFormat>,
    device: &B::Device,
    progress: &mut dyn FnMut(LoadEvent),
) -> Result<LoadedModel<B>> {
    let started = std::time::Instant::now();
    let mut upload = |done, total| progress(LoadEvent::Upload { done, total });
    if path.is_dir() {
        let config = Config::from_hf_json(&path.join("config.json"))?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        let weights = SafetensorsWeights::open(path)?;
        let quantization = match quantize {
            Some(q) => format!("{} → {q:?} at load", weights.dtypes()),
            None => format!("{} (from safetensors)", weights.dtypes()),
        };
        let model = Llama::load(config.clone(), &weights, quantize, device, &mut upload)?;
        let info = info(path, "HF safetensors", &config, quantization, &model, 0);
        uploaded::<B>(device, &info)?;
        tracing::debug!(path = %path.display(), seconds = started.elapsed().as_secs_f64(),
            device_bytes = info.device_bytes, backend = B::kernels_impl(), "loaded");
        return Ok(LoadedModel {
            model,
            tokenizer,
            info,
        });
    }
    let gguf = GgufFile::open(path)?;
    let config = Config::from_gguf(&gguf)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let weights = config.gguf_weights(&gguf);
    let model = Llama::load(config.clone(), &weights, quantize, device, &mut upload)?;
    let file_bytes = gguf.tensors.iter().map(|t| t.len).sum();
    let quantization = match quantize {
        // Every linear weight widened (`--base-dtype`).
        Some(q) if q.is_half() => format!("{} → {q:?} at load", type_census(&gguf)),
        _ => type_census(&gguf),
    };
    let info = info(path, "GGUF", &config, quantization, &model, file_bytes);
    uploaded::<B>(device, &info)?;
    tracing::debug!(path = %path.display(), seconds = started.elapsed().as_secs_f64(),
        device_bytes = info.device_bytes, types = %info.quantization, backend = B::kernels_impl(),
        "loaded");
    Ok(LoadedModel {
        model,
        tokenizer,
        info,
    })
}

/// Wait for the uploads to finish, and fail if the device could not hold them.
fn uploaded<B: KernelBackend>(device: &B::Device, info: &ModelInfo) -> Result<()> {
    // An error of the sync itself surfaces as a device fault too.
    let synced = B::sync(device);
    crate::device::check_device(|| {
        let limit = crate::device::max_binding_bytes()
            .map(|b| format!(", largest buffer {:.0} MiB", b as f64 / (1u64 << 20) as f64))
            .unwrap_or_default();
        format!(
            "Loading {} ({:.1} MB of weights for the device{limit})",
            info.file_name(),
            info.device_bytes as f64 / 1e6
        )
    })?;
    synced.map_err(|e| Error::DeviceFault {
        fault: format!("{e:?}"),
        context: format!("Loading {}", info.file_name()),
    })
}

fn info<B: KernelBackend>(
    path: &Path,
    format: &'static str,
    c: &Config,
    quantization: String,
    m: &Llama<B>,
    file_tensor_bytes: usize,
) -> ModelInfo {
    ModelInfo {
        path: path.into(),
        format,
        architecture: c.architecture.name(),
        parameters: c.num_parameters(),
        quantization,
        context_length: c.max_position_embeddings,
        layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        vocab_size: c.vocab_size,
        device_bytes: m.device_bytes(),
        host_bytes: m.embed_tokens.host_bytes(),
        file_tensor_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalogue model's file gets its catalogue name (not `qwen2.5-coder-1`, what a file
    /// stem makes of the name), other files their name less `.gguf`, folders theirs.
    #[test]
    fn ids_are_catalogue_names_or_file_names() {
        let id = |path: &str| {
            ModelInfo {
                path: path.into(),
                format: "gguf",
                architecture: "llama",
                parameters: 0,
                quantization: String::new(),
                context_length: 0,
                layers: 0,
                hidden_size: 0,
                vocab_size: 0,
                device_bytes: 0,
                host_bytes: 0,
                file_tensor_bytes: 0,
            }
            .id()
        };
        assert_eq!(
            id("/cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
            "qwen2.5-coder-1.5b-instruct"
        );
        assert_eq!(
            id("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "smollm2-135m-instruct"
        );
        assert_eq!(id("/m/my.model.v2.gguf"), "my.model.v2");
        assert_eq!(id("/m/my-hf-model"), "my-hf-model");
    }
}
