//! The KV cache: keys and values of the positions a sequence (or a batch of them) has seen,
//! per layer, written in place as decoding goes on.

use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels::{KernelBackend, to_dtype};

/// Keys and values of past positions, per layer.
#[derive(Debug, Clone)]
pub struct KvCache<B: KernelBackend> {
    pub(super) layers: Vec<LayerCache<B>>,
    /// Positions filled.
    pub len: usize,
    pub capacity: usize,
}

impl<B: KernelBackend> KvCache<B> {
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Forget the positions from `len` on (the next forward writes over them).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Rows of the batch in the cache.
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |l| l.keys.dims()[0])
    }

    /// Keep only the batch rows `rows` (in that order): finished sequences leave a batch
    /// without the others recomputing anything.
    pub fn retain_rows(&mut self, rows: &[usize]) {
        let Some(first) = self.layers.first() else {
            return;
        };
        let device = first.keys.device();
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
        for l in &mut self.layers {
            l.keys = l.keys.clone().select(0, idx.clone());
            l.values = l.values.clone().select(0, idx.clone());
        }
    }
}

/// Continuous batching: rows join and leave a running batch, and its positions move.
impl<B: KernelBackend> KvCache<B> {
    /// Room for `capacity` positions, the filled ones kept.
    pub fn grow(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        let more = capacity - self.capacity;
        self.map_positions(|t| {
            let [b, kv, _, hd] = t.dims();
            let zeros = Tensor::zeros([b, kv, more, hd], (&t.device(), t.dtype()));
            Tensor::cat(vec![t, zeros], 2)
        });
        self.capacity = capacity;
    }

    /// Every row's positions move `by` later, with padding in front: for a row with a longer
    /// prompt to join. Grows the capacity as needed.
    pub fn pad_front(&mut self, by: usize) {
        if by == 0 {
            return;
        }
        self.grow(self.len + by);
        let capacity = self.capacity;
        self.map_positions(|t| {
            let [b, kv, _, hd] = t.dims();
            let zeros = Tensor::zeros([b, kv, by, hd], (&t.device(), t.dtype()));
            Tensor::cat(
                vec![zeros, t.slice([0..b, 0..kv, 0..capacity - by, 0..hd])],
                2,
            )
        });
        self.len += by;
    }

    /// The first `by` positions leave (every row has them as padding): the batch's length
    /// stays that of its longest row as rows leave.
    pub fn drop_front(&mut self, by: usize) {
        let by = by.min(self.len);
        if by == 0 {
            return;
        }
        let capacity = self.capacity;
        self.map_positions(|t| {
            let [b, kv, _, hd] = t.dims();
            let zeros = Tensor::zeros([b, kv, by, hd], (&t.device(), t.dtype()));
            Tensor::cat(vec![t.slice([0..b, 0..kv, by..capacity, 0..hd]), zeros], 2)
        });
        self.len -= by;
    }

    /// The one row of `other` joins as the last row, its `other.len` positions ending where
    /// this cache's end (left-padded). `other.len` must not exceed `len`
    /// ([`pad_front`](Self::pad_front) first).
    pub fn push_row(&mut self, other: &KvCache<B>) {
        assert!(
            other.batch() == 1 && other.len <= self.len && other.layers.len() == self.layers.len(),
            "a row of {} positions joins a batch of {}",
            other.len,
            self.len
        );
        let (pad, len, capacity) = (self.len - other.len, other.len, self.capacity);
        let place = |t: Tensor<B, 4>, row: &Tensor<B, 4>| {
            let [_, kv, _, hd] = t.dims();
            let (device, dtype) = (t.device(), t.dtype());
            let mut parts = Vec::with_capacity(3);
            if pad > 0 {
                parts.push(Tensor::zeros([1, kv, pad, hd], (&device, dtype)));
            }
            parts.push(to_dtype(
                row.clone().slice([0..1, 0..kv, 0..len, 0..hd]),
                dtype,
            ));
            if capacity > pad + len {
                parts.push(Tensor::zeros(
                    [1, kv, capacity - pad - len, hd],
                    (&device, dtype),
                ));
            }
            Tensor::cat(vec![t, Tensor::cat(parts, 2)], 0)
        };
        for (l, o) in self.layers.iter_mut().zip(&other.layers) {
            l.keys = place(l.keys.clone(), &o.keys);
            l.values = place(l.values.clone(), &o.values);
        }
    }

    fn map_positions(&mut self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) {
        for l in &mut self.layers {
            l.keys = f(l.keys.clone());
            l.values = f(l.values.clone());
        }
    }
}

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]` each, in the
/// backend's [`kv_cache_dtype`](KernelBackend::kv_cache_dtype).
#[derive(Debug, Clone)]
pub struct LayerCache<B: KernelBackend> {
    pub(super) keys: Tensor<B, 4>,
    pub(super) values: Tensor<B, 4>,
    /// Stands in for `keys`/`values` while they are being written. All layers share one
    /// one-element buffer (clones share it), so appending allocates nothing.
    pub(super) spare: Tensor<B, 4>,
}

impl<B: KernelBackend> LayerCache<B> {
    /// Write `k`/`v` (`[batch, kv_heads, seq, head_dim]`) at positions `past..past + seq`, and
    /// return the keys and values of positions `0..past + seq`.
    pub(super) fn append(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        past: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, n_kv, seq, hd] = k.dims();
        let total = past + seq;
        // Move the tensors out so their buffers are uniquely owned: the backend can then
        // write in place instead of copying the whole cache.
        self.keys = B::write_positions(
            std::mem::replace(&mut self.keys, self.spare.clone()),
            past,
            k,
        );
        self.values = B::write_positions(
            std::mem::replace(&mut self.values, self.spare.clone()),
            past,
            v,
        );
        let filled = [0..batch, 0..n_kv, 0..total, 0..hd];
        (
            self.keys.clone().slice(filled.clone()),
            self.values.clone().slice(filled),
        )
    }
}
