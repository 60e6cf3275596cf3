//! HF safetensors weights: `model.safetensors` or sharded `model.safetensors.index.json`,
//! memory-mapped; f16/bf16 matrices handed out as they are (16-bit on the device too), every
//! other tensor as f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::{HostData, HostTensor, WeightSource};
use crate::error::{Error, Result};
use crate::quant::GgmlType;

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// The safetensors files of an HF model directory.
pub struct SafetensorsWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Malformed {
                    path: index_path.clone(),
                    what: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for v in map.values() {
                let name = v
                    .as_str()
                    .filter(|s| !s.contains('/') && !s.contains(".."))
                    .ok_or_else(|| Error::Malformed {
                        path: index_path.clone(),
                        what: format!("bad shard name {v}"),
                    })?;
                let p = dir.join(name);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files
        } else {
            return Err(Error::Malformed {
                path: dir.into(),
                what: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        Self::from_files(dir, files)
    }

    /// One safetensors file (an adapter's `adapter_model.safetensors`, for instance).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::from_files(path, vec![path.to_path_buf()])
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The element types of the tensors, lower case, sorted (`bf16, f32`), for reports.
    pub fn dtypes(&self) -> String {
        let mut types = std::collections::BTreeSet::new();
        for shard in &self.shards {
            if let Ok(st) = SafeTensors::deserialize(&shard.map) {
                for (_, view) in st.tensors() {
                    types.insert(format!("{:?}", view.dtype()).to_lowercase());
                }
            }
        }
        types.into_iter().collect::<Vec<_>>().join(", ")
    }

    fn from_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only private map; safetensors validates the header against the length,
            // and every tensor slice it returns is bounds-checked.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| Error::Malformed {
                path: path.clone(),
                what: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            drop(st);
            shards.push(Shard { path, map });
        }
        Ok(Self {
            dir: dir.into(),
            shards,
            index,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, hf_name: &str) -> Result<Option<HostTensor>> {
        let Some(&i) = self.index.get(hf_name) else {
            return Ok(None);
        };
        let shard = &self.shards[i];
        let st = SafeTensors::deserialize(&shard.map).map_err(|e| Error::Malformed {
            path: shard.path.clone(),
            what: e.to_string(),
        })?;
        let view = st.tensor(hf_name).map_err(|e| Error::BadTensor {
            path: shard.path.clone(),
            tensor: hf_name.into(),
            what: e.to_string(),
        })?;
        let bytes = view.data();
        let shape = view.shape().to_vec();
        // 16-bit matrices stay 16-bit (the kernels widen them as they multiply); vectors
        // (norms, biases) and f32 tensors are f32.
        let data = match view.dtype() {
            Dtype::F32 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::F16 if shape.len() == 2 => HostData::Blocks {
                ty: GgmlType::F16,
                bytes: bytes.to_vec(),
            },
            Dtype::BF16 if shape.len() == 2 => HostData::Blocks {
                ty: GgmlType::Bf16,
                bytes: bytes.to_vec(),
            },
            Dtype::F16 => HostData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::BF16 => HostData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            other => {
                return Err(Error::UnsupportedDtype {
                    tensor: hf_name.into(),
                    dtype: format!("{other:?}"),
                    why: format!("{}: weights must be F32, F16 or BF16", shard.path.display()),
                });
            }
        };
        Ok(Some(HostTensor {
            name: hf_name.into(),
            shape,
            data,
        }))
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}
