//! `codelsi train`: LoRA instruction tuning from the command line, with a progress bar and
//! Ctrl-C as a clean stop (a checkpoint is written; `--resume` continues).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use codelsi_engine::adapter::Adapter;
use codelsi_engine::adapter::{LoraConfig, Target};
use codelsi_engine::model::OpenDevice;
use codelsi_engine::model::{LoadedModel, load_model};
use codelsi_engine::regress::{NumberObjective, RegressionData, RegressionSpec};
use codelsi_engine::train::data::PromptTemplate;
use codelsi_engine::train::meta::RunInfo;
use codelsi_engine::train::run::{DEFAULT_VAL_FRAC, InstructRun, load_frozen};
use codelsi_engine::train::{
    Activations, Decay, Nodes, Parallel, Replica, TrainConfig, TrainEvent, TrainJob,
    start_orchestrator, train_parallel,
};

use super::{BaseArgs, Format, load_on};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// A GGUF file, an HF model directory, or `default`.
    #[arg(long, default_value = "default")]
    model: String,
    /// Training data: JSONL of Alpaca (`instruction`, `input`, `output`) or chat (`messages`)
    /// records, or a folder `codelsi import` wrote (its `train.jsonl`, and `val.jsonl` as
    /// validation data unless `--val` is given).
    #[arg(long)]
    data: PathBuf,
    /// Validation data (same format). Without it, `--val-frac` of the training records are held out.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Share held out for validation: 0.05 of the records for instruction data, 0.2 of the
    /// groups (problems) for regression.
    #[arg(long)]
    val_frac: Option<f64>,
    /// Output directory: a PEFT adapter (and `checkpoint/` while training).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// all, attn, mlp, or names among q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    targets: String,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Tokens per packed row (examples are truncated to it).
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// Packed rows per optimiser step (gradients accumulate over them).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Linear warmup as a fraction of the steps.
    #[arg(long, default_value_t = 0.03)]
    warmup: f64,
    /// cosine, linear or constant after warmup.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Validation loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N steps (always on Ctrl-C and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Recompute each layer's activations in the backward instead of keeping them: same
    /// result, about a third more compute, much less memory at long sequences.
    #[arg(long)]
    grad_checkpoint: bool,
    /// Activations' type: auto (f16 where the GPU offers shader-f16, else f32), f16 or f32.
    #[arg(long, default_value = "auto")]
    activations: String,
    /// chat (the model's template) or alpaca; default: chat when the model has a template.
    #[arg(long)]
    template: Option<String>,
    /// One example per row instead of packing short examples together.
    #[arg(long)]
    no_pack: bool,
    /// Continue the run whose checkpoint is in `--out`.
    #[arg(long)]
    resume: bool,
    /// Train on top of earlier adapters, kept frozen and stacked under the new one (repeatable).
    #[arg(long = "base-adapter")]
    base_adapters: Vec<PathBuf>,
    /// Start from this adapter's weights and train it further (on new data, say) instead of
    /// from fresh ones. It needs the same --rank, --alpha and --targets, and for regression the
    /// same metrics; the optimiser and the schedule start afresh.
    #[arg(long, conflicts_with = "resume")]
    init_adapter: Option<PathBuf>,
    #[command(flatten)]
    base: BaseArgs,
    /// `instruct` (LoRA on instruction data) or `regression` (an adapter that predicts
    /// numbers from code: `--data` is JSONL/CSV of `code` and metrics, as `codelsi measure`
    /// writes; validation is split by group).
    #[arg(long, value_enum, default_value = "instruct")]
    task: Task,
    /// Regression: the metrics to predict, in order (default: every one in the data).
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// `json` prints one JSON object per event instead of a progress bar.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Data-parallel training: one replica per device, each on its share of every step's
    /// rows, the adapter's gradients summed before each optimiser step; the same run as one
    /// device with the same --batch. `cuda:0,cuda:1` (a build with the `cuda` feature), or
    /// `cpu,cpu`: logical replicas sharing the CPU's cores (for checking a launch).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Data parallel over several machines: `host:port` of every node, in rank order, the same
    /// list on each (with the same data and settings). Node 0 runs the coordinator on its port;
    /// each node serves its tensors on its port + 1. Each node's replicas are its --devices.
    #[arg(long, value_delimiter = ',', requires = "node_rank")]
    nodes: Vec<String>,
    /// This machine's place in --nodes (0 for the first).
    #[arg(long)]
    node_rank: Option<usize>,
}

