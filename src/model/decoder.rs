//! One decoder for every supported architecture (Llama 2/3/3.x, Qwen2, Qwen3).
//!
//! Read top to bottom: `Linear` → `RmsNorm` → `Mlp` → `Attention` → `DecoderLayer` → `Decoder`.
//! Architecture differences are `ModelConfig` fields (biases, q/k norm, head_dim, tied head,
//! RoPE scaling), never branches on the architecture's name.

use anyhow::{Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, backend::Backend};

use super::config::ModelConfig;
use super::rope::RopeTables;
use super::weights::{LayerNorm, ParamSlot, Projection, WeightKey, WeightSource};
use crate::ops::attention::{
    AttentionBackend, AttentionOptions, Rebuild, delayed_attention_rebuilding, rotate_kept,
};
use crate::ops::elementwise::{ElementwiseBackend, rms_norm, swiglu};
use crate::ops::linear::{LinearBackend, linear};
use crate::ops::recompute::{NormFirst, RecomputeBackend, swiglu_mlp};
use crate::ops::upload::{FillError, UploadBackend};

/// Builds a parameter from a [`WeightSource`], checking its shape against the config.
///
/// The upload is a persistent allocation: on cubecl backends each weight gets a buffer of its exact
/// size instead of a slice of a shared page. The pages are sized for transient tensors (the one
/// for 0.55-4.4 GB allocations is 8.8 GB on a 141 GB card), so an embedding or LM head alone
/// reserved most of such a page for the whole run. Side effect: cubecl then serves every later
/// tensor of a weight's exact byte size (at 4K tokens, e.g. a `[4096, 4096]` bf16 activation and
/// Qwen3-8B's q projection) from exact-size buffers too, kept for reuse at that size's peak count
/// for the rest of the run; measured, the peak still fell (docs/performance.md, Memory). Other
/// backends ignore the mode.
fn load_param<B: UploadBackend, const D: usize>(
    cfg: &ModelConfig,
    source: &mut dyn WeightSource,
    key: WeightKey,
    device: &B::Device,
) -> Result<Param<Tensor<B, D>>> {
    let shape = cfg
        .weight_shape(key)
        .with_context(|| format!("{key:?} is not a base-model tensor"))?;
    let direct = B::uploads_direct(device).then(|| source.direct(key, &shape));
    if let Some(weight) = direct.flatten() {
        let uploaded = B::memory_persistent_allocations(device, &weight, |weight| {
            B::upload_direct(weight, device)
        });
        match uploaded {
            Some(Ok(tensor)) => return Ok(keyed_param(key, tensor)),
            // Read again below, where a bad value gets its error naming the tensor and file.
            Some(Err(FillError::Invalid)) | None => {}
            Some(Err(FillError::Read(e))) => {
                tracing::warn!("reading {key:?} from its file failed ({e}); reading it again")
            }
        }
    }
    let data = source.load(key, &shape)?;
    let tensor = B::memory_persistent_allocations(device, data, |data| B::upload(data, device));
    Ok(keyed_param(key, tensor))
}

