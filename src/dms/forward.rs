//! The decoder forward pass with DMS plugged into every attention layer.
//!
//! One set of weights serves three roles: the original model (teacher; eviction off, exactly the
//! base checkpoint), the student in training (Gumbel-sigmoid decisions, soft delayed-eviction
//! mask), and the retrofitted model at inference (hard decisions, exact eviction mask).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Int, Tensor, backend::Backend};

use super::decision::{
    DmsAdapter, apply_granularity, q_neuron_keep_mask, q_neuron_raw, relax, scale_logits,
};
use super::mask::{inference_key_bias, inference_key_decisions, training_key_bias};
use super::{DmsConfig, Variant};
use crate::model::decoder::{Attention, AttentionHook, AttentionMask, Masked, Qkv};
use crate::model::{Decoder, ParamSlot, RopeTables, WeightKey, WeightSource};
use crate::ops::attention::AttentionBackend;

/// What the attention layers do with the eviction decisions.
pub enum Mode<'a, B: Backend> {
    /// Eviction disabled and nothing altered: the original checkpoint (the teacher).
    Original,
    /// Training: logits relaxed with this logistic noise, `[layers, batch, kv_heads, seq]`.
    Train { noise: &'a Tensor<B, 4> },
    /// Inference semantics: hard decisions `logit > 0`, no noise.
    Inference,
}

/// A base decoder plus the DMS decision parameters (none for the q-neuron variant).
#[derive(Module, Debug)]
pub struct DmsModel<B: Backend> {
    pub base: Decoder<B>,
    /// One per layer for the adapter variant, empty for the q-neuron variant.
    pub adapters: Vec<DmsAdapter<B>>,
    /// The method's settings, captured at construction.
    #[module(skip)]
    pub dms: DmsConfig,
}

/// Per-layer decision tensors, each `[batch, kv_heads, seq]`.
pub struct LayerDecisions<B: Backend> {
    /// Noise-free `alpha_scale * raw - offset`, after the granularity broadcast.
    pub logits: Tensor<B, 3>,
    /// Soft eviction probabilities (train mode only).
    pub probs: Option<Tensor<B, 3>>,
    /// Straight-through decisions (train mode) or hard 0/1 decisions (inference), unshifted.
    pub decisions: Tensor<B, 3>,
    /// This layer's keys (after RoPE) and values, `[batch, kv_heads, seq, head_dim]`, for
    /// building an inference cache after a prefill.
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
}

/// Output of a DMS forward pass.
pub struct DmsOutput<B: Backend> {
    /// Final hidden states before the final norm, `[batch, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// One entry per layer; empty in [`Mode::Original`].
    pub layers: Vec<LayerDecisions<B>>,
}

impl<B: Backend> DmsModel<B> {
    /// Wraps a base decoder; adapter weights come from `source` when it has them (a DMS export or
    /// snapshot), otherwise they start at zero (every logit `-offset`).
    pub fn new(
        base: Decoder<B>,
        dms: &DmsConfig,
        source: Option<&mut dyn WeightSource>,
        device: &B::Device,
    ) -> Result<Self> {
        let model = &base.config;
        let adapters = match (dms.variant, source) {
            (Variant::QNeuron, _) => Vec::new(),
            (Variant::Adapter, Some(source)) if source.contains(adapter_probe()) => (0..model
                .num_layers)
                .map(|layer| DmsAdapter::load(model, source, layer, device))
                .collect::<Result<_>>()?,
            (Variant::Adapter, _) => (0..model.num_layers)
                .map(|layer| DmsAdapter::zeros(model, layer, device))
                .collect(),
        };
        if dms.variant == Variant::QNeuron && model.head_dim < 2 {
            bail!("the q-neuron variant needs head_dim >= 2");
        }
        Ok(Self {
            base,
            adapters,
            dms: dms.clone(),
        })
    }

