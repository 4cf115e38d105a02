//! A KV cache that really frees memory: storage per (layer, KV head) with its own length, where
//! evicted tokens give their slot to the next token (as the official paged DMS cache does), so the
//! bytes held fall with the compression ratio.
//!
//! The same structure serves the training-free baselines (StreamingLLM, TOVA, H2O): only the rule
//! that picks which slot to free differs ([`Policy`]).

use std::collections::VecDeque;

use burn::tensor::{Tensor, TensorData, activation, backend::Backend};

/// Which tokens a head drops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Keep everything (the original model).
    Dense,
    /// DMS: a token marked by its successor's decision leaves once `window` newer tokens arrived.
    Dms { window: usize },
    /// StreamingLLM: the first `sinks` tokens plus the most recent ones, within the budget.
    StreamingLlm { sinks: usize },
    /// TOVA: drop the token the current query attends to least (mean over the group's heads).
    Tova,
    /// H2O: keep the most recent half of the budget plus the heavy hitters by accumulated attention.
    H2o,
}

/// How many tokens a budgeted policy may hold after `seen` tokens: `ceil(seen / cr)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub compression_ratio: f64,
}

impl Budget {
    pub fn at(&self, seen: usize) -> usize {
        ((seen as f64 / self.compression_ratio).ceil() as usize).max(1)
    }

    /// StreamingLLM's budget: never below its sinks plus the newest token. Keeping the sinks is
    /// the rule's point; under `at` alone token 0 would leave at position 1 (budget 1) and never
    /// return. The extra entries count in its measured CR.
    pub fn with_sinks(&self, seen: usize, sinks: usize) -> usize {
        self.at(seen).max((sinks + 1).min(seen))
    }
}

/// One KV head's storage in one layer.
pub struct HeadCache<B: Backend> {
    /// `[capacity, head_dim]`; rows `0..slots` are allocated.
    keys: Tensor<B, 2>,
    values: Tensor<B, 2>,
    /// Allocated rows (the high-water mark); memory is held for these.
    slots: usize,
    /// Token position held by each allocated row, `None` when free.
    position: Vec<Option<usize>>,
    /// Accumulated attention per row (H2O).
    score: Vec<f64>,
    free: Vec<usize>,
    /// DMS: the last `window + 1` tokens as (position, row, evict flag).
    recent: VecDeque<(usize, usize, bool)>,
}

impl<B: Backend> HeadCache<B> {
    fn new(head_dim: usize, device: &B::Device) -> Self {
        let capacity = 16;
        Self {
            keys: Tensor::zeros([capacity, head_dim], device),
            values: Tensor::zeros([capacity, head_dim], device),
            slots: 0,
            position: Vec::new(),
            score: Vec::new(),
            free: Vec::new(),
            recent: VecDeque::new(),
        }
    }