/// `weight` in the activations' dtype. Trained DMS parameters are f32 master weights beside bf16
/// activations on the GPU (autocast semantics): the forward computes in bf16 and the gradient flows
/// back through the cast in f32, so small AdamW updates are not rounded away.
pub fn in_dtype<B: Backend, const D: usize>(
    weight: Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> Tensor<B, D> {
    if weight.dtype() == dtype {
        weight
    } else {
        weight.cast(dtype)
    }
}

/// A trainable parameter whose id is derived from its key (see [`WeightKey::param_id`]).
pub fn keyed_param<B: Backend, const D: usize>(
    key: WeightKey,
    value: Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    Param::initialized(key.param_id(), value.require_grad())
}

/// `y = x Wᵀ + b` with `W` kept in the Hugging Face `[out, in]` layout, so export writes it back
/// unchanged.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_output, d_input]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: UploadBackend> Linear<B> {
    fn load(
        cfg: &ModelConfig,
        source: &mut dyn WeightSource,
        layer: usize,
        projection: Projection,
        device: &B::Device,
    ) -> Result<Self> {
        let key = |bias| WeightKey::Linear {
            layer,
            projection,
            bias,
        };
        let weight = load_param(cfg, source, key(false), device)?;
        let bias = if cfg.has_bias(projection) {
            Some(load_param(cfg, source, key(true), device)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl<B: Backend> Linear<B> {
    /// Slots for the weight and (if any) bias of `projection` in `layer`.
    pub fn slots<'a>(
        &'a mut self,
        layer: usize,
        projection: Projection,
        out: &mut Vec<(WeightKey, ParamSlot<'a, B>)>,
    ) {
        let key = |bias| WeightKey::Linear {
            layer,
            projection,
            bias,
        };
        self.slots_keyed(key(false), key(true), out);
    }

    /// Slots of the weight and (when present) the bias under the given keys.
    pub fn slots_keyed<'a>(
        &'a mut self,
        weight_key: WeightKey,
        bias_key: WeightKey,
        out: &mut Vec<(WeightKey, ParamSlot<'a, B>)>,
    ) {
        out.push((weight_key, ParamSlot::Matrix(&mut self.weight)));
        if let Some(bias) = &mut self.bias {
            out.push((bias_key, ParamSlot::Vector(bias)));
        }
    }
}

impl<B: LinearBackend> Linear<B> {
    /// # Shapes
    /// - `x`: `[..., d_input]` → `[..., d_output]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        linear(
            x,
            in_dtype(self.weight.val(), dtype),
            self.bias.as_ref().map(|b| in_dtype(b.val(), dtype)),
        )
    }
}

/// Root-mean-square norm, computed in f32 whatever the activation dtype (as transformers does).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: UploadBackend> RmsNorm<B> {
    pub fn load(
        cfg: &ModelConfig,
        source: &mut dyn WeightSource,
        key: WeightKey,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: load_param(cfg, source, key, device)?,
            eps: cfg.rms_norm_eps,
        })
    }
}

impl<B: Backend> RmsNorm<B> {
    /// This norm as the first step of a recomputing operation, its weight in `dtype` (the
    /// activations').
    pub fn first(&self, dtype: burn::tensor::DType) -> NormFirst<B> {
        NormFirst {
            weight: in_dtype(self.weight.val(), dtype),
            eps: self.eps,
        }
    }
}

impl<B: ElementwiseBackend> RmsNorm<B> {
    /// # Shapes
    /// - `x`: `[..., dim]` → same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        rms_norm(x, self.weight.val(), self.eps)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// Under autodiff, keep only the input and recompute the gate and up projections in the
    /// backward ([`crate::ops::recompute`]); set for training by [`Decoder::recompute_mlp`].
    pub recompute: bool,
}

impl<B: RecomputeBackend> Mlp<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_after(None, x)
    }

    /// The MLP of `norm(x)`, where `norm` is given. When recomputing, the norm is part of the
    /// recomputing node: only `x` is kept, not also its normalised copy.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward_after(&self, norm: Option<&RmsNorm<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let projections = [&self.gate_proj, &self.up_proj, &self.down_proj];
        if self.recompute && projections.iter().all(|p| p.bias.is_none()) {
            let dtype = x.dtype();
            let [gate, up, down] = projections.map(|p| in_dtype(p.weight.val(), dtype));
            let norm = norm.map(|norm| norm.first(dtype));
            return swiglu_mlp(x, norm, gate, up, down);
        }
        let x = match norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(swiglu(gate, self.up_proj.forward(x)))
    }
}

/// What a query may see, beyond the projections themselves.
pub enum AttentionMask<B: Backend> {
    /// Plain causal attention; the queries sit at absolute positions `offset ..`, the keys at `0 ..`.
    Causal { offset: usize },
    /// Causal attention plus DMS's delayed per-key bias, shared by the query heads of a GQA group:
    /// `key_bias[b, kv_head, k]` is added to the scores of key `k` for queries more than `window`
    /// positions after it (`[batch, kv_heads, k_len]`; `-inf` evicts).
    Delayed {
        offset: usize,
        key_bias: Tensor<B, 3>,
        window: usize,
    },
}

/// Multi-head attention with grouped KV heads, optional q/k RMSNorm and RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Queries, keys and values of one layer after projection, norm and RoPE.
pub struct Qkv<B: Backend> {
    /// `[batch, heads, seq, head_dim]`
    pub q: Tensor<B, 4>,
    /// `[batch, kv_heads, seq, head_dim]`
    pub k: Tensor<B, 4>,
    /// `[batch, kv_heads, seq, head_dim]`
    pub v: Tensor<B, 4>,
    /// How `q` was made from the q-norm's input (models with a q-norm), for the attention to
    /// keep instead of `q` under autodiff.
    pub q_rebuild: Option<Rebuild<B>>,
}

