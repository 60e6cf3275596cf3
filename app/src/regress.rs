//! `codelsi measure` (a regression dataset from running programs), `codelsi predict` (a
//! regression adapter's figures for code, or its scores on the held-out split beside the
//! baselines), and the data side of `codelsi train --task regression`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use codelsi_engine::device::init_wgpu;
use codelsi_engine::eval::{self, Harness};
use codelsi_engine::io::tokenizer::Tokenizer;
use codelsi_engine::kernels::qmatmul::{QPlan, QShape};
use codelsi_engine::kernels::sweep::{self, Best, SweepSettings};
use codelsi_engine::model::OpenDevice;
use codelsi_engine::quant::QFormat;
use codelsi_engine::regress::measure::{self, MeasureEvent, MeasureSettings};
use codelsi_engine::regress::{
    self, Example, HeldOutReport, PredictSettings, Prediction, RegressionSpec, Regressor, stats,
};
use codelsi_engine::train::meta::AdapterMeta;

use crate::{Format, load};

#[derive(clap::Args)]
pub struct MeasureArgs {
    /// Problems whose solutions run: `mbpp-ts` (MBTSP) or a problems JSONL of the same form;
    /// or `kernels`: the latency of every layout of the engine's quantised-matmul WGSL kernels
    /// on this machine's GPU (`--formats`, `--shapes`, `--rows`), with a tuning report.
    #[arg(long, default_value = "mbpp-ts")]
    suite: String,
    /// Measure these completions (JSONL of `task_id`, `completion`, as `codelsi eval --out`
    /// writes in `results.jsonl`) instead of the canonical solutions.
    #[arg(long)]
    completions: Option<PathBuf>,
    /// Each test input scaled by each of these (arrays and strings repeated, integers
    /// multiplied).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    scales: Vec<u32>,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// CPU seconds per run; runs past it are left out.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    /// Memory per run, MiB.
    #[arg(long, default_value_t = 4096)]
    memory_mb: u64,
    /// Programs run at once (0: one per core; timings are of one core each).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Run model-written programs even where no sandbox can be set up (no bubblewrap, or a
    /// kernel that refuses namespaces, or not Linux). UNSAFE: they then run with node's
    /// permission model and rlimits only, and can see your files and processes.
    #[arg(long)]
    unsafe_no_sandbox: bool,
    /// The dataset (JSONL: `code`, `metrics`, `group`).
    #[arg(long)]
    out: PathBuf,
    /// `--suite kernels`: weight formats.
    #[arg(long, value_delimiter = ',', default_value = "q4_1,q8_0")]
    formats: Vec<String>,
    /// `--suite kernels`: shapes of W, `NxK` (default: the default model's projections).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "576x576,192x576,1536x576,576x1536"
    )]
    shapes: Vec<String>,
    /// `--suite kernels`: rows of x (1 is decode).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    rows: Vec<usize>,
    /// `--suite kernels`: each layout repeats until it ran this many milliseconds.
    #[arg(long, default_value_t = 20.0)]
    min_ms: f64,
}