    /// A base checkpoint in the same type, for the paths that serve both: no adapters, and
    /// only [`Mode::Original`] is meaningful.
    pub fn dense(base: Decoder<B>) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            dms: DmsConfig::default(),
        }
    }

    /// Every parameter (base and adapters) with its key.
    pub fn params_mut(&mut self) -> Vec<(WeightKey, ParamSlot<'_, B>)> {
        let mut out = self.base.params_mut();
        for (layer, adapter) in self.adapters.iter_mut().enumerate() {
            out.extend(adapter.params_mut(layer));
        }
        out
    }
}

impl<B: AttentionBackend> DmsModel<B> {
    /// Runs the decoder from position 0 with DMS in the given mode.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, mode: &Mode<B>) -> DmsOutput<B> {
        let [_, seq] = input_ids.dims();
        let rope = self.base.rope(0, seq, &input_ids.device());
        let mut hook = DmsAttention::new(self, &rope, mode);
        let hidden = self.base.layers_with(self.base.embed(input_ids), &mut hook);
        DmsOutput {
            hidden,
            layers: hook.decisions,
        }
    }

    /// Runs decoder layer `index` alone (for per-layer recomputation); `rope` must cover the
    /// sequence from position 0.
    pub fn forward_layer(
        &self,
        index: usize,
        hidden: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mode: &Mode<B>,
    ) -> (Tensor<B, 3>, Option<LayerDecisions<B>>) {
        let mut hook = DmsAttention::new(self, rope, mode);
        let out = self.base.layers[index].forward_with(index, hidden, &mut hook);
        (out, hook.decisions.pop())
    }

    /// Final norm + LM head.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.base.logits(hidden)
    }

    /// Projects one layer's (normed) input and computes its noise-free decision logits
    /// `alpha_scale * raw - offset` (before the granularity broadcast): from the adapter on the
    /// pre-norm residual, or from the borrowed query channel (zeroed before and after RoPE).
    ///
    /// # Shapes
    /// - `residual`, `normed`: `[batch, seq, hidden]` → logits `[batch, kv_heads, seq]`
    pub fn project_with_decisions(
        &self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
        rope: &RopeTables<B>,
    ) -> (Qkv<B>, Tensor<B, 3>) {
        let dms = &self.dms;
        let keep = (dms.variant == Variant::QNeuron).then(|| {
            q_neuron_keep_mask::<B>(
                attn.num_heads,
                attn.num_kv_heads,
                attn.head_dim,
                &residual.device(),
            )
        });
        let (qkv, borrowed) = project_reading_q_neuron(attn, normed, rope, keep.as_ref());
        let raw = match borrowed {
            Some(raw) => raw,
            None => self.adapters[index].raw(residual.clone()),
        };
        (qkv, scale_logits(raw, dms))
    }
}

/// DMS in every attention layer: decisions from the adapter (or the borrowed query channel), the
/// delayed-eviction mask the mode asks for, and the decisions kept for the losses and caches.
struct DmsAttention<'a, B: AttentionBackend> {
    model: &'a DmsModel<B>,
    rope: &'a RopeTables<B>,
    dms: &'a DmsConfig,
    mode: &'a Mode<'a, B>,
    decisions: Vec<LayerDecisions<B>>,
}

impl<'a, B: AttentionBackend> DmsAttention<'a, B> {
    fn new(model: &'a DmsModel<B>, rope: &'a RopeTables<B>, mode: &'a Mode<'a, B>) -> Self {
        Self {
            model,
            rope,
            dms: &model.dms,
            mode,
            decisions: Vec::with_capacity(model.base.config.num_layers),
        }
    }
}