impl<B: AttentionBackend> Qkv<B> {
    /// Grouped attention of these queries, keys and values under `mask` (see
    /// [`grouped_attention`]), rebuilding the queries in the backward where it can.
    pub fn attend(self, mask: &AttentionMask<B>) -> Tensor<B, 4> {
        grouped_attention_rebuilding(self.q, self.k, self.v, mask, self.q_rebuild)
    }
}

impl<B: AttentionBackend> Attention<B> {
    /// Projects `x` and applies q/k norm and RoPE.
    ///
    /// `keep` (`[1, heads, 1, head_dim]`, the DMS q-neuron variant's channel mask) multiplies
    /// the queries before and after RoPE; `observe` sees them after q-norm, before both (where
    /// that variant reads its decision channel).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    pub fn project(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        keep: Option<&Tensor<B, 4>>,
        observe: &mut dyn FnMut(&Tensor<B, 4>),
    ) -> Qkv<B> {
        let [batch, seq, _] = x.dims();
        // 1. Project: [B, T, hidden] -> [B, T, heads, head_dim]
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([batch, seq, self.num_heads, self.head_dim]);
        let k =
            self.k_proj
                .forward(x.clone())
                .reshape([batch, seq, self.num_kv_heads, self.head_dim]);
        let v = self
            .v_proj
            .forward(x)
            .reshape([batch, seq, self.num_kv_heads, self.head_dim]);
        // 2. Per-head norm (Qwen3), over head_dim, before RoPE; [B, T, H, D] -> [B, H, T, D],
        //    then rotate. With a q-norm, the attention can rebuild the queries from its input.
        let (q, q_rebuild) = match &self.q_norm {
            Some(norm) => {
                let rebuild = Rebuild {
                    norm: norm.first(q.dtype()),
                    pre_norm: q,
                    keep: keep.cloned(),
                    cos: rope.cos.clone(),
                    sin: rope.sin.clone(),
                };
                (rebuild.apply(observe), Some(rebuild))
            }
            None => {
                let q = q.swap_dims(1, 2);
                observe(&q);
                let q = rotate_kept(q, keep, rope.cos.clone(), rope.sin.clone());
                (q, None)
            }
        };
        let k = match &self.k_norm {
            Some(norm) => norm.forward(k),
            None => k,
        };
        let k = rope.apply(k.swap_dims(1, 2));
        Qkv {
            q,
            k,
            v: v.swap_dims(1, 2),
            q_rebuild,
        }
    }

    /// Merges heads and applies the output projection.
    ///
    /// # Shapes
    /// - `context`: `[batch, heads, seq, head_dim]` → `[batch, seq, hidden]`
    pub fn output(&self, context: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, dim] = context.dims();
        self.o_proj
            .forward(context.swap_dims(1, 2).reshape([batch, seq, heads * dim]))
    }
}

/// Scaled dot-product attention where the `heads / kv_heads` query heads of a group share one KV
/// head, computed in query chunks (see [`crate::ops::attention`]).
///
/// # Shapes
/// - `q`: `[batch, heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, k_len, head_dim]`
/// - output: `[batch, heads, q_len, head_dim]`
pub fn grouped_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    grouped_attention_rebuilding(q, k, v, mask, None)
}

fn grouped_attention_rebuilding<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    q_rebuild: Option<Rebuild<B>>,
) -> Tensor<B, 4> {
    let (bias, options) = match mask {
        AttentionMask::Causal { offset } => (None, AttentionOptions::causal(*offset)),
        AttentionMask::Delayed {
            offset,
            key_bias,
            window,
        } => (
            Some(key_bias.clone()),
            AttentionOptions {
                window: *window,
                ..AttentionOptions::causal(*offset)
            },
        ),
    };
    delayed_attention_rebuilding(q, k, v, bias, options, q_rebuild)
}

/// The part of a decoder block that differs between its callers: how one layer's attention turns
/// its input into a context. The plain causal pass ([`Masked`]), the DMS student and the exact
/// inference mask (`dms`), a cache's prefill and decode step and the evicting baselines (`eval`)
/// each implement it; the block around it (norms, residuals, MLP) is written once, in
/// [`DecoderLayer::forward_with`].
pub trait AttentionHook<B: AttentionBackend> {
    /// Layer `index`'s attention context `[batch, heads, seq, head_dim]` (before the output
    /// projection), from its input before the norm (`residual`, which DMS adapters read) and
    /// after it (`normed`, which the projections read).
    fn attend(
        &mut self,
        index: usize,
        attn: &Attention<B>,
        residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4>;
}

/// Attention over the layer's own keys under a mask: the original model.
pub struct Masked<'a, B: Backend> {
    pub rope: &'a RopeTables<B>,
    pub mask: &'a AttentionMask<B>,
}

