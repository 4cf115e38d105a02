//! Incremental decoding with a [`KvCache`]: an exact sparse prefill for DMS models, then one token
//! at a time. Logits equal the teacher-forced forward under the inference mask (tested).

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::cache::{KvCache, Policy};
use super::slot_cache::SlotCache;
use crate::dms::decision::apply_granularity;
use crate::dms::mask::inference_key_decisions;
use crate::dms::{DmsConfig, DmsModel, Mode};
use crate::model::decoder::{Attention, AttentionHook, AttentionMask, Qkv, grouped_attention};
use crate::model::rope::inverse_frequencies;
use crate::model::{ModelConfig, RopeTables};
use crate::ops::attention::AttentionBackend;

/// A model ready to decode: DMS eviction (the model's own settings) when `dms` is set, else the
/// original model.
pub struct Decoding<'a, B: Backend> {
    pub model: &'a DmsModel<B>,
    pub cfg: &'a ModelConfig,
    pub dms: Option<&'a DmsConfig>,
    inv_freq: Vec<f64>,
}

/// One layer of a prompt's prefill.
struct PrefillLayer<B: Backend> {
    /// `[kv_heads, seq, head_dim]`, after RoPE.
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
    /// `[kv_heads][seq]`: DMS evicts the key (already shifted); all false without DMS.
    evicted: Vec<Vec<bool>>,
}

fn to_bools<B: Backend>(t: Tensor<B, 3>) -> Vec<Vec<bool>> {
    let [_, heads, seq] = t.dims();
    let values = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32");
    (0..heads)
        .map(|j| (0..seq).map(|i| values[j * seq + i] > 0.5).collect())
        .collect()
}

impl<'a, B: AttentionBackend> Decoding<'a, B> {
    /// `evict`: decode with DMS eviction; otherwise as the original model (dense cache).
    pub fn new(model: &'a DmsModel<B>, evict: bool) -> Self {
        let cfg = &model.base.config;
        Self {
            model,
            cfg,
            dms: evict.then_some(&model.dms),
            inv_freq: inverse_frequencies(&cfg.rope, cfg.head_dim),
        }
    }

    /// A fresh batched cache for `batch` sequences: DMS eviction when the model has DMS.
    pub fn slot_cache(&self, batch: usize) -> SlotCache<B> {
        SlotCache::new(
            self.cfg.num_layers,
            batch,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.dms.map(|dms| dms.window),
            &self.model.base.embed_tokens.val().device(),
        )
    }

    /// A fresh cache whose policy matches this model (DMS window or dense), or a baseline.
    pub fn cache(
        &self,
        policy: Option<Policy>,
        budget: Option<super::cache::Budget>,
    ) -> KvCache<B> {
        let policy = policy.unwrap_or(match self.dms {
            Some(dms) => Policy::Dms { window: dms.window },
            None => Policy::Dense,
        });
        KvCache::new(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            policy,
            budget,
            &self.model.base.embed_tokens.val().device(),
        )
    }

