//! Model families and the layers they share.

pub mod config;
pub mod kv_cache;
pub mod llama;

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};

use crate::adapter::LoraPair;
use crate::error::{Error, Result};
use crate::io::{HostData, HostTensor};
use crate::kernels::{KernelBackend, QTensor, to_dtype};
use crate::quant::{GgmlType, QFormat, QMatrix, dequantize_into};

/// How a linear layer's weight is stored on the device. One model implementation serves both
/// (STYLE.md: no quantised copy of the model).
#[derive(Debug, Clone)]
pub enum LinearWeight<B: KernelBackend> {
    /// `[in, out]`: transposed once at load so the forward is `x.matmul(w)`.
    Dense(Tensor<B, 2>),
    /// `[out, in]` blocks, dequantised in registers by the kernels.
    Quantized(QTensor<B>),
    /// Consecutive ranges of output features, each a weight of its own: a tensor larger than
    /// the device's largest buffer ([`KernelBackend::max_tensor_bytes`]), such as a big
    /// vocabulary's LM head. The product concatenates the parts' products.
    Split(Vec<LinearWeight<B>>),
}

impl<B: KernelBackend> LinearWeight<B> {
    fn autodiff(&self) -> LinearWeight<Autodiff<B>> {
        match self {
            Self::Dense(w) => LinearWeight::Dense(Tensor::from_inner(w.clone())),
            Self::Quantized(q) => LinearWeight::Quantized(QTensor {
                format: q.format,
                rows: q.rows,
                cols: q.cols,
                qs: Tensor::from_inner(q.qs.clone()),
                scales: Tensor::from_inner(q.scales.clone()),
            }),
            Self::Split(parts) => LinearWeight::Split(parts.iter().map(Self::autodiff).collect()),
        }
    }

    /// `x · Wᵀ`. `x: [m, in]` → `[m, out]`.
    fn product(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => B::dense_matmul(x, w),
            Self::Quantized(q) => <B as KernelBackend>::q_matmul(x, q),
            Self::Split(parts) => {
                Tensor::cat(parts.iter().map(|p| p.product(x.clone())).collect(), 1)
            }
        }
    }

    /// The weight dequantised to f32 (split where it was).
    fn dense(&self) -> Self {
        match self {
            Self::Dense(w) => Self::Dense(w.clone()),
            Self::Quantized(q) => Self::Dense(crate::kernels::reference::dequantize(q).transpose()),
            Self::Split(parts) => Self::Split(parts.iter().map(Self::dense).collect()),
        }
    }

    fn device_bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.shape().num_elements() * 4,
            Self::Quantized(q) => q.device_bytes(),
            Self::Split(parts) => parts.iter().map(Self::device_bytes).sum(),
        }
    }

    /// `[out, in]` f32 values (row-major) on the device, split by rows where they exceed
    /// `limit` bytes.
    fn upload_dense(
        values: Vec<f32>,
        out: usize,
        inp: usize,
        limit: u64,
        device: &B::Device,
    ) -> Self {
        let parts = split_rows(out, (4 * inp) as u64, limit);
        let upload = |v: Vec<f32>, rows: usize| {
            Self::Dense(
                Tensor::<B, 2>::from_data(TensorData::new(v, [rows, inp]), device).transpose(),
            )
        };
        if parts.len() == 1 {
            return upload(values, out);
        }
        Self::Split(
            parts
                .iter()
                .map(|&(a, b)| upload(values[a * inp..b * inp].to_vec(), b - a))
                .collect(),
        )
    }

    /// A quantised matrix on the device, split by rows where it exceeds `limit` bytes.
    fn upload_quantized(q: &QMatrix, limit: u64, device: &B::Device) -> Self {
        let row_bytes = (q.gpu_bytes() / q.rows.max(1)) as u64 + 4;
        let parts = split_rows(q.rows, row_bytes, limit);
        if parts.len() == 1 {
            return Self::Quantized(QTensor::from_qmatrix(q, device));
        }
        Self::Split(
            parts
                .iter()
                .map(|&(a, b)| Self::Quantized(QTensor::from_qmatrix(&q.rows(a, b), device)))
                .collect(),
        )
    }
}

/// Row ranges of a `rows`-row tensor of `row_bytes` bytes a row, each at most `limit` bytes
/// (one range when the whole fits).
fn split_rows(rows: usize, row_bytes: u64, limit: u64) -> Vec<(usize, usize)> {
    let per = (limit / row_bytes.max(1)).max(1) as usize;
    let n = rows.div_ceil(per).max(1);
    // Equal parts, so no part is a sliver.
    let per = rows.div_ceil(n);
    (0..n)
        .map(|i| (i * per, ((i + 1) * per).min(rows)))
        .collect()
}