impl<B: AttentionBackend> AttentionHook<B> for DmsAttention<'_, B> {
    fn attend(
        &mut self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let (rope, dms) = (self.rope, self.dms);
        if let Mode::Original = self.mode {
            let mask = AttentionMask::Causal { offset: 0 };
            return Masked { rope, mask: &mask }.attend(index, attn, residual, normed);
        }

        // 1. Projections and noise-free decision logits.
        let (qkv, logits) = self
            .model
            .project_with_decisions(index, attn, residual, normed, rope);

        // 2. Mask from the decisions (one-token shift inside the mask builders).
        let (bias, decisions) = match self.mode {
            Mode::Train { noise } => {
                let [_, batch, heads, seq] = noise.dims();
                let noise = (*noise)
                    .clone()
                    .narrow(0, index, 1)
                    .reshape([batch, heads, seq]);
                let relaxed = relax(logits.clone(), noise, dms);
                let bias = training_key_bias(relaxed.z);
                (
                    bias,
                    LayerDecisions {
                        logits: apply_granularity(logits, dms.granularity),
                        probs: Some(relaxed.probs),
                        decisions: relaxed.decisions,
                        keys: qkv.k.clone(),
                        values: qkv.v.clone(),
                    },
                )
            }
            Mode::Inference => {
                let logits = apply_granularity(logits, dms.granularity);
                let hard = logits
                    .clone()
                    .greater_elem(0.0)
                    .float()
                    .cast(logits.dtype());
                let bias = inference_key_bias(inference_key_decisions(logits.clone()));
                (
                    bias,
                    LayerDecisions {
                        logits,
                        probs: None,
                        decisions: hard,
                        keys: qkv.k.clone(),
                        values: qkv.v.clone(),
                    },
                )
            }
            Mode::Original => unreachable!("handled above"),
        };
        self.decisions.push(decisions);

        // 3. Attention with the per-KV-head bias.
        qkv.attend(&AttentionMask::Delayed {
            offset: 0,
            key_bias: bias,
            window: dms.window,
        })
    }
}

/// Projects q/k/v. With a keep-mask (q-neuron variant) it also returns the borrowed channel,
/// read after q-norm and before RoPE, and zeroes that channel before and after RoPE: RoPE's
/// rotate_half mixes channel `d-1` with `d/2-1`, so zeroing only before would leak it back.
fn project_reading_q_neuron<B: AttentionBackend>(
    attn: &Attention<B>,
    normed: Tensor<B, 3>,
    rope: &RopeTables<B>,
    keep: Option<&Tensor<B, 4>>,
) -> (Qkv<B>, Option<Tensor<B, 3>>) {
    let mut borrowed = None;
    let qkv = attn.project(normed, rope, keep, &mut |q| {
        if keep.is_some() {
            borrowed = Some(q_neuron_raw(q, attn.num_kv_heads));
        }
    });
    (qkv, borrowed)
}

/// A tensor every adapter checkpoint has.
fn adapter_probe() -> crate::model::WeightKey {
    crate::model::WeightKey::Adapter {
        layer: 0,
        tensor: crate::model::AdapterTensor::Norm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::checkpoint::Checkpoint;
    use crate::model::FloatFormat;

    #[test]
    fn q_neuron_channel_is_zero_after_rope_in_the_first_head_of_each_group_only() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen3");
        let ckpt = Checkpoint::open(dir).unwrap();
        let cfg = &ckpt.config;
        let device = Default::default();
        let decoder = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
        let seq = 6;
        let x = Tensor::<Cpu, 3>::random(
            [1, seq, cfg.hidden_size],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let rope = RopeTables::for_model(cfg, 100, seq, &device);
        let keep =
            q_neuron_keep_mask::<Cpu>(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, &device);
        let attn = &decoder.layers[0].self_attn;
        let (qkv, raw) = project_reading_q_neuron(attn, x, &rope, Some(&keep));
        assert_eq!(raw.unwrap().dims(), [1, cfg.num_kv_heads, seq]);
        let d = cfg.head_dim;
        let q = qkv
            .q
            .narrow(3, d - 1, 1)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let group = cfg.group_size();
        for head in 0..cfg.num_heads {
            let channel = &q[head * seq..(head + 1) * seq];
            if head % group == 0 {
                assert!(
                    channel.iter().all(|&v| v == 0.0),
                    "head {head}: {channel:?}"
                );
            } else {
                assert!(
                    channel.iter().any(|&v| v != 0.0),
                    "head {head} must be untouched"
                );
            }
        }
    }
}
