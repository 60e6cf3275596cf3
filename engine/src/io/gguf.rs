//! GGUF v2/v3 reader over a memory map: metadata, tensor infos and tensor data.
//!
//! Follows ggml's `docs/gguf.md`. The header is untrusted input: every count and length is
//! checked against the bytes that remain before anything is allocated, so a lying header costs
//! an error, never a huge allocation or a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::quant::GgmlType;

const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// No real model has tensors of more than 4 dimensions (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Nesting limit for array-of-array metadata values.
const MAX_ARRAY_DEPTH: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's data lies and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major order (outermost first), as PyTorch and burn write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The bytes behind a GGUF: a memory map for files, an owned buffer for tests and fuzzing.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Bytes,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process. A concurrent writer could
        // change bytes under us; every read below is bounds-checked, so that yields wrong
        // values or an error, never out-of-bounds access.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(map))
    }

    /// Parse a GGUF held in memory (`path` is only used in error messages).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            path: &path,
        };
        let magic = r.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::BadMagic { path, got: magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedGgufVersion { path, version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each key-value takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info
        // at least 8 + 4 + 4 + 8: reject counts the file cannot possibly hold.
        r.check_count(n_kv, 13, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, 0, &key)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::Metadata {
                        path,
                        key: "general.alignment".into(),
                        what: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };

        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.bad_tensor(&name, format!("{n_dims} dimensions (1 to 4 allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let ty_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            infos.push((name, dims, ty_id, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;

        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty_id, offset) in infos {
            let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let Some(n) = n.filter(|&n| n > 0) else {
                return Err(r.bad_tensor(&name, format!("absurd dimensions {dims:?}")));
            };
            let Some(ty) = GgmlType::from_id(ty_id) else {
                return Err(Error::UnsupportedDtype {
                    tensor: name,
                    dtype: GgmlType::name_of_id(ty_id),
                    why: format!(
                        "codelsi reads {}",
                        GgmlType::ALL.map(GgmlType::name).join(", ")
                    ),
                });
            };
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(r.bad_tensor(
                    &name,
                    format!(
                        "row of {} is not a multiple of the {} block",
                        dims[0],
                        ty.name()
                    ),
                ));
            }
            let Some(len) = ty.bytes_for(n) else {
                return Err(r.bad_tensor(&name, format!("size of {dims:?} overflows")));
            };
            if offset % alignment != 0 {
                return Err(r.bad_tensor(&name, format!("offset {offset} is not aligned")));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name,
                    dims,
                    ty,
                    start: start as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(r.bad_tensor(
                        &name,
                        format!(
                            "data at offset {offset} + {len} bytes lies past the end of the file \
                             ({file_len} bytes)"
                        ),
                    ));
                }
            }
        }

        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked against the file length when parsed).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.start..info.start + info.len]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, what: &str) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.into(),
            what: what.into(),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_str()
            .ok_or_else(|| self.meta_err(key, "expected a string"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_u64()
            .ok_or_else(|| self.meta_err(key, "expected an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_f64()
            .ok_or_else(|| self.meta_err(key, "expected a number"))
    }

    /// An array of strings (tokenizer vocabularies and merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_array()
            .ok_or_else(|| self.meta_err(key, "expected an array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.meta_err(key, "expected strings"))
            })
            .collect()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() as u64).saturating_sub(self.pos)
    }

    fn truncated(&self, what: &str) -> Error {
        Error::Truncated {
            path: self.path.into(),
            offset: self.pos,
            what: what.into(),
        }
    }

    fn bad_tensor(&self, tensor: &str, what: String) -> Error {
        Error::BadTensor {
            path: self.path.into(),
            tensor: tensor.into(),
            what,
        }
    }

    fn check_count(&self, n: u64, min_bytes_each: u64, what: &str) -> Result<()> {
        if n.saturating_mul(min_bytes_each) > self.remaining() {
            return Err(Error::Malformed {
                path: self.path.into(),
                what: format!(
                    "{what} {n} does not fit in the {} bytes left",
                    self.remaining()
                ),
            });
        }
        Ok(())
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        let start = self.pos as usize;
        self.pos += n;
        Ok(&self.bytes[start..start + n as usize])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        // Vocabularies may hold invalid UTF-8 in byte tokens of some converters; keep them lossy.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(key, "arrays nested too deeply"));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(self.malformed(key, &format!("unknown value type {elem_ty}"))),
                };
                self.check_count(n, min_size, key)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            _ => return Err(self.malformed(key, &format!("unknown value type {ty}"))),
        })
    }

    fn malformed(&self, key: &str, what: &str) -> Error {
        Error::Metadata {
            path: self.path.into(),
            key: key.into(),
            what: what.into(),
        }
    }
}

