//! The physically evicting KV cache for a batch of sequences, laid out for the device.
//!
//! Each layer keeps slots per (sequence, KV head) "row" and an additive bias `[rows, capacity]`
//! (0 for a live slot, -inf for one never used). The host does the bookkeeping (which slot each
//! new token takes, the DMS delayed-eviction ring) and the device only sees one scatter per layer
//! and step plus the attention. An evicted token's slot is reused by the next token of the same
//! row, so a DMS row stops growing at its window plus what it retains.
//!
//! Dense rows all grow alike and live in one table `[rows, capacity, head_dim]` (grown by an
//! eighth at a time). DMS rows grow unevenly, so they own 16-slot pages of a per-layer pool and
//! memory follows the live entries; attention gathers a layer's pages into a rectangle of its
//! largest row, which exists for one layer at a time (reported as transient memory).
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
    /// Paged storage: the pool pages holding slots `i * PAGE ..`, in order.
    pages: Vec<usize>,
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

/// One layer's storage, bias and rows (`None` before anything is written).
struct Layer<B: Backend> {
    storage: Storage<B>,
    /// f32 `[rows, capacity]`: 0 for a live slot, -inf otherwise.
    bias: Option<Tensor<B, 2>>,
    /// Slots per row that attention covers (the largest row, rounded up).
    capacity: usize,
    rows: Vec<Row>,
}

/// Where a layer's keys and values live.
enum Storage<B: Backend> {
    /// Rows that grow alike (dense): `[rows, capacity, head_dim]`, attended in place.
    Tables {
        keys: Option<Tensor<B, 3>>,
        values: Option<Tensor<B, 3>>,
    },
    /// Rows that grow unevenly (DMS heads retain very different shares): each row owns pages
    /// of `PAGE` slots in a shared pool `[pages * PAGE, head_dim]`, so memory follows the live
    /// entries rather than the largest row; attention gathers the rows' pages into one
    /// `[rows, capacity, head_dim]` rectangle, one layer at a time.
    Pages {
        keys: Option<Tensor<B, 2>>,
        values: Option<Tensor<B, 2>>,
        /// Pages in the pool / handed out to rows.
        allocated: usize,
        used: usize,
        /// `[rows, capacity / PAGE]`: the pool page of each row's page index (0 where none).
        table: Option<Tensor<B, 2, Int>>,
    },
}

/// What the cache holds, in bytes of the storage format and in entries.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CacheMemory {
    /// Key and value storage allocated on the device (slot tables or page pools).
    pub allocated_bytes: u64,
    /// Paged storage: the largest layer's gathered rectangle, which exists while that layer
    /// attends (one layer at a time); 0 for slot tables.
    pub transient_bytes: u64,
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

