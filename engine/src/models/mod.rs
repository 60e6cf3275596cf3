//! Model families and the layers they share.

pub mod config;
pub mod kv_cache;
pub mod llama;

use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor, TensorData};

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
            Self::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            Self::Quantized(q) => q.device_bytes(),
            Self::Split(parts) => parts.iter().map(Self::device_bytes).sum(),
        }
    }

    /// `[out, in]` f32 values (row-major) on the device as `dtype`, split by rows where they
    /// exceed `limit` bytes.
    fn upload_dense(
        values: Vec<f32>,
        out: usize,
        inp: usize,
        dtype: DType,
        limit: u64,
        device: &B::Device,
    ) -> Self {
        let parts = split_rows(out, (dtype.size() * inp) as u64, limit);
        let upload = |v: Vec<f32>, rows: usize| {
            let w = Tensor::<B, 2>::from_data(TensorData::new(v, [rows, inp]), device);
            Self::Dense(to_dtype(w, dtype).transpose())
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
    /// becomes f32, or is quantised to `quantize` when given. A 16-bit `quantize` (the CLI's
    /// `--base-dtype bf16|f16`) holds every weight in it, quantised blocks widened too: as
    /// blocks where the backend computes the format, else as a dense tensor of that dtype (the
    /// reference path: CUDA's tensor-core matmuls). A weight larger than the device's largest
    /// buffer is split by rows.
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
        let half = quantize.filter(|f| f.is_half());
        let quantize = quantize.filter(|f| B::computes(*f));
        // Blocks stay as they are, except 16-bit ones when `quantize` asks for a format, and any
        // other than the 16-bit format asked for.
        let native = match &weight.data {
            HostData::Blocks { ty, .. } => ty.gpu_format().filter(|f| {
                B::computes(*f)
                    && in_features.is_multiple_of(f.block_len())
                    && !(f.is_half() && quantize.is_some())
                    && half.is_none_or(|h| h == *f)
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
                        let dtype = match half {
                            Some(QFormat::Bf16) => DType::BF16,
                            Some(QFormat::F16) => DType::F16,
                            _ => DType::F32,
                        };
                        let (out, inp) = (out_features, in_features);
                        LinearWeight::upload_dense(values, out, inp, dtype, limit, device)
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

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};

    use super::{Linear, LinearWeight};
    use crate::io::{HostData, HostTensor};
    use crate::kernels::QTensor;
    use crate::quant::{QFormat, quantize_blocks};

    const OUT: usize = 40;
    const IN: usize = 96;
    const ROWS: usize = 5;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 3) as f32))
            .collect()
    }

    /// `[OUT, IN]` Q4_1 blocks, as a GGUF holds them.
    fn q4_1_weight() -> HostTensor {
        HostTensor {
            name: "w".into(),
            shape: vec![OUT, IN],
            data: HostData::Blocks {
                ty: QFormat::Q4_1.ggml(),
                bytes: quantize_blocks(QFormat::Q4_1, &values(OUT * IN, 1)),
            },
        }
    }

    /// `a · bᵀ` in f64, `a: [m, k]`, `b: [n, k]`.
    fn product_t(a: &[f32], b: &[f32], k: usize) -> Vec<f32> {
        let mut y = Vec::new();
        for ra in a.chunks(k) {
            for rb in b.chunks(k) {
                y.push(
                    ra.iter()
                        .zip(rb)
                        .map(|(&p, &q)| p as f64 * q as f64)
                        .sum::<f64>() as f32,
                );
            }
        }
        y
    }

    fn assert_near(what: &str, got: &[f32], want: &[f32], rel: f32) {
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        assert!(
            worst <= rel * scale,
            "{what}: {worst} off, values up to {scale}"
        );
    }

    fn format_of<B: crate::kernels::KernelBackend>(l: &Linear<B>) -> Option<QFormat> {
        match &l.weight {
            LinearWeight::Quantized(QTensor { format, .. }) => Some(*format),
            _ => None,
        }
    }

    /// `--base-dtype bf16|f16`: a 16-bit format widens a GGUF's quantised blocks, where a
    /// quantised `--quantize` leaves them as they are; the product stays that of the file's
    /// weights to the 16-bit format's rounding.
    #[test]
    fn a_half_base_widens_quantised_blocks() {
        let device = Default::default();
        let weights = q4_1_weight().into_f32();
        let x = values(ROWS * IN, 2);
        let exact = product_t(&x, &weights, IN);
        for (asked, held, rel) in [
            (None, QFormat::Q4_1, 2e-2),
            (Some(QFormat::Q8_0), QFormat::Q4_1, 2e-2),
            (Some(QFormat::F16), QFormat::F16, 2e-3),
            (Some(QFormat::Bf16), QFormat::Bf16, 1e-2),
        ] {
            let l = Linear::<Flex>::load(q4_1_weight(), None, asked, &device)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(format_of(&l), Some(held), "{asked:?}");
            let xt = Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [ROWS, IN]), &device);
            let y = l
                .forward(xt.unsqueeze())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_near(&format!("{asked:?}"), &y, &exact, rel);
        }
    }

    /// Where the backend has no kernel for a 16-bit format (the reference path: CUDA), the weight
    /// is a dense tensor of that dtype, half the bytes of f32; the product and its gradient at x
    /// run in the weight's dtype and come back in x's.
    #[test]
    fn a_dense_half_weight_multiplies_in_its_dtype() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let weights = values(OUT * IN, 3);
        let x = values(ROWS * IN, 4);
        let dy = values(ROWS * OUT, 5);
        let w = LinearWeight::<A>::upload_dense(
            weights.clone(),
            OUT,
            IN,
            DType::BF16,
            u64::MAX,
            &device,
        );
        assert_eq!(w.device_bytes(), OUT * IN * 2);
        let xt = Tensor::<A, 2>::from_data(TensorData::new(x.clone(), [ROWS, IN]), &device)
            .require_grad();
        let y = w.product(xt.clone());
        assert_eq!(y.dtype(), DType::F32);
        let y_host = y.clone().into_data().to_vec::<f32>().unwrap();
        // bf16 weights and inputs (8 significant bits), the sum in f32, the result rounded to bf16.
        assert_near("y", &y_host, &product_t(&x, &weights, IN), 2e-2);

        let dyt = Tensor::<A, 2>::from_data(TensorData::new(dy.clone(), [ROWS, OUT]), &device);
        let grads = (y * dyt).sum().backward();
        let dx = xt.grad(&grads).expect("x's gradient");
        assert_eq!(dx.dtype(), DType::F32);
        // dX = dY · W: W transposed as the `[n, k]` operand.
        let wt: Vec<f32> = (0..IN)
            .flat_map(|i| (0..OUT).map(move |o| (o, i)))
            .map(|(o, i)| weights[o * IN + i])
            .collect();
        let dx_host = dx.into_data().to_vec::<f32>().unwrap();
        assert_near("dx", &dx_host, &product_t(&dy, &wt, OUT), 2e-2);
    }
}
