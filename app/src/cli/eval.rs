//! `codelsi eval`: pass@k on a suite, with completions from a model (and adapters) or from a
//! file, every program run in the sandbox.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::eval::{
    self, Completion, EvalEvent, GenerateSettings, Harness, Limits, Problem, Status,
};
use codelsi_engine::model::OpenDevice;
use codelsi_engine::models::llama::Adapters;

use super::Format;

#[derive(clap::Args, Clone)]
pub struct EvalArgs {
    /// The model that writes the completions: a GGUF file, an HF directory, or `default`.
    #[arg(long, default_value = "default")]
    model: String,
    /// LoRA adapter directories applied to the model (repeat to stack).
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    #[command(flatten)]
    base: super::BaseArgs,
    /// `humaneval-ts`, `mbpp-ts`, or a problems JSONL (`task_id`, `prompt`, `test`).
    #[arg(long, default_value = "humaneval-ts")]
    suite: String,
    /// Domain fit instead of a suite: a dataset folder from `codelsi import` (its `val.jsonl`)
    /// or a JSONL file; loss, perplexity, exact match and edit similarity of generated
    /// outputs, for the base model and, with `--adapter`, the adapted one beside it.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Domain fit: how many records to generate outputs for (0: loss only).
    #[arg(long, default_value_t = 20)]
    generate: usize,
    /// Score these completions (JSONL of `task_id`, `completion`; several lines per task for
    /// pass@k) instead of generating.
    #[arg(long)]
    completions: Option<PathBuf>,
    /// Samples per problem.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 384)]
    max_tokens: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Completions generated together in one batch (more is faster on a GPU, and takes
    /// memory for each row's KV cache).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Side by side: the base model, then each prefix of the `--adapter` stack (a general
    /// adapter, then general + specialised), on the same suite or `--data`.
    #[arg(long)]
    compare: bool,
    /// Chat mode for instruct models: ask through the chat template for the whole function
    /// and take the body from the reply's code block (default: complete the prompt as text).
    /// With `--completions`, the lines are such replies.
    #[arg(long)]
    chat: bool,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// CPU seconds per program (the wall limit is 1.5× this, plus 2 s).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Memory per program, MiB.
    #[arg(long, default_value_t = 2048)]
    memory_mb: u64,
    /// Programs run at once (0: one per core).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Run model-written programs even where no sandbox can be set up (no bubblewrap, or a
    /// kernel that refuses namespaces, or not Linux). UNSAFE: they then run with node's
    /// permission model and rlimits only, and can see your files and processes.
    #[arg(long)]
    unsafe_no_sandbox: bool,
    /// Write `results.jsonl` (every sample) and `summary.json` here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `json` prints the summary as one JSON object.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Set for the runs inside `--compare`, which print nothing of their own.
    #[arg(skip)]
    quiet: bool,
}

/// Completions from the model (with `--adapter`s), with a progress bar.
fn generate_all<B: OpenDevice>(
    args: &EvalArgs,
    problems: &[Problem],
    cancel: &CancelToken,
    json: bool,
) -> Result<Vec<Completion>> {
    let (loaded, gpu) = super::load::<B>(&args.model, &args.base, json)?;
    let model = &loaded.model;
    let adapters = super::load_adapters(&args.adapters, model)?;
    let refs: Vec<&Adapter<B>> = adapters.iter().collect();
    if !json {
        eprintln!(
            "generating {} × {} completions with {} on {}, {} at a time",
            problems.len(),
            args.samples,
            args.model,
            gpu.name,
            args.batch.max(1)
        );
    }
    let pb = super::progress_bar(
        json,
        "generate {bar:30} {pos}/{len}  [{elapsed_precise} / eta {eta}]",
    );
    pb.set_length((problems.len() * args.samples) as u64);
    let settings = GenerateSettings {
        samples: args.samples,
        temperature: args.temperature,
        top_p: args.top_p,
        max_tokens: args.max_tokens,
        seed: args.seed,
        batch: args.batch,
        chat: args.chat,
    };
    let completions = eval::generate_completions(
        model,
        Adapters {
            list: &refs,
            train: None,
        },
        &loaded.tokenizer,
        problems,
        &settings,
        cancel,
        &mut || pb.inc(1),
    )?;
    pb.finish_and_clear();
    Ok(completions)
}

/// `--data`: loss and generation closeness on an imported validation split, base vs adapter.
fn cmd_fit<B: OpenDevice>(args: &EvalArgs, data: &std::path::Path) -> Result<()> {
    use codelsi_engine::eval::fit::{FitEvent, domain_fit};
    use codelsi_engine::train::data::{PromptTemplate, read_jsonl};
    let json = args.format == Format::Json;
    let file = if data.is_dir() {
        codelsi_engine::dataset::DatasetDir::new(data).split(codelsi_engine::dataset::Split::Val)
    } else {
        data.to_path_buf()
    };
    let mut records = read_jsonl(&file)?;
    if let Some(n) = args.limit {
        records.truncate(n);
    }
    let (loaded, _) = super::load::<B>(&args.model, &args.base, json)?;
    let model = &loaded.model;
    let adapters = super::load_adapters(&args.adapters, model)?;
    let refs: Vec<&Adapter<B>> = adapters.iter().collect();
    let template = PromptTemplate::for_tokenizer(&loaded.tokenizer);
    let cancel = super::ctrl_c_token();
    let mut rows = Vec::new();
    let runs: Vec<(&str, &[&Adapter<B>])> = if refs.is_empty() {
        vec![("base", &[])]
    } else {
        vec![("base", &[]), ("adapter", &refs)]
    };
    for (name, list) in runs {
        let pb = super::progress_bar(
            json,
            "{msg} {bar:30} {pos}/{len}  [{elapsed_precise} / eta {eta}]",
        );
        pb.set_message(format!("{name}: generating"));
        let t = Instant::now();
        let report = domain_fit(
            model,
            Adapters { list, train: None },
            &loaded.tokenizer,
            &records,
            template,
            1024,
            args.generate,
            args.max_tokens,
            &cancel,
            &mut |e| match e {
                FitEvent::Loss => pb.set_message(format!("{name}: loss")),
                FitEvent::Generated { done, total } => {
                    pb.set_message(format!("{name}: generating"));
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                }
            },
        )?;
        pb.finish_and_clear();
        let Some(report) = report else {
            bail!("cancelled")
        };
        rows.push((name, report, t.elapsed().as_secs_f64()));
    }
    if json {
        let v: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(n, r, s)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["seconds"] = (*s).into();
                (n.to_string(), v)
            })
            .collect();
        println!("{}", serde_json::Value::Object(v));
        return Ok(());
    }
    println!("{} records of {}", rows[0].1.records, file.display());
    println!(
        "{:<8} {:>8} {:>11} {:>10} {:>9} {:>8}",
        "", "loss", "perplexity", "exact", "edit-sim", "seconds"
    );
    for (n, r, s) in &rows {
        println!(
            "{:<8} {:>8.4} {:>11.2} {:>9.1}% {:>9.3} {:>8.1}",
            n,
            r.loss,
            r.perplexity,
            100.0 * r.exact_match,
            r.edit_similarity,
            s
        );
    }
    Ok(())
}