impl<B: AttentionBackend> AttentionHook<B> for Masked<'_, B> {
    fn attend(
        &mut self,
        _index: usize,
        attn: &Attention<B>,
        _residual: &Tensor<B, 3>,
        normed: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        attn.project(normed, self.rope, None, &mut |_| {})
            .attend(self.mask)
    }
}

/// Pre-norm transformer block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: UploadBackend> DecoderLayer<B> {
    fn load(
        cfg: &ModelConfig,
        source: &mut dyn WeightSource,
        layer: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let norm = |source: &mut dyn WeightSource, norm| {
            RmsNorm::load(cfg, source, WeightKey::Norm { layer, norm }, device)
        };
        let linear = |source: &mut dyn WeightSource, p| Linear::load(cfg, source, layer, p, device);
        Ok(Self {
            input_layernorm: norm(source, LayerNorm::Input)?,
            self_attn: Attention {
                q_proj: linear(source, Projection::Q)?,
                k_proj: linear(source, Projection::K)?,
                v_proj: linear(source, Projection::V)?,
                o_proj: linear(source, Projection::O)?,
                q_norm: cfg
                    .qk_norm
                    .then(|| norm(source, LayerNorm::Q))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| norm(source, LayerNorm::K))
                    .transpose()?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            post_attention_layernorm: norm(source, LayerNorm::PostAttention)?,
            mlp: Mlp {
                gate_proj: linear(source, Projection::Gate)?,
                up_proj: linear(source, Projection::Up)?,
                down_proj: linear(source, Projection::Down)?,
                recompute: false,
            },
        })
    }
}

impl<B: AttentionBackend> DecoderLayer<B> {
    /// The block: `h = x + o_proj(attend(norm(x)))`, then `h + mlp(norm(h))`, with `hook`
    /// attending as layer `index`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward_with(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        hook: &mut dyn AttentionHook<B>,
    ) -> Tensor<B, 3> {
        let normed = self.input_layernorm.forward(x.clone());
        let context = hook.attend(index, &self.self_attn, &x, normed);
        let h = x + self.self_attn.output(context);
        h.clone()
            + self
                .mlp
                .forward_after(Some(&self.post_attention_layernorm), h)
    }

    /// The block with plain attention under `mask`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        self.forward_with(0, x, &mut Masked { rope, mask })
    }
}