/// Slot capacity granularity: attention covers whole blocks of this many slots per row.
const BLOCK: usize = 64;
/// Slots per page of paged storage.
const PAGE: usize = 16;

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
                    storage: match window {
                        Some(_) => Storage::Pages {
                            keys: None,
                            values: None,
                            allocated: 0,
                            used: 0,
                            table: None,
                        },
                        None => Storage::Tables {
                            keys: None,
                            values: None,
                        },
                    },
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
        let allocated: u64 = self
            .layers
            .iter()
            .map(|l| match &l.storage {
                Storage::Tables { .. } => l.capacity as u64 * rows,
                Storage::Pages { allocated, .. } => (allocated * PAGE) as u64,
            })
            .sum();
        let transient = self
            .layers
            .iter()
            .filter(|l| matches!(l.storage, Storage::Pages { .. }))
            .map(|l| l.capacity as u64 * rows)
            .max()
            .unwrap_or(0);
        let live: u64 = self
            .layers
            .iter()
            .flat_map(|l| l.rows.iter().map(|r| r.live as u64))
            .sum();
        let dense: u64 = self.seen.iter().map(|&s| s as u64).sum::<u64>()
            * (self.layers.len() * self.kv_heads) as u64;
        CacheMemory {
            allocated_bytes: allocated * entry,
            transient_bytes: transient * entry,
            live_bytes: live * entry,
            dense_bytes: dense * entry,
            compression_ratio: dense as f64 / live.max(1) as f64,
        }
    }

    /// A cache of `times` copies of this one-sequence cache (benchmarks: the same sizes and work
    /// as `times` different prompts of that length).
    pub fn repeat(&self, times: usize) -> Self {
        assert_eq!(self.seen.len(), 1, "repeat a one-sequence cache");
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut rows: Vec<Row> = (0..times).flat_map(|_| l.rows.iter().cloned()).collect();
                let storage = match &l.storage {
                    Storage::Tables { keys, values } => Storage::Tables {
                        keys: keys.clone().map(|t| t.repeat_dim(0, times)),
                        values: values.clone().map(|t| t.repeat_dim(0, times)),
                    },
                    Storage::Pages {
                        keys,
                        values,
                        allocated,
                        table,
                        ..
                    } => {
                        // Copy c's pages sit `c * allocated` pages further into the pool.
                        let per_copy = l.rows.len();
                        for (r, row) in rows.iter_mut().enumerate() {
                            let shift = (r / per_copy) * allocated;
                            row.pages.iter_mut().for_each(|p| *p += shift);
                        }
                        Storage::Pages {
                            keys: keys.clone().map(|t| t.repeat_dim(0, times)),
                            values: values.clone().map(|t| t.repeat_dim(0, times)),
                            allocated: allocated * times,
                            used: allocated * times,
                            table: table.clone().map(|t| {
                                Tensor::cat(
                                    (0..times)
                                        .map(|c| t.clone().add_scalar((c * allocated) as i64))
                                        .collect(),
                                    0,
                                )
                            }),
                        }
                    }
                };
                Layer {
                    storage,
                    bias: l.bias.clone().map(|t| t.repeat_dim(0, times)),
                    capacity: l.capacity,
                    rows,
                }
            })
            .collect();
        Self {
            window: self.window,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            layers,
            seen: self.seen.repeat(times),
            device: self.device.clone(),
        }
    }

    /// Allocates `slots` per row in every layer up front (a dense cache's known final size).
    pub fn reserve(&mut self, slots: usize, dtype: burn::tensor::DType) {
        for layer in 0..self.layers.len() {
            self.ensure_capacity(layer, slots, dtype);
        }
    }

    /// Makes room for slot `needed - 1` in every row of `layer` (bias, and tables when the
    /// storage is tables; pages are handed out in [`Self::write`]).
    fn ensure_capacity(&mut self, layer: usize, needed: usize, dtype: burn::tensor::DType) {
        let l = &mut self.layers[layer];
        if needed <= l.capacity {
            return;
        }
        let rows = l.rows.len();
        // Whole blocks of 64 slots, grown by an eighth: few distinct attention shapes (each is
        // a GEMM the GPU backend tunes once) and key counts the GEMM tiles evenly.
        let grown = needed.max(l.capacity + (l.capacity / 8).max(BLOCK));
        let capacity = grown.div_ceil(BLOCK) * BLOCK;
        let extra = capacity - l.capacity;
        let device = &self.device;
        match &mut l.storage {
            Storage::Tables { keys, values } => {
                let zeros =
                    || Tensor::<B, 3>::zeros([rows, extra, self.head_dim], device).cast(dtype);
                let grow = |old: Option<Tensor<B, 3>>| match old {
                    Some(old) => Tensor::cat(vec![old, zeros()], 1),
                    None => zeros(),
                };
                *keys = Some(grow(keys.take()));
                *values = Some(grow(values.take()));
            }
            Storage::Pages { table, .. } => {
                let more = Tensor::<B, 2, Int>::zeros([rows, extra / PAGE], device);
                *table = Some(match table.take() {
                    Some(old) => Tensor::cat(vec![old, more], 1),
                    None => more,
                });
            }
        }
        let unused =
            Tensor::<B, 2>::full([rows, extra], f32::NEG_INFINITY, device).cast(FloatDType::F32);
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
        let dtype = keys.dtype();
        let needed = targets.iter().map(|&(_, s)| s + 1).max().unwrap_or(0);
        self.ensure_capacity(layer, needed, dtype);
        let n = targets.len();
        let head_dim = self.head_dim;
        let device = &self.device;
        let pairs = |pairs: Vec<i64>| {
            let count = pairs.len() / 2;
            Tensor::<B, 2, Int>::from_data(TensorData::new(pairs, [count, 2]), device)
        };
        let slots = pairs(
            targets
                .iter()
                .flat_map(|&(r, s)| [r as i64, s as i64])
                .collect(),
        );
        let l = &mut self.layers[layer];
        // Tensors are taken out so each is uniquely owned and the scatter writes in place.
        match &mut l.storage {
            Storage::Tables {
                keys: key_table,
                values: value_table,
            } => {
                let scatter = |t: &mut Option<Tensor<B, 3>>, v: Tensor<B, 2>| {
                    let table = t.take().expect("allocated by ensure_capacity");
                    *t = Some(table.scatter_nd(slots.clone(), v, IndexingUpdateOp::Assign));
                };
                scatter(key_table, keys);
                scatter(value_table, values);
            }
            Storage::Pages {
                keys: key_pool,
                values: value_pool,
                allocated,
                used,
                table,
            } => {
                // Hand out pages to rows whose new slots pass their last page.
                let mut new_pages = Vec::new();
                let mut page_ids = Vec::new();
                for &(r, s) in targets {
                    let row = &mut l.rows[r];
                    while row.pages.len() * PAGE <= s {
                        new_pages.extend([r as i64, row.pages.len() as i64]);
                        page_ids.push(*used as i64);
                        row.pages.push(*used);
                        *used += 1;
                    }
                }
                if !page_ids.is_empty() {
                    let count = page_ids.len();
                    let ids =
                        Tensor::<B, 1, Int>::from_data(TensorData::new(page_ids, [count]), device);
                    let t = table.take().expect("allocated by ensure_capacity");
                    *table = Some(t.scatter_nd(pairs(new_pages), ids, IndexingUpdateOp::Assign));
                }
                if *used > *allocated {
                    let grown = (*used).max(*allocated + *allocated / 8);
                    let extra = (grown - *allocated) * PAGE;
                    let zeros = || Tensor::<B, 2>::zeros([extra, head_dim], device).cast(dtype);
                    let grow = |old: Option<Tensor<B, 2>>| match old {
                        Some(old) => Tensor::cat(vec![old, zeros()], 0),
                        None => zeros(),
                    };
                    *key_pool = Some(grow(key_pool.take()));
                    *value_pool = Some(grow(value_pool.take()));
                    *allocated = grown;
                }
                let physical: Vec<i64> = targets
                    .iter()
                    .map(|&(r, s)| (l.rows[r].pages[s / PAGE] * PAGE + s % PAGE) as i64)
                    .collect();
                let physical =
                    Tensor::<B, 2, Int>::from_data(TensorData::new(physical, [n, 1]), device);
                let scatter = |t: &mut Option<Tensor<B, 2>>, v: Tensor<B, 2>| {
                    let pool = t.take().expect("allocated above");
                    *t = Some(pool.scatter_nd(physical.clone(), v, IndexingUpdateOp::Assign));
                };
                scatter(key_pool, keys);
                scatter(value_pool, values);
            }
        }
        let bias = l.bias.take().expect("allocated by ensure_capacity");
        let live = Tensor::<B, 1>::zeros([n], device).cast(FloatDType::F32);
        l.bias = Some(bias.scatter_nd(slots, live, IndexingUpdateOp::Assign));
    }

    /// The layer's keys and values as `[rows, capacity, head_dim]` (paged storage gathers them).
    fn tables(&self, layer: usize) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let l = &self.layers[layer];
        match &l.storage {
            Storage::Tables { keys, values } => (
                keys.clone().expect("written"),
                values.clone().expect("written"),
            ),
            Storage::Pages {
                keys,
                values,
                table,
                ..
            } => {
                let rows = l.rows.len();
                let offsets =
                    Tensor::<B, 1, Int>::arange(0..PAGE as i64, &self.device).reshape([1, 1, PAGE]);
                let starts = table
                    .clone()
                    .expect("written")
                    .mul_scalar(PAGE as i64)
                    .unsqueeze_dim::<3>(2);
                let physical = (starts + offsets).reshape([rows * l.capacity]);
                let gather = |pool: &Option<Tensor<B, 2>>| {
                    pool.clone()
                        .expect("written")
                        .select(0, physical.clone())
                        .reshape([rows, l.capacity, self.head_dim])
                };
                (gather(keys), gather(values))
            }
        }
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
        let (keys, values) = self.tables(layer);
        let bias = self.layers[layer].bias.clone().expect("written");
        let context = attend(q, keys, values, bias);
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
