//! Training-free KV-eviction baselines, teacher-forced a chunk of positions at a time over a
//! batch of sequences: each layer attends to its retained cache plus the chunk (causally), then
//! keeps what the policy chooses for the next chunk. Everything stays on the device except the
//! per-head scores the selection reads back (`[batch, kv_heads, held]`).
//!
//! With `chunk = 1` this is exactly the per-token eviction of [`super::cache::KvCache`] (tested):
//! before token `p` is stored the cache holds `budget(p + 1) - 1` entries. With a larger chunk the
//! decisions are taken once per chunk, from the chunk's queries, and a query inside a chunk also
//! sees the chunk's earlier tokens on top of that (the reported CR counts them: it is the sequence
//! length over the entries the last query attended to).

use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation};
use serde::Serialize;

use super::cache::{Budget, Policy};
use super::quality::Batch;
use crate::dms::DmsModel;
use crate::model::RopeTables;
use crate::model::decoder::{Attention, AttentionHook, AttentionMask, grouped_attention};
use crate::model::rope::inverse_frequencies;
use crate::ops::attention::AttentionBackend;

/// A training-free eviction policy with a per-head budget of `ceil(seen / CR)` entries.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Baseline {
    /// StreamingLLM: the first `sinks` tokens plus the most recent ones.
    StreamingLlm { sinks: usize },
    /// The most recent tokens only (a sliding window).
    Recent,
    /// TOVA: keep the entries the newest query attends to most (mean over the group's heads).
    Tova,
    /// H2O: the most recent half of the budget plus the heaviest hitters by accumulated attention.
    H2o,
    /// SnapKV-style: the chunk's tokens plus the earlier entries its queries attend to most
    /// (attention summed over the chunk's queries, max-pooled over 7 neighbouring keys).
    SnapKv,
}

impl Baseline {
    /// Every baseline, in report order.
    pub const ALL: [Baseline; 5] = [
        Baseline::StreamingLlm { sinks: 4 },
        Baseline::Recent,
        Baseline::Tova,
        Baseline::H2o,
        Baseline::SnapKv,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Baseline::StreamingLlm { .. } => "StreamingLLM",
            Baseline::Recent => "Recent",
            Baseline::Tova => "TOVA",
            Baseline::H2o => "H2O",
            Baseline::SnapKv => "SnapKV",
        }
    }

    /// The token-by-token [`Policy`] of the same rule, where there is one.
    pub fn exact_policy(&self) -> Option<Policy> {
        match *self {
            Baseline::StreamingLlm { sinks } => Some(Policy::StreamingLlm { sinks }),
            Baseline::Recent => Some(Policy::StreamingLlm { sinks: 0 }),
            Baseline::Tova => Some(Policy::Tova),
            Baseline::H2o => Some(Policy::H2o),
            Baseline::SnapKv => None,
        }
    }
}

/// One layer's retained entries, identical in count for every (sequence, KV head).
struct LayerCache<B: AttentionBackend> {
    /// `[batch, kv_heads, held, head_dim]`; `None` before the first chunk.
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    /// H2O: attention accumulated per entry, f32 `[batch, kv_heads, held]`.
    accumulated: Option<Tensor<B, 3>>,
    /// Positions of the entries (StreamingLLM / Recent only: the same for every head).
    positions: Vec<usize>,
}

/// The result of one baseline over a batch.
pub struct BaselineRun<B: AttentionBackend> {
    /// Final hidden states before the norm, `[batch, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// Sequence length over the entries the last query attended to.
    pub compression_ratio: f64,
}

/// Runs the original model over `batch` with `baseline` evicting to `budget`, `chunk` positions
/// at a time.
pub fn run_baseline<B: AttentionBackend>(
    model: &DmsModel<B>,
    batch: &Batch<B>,
    baseline: Baseline,
    budget: Budget,
    chunk: usize,
) -> BaselineRun<B> {
    assert!(chunk >= 1, "chunk must be >= 1");
    let cfg = &model.base.config;
    let device = batch.ids.device();
    let len = batch.seq_len();
    let inv_freq = inverse_frequencies(&cfg.rope, cfg.head_dim);
    let mut caches: Vec<LayerCache<B>> = (0..cfg.num_layers)
        .map(|_| LayerCache {
            keys: None,
            values: None,
            accumulated: None,
            positions: Vec::new(),
        })
        .collect();
    let mut outputs = Vec::new();
    let mut held_last = len;
    let mut start = 0;
    while start < len {
        let rows = chunk.min(len - start);
        let end = start + rows;
        let rope = RopeTables::new(&inv_freq, start, rows, &device);
        // What the next chunk's first token finds (the per-token rule's `budget(p + 1) - 1`).
        // Score-based rules never empty a head; StreamingLLM may (at budget 1 it keeps only the
        // newest token).
        let floor = usize::from(matches!(
            baseline,
            Baseline::Tova | Baseline::H2o | Baseline::SnapKv
        ));
        let limit = (end < len).then(|| match baseline {
            Baseline::StreamingLlm { sinks } => budget.with_sinks(end + 1, sinks),
            _ => budget.at(end + 1),
        });
        let keep = limit.map(|limit| limit.saturating_sub(1).max(floor));
        // Newest entries kept whatever their score: H2O's recent half of the next token's budget
        // (taken before the floor, as the per-token rule does), SnapKV's chunk.
        let protected = match (baseline, keep) {
            (Baseline::H2o, _) => limit.unwrap_or(0) / 2,
            (Baseline::SnapKv, Some(keep)) => rows.min(keep),
            _ => 0,
        };
        let mut hook = Evicting {
            caches: &mut caches,
            baseline,
            rope: &rope,
            start,
            keep,
            protected,
            held: 0,
        };
        let x = model.base.layers_with(
            model.base.embed(batch.ids.clone().narrow(1, start, rows)),
            &mut hook,
        );
        held_last = hook.held;
        outputs.push(x);
        start = end;
    }
    BaselineRun {
        hidden: Tensor::cat(outputs, 1),
        compression_ratio: len as f64 / held_last.max(1) as f64,
    }
}