    /// Runs a prompt into an empty cache and returns the logits of its last token, `[vocab]`.
    /// DMS models prefill in one pass with the exact inference mask, then keep only what the next
    /// query may still see; other policies step token by token.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache<B>) -> Tensor<B, 1> {
        assert!(!ids.is_empty(), "prefill needs at least one token");
        match (self.dms, cache.policy) {
            (Some(_), Policy::Dms { .. }) | (_, Policy::Dense) => {}
            // Budgeted baselines decide step by step from attention scores.
            _ => {
                let mut last = None;
                for &id in ids {
                    last = Some(self.step(id, cache));
                }
                return last.expect("non-empty");
            }
        }
        let (logits, layers) = self.prefill_layers(ids, matches!(cache.policy, Policy::Dms { .. }));
        for (index, layer) in layers.into_iter().enumerate() {
            cache.prefill_layer(index, layer.keys, layer.values, &layer.evicted);
        }
        cache.set_seen(ids.len());
        logits
    }

    /// Runs a prompt into `sequence`'s empty rows of a batched cache and returns the logits of
    /// its last token, `[vocab]`.
    pub fn prefill_slots(
        &self,
        ids: &[u32],
        sequence: usize,
        cache: &mut SlotCache<B>,
    ) -> Tensor<B, 1> {
        assert!(!ids.is_empty(), "prefill needs at least one token");
        let (logits, layers) = self.prefill_layers(ids, cache.window().is_some());
        for (index, layer) in layers.into_iter().enumerate() {
            cache.prefill(sequence, index, layer.keys, layer.values, &layer.evicted);
        }
        logits
    }

    /// One causal pass over a prompt: the last token's logits `[vocab]` and every layer's keys,
    /// values and (with `dms`, under the exact inference mask) eviction decisions.
    fn prefill_layers(&self, ids: &[u32], dms: bool) -> (Tensor<B, 1>, Vec<PrefillLayer<B>>) {
        let device = self.model.base.embed_tokens.val().device();
        let seq = ids.len();
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, seq]),
            &device,
        );
        let vocab = self.cfg.vocab_size;
        if let (true, Some(_)) = (dms, self.dms) {
            let out = self.model.forward(input, &Mode::Inference);
            let layers = out
                .layers
                .into_iter()
                .map(|layer| {
                    let [_, heads, _, dim] = layer.keys.dims();
                    PrefillLayer {
                        evicted: to_bools(inference_key_decisions(layer.logits)),
                        keys: layer.keys.reshape([heads, seq, dim]),
                        values: layer.values.reshape([heads, seq, dim]),
                    }
                })
                .collect();
            let logits = self.model.logits(out.hidden.narrow(1, seq - 1, 1));
            return (logits.reshape([vocab]), layers);
        }
        let rope = RopeTables::new(&self.inv_freq, 0, seq, &device);
        let mut hook = RecordingPrefill {
            rope: &rope,
            layers: Vec::with_capacity(self.cfg.num_layers),
        };
        let x = self
            .model
            .base
            .layers_with(self.model.base.embed(input), &mut hook);
        let logits = self.model.logits(x.narrow(1, seq - 1, 1)).reshape([vocab]);
        (logits, hook.layers)
    }

    /// Appends one token to every sequence of a batched cache (`ids[sequence]`, each at its own
    /// position) and returns their logits, `[batch, vocab]`.
    ///
    /// The batch rides in the sequence dimension of a single row (`[1, batch, hidden]`), so the
    /// projections see one matrix and RoPE takes one position per sequence.
    pub fn step_slots(&self, ids: &[u32], cache: &mut SlotCache<B>) -> Tensor<B, 2> {
        let batch = ids.len();
        assert_eq!(batch, cache.batch(), "one token per sequence of the cache");
        let device = self.model.base.embed_tokens.val().device();
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [1, batch],
            ),
            &device,
        );
        let rope = RopeTables::for_positions(&self.inv_freq, cache.seen(), &device);
        let mut hook = SlotStep {
            decoding: self,
            rope: &rope,
            cache,
            batch,
            pending: Vec::new(),
        };
        let x = self
            .model
            .base
            .layers_with(self.model.base.embed(input), &mut hook);
        let pending = hook.pending;
        cache.finish_step((!pending.is_empty()).then(|| Tensor::cat(pending, 0)));
        self.model.logits(x).reshape([batch, self.cfg.vocab_size])
    }

    /// One layer's projections of `x` (`[batch, seq, hidden]`, before the layer's norm) and, for
    /// a DMS model, the hard eviction decisions (0/1, `[batch, kv_heads, seq]`) each token makes
    /// about its predecessor.
    fn project(
        &self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
        rope: &RopeTables<B>,
    ) -> (Qkv<B>, Option<Tensor<B, 3>>) {
        match self.dms {
            Some(dms) => {
                let (qkv, logits) = self
                    .model
                    .project_with_decisions(index, attn, residual, normed, rope);
                let hard = apply_granularity(logits, dms.granularity)
                    .greater_elem(0.0)
                    .float();
                (qkv, Some(hard))
            }
            None => (attn.project(normed, rope, None, &mut |_| {}), None),
        }
    }

    /// Appends one token and returns its logits, `[vocab]`.
    pub fn step(&self, id: u32, cache: &mut KvCache<B>) -> Tensor<B, 1> {
        let device = self.model.base.embed_tokens.val().device();
        let position = cache.seen();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![id as i64], [1, 1]), &device);
        let rope = RopeTables::new(&self.inv_freq, position, 1, &device);
        let mut hook = CacheStep {
            decoding: self,
            rope: &rope,
            cache,
            position,
        };
        let x = self
            .model
            .base
            .layers_with(self.model.base.embed(input), &mut hook);
        cache.advance();
        self.model.logits(x).reshape([self.cfg.vocab_size])
    }
}

