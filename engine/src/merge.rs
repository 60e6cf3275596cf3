//! `codelsi merge`: fold LoRA adapters into a base model, `W' = W + Σ (alpha/r)·B·A`, and write
//! the merged model as an HF safetensors directory (f16) or as a GGUF file in the base's own
//! quantisation.
//!
//! All of it runs on the host, one tensor at a time: no GPU, and memory for one tensor, so a
//! 13B model merges on a laptop. The output appears under its name only when it is complete
//! (written beside it and renamed), and an existing output is never overwritten.
//!
//! Re-quantising a merged weight loses part of the adapter's change: a LoRA update is often
//! smaller than a 4-bit quantisation step. The report measures how much
//! ([`MergeReport::delta_loss`]) so the user can choose f16 when it matters.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde::Serialize;

use crate::adapter::{HostAdapter, Target};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::files::{replace_dir, temp_beside};
use crate::io::gguf::{GgufFile, GgufTensorDecl, Value, write_gguf_stream};
use crate::io::safetensors::SafetensorsWeights;
use crate::io::tokenizer::Tokenizer;
use crate::io::{WeightSource, gguf_name, gguf_qk_rows};
use crate::models::config::Config;
use crate::quant::{GgmlType, dequantize_into, quantize_blocks};

/// What `codelsi merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFormat {
    /// An HF model directory: `model.safetensors` (every tensor f16), `config.json`, tokenizer
    /// files. Loads in codelsi and in transformers.
    HfF16,
    /// A GGUF file with the base's metadata and tensor types: merged weights re-quantised to
    /// their original type, or to `merged_type` (Q8_0 or F16 keep much more of a small change
    /// than Q4). Needs a GGUF base.
    Gguf { merged_type: Option<GgmlType> },
}

impl MergeFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "hf" | "hf-f16" | "safetensors" => Ok(Self::HfF16),
            "gguf" => Ok(Self::Gguf { merged_type: None }),
            _ => Err(Error::Setting(format!(
                "merge format `{s}` is not one of hf, gguf"
            ))),
        }
    }

    /// GGUF when `out` ends in `.gguf`, an HF directory otherwise.
    pub fn for_output(out: &Path) -> Self {
        match out.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gguf") => Self::Gguf { merged_type: None },
            _ => Self::HfF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::HfF16 => "HF safetensors (f16)",
            Self::Gguf { merged_type: None } => "GGUF (base quantisation)",
            Self::Gguf {
                merged_type: Some(_),
            } => "GGUF (merged weights retyped)",
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub format: &'static str,
    pub adapters: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Weights an adapter changed.
    pub merged_tensors: usize,
    /// Merged weights written in another type than the base's, and why.
    pub retyped: Vec<String>,
    /// `‖written − (W + ΔW)‖ / ‖ΔW‖` over the merged weights: the share of the adapters' change
    /// lost to the output's number format (f16 rounding, or re-quantisation).
    pub delta_loss: f64,
    /// Bytes of weights written.
    pub bytes: u64,
}

/// The base model a merge reads.
enum Base {
    Gguf(GgufFile),
    Hf(PathBuf),
}

/// The summed change of every adapter to each weight.
struct Deltas {
    adapters: Vec<HostAdapter>,
}

impl Deltas {
    /// `Σ scale·B·A` for `t` in `layer`, `[out, in]` row-major (HF layout).
    fn get(&self, layer: usize, t: Target) -> Option<Vec<f32>> {
        let mut sum: Option<Vec<f32>> = None;
        for a in &self.adapters {
            if let Some(d) = a.delta(layer, t) {
                match &mut sum {
                    None => sum = Some(d),
                    Some(s) => s.iter_mut().zip(&d).for_each(|(s, d)| *s += d),
                }
            }
        }
        sum
    }

    fn touches(&self, layer: usize, t: Target) -> bool {
        self.adapters
            .iter()
            .any(|a| a.layers.get(layer).is_some_and(|l| l[t.index()].is_some()))
    }
}

/// `Σ (written − wanted)²` and `Σ delta²` over merged weights.
#[derive(Default)]
struct LossStats {
    err2: f64,
    delta2: f64,
}

impl LossStats {
    fn add(&mut self, written: &[f32], wanted: &[f32], delta: &[f32]) {
        for ((&w, &x), &d) in written.iter().zip(wanted).zip(delta) {
            self.err2 += (w as f64 - x as f64).powi(2);
            self.delta2 += (d as f64).powi(2);
        }
    }

    fn ratio(&self) -> f64 {
        if self.delta2 == 0.0 {
            0.0
        } else {
            (self.err2 / self.delta2).sqrt()
        }
    }
}