/// The runs `--compare` makes: the base, then each prefix of the adapter stack.
fn compare_runs(args: &EvalArgs) -> Vec<(String, EvalArgs)> {
    (0..=args.adapters.len())
        .map(|i| {
            let mut a = args.clone();
            a.adapters.truncate(i);
            a.compare = false;
            let label = if i == 0 {
                "base".to_string()
            } else {
                a.adapters
                    .iter()
                    .map(|d| {
                        d.file_name().map_or_else(
                            || d.display().to_string(),
                            |n| n.to_string_lossy().into_owned(),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("+")
            };
            (label, a)
        })
        .collect()
}

pub fn cmd_eval(args: EvalArgs) -> Result<()> {
    if let Some(data) = &args.data {
        // Domain fit puts the base and the adapted model side by side anyway.
        return crate::on_engine!(cmd_fit(&args, data));
    }
    if !args.compare {
        return eval_one(args).map(|_| ());
    }
    if args.completions.is_some() {
        bail!("--compare generates with each model; it cannot take --completions");
    }
    let json = args.format == Format::Json;
    let mut rows = Vec::new();
    for (label, mut a) in compare_runs(&args) {
        if !json {
            eprintln!("== {label}");
        }
        a.format = Format::Json; // no bars or tables of its own: the table below is the output
        a.quiet = true;
        a.out = args.out.as_ref().map(|d| d.join(&label));
        rows.push((label, eval_one(a)?));
    }
    if json {
        let v: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(l, s)| (l.clone(), serde_json::to_value(s).unwrap_or_default()))
            .collect();
        println!("{}", serde_json::Value::Object(v));
        return Ok(());
    }
    println!(
        "{}: {} tasks",
        args.suite,
        rows.first().map_or(0, |r| r.1.tasks)
    );
    println!("{:<32} {:>9} {:>9}", "model", "passed", "pass@1");
    for (l, s) in &rows {
        println!(
            "{:<32} {:>4}/{:<4} {:>8.2}%",
            l,
            s.passed,
            s.total,
            100.0 * s.pass_at_1
        );
    }
    Ok(())
}

/// One suite run; returns its summary (and prints it, as `--format` says).
fn eval_one(args: EvalArgs) -> Result<eval::Summary> {
    let json = args.format == Format::Json;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let mut problems = eval::load_suite(&args.suite)?;
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    let cancel = super::ctrl_c_token();
    let limits = Limits {
        cpu_secs: args.timeout,
        wall: Duration::from_secs_f64(args.timeout as f64 * 1.5 + 2.0),
        memory_bytes: args.memory_mb << 20,
        ..Limits::default()
    };
    let harness = Harness::new(limits, args.jobs, args.unsafe_no_sandbox, &mut |s| {
        if !json {
            eprintln!("{s}");
        }
    })?;
    let start = Instant::now();
    let completions = match &args.completions {
        Some(f) => {
            let mut c = eval::read_completions(f)?;
            // One pass: with `--limit`, drop the tasks past it; with `--chat`, the lines are
            // chat replies made elsewhere, so take each one's function as chat mode does.
            c.retain_mut(|c| match problems.iter().find(|p| p.task_id == c.task_id) {
                Some(p) => {
                    if args.chat {
                        c.completion = eval::completion_from_chat(p, &c.completion);
                    }
                    true
                }
                None => args.limit.is_none(),
            });
            c
        }
        None => crate::on_engine!(generate_all(&args, &problems, &cancel, json))?,
    };
    let gen_secs = start.elapsed().as_secs_f64();
    let pb = super::progress_bar(
        json,
        "run {bar:30} {pos}/{len} ({msg})  [{elapsed_precise}]",
    );
    let run_start = Instant::now();
    let results = eval::score(
        &problems,
        &completions,
        &harness,
        &cancel,
        &mut |e| match e {
            EvalEvent::Transpiled { programs } => pb.set_length(programs as u64),
            EvalEvent::Ran { done, passed, .. } => {
                pb.set_message(format!("{passed} passed"));
                pb.set_position(done as u64);
            }
        },
    )?;
    pb.finish_and_clear();
    let run_secs = run_start.elapsed().as_secs_f64();
    let summary = eval::summarize(&results);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("results.jsonl"))?);
        for r in &results {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
    }
    if json {
        let mut v = serde_json::to_value(&summary)?;
        v["suite"] = args.suite.clone().into();
        v["isolation"] = serde_json::to_value(harness.sandbox.isolation)?;
        v["generate_seconds"] = gen_secs.into();
        v["run_seconds"] = run_secs.into();
        if !args.quiet {
            println!("{}", serde_json::to_string(&v)?);
        }
        return Ok(summary);
    }
    for t in &summary.per_task {
        if t.status != Status::Passed || summary.per_task.len() <= 40 {
            println!(
                "{:<28} {:>3}/{:<3} {:?}",
                t.task_id, t.passed, t.samples, t.status
            );
        }
    }
    println!(
        "{}: {} of {} samples passed over {} tasks; pass@1 {:.2}%{}",
        args.suite,
        summary.passed,
        summary.total,
        summary.tasks,
        100.0 * summary.pass_at_1,
        summary
            .pass_at_k
            .iter()
            .filter(|(k, _)| **k > 1)
            .map(|(k, v)| format!(", pass@{k} {:.2}%", 100.0 * v))
            .collect::<String>()
    );
    println!(
        "statuses: {:?}; generation {gen_secs:.1} s, execution {run_secs:.1} s; sandbox: {}",
        summary.statuses, harness.sandbox.isolation
    );
    Ok(summary)
}