/// A dense prompt's pass: plain causal attention, each layer's keys and values recorded.
struct RecordingPrefill<'a, B: Backend> {
    rope: &'a RopeTables<B>,
    layers: Vec<PrefillLayer<B>>,
}

impl<B: AttentionBackend> AttentionHook<B> for RecordingPrefill<'_, B> {
    fn attend(
        &mut self,
        _index: usize,
        attn: &Attention<B>,
        _residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let qkv = attn.project(normed, self.rope, None, &mut |_| {});
        let [_, heads, seq, dim] = qkv.k.dims();
        self.layers.push(PrefillLayer {
            keys: qkv.k.clone().reshape([heads, seq, dim]),
            values: qkv.v.clone().reshape([heads, seq, dim]),
            evicted: vec![vec![false; seq]; heads],
        });
        grouped_attention(qkv.q, qkv.k, qkv.v, &AttentionMask::Causal { offset: 0 })
    }
}

/// One token per sequence through the batched slot cache: each layer stores its keys and values
/// (and DMS decisions) and attends over what the cache holds.
struct SlotStep<'a, 'c, B: AttentionBackend> {
    decoding: &'a Decoding<'a, B>,
    rope: &'a RopeTables<B>,
    cache: &'c mut SlotCache<B>,
    batch: usize,
    /// Decisions the cache applies after the step (read back once, not per layer).
    pending: Vec<Tensor<B, 1>>,
}

impl<B: AttentionBackend> AttentionHook<B> for SlotStep<'_, '_, B> {
    fn attend(
        &mut self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let (heads, kv_heads, dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let (group, rows) = (heads / kv_heads, self.batch * kv_heads);
        let (qkv, hard) = self
            .decoding
            .project(index, attn, residual, normed, self.rope);
        // [1, kv_heads, batch] -> one flag per row (sequence-major).
        let decisions = hard.map(|h| h.swap_dims(1, 2).reshape([rows]));
        // [1, heads, batch, dim] -> [batch * kv_heads, group, dim] (query heads of a KV head are
        // adjacent).
        let q = qkv.q.swap_dims(1, 2).reshape([rows, group, dim]);
        let k = qkv.k.swap_dims(1, 2).reshape([rows, dim]);
        let v = qkv.v.swap_dims(1, 2).reshape([rows, dim]);
        let (context, later) = self.cache.step_layer(index, q, k, v, decisions);
        self.pending.extend(later);
        context.reshape([1, self.batch, heads, dim]).swap_dims(1, 2)
    }
}

/// One token through the per-token reference cache.
struct CacheStep<'a, 'c, B: AttentionBackend> {
    decoding: &'a Decoding<'a, B>,
    rope: &'a RopeTables<B>,
    cache: &'c mut KvCache<B>,
    position: usize,
}

impl<B: AttentionBackend> AttentionHook<B> for CacheStep<'_, '_, B> {
    fn attend(
        &mut self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let (heads, kv_heads, dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let group = heads / kv_heads;
        let (qkv, hard) = self
            .decoding
            .project(index, attn, residual, normed, self.rope);
        let flags = hard
            .filter(|_| self.position > 0)
            .map(|h| to_bools(h).into_iter().map(|h| h[0]).collect::<Vec<bool>>());
        let context = self.cache.step_layer(
            index,
            qkv.q.reshape([kv_heads, group, dim]),
            qkv.k.reshape([kv_heads, 1, dim]),
            qkv.v.reshape([kv_heads, 1, dim]),
            flags.as_deref(),
        );
        context.reshape([1, heads, 1, dim])
    }
}