/// One chunk through every layer: attend to the retained cache plus the chunk (causally), then
/// keep what the policy chooses for the next chunk.
struct Evicting<'a, B: AttentionBackend> {
    caches: &'a mut [LayerCache<B>],
    baseline: Baseline,
    rope: &'a RopeTables<B>,
    /// The chunk's first position.
    start: usize,
    /// Entries each head keeps for the next chunk (`None` after the last chunk).
    keep: Option<usize>,
    /// Newest entries kept whatever their score.
    protected: usize,
    /// Entries the chunk's last query attended to (the last layer's).
    held: usize,
}

impl<B: AttentionBackend> AttentionHook<B> for Evicting<'_, B> {
    fn attend(
        &mut self,
        index: usize,
        attn: &Attention<B>,
        _residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let cache = &mut self.caches[index];
        let qkv = attn.project(normed, self.rope, None, &mut |_| {});
        let rows = qkv.q.dims()[2];
        let keys = match cache.keys.take() {
            Some(old) => Tensor::cat(vec![old, qkv.k], 2),
            None => qkv.k,
        };
        let values = match cache.values.take() {
            Some(old) => Tensor::cat(vec![old, qkv.v], 2),
            None => qkv.v,
        };
        cache.positions.extend(self.start..self.start + rows);
        let held = keys.dims()[2];
        self.held = held;
        let context = grouped_attention(
            qkv.q.clone(),
            keys.clone(),
            values.clone(),
            &AttentionMask::Causal {
                offset: held - rows,
            },
        );
        match self.keep {
            Some(0) => cache.positions.clear(),
            Some(keep) if keep < held => {
                let (k, v) = evict(
                    cache,
                    self.baseline,
                    keep,
                    self.protected,
                    qkv.q,
                    keys,
                    values,
                );
                cache.keys = Some(k);
                cache.values = Some(v);
            }
            _ => {
                if self.baseline == Baseline::H2o && self.keep.is_some() {
                    // Accumulate even when nothing leaves yet.
                    let weights = chunk_attention(qkv.q, keys.clone(), rows);
                    cache.accumulate(weights);
                }
                cache.keys = Some(keys);
                cache.values = Some(values);
            }
        }
        context
    }
}

impl<B: AttentionBackend> LayerCache<B> {
    /// Adds this chunk's attention weights (`[batch, kv_heads, held]`) to the running totals,
    /// extending them with zeros for the chunk's new entries.
    fn accumulate(&mut self, weights: Tensor<B, 3>) {
        let [batch, heads, held] = weights.dims();
        self.accumulated = Some(match self.accumulated.take() {
            Some(old) => {
                let before = old.dims()[2];
                let fresh = Tensor::<B, 3>::zeros([batch, heads, held - before], &weights.device())
                    .cast(FloatDType::F32);
                Tensor::cat(vec![old, fresh], 2) + weights
            }
            None => weights,
        });
    }
}

