//! The KV cache: keys and values of the positions a sequence (or a batch of them) has seen,
//! per layer, written in place as decoding goes on.

use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels::KernelBackend;

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
