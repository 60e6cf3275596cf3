//! Regression data: examples of code with measured metrics, read from JSONL or CSV, split by
//! group so no problem sits on both sides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::RegressionSpec;
use super::number::TOKENS_PER_NUMBER;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::models::config::Config;
use crate::train::data::Row;

/// One piece of code and what was measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub code: String,
    pub metrics: BTreeMap<String, f64>,
    /// Examples of one group (one problem) stay on one side of the held-out split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Fields of a data file that are not metrics.
const NOT_METRICS: [&str; 5] = ["code", "group", "task_id", "scale", "source"];

/// Read examples from JSONL (`code`, `metrics` as an object or as numeric fields beside it,
/// optional `group` or `task_id`) or CSV (a `code` column, optional `group`/`task_id`, every
/// other column a metric; empty cells are missing values).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let examples = if is_csv {
        read_csv(path)?
    } else {
        read_jsonl(path)?
    };
    if examples.is_empty() {
        return Err(Error::Malformed {
            path: path.into(),
            what: "no examples".into(),
        });
    }
    Ok(examples)
}

fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::Malformed {
            path: path.into(),
            what: format!("line {}: {what}", i + 1),
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let code = obj
            .get("code")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad("no `code` string".into()))?
            .to_string();
        let group = ["group", "task_id"]
            .iter()
            .find_map(|k| obj.get(*k))
            .map(|g| match g {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        let mut metrics = BTreeMap::new();
        let mut put = |name: &str, value: &serde_json::Value| -> Result<()> {
            match value {
                serde_json::Value::Null => Ok(()),
                v => {
                    let x = v
                        .as_f64()
                        .ok_or_else(|| bad(format!("metric `{name}` is not a number: {v}")))?;
                    metrics.insert(name.to_string(), x);
                    Ok(())
                }
            }
        };
        match obj.get("metrics") {
            Some(serde_json::Value::Object(m)) => {
                for (k, v) in m {
                    put(k, v)?;
                }
            }
            Some(_) => return Err(bad("`metrics` is not an object".into())),
            None => {
                for (k, v) in obj {
                    if !NOT_METRICS.contains(&k.as_str()) {
                        put(k, v)?;
                    }
                }
            }
        }
        out.push(Example {
            code,
            metrics,
            group,
        });
    }
    Ok(out)
}

fn read_csv(path: &Path) -> Result<Vec<Example>> {
    let bad = |what: String| Error::Malformed {
        path: path.into(),
        what,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let code_col = headers
        .iter()
        .position(|h| h == "code")
        .ok_or_else(|| bad("no `code` column".into()))?;
    let group_col = headers
        .iter()
        .position(|h| h == "group")
        .or_else(|| headers.iter().position(|h| h == "task_id"));
    let mut out = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| bad(e.to_string()))?;
        let mut metrics = BTreeMap::new();
        for (c, h) in headers.iter().enumerate() {
            if c == code_col || Some(c) == group_col || NOT_METRICS.contains(&h) {
                continue;
            }
            let cell = rec.get(c).unwrap_or("").trim();
            if cell.is_empty() {
                continue;
            }
            let v: f64 = cell.parse().map_err(|_| {
                bad(format!(
                    "record {}: column `{h}`: `{cell}` is not a number",
                    i + 1
                ))
            })?;
            metrics.insert(h.to_string(), v);
        }
        out.push(Example {
            code: rec.get(code_col).unwrap_or("").to_string(),
            metrics,
            group: group_col.and_then(|g| rec.get(g)).map(str::to_string),
        });
    }
    Ok(out)
}

/// The metrics of a data set, in order of first appearance.
pub fn metric_names(examples: &[Example]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for e in examples {
        for k in e.metrics.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
}

/// Split by group (an example without a group is its own): a seeded shuffle of the groups,
/// `frac` of them (at least one when there are two or more) held out. Never splits a group.
pub fn split_by_group(
    examples: Vec<Example>,
    frac: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    use rand::seq::SliceRandom;
    let key = |i: usize, e: &Example| e.group.clone().unwrap_or_else(|| format!("#{i}"));
    let mut groups: Vec<String> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| key(i, e))
        .collect();
    groups.sort();
    groups.dedup();
    groups.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_val = if groups.len() >= 2 {
        ((groups.len() as f64 * frac).round() as usize).clamp(1, groups.len() - 1)
    } else {
        0
    };
    let held: std::collections::HashSet<&String> = groups[..n_val].iter().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if held.contains(&key(i, &e)) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// Write examples as JSONL (what `codelsi measure` writes and `train --task regression` reads).
pub fn write_examples(path: &Path, examples: &[Example]) -> Result<()> {
    let mut text = String::new();
    for e in examples {
        let line = serde_json::to_string(e).map_err(|source| Error::Json {
            path: PathBuf::from(path),
            source,
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    crate::files::write_atomic(path, text.as_bytes())
}

/// Regression training data: the examples split by group, what the adapter will predict, and
/// the rows.
#[derive(Debug, Clone)]
pub struct RegressionData {
    pub spec: RegressionSpec,
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub train_examples: usize,
    pub val_examples: usize,
    /// Examples left out because a metric is missing.
    pub missing: usize,
}

impl RegressionData {
    /// Read `data`, keep `metrics` (all of the file's when empty), hold out `val_frac` of the
    /// groups, and cut rows of at most `max_len` tokens for a model of `config`'s shape.
    pub fn prepare(
        data: &Path,
        metrics: &[String],
        val_frac: f64,
        seed: u64,
        max_len: usize,
        tok: &Tokenizer,
        config: &Config,
    ) -> Result<Self> {
        if max_len > config.max_position_embeddings {
            return Err(Error::Setting(format!(
                "max-len {max_len} is past the model's context of {} tokens",
                config.max_position_embeddings
            )));
        }
        let examples = read_examples(data)?;
        let available = metric_names(&examples);
        let metrics: Vec<String> = if metrics.is_empty() {
            available.clone()
        } else {
            metrics.to_vec()
        };
        if metrics.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no metric (numeric field) in the data",
                data.display()
            )));
        }
        if let Some(m) = metrics.iter().find(|m| !available.contains(m)) {
            return Err(Error::InvalidArgument(format!(
                "{}: no metric `{m}` in the data (it has: {})",
                data.display(),
                available.join(", ")
            )));
        }
        let answer = metrics.len() * TOKENS_PER_NUMBER;
        if max_len < answer + 48 {
            return Err(Error::Setting(format!(
                "max-len {max_len} leaves no room for a prompt before {answer} answer tokens"
            )));
        }
        let spec = RegressionSpec::new(metrics, max_len - answer, config.vocab_size);
        let (train, val) = split_by_group(examples, val_frac, seed);
        let (train_rows, missing) = spec.rows(&train, tok)?;
        let (val_rows, _) = spec.rows(&val, tok)?;
        if train_rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no training example has every metric of {:?}",
                spec.metrics
            )));
        }
        Ok(Self {
            spec,
            train: train_rows,
            val: val_rows,
            train_examples: train.len(),
            val_examples: val.len(),
            missing,
        })
    }
}