/// Shrinks one layer's cache (keys/values `[batch, kv_heads, held, dim]`) to `keep` entries per
/// head, in position order.
fn evict<B: AttentionBackend>(
    cache: &mut LayerCache<B>,
    baseline: Baseline,
    keep: usize,
    protected: usize,
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, kv_heads, held, dim] = keys.dims();
    let rows = q.dims()[2];
    match baseline {
        Baseline::StreamingLlm { .. } | Baseline::Recent => {
            let sinks = match baseline {
                Baseline::StreamingLlm { sinks } => sinks,
                _ => 0,
            };
            // The per-token rule drops the oldest non-sink first, then the oldest sink.
            let present = cache.positions.iter().filter(|&&p| p < sinks).count();
            let kept: Vec<usize> = if keep >= present {
                (0..present).chain(held - (keep - present)..held).collect()
            } else {
                (present - keep..present).collect()
            };
            cache.positions = kept.iter().map(|&i| cache.positions[i]).collect();
            let pick = |t: Tensor<B, 4>| {
                let parts: Vec<Tensor<B, 4>> = ranges(&kept)
                    .into_iter()
                    .map(|(s, e)| t.clone().narrow(2, s, e - s))
                    .collect();
                Tensor::cat(parts, 2)
            };
            (pick(keys), pick(values))
        }
        Baseline::Tova | Baseline::H2o | Baseline::SnapKv => {
            let scores = match baseline {
                Baseline::Tova => {
                    let last = q.narrow(2, rows - 1, 1);
                    chunk_attention(last, keys.clone(), 1)
                }
                Baseline::H2o => {
                    cache.accumulate(chunk_attention(q, keys.clone(), rows));
                    cache.accumulated.clone().expect("accumulated")
                }
                _ => {
                    let summed = chunk_attention(q, keys.clone(), rows);
                    // Max-pool over 7 neighbouring keys, as SnapKV clusters its selection.
                    let pooled = burn::tensor::module::max_pool1d(
                        summed.reshape([batch * kv_heads, 1, held]),
                        7,
                        1,
                        3,
                        1,
                        false,
                    );
                    pooled.reshape([batch, kv_heads, held])
                }
            };
            let values_host = scores
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32");
            let mut index = Vec::with_capacity(batch * kv_heads * keep);
            for head in values_host.chunks(held) {
                index.extend(select(head, keep, protected).into_iter().map(|i| i as i64));
            }
            let device = keys.device();
            let index = Tensor::<B, 3, Int>::from_data(
                TensorData::new(index, [batch, kv_heads, keep]),
                &device,
            );
            if baseline == Baseline::H2o {
                let acc = cache.accumulated.take().expect("accumulated");
                cache.accumulated = Some(acc.gather(2, index.clone()));
            }
            let rows_index = index.unsqueeze_dim::<4>(3).repeat_dim(3, dim);
            (
                keys.gather(2, rows_index.clone()),
                values.gather(2, rows_index),
            )
        }
    }
}

/// The `keep` entries one head keeps, ascending, from its scores over the `held` entries (oldest
/// first): the newest `protected`, then the highest scores among the rest.
fn select(scores: &[f32], keep: usize, protected: usize) -> Vec<usize> {
    let held = scores.len();
    let protected = protected.min(keep);
    let candidates = held - protected;
    let mut order: Vec<usize> = (0..candidates).collect();
    // Highest score first; on equal scores the newer entry stays (the per-token rules evict the
    // first minimum in position order).
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    let mut kept: Vec<usize> = order
        .into_iter()
        .take(keep - protected)
        .chain(candidates..held)
        .collect();
    kept.sort_unstable();
    kept
}

/// Contiguous runs of ascending indices, as half-open ranges.
fn ranges(indices: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some((_, end)) if *end == i => *end += 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// Attention weights of the chunk's last `rows` queries (`q`: `[batch, heads, rows, dim]`) over
/// `keys` (`[batch, kv_heads, held, dim]`, the chunk's own keys last, causal), averaged over each
/// group's query heads and summed over the queries: f32 `[batch, kv_heads, held]`.
fn chunk_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    rows: usize,
) -> Tensor<B, 3> {
    let [batch, heads, q_rows, dim] = q.dims();
    let [_, kv_heads, held, _] = keys.dims();
    debug_assert_eq!(q_rows, rows);
    let group = heads / kv_heads;
    let q = q
        .cast(FloatDType::F32)
        .reshape([batch, kv_heads, group * rows, dim]);
    let scores = B::score_matmul(q, keys.cast(FloatDType::F32).swap_dims(2, 3))
        * (1.0 / (dim as f64).sqrt());
    let scores = scores.reshape([batch, kv_heads, group, rows, held]);
    // Query r (the chunk's r-th) sees keys up to held - rows + r.
    let causal: Vec<f32> = (0..rows)
        .flat_map(|r| {
            (0..held).map(move |k| {
                if k <= held - rows + r {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let causal = Tensor::<B, 2>::from_data(TensorData::new(causal, [rows, held]), &scores.device())
        .cast(FloatDType::F32)
        .reshape([1, 1, 1, rows, held]);
    let probs = activation::softmax(scores + causal, 4);
    probs
        .mean_dim(2)
        .sum_dim(3)
        .reshape([batch, kv_heads, held])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keeps_the_budget_in_position_order() {
        let scores = [0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7];
        assert_eq!(select(&scores, 3, 0), vec![0, 2, 6]);
        // Protecting the newest 2 leaves room for the best of the rest.
        assert_eq!(select(&scores, 3, 2), vec![2, 5, 6]);
        // Protection never exceeds the budget.
        assert_eq!(select(&scores, 2, 5), vec![5, 6]);
        assert_eq!(ranges(&[0, 1, 2, 5, 6, 9]), vec![(0, 3), (5, 7), (9, 10)]);
    }
}
