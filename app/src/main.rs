//! `codelsi`: the command line. With no subcommand it opens the desktop app; with one it works
//! headless. Printing belongs here, never in the engine.

mod cli;
mod gui;
mod serve;

use clap::{Parser, Subcommand};
use codelsi_engine::device::init_wgpu;

use cli::{eval, generate, import, measure, merge, models, predict, serve as serve_cmd, train};

#[derive(Parser)]
#[command(
    name = "codelsi",
    version,
    about = "Turn an open code model into your code model, on your own hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Where the engine runs: `gpu` (wgpu: Vulkan, Metal, DX12), `cpu` (burn-flex on every
    /// core), `cuda` or `cuda:N` (burn-cuda, in a build with the `cuda` feature), or `auto`:
    /// the GPU when wgpu finds a hardware one, else the CPU (a software Vulkan such as
    /// lavapipe runs the model several times slower than the CPU path).
    #[arg(long, global = true, value_parser = DeviceChoice::parse, default_value = "auto")]
    device: DeviceChoice,
    /// Threads the CPU path computes on (the import and the sandbox runs too); default: one per
    /// physical core.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// With no subcommand: the model the desktop app loads at start (`default`, a GGUF file or
    /// an HF folder; `none` to pick one in the app).
    #[arg(long, default_value = "default")]
    model: String,
    /// Show the engine's debug logs (kernel plans, load timings, batch sizes); twice for trace.
    /// `RUST_LOG` (e.g. `RUST_LOG=codelsi_engine=trace`) chooses them finely.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Logs on stderr: what `RUST_LOG` asks for, else the engine's debug (`-v`) or trace (`-vv`)
/// events, else nothing.
fn init_logs(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match (std::env::var("RUST_LOG"), verbose) {
        (Ok(spec), _) => EnvFilter::new(spec),
        (Err(_), 0) => return,
        (Err(_), 1) => EnvFilter::new("codelsi_engine=debug"),
        (Err(_), _) => EnvFilter::new("codelsi_engine=trace"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" to every user without a
/// login session (ssh, containers, CI). They only want a private folder: give them one.
fn private_runtime_dir() {
    #[cfg(unix)]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::DirBuilderExt;
        // SAFETY: `geteuid` has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let dir = std::env::temp_dir().join(format!("codelsi-runtime-{uid}"));
        let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        let ours = std::fs::metadata(&dir).is_ok_and(|m| {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o077 == 0
        });
        if (made.is_ok() || dir.is_dir()) && ours {
            // SAFETY: called first thing in `main`, before any thread that reads the
            // environment is started.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it as it comes.
    Generate(generate::GenerateArgs),
    /// Measure pass@k on a suite (HumanEval-TS, MBPP-TS, or yours), programs run sandboxed.
    Eval(eval::EvalArgs),
    /// Turn a repository (or an instruction file) into a training dataset, on this machine.
    Import(import::ImportArgs),
    /// Fine-tune a LoRA adapter on instruction data (JSONL, Alpaca or chat form).
    Train(Box<train::TrainArgs>),
    /// Fold LoRA adapters into the base model and write it (HF safetensors f16, or GGUF).
    Merge(merge::MergeArgs),
    /// Build a regression dataset: run programs in the sandbox on scaled inputs and record
    /// their latency and peak memory.
    Measure(measure::MeasureArgs),
    /// Predict the cost of code with a regression adapter, or score one on its held-out split.
    Predict(predict::PredictArgs),
    /// Serve the model and its adapters over an OpenAI-compatible HTTP API (for editors).
    Serve(serve_cmd::ServeArgs),
    /// Manage models: list the catalogue, fetch a model, show a model's details.
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl DeviceChoice {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("`{s}` is not one of auto, gpu, cpu, cuda, cuda:N")),
            },
        }
    }
}

/// The engine a command (or the app) runs on, once `--device auto` is resolved.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
enum Engine {
    #[default]
    Gpu,
    Cpu,
    /// burn-cuda (builds with the `cuda` feature).
    #[cfg(feature = "cuda")]
    Cuda,
}

/// `--device cuda` in a build without CUDA: said before anything loads.
fn check_device_choice(choice: DeviceChoice) -> anyhow::Result<()> {
    match choice {
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => anyhow::bail!(
            "--device cuda: this codelsi was built without CUDA; build it with \
             `cargo build --release -p codelsi --features cuda` (NVIDIA driver needed, no toolkit)"
        ),
        _ => Ok(()),
    }
}

static DEVICE: std::sync::OnceLock<DeviceChoice> = std::sync::OnceLock::new();

/// The engine of this process: `--device`, with `auto` resolved by opening wgpu once.
fn engine() -> Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    *ENGINE.get_or_init(
        || match DEVICE.get().copied().unwrap_or(DeviceChoice::Auto) {
            DeviceChoice::Gpu => Engine::Gpu,
            DeviceChoice::Cpu => Engine::Cpu,
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(_) => Engine::Cuda,
            // Refused in `main` before any command runs.
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => Engine::Gpu,
            DeviceChoice::Auto => match init_wgpu() {
                Ok((_, info)) if info.device_type != "Cpu" => Engine::Gpu,
                _ => Engine::Cpu,
            },
        },
    )
}

/// `$f::<B>(args…)` with `B` the backend of [`engine`]: the commands are generic over it.
macro_rules! on_engine {
    ($f:ident ( $($arg:expr),* $(,)? )) => {
        match $crate::engine() {
            $crate::Engine::Gpu => $f::<codelsi_engine::device::Wgpu>($($arg),*),
            $crate::Engine::Cpu => $f::<burn::backend::Flex>($($arg),*),
            #[cfg(feature = "cuda")]
            $crate::Engine::Cuda => $f::<burn::backend::Cuda>($($arg),*),
        }
    };
}
pub(crate) use on_engine;

fn main() {
    private_runtime_dir();
    codelsi_engine::device::keep_freed_memory();
    let cli = Cli::parse();
    init_logs(cli.verbose);
    let _ = DEVICE.set(cli.device);
    if let DeviceChoice::Cuda(n) = cli.device {
        codelsi_engine::device::set_cuda_index(n);
    }
    codelsi_engine::device::set_cpu_threads(cli.threads);
    if let Err(e) = check_device_choice(cli.device) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        None => gui::run((cli.model != "none").then_some(cli.model)),
        Some(Command::Generate(args)) => generate::cmd_generate(args),
        Some(Command::Import(args)) => import::cmd_import(args),
        Some(Command::Eval(args)) => eval::cmd_eval(args),
        Some(Command::Train(args)) => train::cmd_train(*args),
        Some(Command::Merge(args)) => merge::cmd_merge(args),
        Some(Command::Measure(args)) => measure::cmd_measure(args),
        Some(Command::Predict(args)) => predict::cmd_predict(args),
        Some(Command::Serve(args)) => serve_cmd::cmd_serve(args),
        Some(Command::Models { command }) => models::cmd_models(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
