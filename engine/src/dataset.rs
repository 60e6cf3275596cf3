//! The dataset folder: what `codelsi import` writes and `train`, `eval --data` and the app's
//! Data panel read. `train.jsonl` and `val.jsonl` hold one record per line (Alpaca or chat, with
//! the import's `kind`, `lang`, `source`, `tokens`); `excluded.jsonl` the records a user left
//! out, each with its split, so they can be restored; `report.json` what the import did.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::files::write_atomic;

/// Which file of the folder a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// The split's file in the folder.
    pub fn file(self) -> &'static str {
        match self {
            Split::Train => DatasetDir::TRAIN,
            Split::Val => DatasetDir::VAL,
        }
    }

    /// How `excluded.jsonl` names it.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// A dataset folder, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetDir {
    pub dir: PathBuf,
}

/// A record a user left out, with the split it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Excluded {
    pub split: Split,
    pub record: Value,
}

impl DatasetDir {
    pub const TRAIN: &str = "train.jsonl";
    pub const VAL: &str = "val.jsonl";
    pub const EXCLUDED: &str = "excluded.jsonl";
    pub const REPORT: &str = "report.json";
    /// The files an import writes (a new import replaces a dataset only when told to).
    pub const IMPORT_FILES: [&str; 3] = [Self::TRAIN, Self::VAL, Self::REPORT];

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder at `dir`, refused when it holds no `train.jsonl`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(Self::TRAIN).is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} has no {}: not a dataset folder",
                dir.display(),
                Self::TRAIN
            )));
        }
        Ok(Self::new(dir))
    }

    pub fn split(&self, split: Split) -> PathBuf {
        self.dir.join(split.file())
    }

    pub fn report(&self) -> PathBuf {
        self.dir.join(Self::REPORT)
    }

    /// The training file and, where the folder has a non-empty one, the validation file. For
    /// commands that take a dataset folder or a JSONL file: a file is its own training data.
    pub fn files(data: &Path) -> (PathBuf, Option<PathBuf>) {
        if data.is_dir() {
            let d = Self::new(data);
            let val = d.split(Split::Val);
            let has_val = std::fs::metadata(&val).is_ok_and(|m| m.len() > 0);
            (d.split(Split::Train), has_val.then_some(val))
        } else {
            (data.to_path_buf(), None)
        }
    }

    /// The records of `split`, as JSON values (none when the file is absent).
    pub fn records(&self, split: Split) -> Result<Vec<Value>> {
        read_values(&self.split(split))
    }

    /// The records left out, each with its split (none when there is no `excluded.jsonl`).
    pub fn excluded(&self) -> Result<Vec<Excluded>> {
        Ok(read_values(&self.dir.join(Self::EXCLUDED))?
            .into_iter()
            .map(|v| Excluded {
                split: match v.get("split").and_then(Value::as_str) {
                    Some("val") => Split::Val,
                    _ => Split::Train,
                },
                record: v.get("record").cloned().unwrap_or(Value::Null),
            })
            .collect())
    }

    /// Replace the three record files with `train`, `val` and `excluded`, each through a
    /// temporary file and a rename, so a reader sees the old file or the new one.
    pub fn save(&self, train: &[Value], val: &[Value], excluded: &[Excluded]) -> Result<()> {
        let excluded: Vec<Value> = excluded
            .iter()
            .map(|e| serde_json::json!({"split": e.split.name(), "record": e.record}))
            .collect();
        write_atomic(&self.split(Split::Train), jsonl(train).as_bytes())?;
        write_atomic(&self.split(Split::Val), jsonl(val).as_bytes())?;
        write_atomic(&self.dir.join(Self::EXCLUDED), jsonl(&excluded).as_bytes())
    }
}

/// One value per line.
fn jsonl(values: &[Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

/// One JSON value per non-empty line of `path`; none when the file does not exist.
fn read_values(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Malformed {
                path: path.to_path_buf(),
                what: format!("line {}: not JSON: {e}", i + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_records_read_back_with_their_splits() {
        let dir = std::env::temp_dir().join(format!("codelsi-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = DatasetDir::new(&dir);
        assert!(DatasetDir::open(&dir).is_err(), "no train.jsonl yet");
        let (a, b, c) = (
            serde_json::json!({"instruction": "a", "output": "1"}),
            serde_json::json!({"instruction": "b", "output": "2"}),
            serde_json::json!({"instruction": "c", "output": "3"}),
        );
        let gone = Excluded {
            split: Split::Val,
            record: c.clone(),
        };
        d.save(
            std::slice::from_ref(&a),
            std::slice::from_ref(&b),
            std::slice::from_ref(&gone),
        )
        .unwrap();
        let d = DatasetDir::open(&dir).unwrap();
        assert_eq!(d.records(Split::Train).unwrap(), vec![a]);
        assert_eq!(d.records(Split::Val).unwrap(), vec![b]);
        assert_eq!(d.excluded().unwrap(), vec![gone]);
        let (train, val) = DatasetDir::files(&dir);
        assert_eq!(train, dir.join("train.jsonl"));
        assert_eq!(val, Some(dir.join("val.jsonl")));
        std::fs::write(dir.join("val.jsonl"), "{\"x\": 1}\nnot json\n").unwrap();
        let err = d.records(Split::Val).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
