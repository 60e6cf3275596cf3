//! What codelsi records beside an adapter it trained, `codelsi_adapter.json`: the run's
//! settings and losses, and where its data came from. The trainer writes it; the app's Adapters
//! panel, `predict` and `train --init-adapter` read it. Every field has a default, so the files
//! of older versions still read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::TrainConfig;

/// `codelsi_adapter.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterMeta {
    /// The codelsi version that trained it.
    pub codelsi: String,
    pub base_model: String,
    /// The run's settings; `None` where an older version wrote settings this one cannot read.
    #[serde(deserialize_with = "or_none")]
    pub train: Option<TrainConfig>,
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// `(step, loss)` of every step, and of every validation.
    pub losses: Vec<(usize, f64)>,
    pub val_losses: Vec<(usize, f64)>,
    /// What the command or the app knew of the run.
    pub extra: RunInfo,
}

/// Where a run's data came from and how it was cut: what a user needs to redo it, and what
/// `predict --evaluate` needs to find the held-out split again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunInfo {
    /// `regression` for a regression adapter; absent for a generation one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub data: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_frac: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub max_len: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub base_adapters: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    pub device: Option<String>,
    /// Trained from the desktop app.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub app: bool,
    /// The task's own description of what the adapter answers (a regression adapter's metrics
    /// and prompt length), kept as the task wrote it: the trainer knows no task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_examples: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_examples: Option<usize>,
}

/// `T` where the value reads as one, else `None` (not an error: the record is informative).
fn or_none<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl AdapterMeta {
    pub const FILE: &str = "codelsi_adapter.json";

    /// The record in adapter folder `dir`; `None` when there is none (an adapter codelsi did not
    /// train, such as one from PEFT).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(Self::FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Json { path, source })
    }

    /// The record as the file holds it.
    pub fn to_json(&self, dir: &Path) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: dir.join(Self::FILE),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written before the record was typed (0.1: `extra` as free JSON) reads, and
    /// what it says survives a write and a read.
    #[test]
    fn older_files_read_and_round_trip() {
        let old = r#"{"codelsi": "0.1.0", "base_model": "m.gguf", "steps": 3,
            "final_loss": 0.5, "val_loss": null, "losses": [[1, 0.9], [3, 0.5]],
            "val_losses": [], "train": {"lr": "fast"}, "extra": {"task": "regression", "data": "d.jsonl",
            "val_frac": 0.2, "seed": 7, "regression": {"metrics": ["latency_ms"]},
            "unknown": 1}}"#;
        let meta: AdapterMeta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.steps, 3);
        assert_eq!(meta.losses, vec![(1, 0.9), (3, 0.5)]);
        assert_eq!(meta.extra.data, Some(PathBuf::from("d.jsonl")));
        assert_eq!(meta.extra.seed, Some(7));
        assert!(meta.train.is_none());
        let back: AdapterMeta =
            serde_json::from_slice(&meta.to_json(Path::new(".")).unwrap()).unwrap();
        assert_eq!(back.extra, meta.extra);
        assert_eq!(back.final_loss, Some(0.5));
    }
}