/// `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear<B: KernelBackend> {
    pub weight: LinearWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl<B: KernelBackend> Linear<B> {
    /// The same layer on `Autodiff<B>`, sharing its device tensors (see [`Llama::autodiff`]).
    ///
    /// [`Llama::autodiff`]: llama::Llama::autodiff
    pub fn autodiff(&self) -> Linear<Autodiff<B>> {
        Linear {
            weight: self.weight.autodiff(),
            bias: self.bias.clone().map(Tensor::from_inner),
            in_features: self.in_features,
            out_features: self.out_features,
        }
    }

    /// Upload `[out, in]` weights: ggml blocks of a format the backend computes on stay as they
    /// are ([`KernelBackend::computes`]; 16-bit ones unless `quantize` is given); anything else
    /// becomes f32, or is quantised to `quantize` when given. A weight larger than the device's largest buffer is split by rows.
    pub fn load(
        weight: HostTensor,
        bias: Option<HostTensor>,
        quantize: Option<QFormat>,
        device: &B::Device,
    ) -> Result<Self> {
        let [out_features, in_features] = match weight.shape[..] {
            [o, i] => [o, i],
            _ => {
                return Err(Error::ShapeMismatch {
                    tensor: weight.name.clone(),
                    expected: vec![0, 0],
                    got: weight.shape.clone(),
                });
            }
        };
        let bias = match bias {
            Some(b) => {
                b.expect_shape(&[out_features])?;
                Some(Tensor::from_data(
                    TensorData::new(b.into_f32(), [out_features]),
                    device,
                ))
            }
            None => None,
        };
        let quantize = quantize.filter(|f| B::computes(*f));
        // Blocks stay as they are, except 16-bit ones when `quantize` asks for a format.
        let native = match &weight.data {
            HostData::Blocks { ty, .. } => ty.gpu_format().filter(|f| {
                B::computes(*f)
                    && in_features.is_multiple_of(f.block_len())
                    && !(f.is_half() && quantize.is_some())
            }),
            _ => None,
        };
        let limit = B::max_tensor_bytes(device).unwrap_or(u64::MAX);
        let weight = match (native, weight.data, quantize) {
            (Some(format), HostData::Blocks { bytes, .. }, _) => LinearWeight::upload_quantized(
                &QMatrix::from_ggml_blocks(format, out_features, in_features, &bytes),
                limit,
                device,
            ),
            (_, data, q) => {
                let values = HostTensor {
                    name: weight.name,
                    shape: weight.shape,
                    data,
                }
                .into_f32();
                match q {
                    Some(format) if in_features % format.block_len() == 0 => {
                        LinearWeight::upload_quantized(
                            &QMatrix::quantize(format, out_features, in_features, &values),
                            limit,
                            device,
                        )
                    }
                    _ => {
                        LinearWeight::upload_dense(values, out_features, in_features, limit, device)
                    }
                }
            }
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, in_features]` → `[batch, seq, out_features]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let x = x.reshape([batch * seq, self.in_features]);
        let y = self.plus_bias(self.weight.product(x));
        y.reshape([batch, seq, self.out_features])
    }

    /// [`forward`](Self::forward) of several layers with the same input (a layer's q, k and v),
    /// their quantised products in one [`KernelBackend::q_matmul_many`] where every weight is
    /// quantised whole (not split), else one by one.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, in_features]` → `[batch, seq, out_features]` each
    pub fn forward_many(layers: &[&Self], x: Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let quantized: Option<Vec<&QTensor<B>>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Quantized(q) if l.in_features == layers[0].in_features => Some(q),
                _ => None,
            })
            .collect();
        let Some(weights) = quantized else {
            return layers.iter().map(|l| l.forward(x.clone())).collect();
        };
        let [batch, seq, _] = x.dims();
        let x = x.reshape([batch * seq, layers[0].in_features]);
        B::q_matmul_many(x, &weights)
            .into_iter()
            .zip(layers)
            .map(|(y, l)| l.plus_bias(y).reshape([batch, seq, l.out_features]))
            .collect()
    }

    /// The forward with LoRA adapters beside the base weight. The first adapter's up-projection
    /// is fused with a quantised base product (one kernel); others add their own small products.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, in_features]` → `[batch, seq, out_features]`
    pub fn forward_adapted(&self, x: Tensor<B, 3>, loras: &[LoraApply<'_, B>]) -> Tensor<B, 3> {
        let Some((first, rest)) = loras.split_first() else {
            return self.forward(x);
        };
        let [batch, seq, _] = x.dims();
        let x = x.reshape([batch * seq, self.in_features]);
        let mut y = match &self.weight {
            LinearWeight::Quantized(q) => B::lora_matmul(
                x.clone(),
                first.dropped(&x),
                q,
                first.pair.a.clone(),
                first.pair.b.clone(),
                first.scale,
            ),
            w => w.product(x.clone()) + first.term(&x),
        };
        for l in rest {
            y = y + l.term(&x);
        }
        self.plus_bias(y).reshape([batch, seq, self.out_features])
    }

    /// `y` (`[rows, out_features]`) plus the bias, if the layer has one.
    fn plus_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.bias {
            Some(b) => y.clone() + to_dtype(b.clone(), y.dtype()).unsqueeze(),
            None => y,
        }
    }

    /// The same layer with its weight dequantised to f32: the plain-tensor reference path (tests
    /// compare the kernels against it; merging adapters starts from it).
    pub fn to_dense(&self) -> Self {
        Self {
            weight: self.weight.dense(),
            ..self.clone()
        }
    }

    pub fn device_bytes(&self) -> usize {
        let bias = self
            .bias
            .as_ref()
            .map_or(0, |b| 4 * b.shape().num_elements());
        self.weight.device_bytes() + bias
    }
}