    /// Live tokens.
    pub fn len(&self) -> usize {
        self.slots - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Allocated rows (live + free).
    pub fn allocated(&self) -> usize {
        self.slots
    }

    fn release(&mut self, row: usize) {
        self.position[row] = None;
        self.score[row] = 0.0;
        self.free.push(row);
    }

    /// Stores a token's key and value, reusing a freed row when there is one.
    ///
    /// # Shapes
    /// - `key`, `value`: `[1, head_dim]`
    fn insert(&mut self, position: usize, key: Tensor<B, 2>, value: Tensor<B, 2>) -> usize {
        let row = match self.free.pop() {
            Some(row) => row,
            None => {
                let [capacity, dim] = self.keys.dims();
                if self.slots == capacity {
                    // Double the storage (amortised O(1) per token).
                    let device = self.keys.device();
                    let grow = |t: &mut Tensor<B, 2>| {
                        let old = std::mem::replace(t, Tensor::empty([0, dim], &device));
                        *t = Tensor::cat(vec![old, Tensor::zeros([capacity, dim], &device)], 0);
                    };
                    grow(&mut self.keys);
                    grow(&mut self.values);
                }
                self.position.push(None);
                self.score.push(0.0);
                self.slots += 1;
                self.slots - 1
            }
        };
        let dim = key.dims()[1];
        // Move the storage out so it is uniquely owned and the row is written in place, instead
        // of copying the whole cache on every token.
        let device = key.device();
        let keys = std::mem::replace(&mut self.keys, Tensor::empty([0, dim], &device));
        self.keys = keys.slice_assign([row..row + 1, 0..dim], key);
        let values = std::mem::replace(&mut self.values, Tensor::empty([0, dim], &device));
        self.values = values.slice_assign([row..row + 1, 0..dim], value);
        self.position[row] = Some(position);
        row
    }

    /// Rows holding tokens, oldest position first.
    fn live_rows(&self) -> Vec<usize> {
        let mut rows: Vec<usize> = (0..self.slots)
            .filter(|&r| self.position[r].is_some())
            .collect();
        rows.sort_by_key(|&r| self.position[r]);
        rows
    }

    /// Attention of the group's queries over the live rows.
    ///
    /// # Shapes
    /// - `q`: `[group, head_dim]` → context `[group, head_dim]`, weights per row `[slots]`
    fn attend(&self, q: Tensor<B, 2>) -> (Tensor<B, 2>, Vec<f32>) {
        let [_, dim] = q.dims();
        let keys = self.keys.clone().narrow(0, 0, self.slots);
        let values = self.values.clone().narrow(0, 0, self.slots);
        let scores = q.matmul(keys.transpose()) * (1.0 / (dim as f64).sqrt());
        let free: Vec<f32> = (0..self.slots)
            .map(|r| {
                if self.position[r].is_some() {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let free = Tensor::<B, 1>::from_data(TensorData::new(free, [self.slots]), &scores.device());
        let probs = activation::softmax(scores + free.unsqueeze::<2>(), 1);
        let weights = probs
            .clone()
            .mean_dim(0)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32");
        (probs.matmul(values), weights)
    }
}

/// The cache of one model: `layers x kv_heads` heads, batch 1.
pub struct KvCache<B: Backend> {
    pub policy: Policy,
    pub budget: Option<Budget>,
    heads: Vec<Vec<HeadCache<B>>>,
    /// Tokens appended so far.
    seen: usize,
    head_dim: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        policy: Policy,
        budget: Option<Budget>,
        device: &B::Device,
    ) -> Self {
        Self {
            policy,
            budget,
            heads: (0..layers)
                .map(|_| {
                    (0..kv_heads)
                        .map(|_| HeadCache::new(head_dim, device))
                        .collect()
                })
                .collect(),
            seen: 0,
            head_dim,
        }
    }

    /// Tokens appended so far (the position of the next token).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Live entries per layer and head.
    pub fn lengths(&self) -> Vec<Vec<usize>> {
        self.heads
            .iter()
            .map(|layer| layer.iter().map(HeadCache::len).collect())
            .collect()
    }

    /// Bytes held (allocated rows x K and V x head_dim x element size).
    pub fn bytes(&self, element_bytes: usize) -> u64 {
        let rows: usize = self.heads.iter().flatten().map(HeadCache::allocated).sum();
        (rows * 2 * self.head_dim * element_bytes) as u64
    }

    /// Bytes a dense cache would hold for the same tokens.
    pub fn dense_bytes(&self, element_bytes: usize) -> u64 {
        let heads: usize = self.heads.iter().map(Vec::len).sum();
        (heads * self.seen * 2 * self.head_dim * element_bytes) as u64
    }

    /// Measured compression ratio: tokens seen / mean live entries (spec §5, window included).
    pub fn compression_ratio(&self) -> f64 {
        let lengths: Vec<usize> = self.heads.iter().flatten().map(HeadCache::len).collect();
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64;
        self.seen as f64 / mean.max(f64::MIN_POSITIVE)
    }

    /// Marks that one more token has been appended to every layer.
    pub fn advance(&mut self) {
        self.seen += 1;
    }

    /// Fills one layer from a prefill of `keys`/`values` `[kv_heads, seq, head_dim]` under DMS key
    /// decisions `evicted` (`[kv_heads][seq]`, already shifted: entry k is about key k). Keys whose
    /// window has passed are dropped (compaction); the last `window + 1` go to the ring.
    pub fn prefill_layer(
        &mut self,
        layer: usize,
        keys: Tensor<B, 3>,
        values: Tensor<B, 3>,
        evicted: &[Vec<bool>],
    ) {
        let [heads, seq, dim] = keys.dims();
        let window = match self.policy {
            Policy::Dms { window } => window,
            _ => usize::MAX,
        };
        for (j, cache) in self.heads[layer].iter_mut().enumerate().take(heads) {
            let k = keys.clone().narrow(0, j, 1).reshape([seq, dim]);
            let v = values.clone().narrow(0, j, 1).reshape([seq, dim]);
            let last = seq - 1;
            for (pos, &evict) in evicted[j].iter().enumerate().take(seq) {
                let in_window = last - pos <= window;
                if evict && !in_window {
                    continue;
                }
                let row = cache.insert(
                    pos,
                    k.clone().narrow(0, pos, 1),
                    v.clone().narrow(0, pos, 1),
                );
                if matches!(self.policy, Policy::Dms { .. }) && seq - pos <= window + 1 {
                    cache.recent.push_back((pos, row, evict));
                }
            }
        }
    }

    /// Sets the count of tokens seen after a prefill of `seq` tokens.
    pub fn set_seen(&mut self, seq: usize) {
        self.seen = seq;
    }

    /// Appends the current token (position [`Self::seen`]) to one layer and attends to it.
    ///
    /// - `q`: `[kv_heads, group, head_dim]`; `k`, `v`: `[kv_heads, 1, head_dim]`;
    /// - `evict_previous`: DMS decisions about the previous token, one per KV head.
    ///
    /// Returns the attention context `[kv_heads, group, head_dim]`.
    pub fn step_layer(
        &mut self,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        evict_previous: Option<&[bool]>,
    ) -> Tensor<B, 3> {
        let [heads, group, dim] = q.dims();
        let position = self.seen;
        let budget_next = self.budget.map(|b| b.at(position + 2));
        let policy = self.policy;
        let mut contexts = Vec::with_capacity(heads);
        for (j, cache) in self.heads[layer].iter_mut().enumerate().take(heads) {
            let key = k.clone().narrow(0, j, 1).reshape([1, dim]);
            let value = v.clone().narrow(0, j, 1).reshape([1, dim]);
            // 1. Before the new token is stored: free what the policy says is gone.
            match policy {
                Policy::Dms { window } => {
                    // The new token decides about the previous one; then the token leaving the
                    // window frees its row if it was marked.
                    if let (Some(flags), Some(back)) = (evict_previous, cache.recent.back_mut()) {
                        back.2 = flags[j];
                    }
                    if cache.recent.len() == window + 1 {
                        let (_, row, evict) = cache.recent.pop_front().expect("full ring");
                        if evict {
                            cache.release(row);
                        }
                    }
                }
                Policy::StreamingLlm { sinks } => {
                    let limit = self
                        .budget
                        .expect("StreamingLLM needs a budget")
                        .with_sinks(position + 1, sinks);
                    while cache.len() + 1 > limit {
                        let rows = cache.live_rows();
                        let victim = rows
                            .iter()
                            .copied()
                            .find(|&r| cache.position[r].is_some_and(|p| p >= sinks))
                            .unwrap_or(rows[0]);
                        cache.release(victim);
                    }
                }
                Policy::Dense | Policy::Tova | Policy::H2o => {}
            }
            let row = cache.insert(position, key, value);
            if let Policy::Dms { .. } = policy {
                cache.recent.push_back((position, row, false));
            }
            // 2. Attend.
            let query = q.clone().narrow(0, j, 1).reshape([group, dim]);
            let (context, weights) = cache.attend(query);
            contexts.push(context.unsqueeze::<3>());
            // 3. Score-based policies free rows so the next token fits the budget.
            match policy {
                Policy::Tova | Policy::H2o => {
                    for (r, w) in weights.iter().enumerate() {
                        if cache.position[r].is_some() {
                            cache.score[r] += *w as f64;
                        }
                    }
                    let limit = budget_next.expect("TOVA and H2O need a budget");
                    while cache.len() + 1 > limit && cache.len() > 1 {
                        let rows = cache.live_rows();
                        let victim = if policy == Policy::Tova {
                            *rows
                                .iter()
                                .min_by(|&&a, &&b| weights[a].total_cmp(&weights[b]))
                                .expect("non-empty")
                        } else {
                            // Keep the most recent half of the budget; evict the lightest of the rest.
                            let recent = limit / 2;
                            let candidates = &rows[..rows.len().saturating_sub(recent).max(1)];
                            *candidates
                                .iter()
                                .min_by(|&&a, &&b| cache.score[a].total_cmp(&cache.score[b]))
                                .expect("non-empty")
                        };
                        cache.release(victim);
                    }
                }
                Policy::Dense | Policy::Dms { .. } | Policy::StreamingLlm { .. } => {}
            }
        }
        Tensor::cat(contexts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn kv(n: usize, dim: usize) -> Tensor<Cpu, 3> {
        let data: Vec<f32> = (0..n * dim).map(|i| (i % 7) as f32 * 0.1).collect();
        Tensor::from_data(TensorData::new(data, [1, n, dim]), &Default::default())
    }

    #[test]
    fn dms_rows_are_reused_so_memory_stops_growing() {
        let device = Default::default();
        let (window, dim) = (2, 4);
        let mut cache = KvCache::<Cpu>::new(1, 1, dim, Policy::Dms { window }, None, &device);
        for t in 0..40 {
            let q = kv(1, dim);
            // Every token marks its predecessor for eviction.
            let flags = [t > 0];
            cache.step_layer(0, q, kv(1, dim), kv(1, dim), Some(&flags));
            cache.advance();
            assert!(
                cache.lengths()[0][0] <= window + 1,
                "t{t}: {:?}",
                cache.lengths()
            );
        }
        // Rows are reused: allocation stays at the window, not the 40 tokens seen.
        assert!(
            cache.bytes(4) <= ((window + 2) * 2 * dim * 4) as u64,
            "{}",
            cache.bytes(4)
        );
        assert!(cache.compression_ratio() > 10.0);
    }

    #[test]
    fn budgets_are_respected_by_every_baseline() {
        let device = Default::default();
        let budget = Budget {
            compression_ratio: 4.0,
        };
        for policy in [Policy::StreamingLlm { sinks: 2 }, Policy::Tova, Policy::H2o] {
            let mut cache = KvCache::<Cpu>::new(1, 2, 4, policy, Some(budget), &device);
            for t in 0..50 {
                cache.step_layer(
                    0,
                    kv(2, 4).reshape([2, 1, 4]),
                    kv(2, 4).reshape([2, 1, 4]),
                    kv(2, 4).reshape([2, 1, 4]),
                    None,
                );
                cache.advance();
                let limit = match policy {
                    Policy::StreamingLlm { sinks } => budget.with_sinks(t + 1, sinks),
                    _ => budget.at(t + 1),
                };
                for len in &cache.lengths()[0] {
                    assert!(*len <= limit, "{policy:?} t{t}: {len}");
                }
            }
            assert!((cache.compression_ratio() - 4.0).abs() < 0.5, "{policy:?}");
            if let Policy::StreamingLlm { sinks } = policy {
                // The sinks survive the first positions, where the plain budget is 1.
                for head in &cache.heads[0] {
                    let held: Vec<usize> = head.position.iter().flatten().copied().collect();
                    assert!((0..sinks).all(|p| held.contains(&p)), "{held:?}");
                }
            }
        }
    }
}