/// Writes GGUF v3 files: used by tests (tiny models, corrupt files) and, through
/// [`write_gguf_stream`], by `codelsi merge`.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(GgufTensorDecl, Vec<u8>)>,
}

/// A tensor's entry in a GGUF header: its data comes later, in header order.
#[derive(Debug, Clone)]
pub struct GgufTensorDecl {
    pub name: String,
    /// Row-major shape (outermost first).
    pub shape: Vec<usize>,
    /// ggml type id.
    pub ty: u32,
    /// Bytes of data.
    pub len: u64,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Add a tensor: `shape` row-major (outermost first), `ty_id` a ggml type id, `data` its bytes.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty_id: u32, data: Vec<u8>) -> &mut Self {
        let decl = GgufTensorDecl {
            name: name.into(),
            shape: shape.to_vec(),
            ty: ty_id,
            len: data.len() as u64,
        };
        self.tensors.push((decl, data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let decls: Vec<GgufTensorDecl> = self.tensors.iter().map(|(d, _)| d.clone()).collect();
        let mut out = gguf_header(&self.metadata, &decls);
        for (_, data) in &self.tensors {
            out.extend(data);
            out.resize(aligned(out.len() as u64) as usize, 0);
        }
        out
    }
}

fn aligned(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

/// The header of a GGUF v3 file (metadata and tensor infos), padded to where data begins.
fn gguf_header(metadata: &[(String, Value)], tensors: &[GgufTensorDecl]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
            Value::Array(items) => {
                out.extend(items.first().map_or(4, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| put_value(out, i));
            }
        }
    }
    let mut out = Vec::new();
    out.extend(GGUF_MAGIC.to_le_bytes());
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        t.shape
            .iter()
            .rev()
            .for_each(|&d| out.extend((d as u64).to_le_bytes()));
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = aligned(offset + t.len);
    }
    out.resize(aligned(out.len() as u64) as usize, 0);
    out
}

/// Write a GGUF v3 file to `out` without holding its tensors in memory: `data(i)` gives the
/// bytes of `tensors[i]`, called in order, and must give exactly `len` bytes. The
/// `general.alignment` key, if given, is dropped: the file uses the default alignment.
pub fn write_gguf_stream(
    out: &mut dyn std::io::Write,
    metadata: &[(String, Value)],
    tensors: &[GgufTensorDecl],
    data: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let io_err = |e: std::io::Error| Error::io("(GGUF output)", e);
    let metadata: Vec<(String, Value)> = metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .cloned()
        .collect();
    let header = gguf_header(&metadata, tensors);
    out.write_all(&header).map_err(io_err)?;
    let mut written = header.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != t.len {
            return Err(Error::BadTensor {
                path: "(GGUF output)".into(),
                tensor: t.name.clone(),
                what: format!("{} bytes of data for a {}-byte entry", bytes.len(), t.len),
            });
        }
        out.write_all(&bytes).map_err(io_err)?;
        let pad = aligned(bytes.len() as u64) - bytes.len() as u64;
        out.write_all(&vec![0u8; pad as usize]).map_err(io_err)?;
        written += bytes.len() as u64 + pad;
    }
    Ok(written)
}

/// Tensors of a GGUF file under HF names.
///
/// llama.cpp's converter permutes the rows of `q_proj`/`k_proj` (weights and biases) of Llama
/// models so that its interleaved RoPE matches HF's rotate-half; we undo that here, as
/// transformers does when it loads a GGUF, so one model implementation serves both formats.
pub struct GgufWeights<'a> {
    pub file: &'a GgufFile,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Whether q/k rows were permuted (Llama-arch GGUFs; Qwen2 GGUFs are not).
    pub unpermute_qk: bool,
}
