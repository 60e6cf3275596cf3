//! Model file loaders. Each source hands out tensors by their HF names
//! (`model.layers.0.self_attn.q_proj.weight`), row-major, either as f32 or as ggml blocks that
//! can go to the GPU without dequantising.

pub mod gguf;
pub mod safetensors;
pub mod tokenizer;

use crate::error::{Error, Result};
use crate::quant::{GgmlType, dequantize_into};
pub use gguf::GgufWeights;

/// Tensor data on the host.
#[derive(Debug, Clone)]
pub enum HostData {
    F32(Vec<f32>),
    /// Whole ggml blocks of `ty`; each row of the tensor is a whole number of blocks.
    Blocks {
        ty: GgmlType,
        bytes: Vec<u8>,
    },
}

/// A tensor on the host, row-major (`shape[0]` outermost).
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32, dequantising blocks.
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            HostData::F32(v) => v,
            HostData::Blocks { ty, bytes } => dequantize(ty, &bytes),
        }
    }

    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::ShapeMismatch {
                tensor: self.name.clone(),
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Reorder the rows of a 2-D tensor: row `i` of the result is row `from[i]` of `self`.
    /// Works on quantised blocks too, since each row is a whole number of blocks.
    pub fn permute_rows(self, from: &[usize]) -> Self {
        let rows = self.shape[0];
        let data = match self.data {
            HostData::F32(v) => {
                let w = v.len() / rows;
                HostData::F32(
                    from.iter()
                        .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                        .collect(),
                )
            }
            HostData::Blocks { ty, bytes } => {
                let w = bytes.len() / rows;
                let bytes = from
                    .iter()
                    .flat_map(|&r| bytes[r * w..(r + 1) * w].iter().copied())
                    .collect();
                HostData::Blocks { ty, bytes }
            }
        };
        Self { data, ..self }
    }
}

/// `bytes` of `ty` as f32 values.
fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    dequantize_into(ty, bytes, &mut out);
    out
}

/// Where a model's weights come from.
pub trait WeightSource {
    /// The tensor with this HF name, or `None` if the file does not hold it.
    fn get(&self, hf_name: &str) -> Result<Option<HostTensor>>;

    /// The file, for error messages.
    fn path(&self) -> &std::path::Path;

    fn require(&self, hf_name: &str) -> Result<HostTensor> {
        self.get(hf_name)?.ok_or_else(|| Error::MissingTensor {
            path: self.path().into(),
            tensor: hf_name.into(),
        })
    }
}

/// GGUF tensor names (llama.cpp's `convert_hf_to_gguf.py`) for HF names.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's q/k row order: HF row `r` is GGUF row `from[r]` (HF row `j·half + i` of a head
/// is GGUF row `2i + j`, llama.cpp's `permute`). `None` when `rows` does not split into `heads`
/// heads of even size.
pub fn gguf_qk_rows(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (h, within) = (r / head_dim, r % head_dim);
                let (j, i) = (within / half, within % half);
                h * head_dim + 2 * i + j
            })
            .collect(),
    )
}

impl WeightSource for GgufWeights<'_> {
    fn get(&self, hf_name: &str) -> Result<Option<HostTensor>> {
        let Some(name) = gguf_name(hf_name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor(&name) else {
            return Ok(None);
        };
        let bytes = self.file.tensor_bytes(info);
        let mut shape = info.shape();
        // 16-bit matrices stay 16-bit, as quantised ones stay in their blocks; vectors (norms,
        // biases) are small and become f32.
        let data = match info.ty {
            GgmlType::F32 => HostData::F32(dequantize(info.ty, bytes)),
            GgmlType::F16 | GgmlType::Bf16 if shape.len() == 1 => {
                HostData::F32(dequantize(info.ty, bytes))
            }
            ty => HostData::Blocks {
                ty,
                bytes: bytes.to_vec(),
            },
        };
        if shape.len() == 1 && matches!(data, HostData::Blocks { .. }) {
            shape.insert(0, 1);
        }
        let t = HostTensor {
            name: hf_name.into(),
            shape,
            data,
        };
        let heads = if hf_name.contains("q_proj") {
            self.n_heads
        } else if hf_name.contains("k_proj") {
            self.n_kv_heads
        } else {
            return Ok(Some(t));
        };
        if !self.unpermute_qk {
            return Ok(Some(t));
        }
        let rows = t.shape[0];
        let Some(from) = gguf_qk_rows(rows, heads) else {
            return Err(Error::BadTensor {
                path: self.file.path.clone(),
                tensor: name,
                what: format!("{rows} rows do not split into {heads} heads of even size"),
            });
        };
        if t.shape.len() == 1 {
            // Biases: permute as a column of rows.
            let v = t.into_f32();
            let data = HostData::F32(from.iter().map(|&r| v[r]).collect());
            return Ok(Some(HostTensor {
                name: hf_name.into(),
                shape: vec![rows],
                data,
            }));
        }
        Ok(Some(t.permute_rows(&from)))
    }

    fn path(&self) -> &std::path::Path {
        &self.file.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::{GgufFile, GgufWriter, Value};

    /// A GGUF's 16-bit matrices come out as blocks (they stay 16-bit on the device), its
    /// 16-bit vectors as f32.
    #[test]
    fn sixteen_bit_matrices_stay_sixteen_bit() {
        let values: Vec<f32> = (0..64 * 32).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
        let halves = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("qwen2".into()))
            .tensor("blk.0.attn_q.weight", &[64, 32], 1, halves(&values))
            .tensor("blk.0.attn_norm.weight", &[32], 30, [0x80, 0x3f].repeat(32));
        let file =
            GgufFile::from_bytes("test.gguf", w.to_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let weights = GgufWeights {
            file: &file,
            n_heads: 1,
            n_kv_heads: 1,
            unpermute_qk: false,
        };
        let q = weights
            .require("model.layers.0.self_attn.q_proj.weight")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.shape, vec![64, 32]);
        assert!(
            matches!(&q.data, HostData::Blocks { ty: GgmlType::F16, bytes } if bytes.len() == 64 * 32 * 2)
        );
        assert_eq!(q.into_f32(), values);
        let norm = weights
            .require("model.layers.0.input_layernorm.weight")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&norm.data, HostData::F32(v) if v == &vec![1.0; 32]));
    }
}
