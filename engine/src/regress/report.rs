//! The held-out report: the adapter's predictions and the baselines, scored per metric.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Example, Prediction, RegressionSpec, stats};
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;

/// A held-out evaluation: the adapter's median predictions and the two baselines, per metric.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutReport {
    pub train_examples: usize,
    pub val_examples: usize,
    pub val_groups: usize,
    pub metrics: Vec<MetricReport>,
    /// Each held-out example's group, true values and predictions (with the adapter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<HeldOutPrediction>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldOutPrediction {
    pub group: Option<String>,
    pub truth: BTreeMap<String, f64>,
    pub predicted: Vec<Prediction>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricReport {
    pub metric: String,
    /// Spread of the held-out values: min, median, max, and decades (log10 max/min).
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub decades: f64,
    /// The model's median predictions scored, its samples' geometric means, and the
    /// geometric means with the exponent's expectation ([`Prediction::expected`]).
    pub model: Option<stats::Scores>,
    pub model_geomean: Option<stats::Scores>,
    pub model_expected: Option<stats::Scores>,
    pub length: stats::Scores,
    pub ridge: stats::Scores,
    /// Mean width of the model's 10–90 % interval, in decades.
    pub model_interval_decades: Option<f64>,
    /// Share of held-out values inside the model's 10–90 % interval.
    pub model_coverage: Option<f64>,
}

/// Score the baselines (fitted on `train`) and, when given, the model's predictions on `val`.
pub fn held_out_report(
    spec: &RegressionSpec,
    tok: &Tokenizer,
    train: &[Example],
    val: &[Example],
    predictions: Option<&[Vec<Prediction>]>,
) -> Result<HeldOutReport> {
    let ids = |e: &Example| tok.encode(&e.code, false);
    let train_ids: Vec<Vec<u32>> = train.iter().map(ids).collect::<Result<_>>()?;
    let val_ids: Vec<Vec<u32>> = val.iter().map(ids).collect::<Result<_>>()?;
    let mut metrics = Vec::new();
    for (m, name) in spec.metrics.iter().enumerate() {
        let pick = |set: &[Example], set_ids: &[Vec<u32>]| {
            let mut ys = vec![];
            let mut rows = vec![];
            for (i, e) in set.iter().enumerate() {
                if let Some(&y) = e.metrics.get(name).filter(|v| v.is_finite()) {
                    ys.push(y);
                    rows.push((i, e.code.chars().count(), set_ids[i].clone()));
                }
            }
            (ys, rows)
        };
        let (ty, trows) = pick(train, &train_ids);
        let (vy, vrows) = pick(val, &val_ids);
        if ty.is_empty() || vy.is_empty() {
            continue;
        }
        let length =
            stats::LengthBaseline::fit(&trows.iter().map(|r| r.1).collect::<Vec<_>>(), &ty);
        let ridge =
            stats::RidgeBaseline::fit(&trows.iter().map(|r| r.2.clone()).collect::<Vec<_>>(), &ty);
        let length_pred: Vec<f64> = vrows.iter().map(|r| length.predict(r.1)).collect();
        let ridge_pred: Vec<f64> = vrows.iter().map(|r| ridge.predict(&r.2)).collect();
        let (mut model, mut geomean, mut expected) = (None, None, None);
        let (mut width, mut coverage) = (None, None);
        if let Some(p) = predictions {
            let got: Vec<&Prediction> = vrows.iter().map(|r| &p[r.0][m]).collect();
            let score = |of: fn(&Prediction) -> f64| {
                let pred: Vec<f64> = got.iter().map(|&p| of(p)).collect();
                Some(stats::Scores::of(&pred, &vy))
            };
            model = score(|p| p.median);
            geomean = score(|p| p.geomean);
            expected = score(|p| p.expected);
            width = Some(
                got.iter()
                    .map(|p| stats::log10_floor(p.high) - stats::log10_floor(p.low))
                    .sum::<f64>()
                    / got.len() as f64,
            );
            coverage = Some(
                got.iter()
                    .zip(&vy)
                    .filter(|(p, y)| p.low <= **y && **y <= p.high)
                    .count() as f64
                    / got.len() as f64,
            );
        }
        let (min, max) = (stats::quantile(&vy, 0.0), stats::quantile(&vy, 1.0));
        metrics.push(MetricReport {
            metric: name.clone(),
            min,
            median: stats::quantile(&vy, 0.5),
            max,
            decades: stats::log10_floor(max) - stats::log10_floor(min),
            model,
            model_geomean: geomean,
            model_expected: expected,
            length: stats::Scores::of(&length_pred, &vy),
            ridge: stats::Scores::of(&ridge_pred, &vy),
            model_interval_decades: width,
            model_coverage: coverage,
        });
    }
    Ok(HeldOutReport {
        train_examples: train.len(),
        val_examples: val.len(),
        val_groups: {
            let mut g: Vec<_> = val.iter().map(|e| e.group.clone()).collect();
            g.sort();
            g.dedup();
            g.len()
        },
        metrics,
        predictions: predictions.map_or_else(Vec::new, |p| {
            val.iter()
                .zip(p)
                .map(|(e, p)| HeldOutPrediction {
                    group: e.group.clone(),
                    truth: e.metrics.clone(),
                    predicted: p.clone(),
                })
                .collect()
        }),
    })
}