/// `--nodes` and `--node-rank` as the engine takes them, with the first node's port (where
/// node 0 runs the orchestrator).
fn parse_nodes(list: &[String], rank: Option<usize>) -> Result<Option<(Nodes, u16)>> {
    let Some(rank) = rank else {
        return Ok(None);
    };
    if rank >= list.len() {
        anyhow::bail!("--node-rank {rank}: --nodes lists {} node(s)", list.len());
    }
    let split = |entry: &str| -> Result<(String, u16)> {
        let (host, port) = entry
            .rsplit_once(':')
            .with_context(|| format!("--nodes: `{entry}` is not host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("--nodes: `{entry}`: the port is not a number"))?;
        if port == u16::MAX {
            anyhow::bail!(
                "--nodes: `{entry}`: the port after it serves tensors; choose a lower one"
            );
        }
        Ok((host.to_string(), port))
    };
    let (host0, port0) = split(&list[0])?;
    let (host, port) = split(&list[rank])?;
    let nodes = Nodes {
        rank,
        count: list.len(),
        orchestrator: format!("ws://{host0}:{port0}"),
        address: format!("ws://{host}:{}", port + 1),
        data_port: port + 1,
    };
    Ok(Some((nodes, port0)))
}

/// `--devices`: one kind of device (`cpu`, `gpu` or `cuda`) and the index of each replica's.
fn parse_devices(list: &[String]) -> Result<(&'static str, Vec<usize>)> {
    let mut kind = None;
    let mut indices = Vec::new();
    for entry in list {
        let (k, index) = match entry.split_once(':') {
            None => (entry.as_str(), 0),
            Some((k, n)) => (
                k,
                n.parse()
                    .with_context(|| format!("--devices: `{entry}`: the index is not a number"))?,
            ),
        };
        let k = match k {
            "cpu" => "cpu",
            "gpu" => "gpu",
            "cuda" => "cuda",
            _ => anyhow::bail!("--devices: `{entry}` is not cpu, gpu[:N] or cuda[:N]"),
        };
        if kind.is_some_and(|have| have != k) {
            anyhow::bail!(
                "--devices: every replica runs on one kind of device, not {k} beside others"
            );
        }
        if k != "cpu" && indices.contains(&index) {
            anyhow::bail!("--devices: {entry} is named twice");
        }
        kind = Some(k);
        indices.push(index);
    }
    Ok((kind.unwrap_or("cpu"), indices))
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Task {
    Instruct,
    Regression,
}

pub fn cmd_train(args: TrainArgs) -> Result<()> {
    let config = TrainConfig {
        lora: LoraConfig {
            rank: args.rank,
            alpha: args.alpha,
            dropout: args.dropout,
            targets: Target::parse_list(&args.targets)?,
            rslora: false,
        },
        lr: args.lr,
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch: args.batch,
        warmup_frac: args.warmup,
        decay: Decay::parse(&args.schedule)?,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        grad_checkpoint: args.grad_checkpoint,
        activations: Activations::parse(&args.activations)?,
    };
    config.validate()?;
    if args.task == Task::Regression && (args.node_rank.is_some() || args.devices.len() > 1) {
        anyhow::bail!("--devices, --nodes: regression adapters train on one device for now");
    }
    if args.devices.is_empty() {
        return crate::on_engine!(train_on(&args, &config, &[]));
    }
    let (kind, indices) = parse_devices(&args.devices)?;
    match kind {
        "cpu" => train_on::<burn::backend::Flex>(&args, &config, &indices),
        "gpu" => train_on::<codelsi_engine::device::Wgpu>(&args, &config, &indices),
        #[cfg(feature = "cuda")]
        "cuda" => train_on::<burn::backend::Cuda>(&args, &config, &indices),
        _ => anyhow::bail!(
            "--devices cuda: this codelsi was built without CUDA; build it with \
             `cargo build --release -p codelsi --features cuda`"
        ),
    }
}

/// The training run on `B` (the model loads on `Autodiff<B>`), on the devices `indices` of `B`
/// (none: the one `--device` chose).
fn train_on<B: OpenDevice>(
    args: &TrainArgs,
    config: &TrainConfig,
    indices: &[usize],
) -> Result<()> {
    let json = args.format == Format::Json;
    let first = indices.first().copied();
    let (loaded, gpu) = load_on::<Autodiff<B>>(&args.model, &args.base, json, first)?;
    if args.task == Task::Regression {
        return train_regression(args, config, &loaded, &gpu);
    }
    let template = args
        .template
        .as_deref()
        .map(PromptTemplate::parse)
        .transpose()?;
    let assembled = InstructRun {
        data: args.data.clone(),
        val: args.val.clone(),
        val_frac: args.val_frac.unwrap_or(DEFAULT_VAL_FRAC),
        template,
        max_len: args.max_len,
        pack: !args.no_pack,
        base_adapters: args.base_adapters.clone(),
        init_adapter: args.init_adapter.clone(),
        seed: args.seed,
        device: gpu.to_string(),
        app: false,
    }
    .assemble::<B>(
        &loaded.model.config,
        loaded.model.device(),
        &loaded.tokenizer,
    )?;
    let data = &assembled.data;
    if !json {
        eprintln!(
            "{} training records → {} rows of ≤{} tokens ({} dropped: prompt alone fills max-len); {} validation rows; template {:?}; {} on {}",
            data.train_records,
            data.train.len(),
            args.max_len,
            data.dropped,
            data.val.len(),
            assembled.template,
            loaded.info.architecture,
            gpu
        );
    }

    // Replicas 1..: the model on each further device (the first's, where it is the same
    // device: logical replicas on the CPU), with the base adapters there.
    let mut models: Vec<LoadedModel<Autodiff<B>>> = Vec::new();
    let mut slots: Vec<(Option<usize>, String)> = Vec::new();
    for &i in indices.iter().skip(1) {
        let (device, info) = <Autodiff<B> as OpenDevice>::open_index(i)?;
        let name = format!("{info} (replica {})", slots.len() + 1);
        if device == *loaded.model.device() {
            slots.push((None, name));
        } else {
            let path = &loaded.info.path;
            models.push(load_model::<Autodiff<B>>(
                path,
                args.base.format::<Autodiff<B>>(&device)?,
                &device,
                &mut |_| {},
            )?);
            slots.push((Some(models.len() - 1), name));
        }
    }
    let replica_frozen = models
        .iter()
        .map(|m| load_frozen::<B>(&args.base_adapters, &m.model.config, m.model.device()))
        .collect::<codelsi_engine::Result<Vec<_>>>()?;
    let replica_refs: Vec<Vec<&Adapter<Autodiff<B>>>> =
        replica_frozen.iter().map(|f| f.iter().collect()).collect();
    let frozen = assembled.frozen_refs();
    let replicas = slots
        .iter()
        .map(|(slot, name)| match slot {
            Some(k) => Replica {
                model: &models[*k].model,
                frozen: &replica_refs[*k],
                name: name.clone(),
            },
            None => Replica {
                model: &loaded.model,
                frozen: &frozen,
                name: name.clone(),
            },
        })
        .collect();
    let nodes = parse_nodes(&args.nodes, args.node_rank)?;
    if let Some((n, port0)) = &nodes
        && n.rank == 0
    {
        start_orchestrator(*port0)?;
    }
    let par = Parallel {
        replicas,
        first: format!("{gpu} (replica 0)"),
        fault: None,
        nodes: nodes.map(|(n, _)| n),
    };
    if let Some(n) = &par.nodes {
        if !json {
            eprintln!(
                "data parallel: node {} of {}, {} replica(s) here, {} in all",
                n.rank,
                n.count,
                par.count(),
                par.count() * n.count
            );
        }
    } else if !json && par.count() > 1 {
        eprintln!("data parallel: {} replicas", par.count());
    }

    let model_name = loaded.info.file_name();
    let job = TrainJob {
        model: &loaded.model,
        frozen: &frozen,
        train: &data.train,
        val: &data.val,
        config,
        out: &args.out,
        base_model: &model_name,
        run: assembled.run.clone(),
        resume: args.resume,
        objective: None,
        init: args.init_adapter.as_deref(),
    };
    run(args, config, job, &par)
}

/// Run a training job with a progress bar (or JSON events), and say how it ended.
fn run<B: OpenDevice>(
    args: &TrainArgs,
    config: &TrainConfig,
    job: TrainJob<'_, B>,
    par: &Parallel<'_, B>,
) -> Result<()> {
    let json = args.format == Format::Json;
    let cancel = super::ctrl_c_token();
    let bar = super::progress_bar(
        json,
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
    );
    let mut last_val = None;
    let summary = train_parallel(job, par, &cancel, &mut |e| {
        if json {
            if let Ok(s) = serde_json::to_string(&e) {
                println!("{s}");
            }
            return;
        }
        match e {
            TrainEvent::Started {
                total_steps,
                trainable_params,
                resumed_at,
                activations,
                ..
            } => {
                bar.set_length(total_steps as u64);
                bar.set_position(resumed_at as u64);
                bar.println(format!(
                    "{trainable_params} trainable parameters (r={}, alpha={}, {} targets), \
                         {activations} activations{}",
                    config.lora.rank,
                    config.lora.alpha,
                    config.lora.targets.len(),
                    if resumed_at > 0 {
                        format!("; resuming at step {resumed_at}")
                    } else {
                        String::new()
                    }
                ));
            }
            TrainEvent::Step {
                step,
                loss,
                lr,
                tokens_per_second,
                peak_bytes,
                ..
            } => {
                let mem = peak_bytes
                    .map(|b| format!("  peak {:.0} MiB", b as f64 / (1 << 20) as f64))
                    .unwrap_or_default();
                let val = last_val
                    .map(|v: f64| format!("  val {v:.4}"))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "loss {loss:.4}{val}  lr {lr:.2e}  {tokens_per_second:.0} tok/s{mem}"
                ));
                bar.set_position(step as u64);
            }
            TrainEvent::Eval { step, val_loss } => {
                last_val = Some(val_loss);
                bar.println(format!("step {step}: validation loss {val_loss:.4}"));
            }
            TrainEvent::Checkpoint { step, path } => {
                bar.println(format!("step {step}: checkpoint in {}", path.display()));
            }
        }
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if summary.cancelled {
        eprintln!(
            "stopped at step {}/{}; continue with the same command and --resume",
            summary.steps, summary.total_steps
        );
    } else {
        eprintln!(
            "done: {} steps in {:.0} s ({:.1} tok/s), loss {:.4} → {:.4}{}{}; adapter in {} (use it with `codelsi {} --adapter {}`)",
            summary.steps,
            summary.seconds,
            summary.tokens as f64 / summary.seconds.max(1e-9),
            summary.losses.first().map_or(f64::NAN, |l| l.1),
            summary.losses.last().map_or(f64::NAN, |l| l.1),
            summary
                .val_losses
                .last()
                .map(|v| format!(", validation loss {:.4}", v.1))
                .unwrap_or_default(),
            summary
                .peak_bytes
                .map(|b| format!(", peak GPU memory {:.0} MiB", b as f64 / (1 << 20) as f64))
                .unwrap_or_default(),
            args.out.display(),
            if args.task == Task::Regression {
                "predict"
            } else {
                "generate"
            },
            args.out.display()
        );
    }
    Ok(())
}

/// `--task regression`: rows of code and numbers, split by group, and an adapter that adds
/// the number tokens.
fn train_regression<B: OpenDevice>(
    args: &TrainArgs,
    config: &TrainConfig,
    loaded: &codelsi_engine::model::LoadedModel<Autodiff<B>>,
    gpu: &codelsi_engine::device::GpuInfo,
) -> Result<()> {
    if !args.base_adapters.is_empty() {
        anyhow::bail!("a regression adapter trains on the base model alone (no --base-adapter)");
    }
    let val_frac = args.val_frac.unwrap_or(0.2);
    let data = RegressionData::prepare(
        &args.data,
        &args.metrics,
        val_frac,
        args.seed,
        args.max_len,
        &loaded.tokenizer,
        &loaded.model.config,
    )?;
    if args.format != Format::Json {
        eprintln!(
            "{} training examples → {} rows, {} held-out examples → {} rows ({} left out: a metric missing); predicting {} on {}",
            data.train_examples,
            data.train.len(),
            data.val_examples,
            data.val.len(),
            data.missing,
            data.spec.metrics.join(", "),
            gpu
        );
    }
    if let Some(dir) = &args.init_adapter {
        let theirs = RegressionSpec::load(dir)?.with_context(|| {
            format!(
                "--init-adapter {}: not a regression adapter (no `regression` in codelsi_adapter.json)",
                dir.display()
            )
        })?;
        if theirs.metrics != data.spec.metrics {
            anyhow::bail!(
                "--init-adapter {} predicts {}; this run {} (pass --metrics {})",
                dir.display(),
                theirs.metrics.join(", "),
                data.spec.metrics.join(", "),
                theirs.metrics.join(",")
            );
        }
    }
    let objective = NumberObjective::new(&loaded.model, &loaded.tokenizer)?;
    let model_name = loaded.info.file_name();
    let job = TrainJob {
        model: &loaded.model,
        frozen: &[],
        train: &data.train,
        val: &data.val,
        config,
        out: &args.out,
        base_model: &model_name,
        run: RunInfo {
            task: Some("regression".into()),
            data: Some(args.data.clone()),
            val_frac: Some(val_frac),
            seed: Some(args.seed),
            max_len: Some(args.max_len),
            regression: Some(serde_json::to_value(&data.spec)?),
            train_examples: Some(data.train_examples),
            val_examples: Some(data.val_examples),
            init_adapter: args.init_adapter.clone(),
            device: Some(gpu.to_string()),
            ..RunInfo::default()
        },
        resume: args.resume,
        objective: Some(&objective),
        init: args.init_adapter.as_deref(),
    };
    run(args, config, job, &Parallel::default())
}

#[cfg(test)]
mod tests {
    use super::{parse_devices, parse_nodes};

    fn list(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// `--devices` and `--nodes` as a user types them, and the mistakes a user makes, each
    /// refused with what is wrong.
    #[test]
    fn devices_and_nodes_parse_or_say_what_is_wrong() {
        let ok = |s: &[&str]| parse_devices(&list(s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok(&["cuda:0", "cuda:1"]), ("cuda", vec![0, 1]));
        assert_eq!(ok(&["cpu", "cpu"]), ("cpu", vec![0, 0]));
        assert_eq!(ok(&["gpu"]), ("gpu", vec![0]));
        for (bad, says) in [
            (&["cuda:0", "cpu"][..], "one kind"),
            (&["cuda:x"][..], "not a number"),
            (&["cuda:1", "cuda:1"][..], "twice"),
            (&["tpu:0"][..], "not cpu, gpu[:N] or cuda[:N]"),
        ] {
            let err = parse_devices(&list(bad)).map_or_else(|e| e.to_string(), |_| String::new());
            assert!(err.contains(says), "{bad:?}: `{err}`");
        }

        let nodes = list(&["a.lan:29500", "b.lan:29600"]);
        let (n, port0) = parse_nodes(&nodes, Some(1))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no nodes"));
        assert_eq!((n.rank, n.count, port0), (1, 2, 29500));
        assert_eq!(n.orchestrator, "ws://a.lan:29500");
        assert_eq!(
            (n.address.as_str(), n.data_port),
            ("ws://b.lan:29601", 29601)
        );
        assert!(parse_nodes(&nodes, None).is_ok_and(|n| n.is_none()));
        for (bad, rank, says) in [
            (list(&["a:1", "b:2"]), 2, "lists 2 node"),
            (list(&["a"]), 0, "not host:port"),
            (list(&["a:port"]), 0, "not a number"),
            (list(&["a:65535"]), 0, "lower one"),
        ] {
            let err =
                parse_nodes(&bad, Some(rank)).map_or_else(|e| e.to_string(), |_| String::new());
            assert!(err.contains(says), "{bad:?} rank {rank}: `{err}`");
        }
    }
}