/// Embedding, decoder layers, final norm and LM head (tied to the embedding when the config says
/// so).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// The architecture it was built from (RoPE, sizes); captured at load, not passed to calls.
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: UploadBackend> Decoder<B> {
    /// Builds the decoder from a weight source, checking every tensor's shape against `cfg`.
    pub fn load(
        cfg: &ModelConfig,
        source: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        let embed_tokens = load_param(cfg, source, WeightKey::Embedding, device)?;
        let layers = (0..cfg.num_layers)
            .map(|layer| DecoderLayer::load(cfg, source, layer, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(cfg, source, WeightKey::FinalNorm, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear {
                weight: load_param(cfg, source, WeightKey::LmHead, device)?,
                bias: None,
            })
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: cfg.clone(),
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// RoPE tables for positions `start .. start + len` of this model.
    pub fn rope(&self, start: usize, len: usize, device: &B::Device) -> RopeTables<B> {
        RopeTables::for_model(&self.config, start, len, device)
    }

    /// Whether training keeps only each MLP's input and recomputes its gate and up projections
    /// in the backward (see [`crate::ops::recompute`]); off after loading.
    pub fn recompute_mlp(&mut self, on: bool) {
        for layer in &mut self.layers {
            layer.mlp.recompute = on;
        }
    }

    /// Every parameter with its key, in the order of [`ModelConfig::base_weight_keys`] layers.
    pub fn params_mut(&mut self) -> Vec<(WeightKey, ParamSlot<'_, B>)> {
        let mut out = vec![(
            WeightKey::Embedding,
            ParamSlot::Matrix(&mut self.embed_tokens),
        )];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let norm = |norm| WeightKey::Norm { layer: i, norm };
            out.push((
                norm(LayerNorm::Input),
                ParamSlot::Vector(&mut layer.input_layernorm.weight),
            ));
            let attn = &mut layer.self_attn;
            attn.q_proj.slots(i, Projection::Q, &mut out);
            attn.k_proj.slots(i, Projection::K, &mut out);
            attn.v_proj.slots(i, Projection::V, &mut out);
            attn.o_proj.slots(i, Projection::O, &mut out);
            if let Some(q_norm) = &mut attn.q_norm {
                out.push((norm(LayerNorm::Q), ParamSlot::Vector(&mut q_norm.weight)));
            }
            if let Some(k_norm) = &mut attn.k_norm {
                out.push((norm(LayerNorm::K), ParamSlot::Vector(&mut k_norm.weight)));
            }
            out.push((
                norm(LayerNorm::PostAttention),
                ParamSlot::Vector(&mut layer.post_attention_layernorm.weight),
            ));
            layer.mlp.gate_proj.slots(i, Projection::Gate, &mut out);
            layer.mlp.up_proj.slots(i, Projection::Up, &mut out);
            layer.mlp.down_proj.slots(i, Projection::Down, &mut out);
        }
        out.push((
            WeightKey::FinalNorm,
            ParamSlot::Vector(&mut self.norm.weight),
        ));
        if let Some(head) = &mut self.lm_head {
            out.push((WeightKey::LmHead, ParamSlot::Matrix(&mut head.weight)));
        }
        out
    }

    /// # Shapes
    /// - `input_ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.embed_tokens.val(), input_ids)
    }
}

impl<B: AttentionBackend> Decoder<B> {
    /// Final norm and LM head.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = self.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let dtype = hidden.dtype();
                linear(hidden, in_dtype(self.embed_tokens.val(), dtype), None)
            }
        }
    }

    /// Every layer over the embedded input `x`, `hook` attending: the final hidden states before
    /// the final norm.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn layers_with(&self, x: Tensor<B, 3>, hook: &mut dyn AttentionHook<B>) -> Tensor<B, 3> {
        self.layers
            .iter()
            .enumerate()
            .fold(x, |x, (index, layer)| layer.forward_with(index, x, hook))
    }

    /// The original model's final hidden states (before the final norm), causal from position 0.
    pub fn hidden(&self, input_ids: Tensor<B, 2, Int>, rope: &RopeTables<B>) -> Tensor<B, 3> {
        let mask = AttentionMask::Causal { offset: 0 };
        self.layers_with(self.embed(input_ids), &mut Masked { rope, mask: &mask })
    }

    /// Full causal forward from position 0.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]` → logits `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, rope: &RopeTables<B>) -> Tensor<B, 3> {
        self.logits(self.hidden(input_ids, rope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::TensorData;

    /// Attention with K and V repeated per query head, the textbook way.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        h: usize,
        hkv: usize,
        t: usize,
        d: usize,
    ) -> Vec<f32> {
        let group = h / hkv;
        let mut out = vec![0f32; h * t * d];
        for head in 0..h {
            let kv = head / group;
            for i in 0..t {
                let scores: Vec<f32> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[(head * t + i) * d + c] * k[(kv * t + j) * d + c])
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                for c in 0..d {
                    out[(head * t + i) * d + c] = (0..=i)
                        .map(|j| exp[j] / sum * v[(kv * t + j) * d + c])
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn grouped_attention_matches_repeated_kv_for_group_sizes_1_2_4() {
        let device = Default::default();
        let (t, d) = (5, 4);
        let values = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 31 + salt * 17) % 23) as f32 - 11.0) / 7.0)
                .collect()
        };
        for (h, hkv) in [(4, 4), (4, 2), (4, 1)] {
            let (q, k, v) = (
                values(h * t * d, 1),
                values(hkv * t * d, 2),
                values(hkv * t * d, 3),
            );
            let tensor = |x: &Vec<f32>, heads| {
                Tensor::<Cpu, 4>::from_data(TensorData::new(x.clone(), [1, heads, t, d]), &device)
            };
            let got = grouped_attention(
                tensor(&q, h),
                tensor(&k, hkv),
                tensor(&v, hkv),
                &AttentionMask::Causal { offset: 0 },
            )
            .into_data()
            .into_vec::<f32>()
            .unwrap();
            let want = naive_attention(&q, &k, &v, h, hkv, t, d);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "group {}: {g} vs {w}", h / hkv);
            }
        }
    }
}
