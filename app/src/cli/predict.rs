//! `codelsi predict`: a regression adapter's figures for code, or its scores on the held-out
//! split beside the baselines.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use codelsi_engine::model::OpenDevice;
use codelsi_engine::regress::{
    self, HeldOutReport, PredictSettings, Prediction, RegressionSpec, Regressor,
};
use codelsi_engine::train::meta::AdapterMeta;

use super::{Format, load};

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
    let (loaded, gpu) = load::<B>(&args.model, &Default::default(), json)?;
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

    let bar = super::progress_bar(
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
            &super::ctrl_c_token(),
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
    let (loaded, _) = load::<B>(&args.model, &Default::default(), json)?;
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