pub fn cmd_measure(args: MeasureArgs) -> Result<()> {
    if args.suite == "kernels" {
        return measure_kernels(&args);
    }
    let mut problems = eval::load_suite(&args.suite)?;
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    let completions = match &args.completions {
        Some(p) => Some(eval::read_completions(p)?),
        None => None,
    };
    let (workloads, skipped) = measure::workloads(&problems, completions.as_deref());
    if workloads.is_empty() {
        bail!(
            "no workload: none of the {} problems has tests of the form `let actual_N = f(...)`",
            problems.len()
        );
    }
    let mut settings = MeasureSettings {
        scales: args.scales.clone(),
        ..MeasureSettings::default()
    };
    settings.limits.cpu_secs = args.timeout;
    settings.limits.wall = Duration::from_secs(args.timeout * 2 + 2);
    settings.limits.memory_bytes = args.memory_mb << 20;
    let harness = Harness::new(
        settings.limits,
        args.jobs,
        args.unsafe_no_sandbox,
        &mut |s| eprintln!("{s}"),
    )?;
    eprintln!(
        "{} programs × {} scales ({} problems without calls to scale); sandbox: {}",
        workloads.len(),
        settings.scales.len(),
        skipped.len(),
        harness.sandbox.isolation
    );
    let bar = crate::progress_bar(
        false,
        "{bar:30} {pos}/{len} runs  {msg}  [{elapsed_precise} < {eta_precise}]",
    );
    let cancel = crate::ctrl_c_token();
    let start = Instant::now();
    let Some((examples, dropped)) =
        measure::measure(&workloads, &settings, &harness, &cancel, &mut |e| match e {
            MeasureEvent::Transpiled { programs } => bar.set_length(programs as u64),
            MeasureEvent::Ran { done, kept, .. } => {
                bar.set_message(format!("{kept} kept"));
                bar.set_position(done as u64);
            }
        })?
    else {
        bar.finish_and_clear();
        bail!("cancelled; nothing written");
    };
    bar.finish_and_clear();
    regress::write_examples(&args.out, &examples)?;
    let mut why: std::collections::BTreeMap<String, usize> = Default::default();
    for d in &dropped {
        let kind = d.why.split(':').next().unwrap_or("").to_string();
        *why.entry(kind).or_default() += 1;
    }
    println!(
        "{} examples from {} runs in {:.0} s → {}",
        examples.len(),
        examples.len() + dropped.len(),
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    if !dropped.is_empty() {
        println!("left out: {why:?}");
    }
    print_spread(&examples);
    Ok(())
}

/// `codelsi measure --suite kernels`: time every kernel layout on every problem, write them as
/// examples (`latency_ms`, grouped by problem), and report the fastest layouts beside the
/// engine's.
fn measure_kernels(args: &MeasureArgs) -> Result<()> {
    if args.completions.is_some() {
        bail!("--completions is for program suites, not `--suite kernels`");
    }
    let formats = args
        .formats
        .iter()
        .map(|f| {
            QFormat::parse(f)
                .with_context(|| format!("--formats: {f} is not one of {}", QFormat::names()))
        })
        .collect::<Result<Vec<_>>>()?;
    let shapes = args
        .shapes
        .iter()
        .map(|s| {
            let parsed = s
                .split_once(['x', 'X'])
                .and_then(|(n, k)| Some([n.trim().parse().ok()?, k.trim().parse().ok()?]));
            parsed.with_context(|| format!("--shapes: {s} is not NxK (e.g. 1536x576)"))
        })
        .collect::<Result<Vec<_>>>()?;
    let settings = SweepSettings {
        formats,
        shapes,
        rows: args.rows.clone(),
        min_secs: args.min_ms / 1e3,
    };
    let cases = sweep::cases(&settings)?;
    let (device, gpu) = init_wgpu()?;
    eprintln!(
        "{} cases ({} layouts × {} problems) on {gpu}",
        cases.len(),
        sweep::plans().len(),
        cases.len() / sweep::plans().len()
    );
    let bar = crate::progress_bar(
        false,
        "{bar:30} {pos}/{len} layouts  [{elapsed_precise} < {eta_precise}]",
    );
    bar.set_length(cases.len() as u64);
    let start = Instant::now();
    let timed = sweep::sweep(
        &device,
        &cases,
        settings.min_secs,
        &crate::ctrl_c_token(),
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let Some(timed) = timed else {
        bail!("cancelled; nothing written");
    };
    let examples: Vec<Example> = timed
        .iter()
        .map(|t| Example {
            code: t.case.text(),
            metrics: [(measure::LATENCY.to_string(), t.ms)].into(),
            group: Some(t.case.problem()),
        })
        .collect();
    regress::write_examples(&args.out, &examples)?;
    println!(
        "{} examples in {:.0} s → {}",
        examples.len(),
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    print_spread(&examples);
    print_tuning(&sweep::best_per_problem(&timed, QShape::for_adapter()));
    Ok(())
}

fn plan_label(plan: QPlan) -> String {
    match plan {
        QPlan::Vector { lanes, rows } => format!("mat-vec {lanes}×{rows}"),
        QPlan::RowBlocks => "row-block".into(),
        QPlan::Tiled => "tiled".into(),
    }
}

/// For each row count: how often the engine's layout is the fastest (or within 5 % of it), how
/// far it is from the fastest, and which layout is fastest most often.
fn print_tuning(best: &[Best]) {
    println!("fastest layout vs the engine's (mat-vec lanes×rows), by rows of x:");
    let mut ms: Vec<usize> = best.iter().map(|b| b.m).collect();
    ms.sort_unstable();
    ms.dedup();
    for m in ms {
        let of_m: Vec<&Best> = best.iter().filter(|b| b.m == m).collect();
        let ratios: Vec<f64> = of_m
            .iter()
            .filter_map(|b| b.ours_ms.map(|o| o / b.best_ms))
            .collect();
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for b in &of_m {
            *counts.entry(plan_label(b.best)).or_default() += 1;
        }
        let (top, n) = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(l, n)| (l.clone(), *n))
            .unwrap_or_default();
        println!(
            "  m={m}: ours ({}) fastest or within 5 % on {}/{}; ours/fastest median {:.2}, max {:.2}; fastest most often: {top} ({n}/{})",
            plan_label(of_m[0].ours),
            ratios.iter().filter(|r| **r <= 1.05).count(),
            ratios.len(),
            stats::quantile(&ratios, 0.5),
            stats::quantile(&ratios, 1.0),
            of_m.len()
        );
    }
}

/// Each metric's range over `examples`: quantiles and decades.
fn print_spread(examples: &[Example]) {
    for m in regress::metric_names(examples) {
        let v: Vec<f64> = examples
            .iter()
            .filter_map(|e| e.metrics.get(&m).copied())
            .collect();
        let (lo, hi) = (stats::quantile(&v, 0.0), stats::quantile(&v, 1.0));
        println!(
            "{m}: {} values, min {lo:.4}, p10 {:.4}, median {:.4}, p90 {:.4}, max {hi:.4} ({:.1} decades)",
            v.len(),
            stats::quantile(&v, 0.1),
            stats::quantile(&v, 0.5),
            stats::quantile(&v, 0.9),
            stats::log10_floor(hi) - stats::log10_floor(lo)
        );
    }
}

/// Regression training data: the examples split by group, the spec, the rows.
pub struct RegressionData {
    pub spec: RegressionSpec,
    pub train: Vec<codelsi_engine::train::data::Row>,
    pub val: Vec<codelsi_engine::train::data::Row>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub missing: usize,
}

/// Read `data`, keep `metrics` (all of the file's when empty), split by group, tokenise.
pub fn regression_data(
    data: &Path,
    metrics: &[String],
    val_frac: f64,
    seed: u64,
    max_len: usize,
    tok: &Tokenizer,
    model: &codelsi_engine::models::config::Config,
) -> Result<RegressionData> {
    let vocab = model.vocab_size;
    if max_len > model.max_position_embeddings {
        bail!(
            "--max-len {max_len} is past the model's context of {} tokens",
            model.max_position_embeddings
        );
    }
    let examples = regress::read_examples(data)?;
    let available = regress::metric_names(&examples);
    let metrics: Vec<String> = if metrics.is_empty() {
        available.clone()
    } else {
        metrics.to_vec()
    };
    if metrics.is_empty() {
        bail!("{}: no metric (numeric field) in the data", data.display());
    }
    if let Some(m) = metrics.iter().find(|m| !available.contains(m)) {
        bail!(
            "{}: no metric `{m}` in the data (it has: {})",
            data.display(),
            available.join(", ")
        );
    }
    let answer = metrics.len() * regress::number::TOKENS_PER_NUMBER;
    if max_len < answer + 48 {
        bail!("--max-len {max_len} leaves no room for a prompt before {answer} answer tokens");
    }
    let spec = RegressionSpec::new(metrics, max_len - answer, vocab);
    let (train, val) = regress::split_by_group(examples, val_frac, seed);
    let (train_rows, missing) = spec.rows(&train, tok)?;
    let (val_rows, _) = spec.rows(&val, tok)?;
    if train_rows.is_empty() {
        bail!("no training example has every metric of {:?}", spec.metrics);
    }
    Ok(RegressionData {
        spec,
        train: train_rows,
        val: val_rows,
        train_examples: train.len(),
        val_examples: val.len(),
        missing,
    })
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// Code files to predict for (`-` reads standard input).
    files: Vec<PathBuf>,
    /// The base model the adapter was trained on.
    #[arg(long, default_value = "default")]
    model: String,
    /// A regression adapter (`codelsi train --task regression`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Answers drawn per input; the median is the prediction, the 10–90 % range its spread.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score the adapter on its held-out split (the groups its training left out, recomputed
    /// from the data, fraction and seed it was trained with) beside the two baselines.
    #[arg(long)]
    evaluate: bool,
    /// With `--evaluate`: this data instead of the adapter's.
    #[arg(long)]
    data: Option<PathBuf>,
    /// With `--evaluate`: only the first N held-out examples.
    #[arg(long)]
    limit: Option<usize>,
    /// With `--evaluate` and `--data`: only the baselines (no adapter), split with
    /// `--val-frac` and `--split-seed`, for these metrics (default: all).
    #[arg(long)]
    baselines_only: bool,
    #[arg(long, default_value_t = 0.2)]
    val_frac: f64,
    #[arg(long, default_value_t = 42)]
    split_seed: u64,
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Write the held-out report (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

/// Where a regression adapter's training data and split came from (`codelsi_adapter.json`).
fn training_split(dir: &Path) -> Result<(PathBuf, f64, u64)> {
    let extra = AdapterMeta::read(dir)?
        .with_context(|| format!("{}: no {}", dir.display(), AdapterMeta::FILE))?
        .extra;
    let data = extra
        .data
        .context("the adapter does not record its data; pass --data")?;
    Ok((
        data,
        extra.val_frac.unwrap_or(0.2),
        extra.seed.unwrap_or(42),
    ))
}

pub fn cmd_predict(args: PredictArgs) -> Result<()> {
    let json = args.format == Format::Json;
    if args.evaluate && args.baselines_only {
        return crate::on_engine!(baselines_only(&args, json));
    }
    let Some(dir) = &args.adapter else {
        bail!("--adapter is needed (a regression adapter); --baselines-only needs none");
    };
    crate::on_engine!(predict_on(&args, dir))
}

/// `codelsi predict` on `B`: the held-out split or the files named.
fn predict_on<B: OpenDevice>(args: &PredictArgs, dir: &Path) -> Result<()> {
    let json = args.format == Format::Json;
    let (loaded, gpu) = load::<B>(&args.model, None, json)?;
    let regressor = Regressor::<B>::load(dir, &loaded.model)?;
    let spec = &regressor.spec;
    // What to predict for: the held-out split (with the training side, for the baselines),
    // or the files named.
    let (codes, held_out) = if args.evaluate {
        let (data, val_frac, seed) = match &args.data {
            Some(d) => (d.clone(), args.val_frac, args.split_seed),
            None => training_split(dir)?,
        };
        let examples = regress::read_examples(&data)?;
        let (train, mut val) = regress::split_by_group(examples, val_frac, seed);
        val.retain(|e| spec.metrics.iter().all(|m| e.metrics.contains_key(m)));
        if let Some(n) = args.limit {
            val.truncate(n);
        }
        if val.is_empty() {
            bail!("the held-out split has no example with every metric");
        }
        let codes: Vec<String> = val.iter().map(|e| e.code.clone()).collect();
        (codes, Some((train, val)))
    } else {
        if args.files.is_empty() {
            bail!("name code files to predict for (or - for standard input), or pass --evaluate");
        }
        let mut codes = Vec::new();
        for f in &args.files {
            codes.push(if f.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(f).with_context(|| f.display().to_string())?
            });
        }
        (codes, None)
    };

    let bar = crate::progress_bar(
        json || held_out.is_none(),
        "{bar:30} {pos}/{len} held-out programs  [{elapsed_precise} < {eta_precise}]",
    );
    bar.set_length(codes.len() as u64);
    let start = Instant::now();
    let settings = PredictSettings {
        samples: args.samples,
        temperature: args.temperature,
        seed: args.seed,
        share_prefix: true,
    };
    let preds = regressor
        .predict(
            &loaded.model,
            &loaded.tokenizer,
            &codes,
            settings,
            &crate::ctrl_c_token(),
            &mut |i| bar.set_position(i as u64 + 1),
        )?
        .context("cancelled")?;
    bar.finish_and_clear();

    if let Some((train, val)) = held_out {
        let report = regress::held_out_report(spec, &loaded.tokenizer, &train, &val, Some(&preds))?;
        if !json {
            eprintln!(
                "{} held-out programs, {} samples each, in {:.0} s on {gpu}",
                val.len(),
                args.samples,
                start.elapsed().as_secs_f64()
            );
        }
        return finish_report(&report, args, json);
    }
    if json {
        let out: Vec<serde_json::Value> = args
            .files
            .iter()
            .zip(&preds)
            .map(|(f, p)| serde_json::json!({"file": f, "predictions": p}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (f, p) in args.files.iter().zip(&preds) {
            println!("{}: {}", f.display(), describe(p, ", "));
        }
    }
    Ok(())
}

/// Each metric's median and 10–90 % range, `sep` between them:
/// `latency_ms 12.30 (8.100–20.50), peak_kb 384.0 (…)`.
pub fn describe(p: &[Prediction], sep: &str) -> String {
    p.iter()
        .map(|p| {
            format!(
                "{} {} ({}–{})",
                p.metric,
                short(p.median),
                short(p.low),
                short(p.high)
            )
        })
        .collect::<Vec<_>>()
        .join(sep)
}

/// Four significant digits, as the number tokens carry: `12.35`, `0.001234`, `4.560e7`.
pub fn short(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        return format!("{v:.3e}");
    }
    let digits = (3 - a.log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

fn baselines_only<B: OpenDevice>(args: &PredictArgs, json: bool) -> Result<()> {
    let Some(data) = &args.data else {
        bail!("--baselines-only needs --data");
    };
    let (loaded, _) = load::<B>(&args.model, None, json)?;
    let examples = regress::read_examples(data)?;
    let metrics = if args.metrics.is_empty() {
        regress::metric_names(&examples)
    } else {
        args.metrics.clone()
    };
    let spec = RegressionSpec::new(metrics, 0, loaded.model.config.vocab_size);
    let (train, val) = regress::split_by_group(examples, args.val_frac, args.split_seed);
    let report = regress::held_out_report(&spec, &loaded.tokenizer, &train, &val, None)?;
    finish_report(&report, args, json)
}

fn finish_report(report: &HeldOutReport, args: &PredictArgs, json: bool) -> Result<()> {
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(report)?)
            .with_context(|| out.display().to_string())?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "held out: {} examples in {} groups (trained on {})",
        report.val_examples, report.val_groups, report.train_examples
    );
    println!(
        "{:<12} {:<15} {:>9} {:>10} {:>11}",
        "metric", "predictor", "Spearman", "Kendall τ", "MAE log10"
    );
    for m in &report.metrics {
        let mut rows = vec![];
        if let Some(s) = m.model {
            rows.push(("adapter", s));
        }
        if let Some(s) = m.model_geomean {
            rows.push(("adapter, gmean", s));
        }
        if let Some(s) = m.model_expected {
            rows.push(("adapter, E[exp]", s));
        }
        rows.push(("code length", m.length));
        rows.push(("token ridge", m.ridge));
        for (name, s) in rows {
            println!(
                "{:<12} {:<15} {:>9.3} {:>10.3} {:>11.3}",
                m.metric, name, s.spearman, s.kendall_tau, s.mae_log10
            );
        }
        println!(
            "{:<12} values {} … {} (median {}, {:.1} decades){}",
            "",
            short(m.min),
            short(m.max),
            short(m.median),
            m.decades,
            match (m.model_interval_decades, m.model_coverage) {
                (Some(w), Some(c)) => format!(
                    "; adapter's 10–90 % interval {w:.2} decades wide, holds {:.0} % of values",
                    c * 100.0
                ),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_keeps_four_significant_digits() {
        assert_eq!(super::short(12.3456), "12.35");
        assert_eq!(super::short(0.00123456), "0.001235");
        assert_eq!(super::short(44424.0), "44424");
        assert_eq!(super::short(2757814000.0), "2.758e9");
        assert_eq!(super::short(0.0), "0");
    }
}
