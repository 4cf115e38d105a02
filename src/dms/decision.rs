//! Per-token, per-KV-head eviction logits (spec §1.2) and their relaxation (spec §1.3).

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};

use super::{DmsConfig, Granularity};
use crate::model::decoder::{Linear, RmsNorm, in_dtype, keyed_param};
use crate::model::{AdapterTensor, ModelConfig, ParamSlot, WeightKey, WeightSource};

/// Whether the adapter's projection has a bias: the official adapter is
/// `nn.Linear(hidden, kv_heads, bias=config.attention_bias)`, the flag that gives `o_proj` its bias.
pub fn adapter_has_bias(cfg: &ModelConfig) -> bool {
    cfg.o_bias
}

/// The shape of one adapter tensor in the Hugging Face `[out, in]` layout.
pub fn adapter_shape(cfg: &ModelConfig, tensor: AdapterTensor) -> Vec<usize> {
    match tensor {
        AdapterTensor::Norm => vec![cfg.hidden_size],
        AdapterTensor::Weight => vec![cfg.num_kv_heads, cfg.hidden_size],
        AdapterTensor::Bias => vec![cfg.num_kv_heads],
    }
}

/// The shape of any tensor of a DMS model: the base model's, or the adapter's.
pub fn tensor_shape(cfg: &ModelConfig, key: WeightKey) -> Vec<usize> {
    match key {
        WeightKey::Adapter { tensor, .. } => adapter_shape(cfg, tensor),
        key => cfg
            .weight_shape(key)
            .expect("every key other than an adapter's is a base-model tensor"),
    }
}

/// The tensors the adapter variant adds to every layer, in a stable order.
pub fn adapter_keys(cfg: &ModelConfig) -> Vec<WeightKey> {
    let mut keys = Vec::new();
    for layer in 0..cfg.num_layers {
        let mut tensors = vec![AdapterTensor::Weight];
        if adapter_has_bias(cfg) {
            tensors.push(AdapterTensor::Bias);
        }
        tensors.push(AdapterTensor::Norm);
        keys.extend(
            tensors
                .into_iter()
                .map(|tensor| WeightKey::Adapter { layer, tensor }),
        );
    }
    keys
}

/// The adapter variant's parameters for one layer: its own RMSNorm over the residual stream and a
/// Linear(hidden -> kv_heads).
#[derive(Module, Debug)]
pub struct DmsAdapter<B: Backend> {
    pub norm: RmsNorm<B>,
    pub proj: Linear<B>,
}

impl<B: Backend> DmsAdapter<B> {
    /// Zero projection (every logit starts at exactly `-offset`), unit norm weight.
    pub fn zeros(cfg: &ModelConfig, layer: usize, device: &B::Device) -> Self {
        let (out, inp) = (cfg.num_kv_heads, cfg.hidden_size);
        let (norm_key, weight_key, bias_key) = Self::keys(layer);
        Self {
            norm: RmsNorm {
                weight: keyed_param(norm_key, Tensor::ones([inp], device)),
                eps: cfg.rms_norm_eps,
            },
            proj: Linear {
                weight: keyed_param(weight_key, Tensor::zeros([out, inp], device)),
                bias: adapter_has_bias(cfg)
                    .then(|| keyed_param(bias_key, Tensor::zeros([out], device))),
            },
        }
    }

    /// (norm weight, projection weight, projection bias) keys of `layer`.
    fn keys(layer: usize) -> (WeightKey, WeightKey, WeightKey) {
        let key = |tensor| WeightKey::Adapter { layer, tensor };
        (
            key(AdapterTensor::Norm),
            key(AdapterTensor::Weight),
            key(AdapterTensor::Bias),
        )
    }

    /// Slots of this adapter's parameters.
    pub fn params_mut(&mut self, layer: usize) -> Vec<(WeightKey, ParamSlot<'_, B>)> {
        let (norm_key, weight_key, bias_key) = Self::keys(layer);
        let mut out = vec![(norm_key, ParamSlot::Vector(&mut self.norm.weight))];
        self.proj.slots_keyed(weight_key, bias_key, &mut out);
        out
    }

    /// Loads a trained adapter (an export or a training snapshot).
    pub fn load(
        cfg: &ModelConfig,
        source: &mut dyn WeightSource,
        layer: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let (norm_key, weight_key, bias_key) = Self::keys(layer);
        let mut tensor =
            |key: WeightKey| -> Result<TensorData> { source.load(key, &tensor_shape(cfg, key)) };
        let norm = tensor(norm_key)?;
        let weight = tensor(weight_key)?;
        let bias = if adapter_has_bias(cfg) {
            Some(tensor(bias_key)?)
        } else {
            None
        };
        Ok(Self {
            norm: RmsNorm {
                weight: keyed_param(norm_key, Tensor::from_data(norm, device)),
                eps: cfg.rms_norm_eps,
            },
            proj: Linear {
                weight: keyed_param(weight_key, Tensor::from_data(weight, device)),
                bias: bias.map(|b| keyed_param(bias_key, Tensor::from_data(b, device))),
            },
        })
    }
}