/// Merge the PEFT adapters in `adapters` into the model at `base` (a GGUF file or an HF
/// directory) and write it to `out`, which must not exist. `progress(done, total)` counts
/// tensors; `cancel` stops between tensors, leaving nothing behind.
pub fn merge(
    base: &Path,
    adapters: &[PathBuf],
    out: &Path,
    format: MergeFormat,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MergeReport> {
    if adapters.is_empty() {
        return Err(Error::InvalidArgument(
            "merge needs at least one adapter directory".into(),
        ));
    }
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; merge never overwrites: choose another output or remove it",
            out.display()
        )));
    }
    let (base_file, config) = if base.is_dir() {
        let config = Config::from_hf_json(&base.join("config.json"))?;
        (Base::Hf(base.into()), config)
    } else {
        let file = GgufFile::open(base)?;
        let config = Config::from_gguf(&file)?;
        (Base::Gguf(file), config)
    };
    let deltas = Deltas {
        adapters: adapters
            .iter()
            .map(|dir| {
                let a = HostAdapter::load_peft(dir, &config)?;
                if a.new_tokens.is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: a regression adapter's number tokens have no place in a merged \
                         model; use it with `codelsi predict`",
                        dir.display()
                    )));
                }
                Ok(a)
            })
            .collect::<Result<_>>()?,
    };

    let tmp = TempPath(temp_beside(out, "merged")?);
    let mut report = MergeReport {
        out: out.into(),
        format: format.name(),
        adapters: adapters.len(),
        tensors: 0,
        merged_tensors: 0,
        retyped: vec![],
        delta_loss: 0.0,
        bytes: 0,
    };
    let mut ctx = Ctx {
        config: &config,
        deltas: &deltas,
        cancel,
        progress,
        report: &mut report,
        stats: LossStats::default(),
    };
    match (format, &base_file) {
        (MergeFormat::HfF16, Base::Gguf(file)) => {
            let tokenizer = Tokenizer::from_gguf(file)?;
            let files = tokenizer.hf_files(config.max_position_embeddings)?;
            let files = files.into_iter().map(|(n, b)| (n.to_string(), b)).collect();
            let weights = config.gguf_weights(file);
            write_hf(&weights, files, &tmp.0, &mut ctx)?;
        }
        (MergeFormat::HfF16, Base::Hf(dir)) => {
            let mut files = Vec::new();
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
                "chat_template.jinja",
                "tokenizer.model",
            ] {
                let p = dir.join(f);
                if p.exists() {
                    files.push((
                        f.to_string(),
                        std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
                    ));
                }
            }
            let weights = SafetensorsWeights::open(dir)?;
            write_hf(&weights, files, &tmp.0, &mut ctx)?;
        }
        (MergeFormat::Gguf { merged_type }, Base::Gguf(file)) => {
            if let Some(ty) = merged_type
                && encode(ty, &[]).is_none()
            {
                return Err(Error::Setting(format!(
                    "codelsi cannot quantise to {}; merged weights can be F32, F16, BF16, Q8_0, \
                     Q4_1 or Q4_0",
                    ty.name()
                )));
            }
            let adapter_names: Vec<Value> = adapters
                .iter()
                .map(|p| Value::String(p.display().to_string()))
                .collect();
            write_gguf(file, adapter_names, merged_type, &tmp.0, &mut ctx)?;
        }
        (MergeFormat::Gguf { .. }, Base::Hf(_)) => {
            return Err(Error::InvalidArgument(
                "a GGUF merge keeps the base's quantisation, so it needs a GGUF base; merge an \
                 HF base to an HF directory (f16) and convert that with llama.cpp's \
                 convert_hf_to_gguf.py"
                    .into(),
            ));
        }
    }
    ctx.report.delta_loss = ctx.stats.ratio();
    match format {
        MergeFormat::HfF16 => replace_dir(&tmp.0, out)?,
        MergeFormat::Gguf { .. } => std::fs::rename(&tmp.0, out).map_err(|e| Error::io(out, e))?,
    }
    std::mem::forget(tmp);
    Ok(report)
}

/// A partial output, removed unless the merge completes.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

struct Ctx<'a> {
    config: &'a Config,
    deltas: &'a Deltas,
    cancel: &'a CancelToken,
    progress: &'a mut dyn FnMut(usize, usize),
    report: &'a mut MergeReport,
    stats: LossStats,
}