/// One adapter's share of a projection: `scale · B·(A·dropout(x))`.
#[derive(Debug)]
pub struct LoraApply<'a, B: KernelBackend> {
    pub pair: &'a LoraPair<B>,
    pub scale: f32,
    /// Dropout on the adapter's input; `None` outside training.
    pub dropout: Option<Dropout>,
}

/// Dropout with probability `p`, its mask drawn from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl<B: KernelBackend> LoraApply<'_, B> {
    /// `x` after dropout (inverted: kept values scaled by `1 / (1 - p)`), or `None` without.
    fn dropped(&self, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let d = self.dropout.filter(|d| d.p > 0.0)?;
        let mask = B::dropout_mask(x.dims(), 1.0 - d.p as f64, d.seed, &x.device());
        Some(x.clone() * to_dtype(mask, x.dtype()))
    }

    /// The adapter's term with its own small products.
    fn term(&self, x: &Tensor<B, 2>) -> Tensor<B, 2> {
        let xd = self.dropped(x).unwrap_or_else(|| x.clone());
        let u = B::matmul_small(xd, self.pair.a.clone(), false, true, 1.0);
        B::matmul_small(u, self.pair.b.clone(), false, true, self.scale)
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: KernelBackend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: KernelBackend> RmsNorm<B> {
    pub fn load(t: HostTensor, dim: usize, eps: f64, device: &B::Device) -> Result<Self> {
        t.expect_shape(&[dim])?;
        Ok(Self {
            weight: Tensor::from_data(TensorData::new(t.into_f32(), [dim]), device),
            eps,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::rms_norm(x, &self.weight, self.eps)
    }
}

/// The token embedding table, kept on the host in its file format (quantised rows are
/// dequantised on lookup): a lookup needs a handful of rows per step, and the table can be as
/// large as the rest of the model.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub ty: GgmlType,
    pub vocab_size: usize,
    pub dim: usize,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

impl Embedding {
    pub fn load(t: &HostTensor, vocab_size: usize, dim: usize) -> Result<Self> {
        t.expect_shape(&[vocab_size, dim])?;
        Ok(match &t.data {
            HostData::F32(v) => Self {
                ty: GgmlType::F32,
                vocab_size,
                dim,
                bytes: vec![],
                values: v.clone(),
            },
            HostData::Blocks { ty, bytes } => Self {
                ty: *ty,
                vocab_size,
                dim,
                bytes: bytes.clone(),
                values: vec![],
            },
        })
    }

    /// Rows for `ids`, concatenated. Fails on an id outside the vocabulary.
    pub fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.dim);
        for &id in ids {
            let id = id as usize;
            if id >= self.vocab_size {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
            if self.ty == GgmlType::F32 {
                out.extend_from_slice(&self.values[id * self.dim..(id + 1) * self.dim]);
            } else {
                let row_bytes = self.bytes.len() / self.vocab_size;
                dequantize_into(
                    self.ty,
                    &self.bytes[id * row_bytes..(id + 1) * row_bytes],
                    &mut out,
                );
            }
        }
        Ok(out)
    }

    pub fn host_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.values.len()
    }
}