impl<B: crate::ops::recompute::RecomputeBackend> DmsAdapter<B> {
    /// Raw (unscaled) decision values from the layer's input residual, before `input_layernorm`.
    /// Norm and projection are one operation: training keeps the residual (which the block
    /// keeps anyway), not also the adapter's normalised copy of it.
    ///
    /// # Shapes
    /// - `residual`: `[batch, seq, hidden]` → `[batch, kv_heads, seq]`
    pub fn raw(&self, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = residual.dtype();
        crate::ops::recompute::linear_after_norm(
            residual,
            self.norm.first(dtype),
            in_dtype(self.proj.weight.val(), dtype),
            self.proj.bias.as_ref().map(|b| in_dtype(b.val(), dtype)),
        )
        .swap_dims(1, 2)
    }
}

/// The q-neuron variant's raw decision values: the last channel of query head `j * group`.
///
/// # Shapes
/// - `q`: `[batch, heads, seq, head_dim]` (after q-norm, before RoPE) → `[batch, kv_heads, seq]`
pub fn q_neuron_raw<B: Backend>(q: &Tensor<B, 4>, kv_heads: usize) -> Tensor<B, 3> {
    let [batch, heads, seq, dim] = q.dims();
    let group = heads / kv_heads;
    q.clone()
        .reshape([batch, kv_heads, group, seq, dim])
        .narrow(2, 0, 1)
        .narrow(4, dim - 1, 1)
        .reshape([batch, kv_heads, seq])
}

/// A `[1, heads, 1, head_dim]` multiplier that zeroes the decision channel of each group's first
/// query head and keeps everything else (applied before and after RoPE, spec §1.2a).
pub fn q_neuron_keep_mask<B: Backend>(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let group = heads / kv_heads;
    let mut keep = vec![1f32; heads * head_dim];
    for j in 0..kv_heads {
        keep[(j * group) * head_dim + head_dim - 1] = 0.0;
    }
    Tensor::from_data(TensorData::new(keep, [1, heads, 1, head_dim]), device)
}

/// `alpha_scale * raw - offset`.
pub fn scale_logits<B: Backend>(raw: Tensor<B, 3>, cfg: &DmsConfig) -> Tensor<B, 3> {
    raw * cfg.alpha_scale - cfg.offset
}

/// With per-layer granularity every KV head takes head 0's value.
///
/// # Shapes
/// - `x`: `[batch, kv_heads, seq]` → same
pub fn apply_granularity<B: Backend>(x: Tensor<B, 3>, granularity: Granularity) -> Tensor<B, 3> {
    match granularity {
        Granularity::Head => x,
        Granularity::Layer => {
            let [batch, heads, seq] = x.dims();
            x.narrow(1, 0, 1).expand([batch, heads, seq])
        }
    }
}

/// The Gumbel-sigmoid relaxation of one layer's decisions.
pub struct Relaxed<B: Backend> {
    /// `(logit + noise) / tau`: drives the attention mask (soft, no straight-through).
    pub z: Tensor<B, 3>,
    /// `sigmoid(z)`, the soft eviction probability.
    pub probs: Tensor<B, 3>,
    /// `hard - stopgrad(p) + p`: value 0/1, gradient of `p`; drives the compression loss.
    pub decisions: Tensor<B, 3>,
}

/// Relaxes noise-free logits with logistic `noise` (same shape) at temperature `tau`. Per-layer
/// granularity broadcasts head 0 after the noise is added, as the official code does.
///
/// # Shapes
/// - `logits`, `noise`: `[batch, kv_heads, seq]`
pub fn relax<B: Backend>(logits: Tensor<B, 3>, noise: Tensor<B, 3>, cfg: &DmsConfig) -> Relaxed<B> {
    let noise = in_dtype(noise, logits.dtype());
    let z = apply_granularity((logits + noise) / cfg.tau, cfg.granularity);
    let probs = activation::sigmoid(z.clone());
    let hard = z.clone().greater_elem(0.0).float().cast(z.dtype());
    let decisions = hard - probs.clone().detach() + probs.clone();
    Relaxed {
        z,
        probs,
        decisions,
    }
}