impl Ctx<'_> {
    fn step(&mut self, done: usize, total: usize) -> Result<()> {
        (self.progress)(done, total);
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

/// One tensor of the HF output: name, shape, and the projection it is when adapters touch it.
struct Entry {
    name: String,
    shape: Vec<usize>,
    target: Option<(usize, Target)>,
}

/// The tensors of an HF Llama checkpoint, in layer order.
fn hf_entries(c: &Config, with_head: bool) -> Vec<Entry> {
    let h = c.hidden_size;
    let entry = |name: String, shape: Vec<usize>| Entry {
        name,
        shape,
        target: None,
    };
    let mut v = vec![entry(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push(entry(format!("{p}.input_layernorm.weight"), vec![h]));
        v.push(entry(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        ));
        for t in Target::ALL {
            let (inp, out) = t.dims(c);
            let name = format!("{p}.{}.{}", t.parent(), t.name());
            v.push(Entry {
                name: format!("{name}.weight"),
                shape: vec![out, inp],
                target: Some((i, t)),
            });
            if c.qkv_bias && matches!(t, Target::Q | Target::K | Target::V) {
                v.push(entry(format!("{name}.bias"), vec![out]));
            }
        }
    }
    v.push(entry("model.norm.weight".into(), vec![h]));
    if with_head {
        v.push(entry("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    v
}

fn write_hf(
    src: &dyn WeightSource,
    files: Vec<(String, Vec<u8>)>,
    dir: &Path,
    ctx: &mut Ctx<'_>,
) -> Result<()> {
    let mut config = ctx.config.clone();
    let with_head = !config.tie_word_embeddings && src.get("lm_head.weight")?.is_some();
    config.tie_word_embeddings = !with_head;
    let entries = hf_entries(&config, with_head);

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Token ids for config.json come from the tokenizer files just gathered.
    let tok_dir_ids = token_ids(&files);
    let cfg_json = config.to_hf_json(tok_dir_ids.0, &tok_dir_ids.1)?;
    let cfg_path = dir.join("config.json");
    let cfg_bytes = serde_json::to_vec_pretty(&cfg_json).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    std::fs::write(&cfg_path, cfg_bytes).map_err(|e| Error::io(&cfg_path, e))?;
    for (name, bytes) in &files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }

    // safetensors: an 8-byte header length, the JSON header (padded with spaces to 8 bytes),
    // then the data in header order.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "merged_by": "codelsi"}),
    );
    let mut offset = 0usize;
    for e in &entries {
        let len = e.shape.iter().product::<usize>() * 2;
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": "F16", "shape": e.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let path = dir.join("model.safetensors");
    let mut json = serde_json::to_vec(&header).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io_err = |e: std::io::Error| Error::io(&path, e);
    w.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io_err)?;
    w.write_all(&json).map_err(io_err)?;
    for (done, e) in entries.iter().enumerate() {
        let t = src.require(&e.name)?;
        t.expect_shape(&e.shape)?;
        let mut values = t.into_f32();
        let delta = e.target.and_then(|(l, t)| ctx.deltas.get(l, t));
        let halves: Vec<f16> = match &delta {
            Some(d) => {
                values.iter_mut().zip(d).for_each(|(v, d)| *v += d);
                let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                let written: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
                ctx.stats.add(&written, &values, d);
                ctx.report.merged_tensors += 1;
                halves
            }
            None => values.iter().map(|&v| f16::from_f32(v)).collect(),
        };
        w.write_all(bytemuck::cast_slice(&halves)).map_err(io_err)?;
        ctx.report.tensors += 1;
        ctx.report.bytes += halves.len() as u64 * 2;
        ctx.step(done + 1, entries.len())?;
    }
    w.flush().map_err(io_err)?;
    w.into_inner()
        .map_err(|e| io_err(e.into_error()))?
        .sync_all()
        .map_err(io_err)
}

/// BOS and end-token ids from tokenizer files (`generation_config.json`), for `config.json`.
fn token_ids(files: &[(String, Vec<u8>)]) -> (Option<u32>, Vec<u32>) {
    let Some((_, bytes)) = files.iter().find(|(n, _)| n == "generation_config.json") else {
        return (None, vec![]);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return (None, vec![]);
    };
    let bos = v
        .get("bos_token_id")
        .and_then(|b| b.as_u64())
        .map(|b| b as u32);
    let eos = match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|e| e as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|e| e.as_u64())
            .map(|e| e as u32)
            .collect(),
        _ => vec![],
    };
    (bos, eos)
}

/// Values as bytes of `ty`, or `None` for types codelsi cannot quantise to (Q2_K, Q3_K and the
/// IQ4 types: codelsi reads them but does not write them).
fn encode(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    Some(match ty {
        GgmlType::F32 => bytemuck::cast_slice(values).to_vec(),
        GgmlType::F16 => {
            let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        GgmlType::Bf16 => {
            let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Iq4Nl | GgmlType::Iq4Xs => return None,
        _ => quantize_blocks(ty.gpu_format()?, values),
    })
}

fn write_gguf(
    file: &GgufFile,
    adapters: Vec<Value>,
    merged_type: Option<GgmlType>,
    path: &Path,
    ctx: &mut Ctx<'_>,
) -> Result<()> {
    let config = ctx.config;
    // GGUF tensor name → the projection it is, for the weights the adapters touch.
    let mut targets: HashMap<String, (usize, Target)> = HashMap::new();
    for layer in 0..config.num_hidden_layers {
        for t in Target::ALL {
            if !ctx.deltas.touches(layer, t) {
                continue;
            }
            let hf = format!("model.layers.{layer}.{}.{}.weight", t.parent(), t.name());
            if let Some(g) = gguf_name(&hf) {
                targets.insert(g, (layer, t));
            }
        }
    }
    let permuted = config.gguf_weights(file).unpermute_qk;
    // Each merged weight keeps its type when codelsi can quantise to it; K-quants become Q8_0
    // (F16 when rows are not whole 32-blocks).
    let mut decls = Vec::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let shape = info.shape();
        let mut ty = info.ty;
        let merged = targets.contains_key(&info.name);
        if let Some(t) = merged_type.filter(|_| merged) {
            ty = t;
        } else if merged && encode(ty, &[]).is_none() {
            let cols = shape.last().copied().unwrap_or(0);
            ty = if cols % 32 == 0 {
                GgmlType::Q8_0
            } else {
                GgmlType::F16
            };
            ctx.report.retyped.push(format!(
                "{}: {} → {} (codelsi does not quantise to {})",
                info.name,
                info.ty.name(),
                ty.name(),
                info.ty.name()
            ));
        }
        let len = ty
            .bytes_for(info.n_elements())
            .ok_or_else(|| Error::BadTensor {
                path: file.path.clone(),
                tensor: info.name.clone(),
                what: format!(
                    "{} elements are not whole {} blocks",
                    info.n_elements(),
                    ty.name()
                ),
            })?;
        decls.push(GgufTensorDecl {
            name: info.name.clone(),
            shape,
            ty: ty.id(),
            len,
        });
    }
    let mut metadata: Vec<(String, Value)> = file
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("codelsi.merged_adapters".into(), Value::Array(adapters)));

    let out = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(out);
    let total = decls.len();
    let mut data = |i: usize| -> Result<Vec<u8>> {
        let info = &file.tensors[i];
        let bytes = file.tensor_bytes(info);
        let Some(&(layer, t)) = targets.get(&info.name) else {
            ctx.report.tensors += 1;
            ctx.step(i + 1, total)?;
            return Ok(bytes.to_vec());
        };
        let mut values = Vec::new();
        dequantize_into(info.ty, bytes, &mut values);
        let (inp, rows) = t.dims(config);
        let hf_delta = ctx.deltas.get(layer, t).unwrap_or_default();
        if values.len() != rows * inp || hf_delta.len() != values.len() {
            return Err(Error::ShapeMismatch {
                tensor: info.name.clone(),
                expected: vec![rows, inp],
                got: info.shape(),
            });
        }
        // The adapters are in HF row order; llama.cpp permuted q/k rows for its RoPE.
        let heads = match t {
            Target::Q => Some(config.num_attention_heads),
            Target::K => Some(config.num_key_value_heads),
            _ => None,
        };
        let delta = match heads.filter(|_| permuted) {
            Some(heads) => {
                let from = gguf_qk_rows(rows, heads).ok_or_else(|| Error::BadTensor {
                    path: file.path.clone(),
                    tensor: info.name.clone(),
                    what: format!("{rows} rows do not split into {heads} heads of even size"),
                })?;
                let mut d = vec![0f32; hf_delta.len()];
                for (hf_row, &gguf_row) in from.iter().enumerate() {
                    d[gguf_row * inp..(gguf_row + 1) * inp]
                        .copy_from_slice(&hf_delta[hf_row * inp..(hf_row + 1) * inp]);
                }
                d
            }
            None => hf_delta,
        };
        values.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
        let ty = GgmlType::from_id(decls[i].ty).unwrap_or(GgmlType::F16);
        let encoded = encode(ty, &values).ok_or_else(|| Error::BadTensor {
            path: file.path.clone(),
            tensor: info.name.clone(),
            what: format!("cannot write type {}", ty.name()),
        })?;
        let mut written = Vec::new();
        dequantize_into(ty, &encoded, &mut written);
        ctx.stats.add(&written, &values, &delta);
        ctx.report.merged_tensors += 1;
        ctx.report.tensors += 1;
        ctx.step(i + 1, total)?;
        Ok(encoded)
    };
    finish_file(
        write_gguf_stream(&mut w, &metadata, &decls, &mut data),
        path,
        w,
    )
    .map(|n| ctx.report.bytes = n)
}

/// Flush and sync the GGUF output after the stream is written.
fn finish_file(
    written: Result<u64>,
    path: &Path,
    w: std::io::BufWriter<std::fs::File>,
) -> Result<u64> {
    let n = written?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(n)
}
