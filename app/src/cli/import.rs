//! `codelsi import`: a repository (or an instruction file) into a training dataset.

use std::path::PathBuf;

use anyhow::Result;
use codelsi_engine::import::{ImportEvent, ImportOptions, Lang, import_records, import_repo};
use codelsi_engine::io::tokenizer::Tokenizer;
use codelsi_engine::model::resolve_model;

use super::Format;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// A repository folder, or an instruction file (Alpaca JSON/JSONL, chat JSONL, or
    /// problems with `prompt` and `canonical_solution` as MBXP/HumanEval ship them).
    source: PathBuf,
    /// The dataset folder: `train.jsonl`, `val.jsonl`, `report.json`.
    #[arg(long)]
    out: PathBuf,
    /// Languages to import: ts (with tsx), tsx, js, py, rs, go, java. Default: all.
    #[arg(long)]
    lang: Option<String>,
    /// Share of files (records, for an instruction file) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_frac: f64,
    /// The model whose tokenizer measures lengths: a GGUF file, an HF directory, or `default`.
    #[arg(long, default_value = "default")]
    model: String,
    /// Fewest tokens a pair's output may have.
    #[arg(long, default_value_t = 8)]
    min_tokens: usize,
    /// Most tokens of prompt and output together.
    #[arg(long, default_value_t = 960)]
    max_tokens: usize,
    /// Token budget of the repository context (imports, project types) in each prompt.
    #[arg(long, default_value_t = 256)]
    context_tokens: usize,
    /// Files larger than this (KiB) are skipped.
    #[arg(long, default_value_t = 1024)]
    max_file_kb: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Replace a dataset already in `--out`.
    #[arg(long)]
    force: bool,
    /// `json` prints the report as one JSON object.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub fn cmd_import(args: ImportArgs) -> Result<()> {
    let json = args.format == Format::Json;
    if !(0.0..1.0).contains(&args.val_frac) {
        anyhow::bail!("--val-frac must be in [0, 1), got {}", args.val_frac);
    }
    if !args.source.exists() {
        anyhow::bail!("{}: no such file or folder", args.source.display());
    }
    let opts = ImportOptions {
        langs: match &args.lang {
            Some(l) => Lang::parse_list(l)?,
            None => Lang::ALL.to_vec(),
        },
        val_frac: args.val_frac,
        seed: args.seed,
        min_tokens: args.min_tokens,
        max_tokens: args.max_tokens,
        context_tokens: args.context_tokens,
        max_file_bytes: args.max_file_kb * 1024,
        threads: 0,
        force: args.force,
    };
    let model = resolve_model(&args.model, &mut |_| {})?;
    let tokenizer = Tokenizer::from_model(&model)?;
    let cancel = super::ctrl_c_token();
    let bar = super::progress_bar(json, "{msg:>12} {bar:30} {pos}/{len}  [{elapsed_precise}]");
    let start = std::time::Instant::now();
    let mut progress = |e: ImportEvent| match e {
        ImportEvent::Walking { seen } => {
            bar.set_message("walking");
            bar.set_length(seen as u64);
            bar.set_position(seen as u64);
        }
        ImportEvent::Parsing { done, total, .. } => {
            bar.set_message("parsing");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        ImportEvent::Pairing { done, total } => {
            bar.set_message("pairs");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        ImportEvent::Writing => bar.set_message("writing"),
    };
    let report = if args.source.is_dir() {
        import_repo(
            &args.source,
            &args.out,
            &tokenizer,
            &opts,
            &cancel,
            &mut progress,
        )?
    } else {
        import_records(
            &args.source,
            &args.out,
            &tokenizer,
            &opts,
            &cancel,
            &mut progress,
        )?
    };
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("{}", report.summary());
    let pairs = report.pairs.train + report.pairs.val;
    println!(
        "took {secs:.1} s ({:.2} MB/s, {:.0} pairs/s); wrote {}",
        report.bytes_parsed as f64 / 1e6 / secs.max(1e-9),
        pairs as f64 / secs.max(1e-9),
        args.out.display()
    );
    if pairs == 0 {
        println!("note: no pairs were kept; the report's `dropped` and `skipped` say why");
    }
    Ok(())
}
