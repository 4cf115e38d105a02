//! The physically evicting KV cache for a batch of sequences, laid out for the device.
//!
//! Each layer keeps one slot table per (sequence, KV head) "row": keys and values
//! `[rows, capacity, head_dim]` and an additive bias `[rows, capacity]` (0 for a live slot,
//! -inf for one never used). The host does the bookkeeping (which slot each new token takes, the
//! DMS delayed-eviction ring) and the device only sees one scatter per layer and step plus the
//! attention over the table. An evicted token's slot is reused by the next token of the same row,
//! so a DMS row stops growing at its window plus what it retains; the table's capacity is the
//! largest row of the layer (grown by an eighth at a time, so at most ~12% is unused headroom).
//!
//! It is the same eviction as [`super::cache::KvCache`] (the per-token reference), batched, and
//! decoding through it gives the teacher-forced logits under the inference mask (tested).

use std::collections::VecDeque;

use burn::tensor::IndexingUpdateOp;
use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation, backend::Backend};

/// Bookkeeping of one (sequence, KV head) of one layer.
#[derive(Clone, Debug, Default)]
struct Row {
    /// Slots ever used (the row's high-water mark).
    used: usize,
    free: Vec<usize>,
    live: usize,
    /// DMS: the newest `window + 1` tokens as (slot, marked for eviction), oldest first.
    recent: VecDeque<(usize, bool)>,
}

impl Row {
    fn take(&mut self) -> usize {
        self.live += 1;
        self.free.pop().unwrap_or_else(|| {
            self.used += 1;
            self.used - 1
        })
    }

    fn release(&mut self, slot: usize) {
        self.live -= 1;
        self.free.push(slot);
    }
}

/// One layer's slot tables (`None` before anything is written) and rows.
struct Layer<B: Backend> {
    keys: Option<Tensor<B, 3>>,
    values: Option<Tensor<B, 3>>,
    /// f32 `[rows, capacity]`.
    bias: Option<Tensor<B, 2>>,
    capacity: usize,
    rows: Vec<Row>,
}

/// What the cache holds, in bytes of the storage format and in entries.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CacheMemory {
    /// Key and value storage allocated on the device (the slot tables).
    pub allocated_bytes: u64,
    /// Key and value storage of the live entries.
    pub live_bytes: u64,
    /// What a dense cache would hold for the same tokens.
    pub dense_bytes: u64,
    /// Tokens seen over live entries, averaged over every (sequence, layer, KV head).
    pub compression_ratio: f64,
}

/// The cache of one model over a batch of sequences.
pub struct SlotCache<B: Backend> {
    /// The DMS delayed-eviction window; `None` keeps every token (dense).
    window: Option<usize>,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<Layer<B>>,
    /// Tokens per sequence (the position of its next token).
    seen: Vec<usize>,
    device: B::Device,
}

/// Slot capacity granularity: tables grow by whole blocks of this many slots.
const BLOCK: usize = 64;

