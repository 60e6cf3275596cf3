//! `codelsi measure`: a regression dataset from running programs in the sandbox on scaled
//! inputs, or (`--suite kernels`) the kernel plans timed on this machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use codelsi_engine::device::init_wgpu;
use codelsi_engine::eval::{self, Harness};
use codelsi_engine::kernels::qmatmul::{QPlan, QShape};
use codelsi_engine::kernels::sweep::{self, Best, SweepSettings};
use codelsi_engine::quant::QFormat;
use codelsi_engine::regress::measure::{self, MeasureEvent, MeasureSettings};
use codelsi_engine::regress::{self, Example, stats};

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
    let bar = super::progress_bar(
        false,
        "{bar:30} {pos}/{len} runs  {msg}  [{elapsed_precise} < {eta_precise}]",
    );
    let cancel = super::ctrl_c_token();
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
    let bar = super::progress_bar(
        false,
        "{bar:30} {pos}/{len} layouts  [{elapsed_precise} < {eta_precise}]",
    );
    bar.set_length(cases.len() as u64);
    let start = Instant::now();
    let timed = sweep::sweep(
        &device,
        &cases,
        settings.min_secs,
        &super::ctrl_c_token(),
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