impl<B: Backend> SlotCache<B> {
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        device: &B::Device,
    ) -> Self {
        Self {
            window,
            kv_heads,
            head_dim,
            layers: (0..layers)
                .map(|_| Layer {
                    keys: None,
                    values: None,
                    bias: None,
                    capacity: 0,
                    rows: vec![Row::default(); batch * kv_heads],
                })
                .collect(),
            seen: vec![0; batch],
            device: device.clone(),
        }
    }

    pub fn batch(&self) -> usize {
        self.seen.len()
    }

    /// Tokens seen per sequence.
    pub fn seen(&self) -> &[usize] {
        &self.seen
    }

    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Live entries per layer and row (`sequence * kv_heads + head`).
    pub fn lengths(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.rows.iter().map(|r| r.live).collect())
            .collect()
    }

    /// Slots per row allocated by each layer's table.
    pub fn capacities(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.capacity).collect()
    }

    pub fn memory(&self, element_bytes: usize) -> CacheMemory {
        let entry = (2 * self.head_dim * element_bytes) as u64;
        let rows = (self.seen.len() * self.kv_heads) as u64;
        let allocated: u64 = self.layers.iter().map(|l| l.capacity as u64 * rows).sum();
        let live: u64 = self
            .layers
            .iter()
            .flat_map(|l| l.rows.iter().map(|r| r.live as u64))
            .sum();
        let dense: u64 = self.seen.iter().map(|&s| s as u64).sum::<u64>()
            * (self.layers.len() * self.kv_heads) as u64;
        CacheMemory {
            allocated_bytes: allocated * entry,
            live_bytes: live * entry,
            dense_bytes: dense * entry,
            compression_ratio: dense as f64 / live.max(1) as f64,
        }
    }

    /// Allocates `slots` per row in every layer up front (a dense cache's known final size).
    pub fn reserve(&mut self, slots: usize, dtype: burn::tensor::DType) {
        for layer in 0..self.layers.len() {
            self.ensure_capacity(layer, slots, dtype);
        }
    }

    /// Makes room for slot `needed - 1` in every row of `layer`.
    fn ensure_capacity(&mut self, layer: usize, needed: usize, dtype: burn::tensor::DType) {
        let l = &mut self.layers[layer];
        if needed <= l.capacity {
            return;
        }
        let grown = needed.max(l.capacity + (l.capacity / 8).max(BLOCK));
        let capacity = grown.div_ceil(BLOCK) * BLOCK;
        let extra = capacity - l.capacity;
        let rows = l.rows.len();
        let zeros =
            || Tensor::<B, 3>::zeros([rows, extra, self.head_dim], &self.device).cast(dtype);
        let grow = |old: Option<Tensor<B, 3>>| match old {
            Some(old) => Tensor::cat(vec![old, zeros()], 1),
            None => zeros(),
        };
        l.keys = Some(grow(l.keys.take()));
        l.values = Some(grow(l.values.take()));
        let unused = Tensor::<B, 2>::full([rows, extra], f32::NEG_INFINITY, &self.device)
            .cast(FloatDType::F32);
        l.bias = Some(match l.bias.take() {
            Some(old) => Tensor::cat(vec![old, unused], 1),
            None => unused,
        });
        l.capacity = capacity;
    }

    /// Writes `keys`/`values` `[n, head_dim]` to the `(row, slot)` pairs and marks them live.
    fn write(
        &mut self,
        layer: usize,
        targets: &[(usize, usize)],
        keys: Tensor<B, 2>,
        values: Tensor<B, 2>,
    ) {
        let needed = targets.iter().map(|&(_, s)| s + 1).max().unwrap_or(0);
        self.ensure_capacity(layer, needed, keys.dtype());
        let n = targets.len();
        let flat: Vec<i64> = targets
            .iter()
            .flat_map(|&(r, s)| [r as i64, s as i64])
            .collect();
        let index = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, 2]), &self.device);
        let l = &mut self.layers[layer];
        // Taken out so each table is uniquely owned and the scatter writes in place.
        let scatter = |t: &mut Option<Tensor<B, 3>>, v: Tensor<B, 2>| {
            let table = t.take().expect("allocated by ensure_capacity");
            *t = Some(table.scatter_nd(index.clone(), v, IndexingUpdateOp::Assign));
        };
        scatter(&mut l.keys, keys);
        scatter(&mut l.values, values);
        let bias = l.bias.take().expect("allocated by ensure_capacity");
        let live = Tensor::<B, 1>::zeros([n], &self.device).cast(FloatDType::F32);
        l.bias = Some(bias.scatter_nd(index, live, IndexingUpdateOp::Assign));
    }

    /// Fills `sequence`'s rows of `layer` from its prompt: `keys`/`values` `[kv_heads, seq,
    /// head_dim]`, `evicted[head][position]` the (shifted) DMS key decisions. A key marked for
    /// eviction whose window has passed is not stored; the newest `window + 1` go to the ring.
    pub fn prefill(
        &mut self,
        sequence: usize,
        layer: usize,
        keys: Tensor<B, 3>,
        values: Tensor<B, 3>,
        evicted: &[Vec<bool>],
    ) {
        let [heads, seq, dim] = keys.dims();
        let window = self.window;
        let mut targets = Vec::new();
        let mut sources = Vec::new();
        for (head, flags) in evicted.iter().enumerate().take(heads) {
            let row = &mut self.layers[layer].rows[sequence * self.kv_heads + head];
            assert!(row.used == 0, "prefill of a row that already holds tokens");
            for (pos, &evict) in flags.iter().enumerate().take(seq) {
                let age = seq - 1 - pos;
                if window.is_some_and(|window| evict && age > window) {
                    continue;
                }
                let slot = row.take();
                if let Some(window) = window
                    && age <= window
                {
                    row.recent.push_back((slot, evict));
                }
                targets.push((sequence * self.kv_heads + head, slot));
                sources.push((head * seq + pos) as i64);
            }
        }
        let n = sources.len();
        let source = Tensor::<B, 1, Int>::from_data(TensorData::new(sources, [n]), &self.device);
        let pick = |t: Tensor<B, 3>| t.reshape([heads * seq, dim]).select(0, source.clone());
        self.write(layer, &targets, pick(keys), pick(values));
        if layer + 1 == self.layers.len() {
            self.seen[sequence] = seq;
        }
    }

    /// Sets the DMS decision about the previous token of every row of `layer` (`flags[row]`).
    fn mark_previous(&mut self, layer: usize, flags: &[bool], newest_included: bool) {
        for (row, &flag) in self.layers[layer].rows.iter_mut().zip(flags) {
            // Before this step's token is pushed the previous one is the newest entry.
            let back = row.recent.len() - 1 - usize::from(newest_included);
            row.recent[back].1 = flag;
        }
    }

    /// Appends one token to every sequence in `layer` and attends to the cache.
    ///
    /// - `q`: `[rows, group, head_dim]`; `k`, `v`: `[rows, head_dim]`;
    /// - `decisions`: DMS only, this token's hard decisions about the previous one, `[rows]`
    ///   (0/1). They free a slot only `window + 1` tokens later, so unless the window is 0 they
    ///   are returned to be read with the step's other results ([`Self::apply_decisions`]).
    ///
    /// Returns the attention context `[rows, group, head_dim]`.
    pub fn step_layer(
        &mut self,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        decisions: Option<Tensor<B, 1>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let mut pending = decisions;
        if self.window == Some(0)
            && let Some(flags) = pending.take()
        {
            // With no delay the previous token leaves now: its decision is needed at once.
            let flags = read_flags(flags);
            self.mark_previous(layer, &flags, false);
        }
        let window = self.window;
        let targets: Vec<(usize, usize)> = self.layers[layer]
            .rows
            .iter_mut()
            .enumerate()
            .map(|(r, row)| {
                if let Some(window) = window
                    && row.recent.len() == window + 1
                {
                    let (slot, evict) = row.recent.pop_front().expect("full ring");
                    if evict {
                        row.release(slot);
                    }
                }
                let slot = row.take();
                if window.is_some() {
                    row.recent.push_back((slot, false));
                }
                (r, slot)
            })
            .collect();
        self.write(layer, &targets, k, v);
        let l = &self.layers[layer];
        let context = attend(
            q,
            l.keys.clone().expect("written"),
            l.values.clone().expect("written"),
            l.bias.clone().expect("written"),
        );
        (context, pending)
    }

    /// Applies the decisions [`Self::step_layer`] returned, one `[rows]` tensor per layer
    /// (concatenated: `[layers * rows]`), read back at once; then counts the step.
    pub fn finish_step(&mut self, decisions: Option<Tensor<B, 1>>) {
        if let Some(all) = decisions {
            let flags = read_flags(all);
            let rows = self.seen.len() * self.kv_heads;
            for layer in 0..self.layers.len() {
                self.mark_previous(layer, &flags[layer * rows..(layer + 1) * rows], true);
            }
        }
        for s in &mut self.seen {
            *s += 1;
        }
    }
}

fn read_flags<B: Backend>(t: Tensor<B, 1>) -> Vec<bool> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 decisions")
        .into_iter()
        .map(|f| f > 0.5)
        .collect()
}

/// Attention of each row's query group over its slot table: `q` `[rows, group, dim]`, `keys` /
/// `values` `[rows, capacity, dim]`, `bias` f32 `[rows, capacity]` → `[rows, group, dim]`.
/// Scores and softmax in f32.
fn attend<B: Backend>(
    q: Tensor<B, 3>,
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
    bias: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let dim = q.dims()[2];
    let dtype = q.dtype();
    let scores = q.matmul(keys.swap_dims(1, 2)).cast(FloatDType::F32) * (1.0 / (dim as f64).sqrt());
    let probs = activation::softmax(scores + bias.unsqueeze_dim(1), 2);
    probs.cast(dtype).matmul(values)
}
