//! Causal grouped-query attention with an optional DMS delayed-eviction key bias, computed in
//! query chunks so that no `[batch, heads, seq, seq]` tensor lives longer than one chunk.
//!
//! - The forward keeps only the output and each query row's log-sum-exp; the backward recomputes a
//!   chunk's probabilities from them (FlashAttention's recomputation, at tensor-op granularity).
//!   Under autodiff the whole attention is one graph node, so the per-layer memory kept for the
//!   backward is q, k, v, the output and the log-sum-exp instead of several `T x T` tensors.
//! - A chunk of queries ending at position `e` only reads keys `0 ..= e` (causal block skipping):
//!   about half the score FLOPs of evaluating every block.
//! - The query heads of a GQA group are folded into one matmul against their shared KV head.
//!
//! The key bias is DMS's `log(1 - p_k)` (spec §2): added to the score of key `k` for queries more
//! than `window` positions after it, never inside the window. At inference it is `-inf` for evicted
//! keys, which the mask-based formulation handles without `0 * inf` NaNs.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, FloatDType, Int, Tensor, backend::Backend};

use super::elementwise::{ElementwiseBackend, rms_norm, rope};
use super::linear::float;
use super::recompute::NormFirst;

/// Largest score chunk (`batch * heads * chunk_queries * keys` elements) the chunked attention
/// materialises at once; about 4 f32 tensors of this size are alive at the peak of a backward chunk.
pub const DEFAULT_SCORE_BUDGET: usize = 1 << 27;

/// The geometry of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Absolute position of the first query; keys start at position 0.
    pub offset: usize,
    /// DMS delay: the key bias applies to key `k` for queries at positions `> k + window`.
    pub window: usize,
    /// Element budget for one chunk of scores (see [`DEFAULT_SCORE_BUDGET`]).
    pub score_budget: usize,
}

impl AttentionOptions {
    pub fn causal(offset: usize) -> Self {
        Self {
            offset,
            window: 0,
            score_budget: DEFAULT_SCORE_BUDGET,
        }
    }
}

/// How the attention's queries were made from a tensor that training keeps anyway (the q-norm's
/// input): `keep ⊙ rope(keep ⊙ rms_norm(pre_norm))`, heads moved before positions. Given to the
/// attention under autodiff, the attention keeps this instead of the queries (as large as
/// `pre_norm`) and rebuilds them in its backward: one norm and one RoPE pass instead of a second
/// copy of the queries between the forward and the backward.
#[derive(Clone, Debug)]
pub struct Rebuild<B: Backend> {
    /// `[batch, seq, heads, head_dim]`
    pub pre_norm: Tensor<B, 4>,
    /// The norm's weight in `pre_norm`'s dtype.
    pub norm: NormFirst<B>,
    /// `[1, heads, 1, head_dim]`, applied before and after RoPE (the DMS q-neuron variant).
    pub keep: Option<Tensor<B, 4>>,
    /// RoPE tables `[seq, head_dim]`.
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl<B: ElementwiseBackend> Rebuild<B> {
    /// The queries `[batch, heads, seq, head_dim]`, and `observe` sees them after the norm,
    /// before `keep` and RoPE.
    pub fn apply(&self, observe: &mut dyn FnMut(&Tensor<B, 4>)) -> Tensor<B, 4> {
        let normed = rms_norm(
            self.pre_norm.clone(),
            self.norm.weight.clone(),
            self.norm.eps,
        )
        .swap_dims(1, 2);
        observe(&normed);
        rotate_kept(
            normed,
            self.keep.as_ref(),
            self.cos.clone(),
            self.sin.clone(),
        )
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> Rebuild<B> {
    fn inner(self) -> Rebuild<B::InnerBackend> {
        Rebuild {
            pre_norm: self.pre_norm.inner(),
            norm: NormFirst {
                weight: self.norm.weight.inner(),
                eps: self.norm.eps,
            },
            keep: self.keep.map(|k| k.inner()),
            cos: self.cos.inner(),
            sin: self.sin.inner(),
        }
    }
}

/// `keep ⊙ rope(keep ⊙ x)` (`rope(x)` without `keep`): `x` `[batch, heads, seq, head_dim]`.
/// RoPE's rotate_half mixes channel `d-1` with `d/2-1`, so a channel zeroed only before it would
/// leak back.
pub fn rotate_kept<B: ElementwiseBackend>(
    x: Tensor<B, 4>,
    keep: Option<&Tensor<B, 4>>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    match keep {
        Some(keep) => rope(x * keep.clone(), cos, sin) * keep.clone(),
        None => rope(x, cos, sin),
    }
}

/// Backends that run [`delayed_attention`]. The default method is the chunked tensor-op version;
/// the autodiff backend overrides it with a single graph node whose backward recomputes chunks.
/// It is the decoder's backend: every op the decoder runs, and the weight upload, come with it.
pub trait AttentionBackend:
    super::recompute::RecomputeBackend + super::upload::UploadBackend
{
    /// `rebuild`, where given, describes how `q` was made (see [`Rebuild`]); only the autodiff
    /// backend uses it.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, q_len, head_dim]`; `k`, `v`: `[batch, kv_heads, k_len, head_dim]`
    /// - `key_bias`: `[batch, kv_heads, k_len]`
    /// - output: `[batch, heads, q_len, head_dim]`
    fn delayed_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: Option<FloatTensor<Self>>,
        options: AttentionOptions,
        rebuild: Option<Rebuild<Self>>,
    ) -> FloatTensor<Self> {
        let _ = rebuild;
        let out = Self::attention_forward_with_lse(
            float(q),
            float(k),
            float(v),
            key_bias.map(float),
            options,
        );
        out.output.into_primitive().tensor()
    }

    /// The forward with each query row's log-sum-exp (what the backward recomputes from). The
    /// default is the chunked tensor-op [`attention_forward`].
    fn attention_forward_with_lse(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        key_bias: Option<Tensor<Self, 3>>,
        options: AttentionOptions,
    ) -> AttentionForward<Self> {
        attention_forward(q, k, v, key_bias, options)
    }

    /// The gradients of [`Self::attention_forward_with_lse`]. The default is the chunked
    /// tensor-op [`attention_backward`].
    fn attention_backward_with_lse(
        inputs: AttentionInputs<Self>,
        forward: &AttentionForward<Self>,
        grad_output: Tensor<Self, 4>,
        want_bias_grad: bool,
        options: AttentionOptions,
    ) -> AttentionGrads<Self> {
        attention_backward(inputs, forward, grad_output, want_bias_grad, options)
    }

    /// `a · b` for small f32 score products outside the attention kernels (the eval baselines'
    /// eviction scores, `[batch, kv_heads, rows, dim] x [batch, kv_heads, dim, held]`). The default
    /// is burn's matmul.
    fn score_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        a.matmul(b)
    }
}

/// Backends that train: the autodiff backend and the backend its frozen teacher runs on.
pub trait TrainBackend:
    burn::tensor::backend::AutodiffBackend<InnerBackend: AttentionBackend> + AttentionBackend
{
}

impl<T> TrainBackend for T where
    T: burn::tensor::backend::AutodiffBackend<InnerBackend: AttentionBackend> + AttentionBackend
{
}

impl AttentionBackend for crate::backend::Cpu {}

/// CUDA runs the forward and backward as cuBLASLt GEMMs around fused kernels (`super::cuda`), and
/// the chunked tensor-op version where that path declines.
#[cfg(feature = "cuda")]
impl AttentionBackend for crate::backend::Cuda {
    fn attention_forward_with_lse(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        key_bias: Option<Tensor<Self, 3>>,
        options: AttentionOptions,
    ) -> AttentionForward<Self> {
        match super::cuda::attention::attention_forward(
            q.clone(),
            k.clone(),
            v.clone(),
            key_bias.clone(),
            &options,
        ) {
            Some((output, lse)) => AttentionForward { output, lse },
            None => attention_forward(q, k, v, key_bias, options),
        }
    }

    fn attention_backward_with_lse(
        inputs: AttentionInputs<Self>,
        forward: &AttentionForward<Self>,
        grad_output: Tensor<Self, 4>,
        want_bias_grad: bool,
        options: AttentionOptions,
    ) -> AttentionGrads<Self> {
        match super::cuda::attention::attention_backward(
            inputs.clone(),
            forward,
            grad_output.clone(),
            want_bias_grad,
            &options,
        ) {
            Some(grads) => grads,
            None => attention_backward(inputs, forward, grad_output, want_bias_grad, options),
        }
    }

    /// burn's matmul kernel chosen by its heuristic, not autotuned: the baselines' score shapes
    /// change with every chunk (the retained count grows), and autotune benchmarks ~20 candidates
    /// for each new shape class, about a minute of a first `eval` for products that take
    /// microseconds. Falls back to the autotuned matmul if the heuristic's kernel cannot launch.
    fn score_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
        let dtype = a.dtype();
        let (lhs, rhs) = (
            a.clone().into_primitive().tensor(),
            b.clone().into_primitive().tensor(),
        );
        match matmul(lhs, rhs, None, MatmulStrategy::Cube, dtype) {
            Ok(out) => float(out),
            Err(_) => a.matmul(b),
        }
    }
}

/// Grouped-query attention, causal, with the DMS key bias when given.
pub fn delayed_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Option<Tensor<B, 3>>,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    delayed_attention_rebuilding(q, k, v, key_bias, options, None)
}

/// [`delayed_attention`] where `q` was made as `rebuild` says: under autodiff the attention
/// keeps `rebuild` (whose tensors training keeps anyway) instead of `q`.
pub fn delayed_attention_rebuilding<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Option<Tensor<B, 3>>,
    options: AttentionOptions,
    rebuild: Option<Rebuild<B>>,
) -> Tensor<B, 4> {
    float(B::delayed_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        key_bias.map(|b| b.into_primitive().tensor()),
        options,
        rebuild,
    ))
}

/// Output of the chunked forward.
pub struct AttentionForward<B: Backend> {
    /// `[batch, heads, q_len, head_dim]`, in q's dtype.
    pub output: Tensor<B, 4>,
    /// Log-sum-exp of each query row's scores, f32: `[batch, kv_heads, group, q_len]`.
    pub lse: Tensor<B, 4>,
}

/// The operands of an attention call, what its backward differentiates with respect to.
#[derive(Clone, Debug)]
pub struct AttentionInputs<B: Backend> {
    /// `[batch, heads, q_len, head_dim]`
    pub q: Tensor<B, 4>,
    /// `[batch, kv_heads, k_len, head_dim]`
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    /// `[batch, kv_heads, k_len]`
    pub key_bias: Option<Tensor<B, 3>>,
}

/// Gradients of [`attention_backward`].
pub struct AttentionGrads<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub key_bias: Option<Tensor<B, 3>>,
}

/// Sizes shared by the forward and backward.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    k_len: usize,
    dim: usize,
    chunk: usize,
}

impl Geometry {
    fn new<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, options: &AttentionOptions) -> Self {
        let [batch, heads, q_len, dim] = q.dims();
        let [_, kv_heads, k_len, _] = k.dims();
        assert!(
            options.offset + q_len <= k_len,
            "attention: queries at {}..{} need at least that many keys, got {k_len}",
            options.offset,
            options.offset + q_len
        );
        let per_query = batch * heads * k_len.max(1);
        let chunk = (options.score_budget / per_query).clamp(1, q_len.max(1));
        Self {
            batch,
            kv_heads,
            group: heads / kv_heads,
            q_len,
            k_len,
            dim,
            chunk,
        }
    }

    /// Query chunks `[start, end)` and the number of keys each reads.
    fn chunks(&self, offset: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.q_len).step_by(self.chunk).map(move |start| {
            let end = (start + self.chunk).min(self.q_len);
            (start, end, (offset + end).min(self.k_len))
        })
    }

    /// `[batch, heads, q_len, dim]` → `[batch, kv_heads, group, q_len, dim]`.
    fn split_heads<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 5> {
        x.reshape([self.batch, self.kv_heads, self.group, self.q_len, self.dim])
    }

    fn merge_heads<B: Backend>(&self, x: Tensor<B, 5>) -> Tensor<B, 4> {
        x.reshape([self.batch, self.kv_heads * self.group, self.q_len, self.dim])
    }
}

/// A chunk's `[rows, keys]` masks: `future` where the key lies after the query, `outside` where
/// the query is more than `window` positions after the key (the bias applies).
fn chunk_masks<B: Backend>(
    start: usize,
    end: usize,
    keys: usize,
    options: &AttentionOptions,
    device: &B::Device,
) -> (Tensor<B, 5, Bool>, Tensor<B, 5, Bool>) {
    let rows = end - start;
    let first = (options.offset + start) as i64;
    let queries = Tensor::<B, 1, Int>::arange(first..first + rows as i64, device)
        .reshape([rows, 1])
        .expand([rows, keys]);
    let keys_pos = Tensor::<B, 1, Int>::arange(0..keys as i64, device)
        .reshape([1, keys])
        .expand([rows, keys]);
    let distance = queries - keys_pos;
    let future = distance
        .clone()
        .lower_elem(0)
        .reshape([1, 1, 1, rows, keys]);
    let outside = distance
        .greater_elem(options.window as i64)
        .reshape([1, 1, 1, rows, keys]);
    (future, outside)
}

/// One chunk's scores in f32, `[batch, kv_heads, group, rows, keys]`, bias and causality applied.
fn chunk_scores<B: Backend>(
    q_chunk: Tensor<B, 5>,
    k: &Tensor<B, 4>,
    key_bias: Option<&Tensor<B, 3>>,
    keys: usize,
    future: Tensor<B, 5, Bool>,
    outside: &Tensor<B, 5, Bool>,
) -> Tensor<B, 5> {
    let [batch, kv_heads, group, rows, dim] = q_chunk.dims();
    let k = k.clone().narrow(2, 0, keys);
    let scores = q_chunk
        .reshape([batch, kv_heads, group * rows, dim])
        .matmul(k.swap_dims(2, 3))
        * (1.0 / (dim as f64).sqrt());
    let scores = scores
        .reshape([batch, kv_heads, group, rows, keys])
        .cast(FloatDType::F32);
    let scores = match key_bias {
        Some(bias) => {
            let inside = outside
                .clone()
                .bool_not()
                .expand([batch, kv_heads, 1, rows, keys]);
            let bias = bias
                .clone()
                .narrow(2, 0, keys)
                .cast(FloatDType::F32)
                .reshape([batch, kv_heads, 1, 1, keys])
                .expand([batch, kv_heads, 1, rows, keys])
                .mask_fill(inside, 0.0);
            scores + bias
        }
        None => scores,
    };
    scores.mask_fill(future, f32::NEG_INFINITY)
}

/// The chunked forward (no graph of its own; see [`AttentionBackend`]).
pub fn attention_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Option<Tensor<B, 3>>,
    options: AttentionOptions,
) -> AttentionForward<B> {
    let geo = Geometry::new(&q, &k, &options);
    let dtype = q.dtype();
    let device = q.device();
    let q5 = geo.split_heads(q);
    let mut outputs = Vec::new();
    let mut lses = Vec::new();
    for (start, end, keys) in geo.chunks(options.offset) {
        let rows = end - start;
        let (future, outside) = chunk_masks::<B>(start, end, keys, &options, &device);
        let q_chunk = q5.clone().narrow(3, start, rows);
        let scores = chunk_scores(q_chunk, &k, key_bias.as_ref(), keys, future, &outside);
        let max = scores.clone().max_dim(4);
        let weights = (scores - max.clone()).exp();
        let total = weights.clone().sum_dim(4);
        lses.push((total.clone().log() + max).squeeze_dim::<4>(4));
        let probs = (weights / total).cast(dtype).reshape([
            geo.batch,
            geo.kv_heads,
            geo.group * rows,
            keys,
        ]);
        let out = probs.matmul(v.clone().narrow(2, 0, keys));
        outputs.push(out.reshape([geo.batch, geo.kv_heads, geo.group, rows, geo.dim]));
    }
    AttentionForward {
        output: geo.merge_heads(Tensor::cat(outputs, 3)),
        lse: Tensor::cat(lses, 3),
    }
}

/// The chunked backward: recomputes each chunk's probabilities from the saved log-sum-exp.
pub fn attention_backward<B: Backend>(
    inputs: AttentionInputs<B>,
    forward: &AttentionForward<B>,
    grad_output: Tensor<B, 4>,
    want_bias_grad: bool,
    options: AttentionOptions,
) -> AttentionGrads<B> {
    let AttentionInputs { q, k, v, key_bias } = inputs;
    let geo = Geometry::new(&q, &k, &options);
    let dtype = q.dtype();
    let device = q.device();
    let scale = 1.0 / (geo.dim as f64).sqrt();
    let q5 = geo.split_heads(q);
    let out5 = geo.split_heads(forward.output.clone());
    let grad5 = geo.split_heads(grad_output);
    let kv_shape = [geo.batch, geo.kv_heads, geo.k_len, geo.dim];
    let mut grad_k = Tensor::<B, 4>::zeros(kv_shape, &device).cast(FloatDType::F32);
    let mut grad_v = grad_k.clone();
    let mut grad_bias =
        Tensor::<B, 3>::zeros([geo.batch, geo.kv_heads, geo.k_len], &device).cast(FloatDType::F32);
    let mut grad_q = Vec::new();
    for (start, end, keys) in geo.chunks(options.offset) {
        let rows = end - start;
        let folded = [geo.batch, geo.kv_heads, geo.group * rows, geo.dim];
        let (future, outside) = chunk_masks::<B>(start, end, keys, &options, &device);
        let q_chunk = q5.clone().narrow(3, start, rows);
        let scores = chunk_scores(
            q_chunk.clone(),
            &k,
            key_bias.as_ref(),
            keys,
            future,
            &outside,
        );
        let lse = forward
            .lse
            .clone()
            .narrow(3, start, rows)
            .unsqueeze_dim::<5>(4);
        let probs = (scores - lse).exp();
        let grad_out = grad5.clone().narrow(3, start, rows);
        // D_i = sum_d dO_id O_id = sum_k P_ik dP_ik: the softmax backward's row term.
        let row_term = (grad_out.clone().cast(FloatDType::F32)
            * out5.clone().narrow(3, start, rows).cast(FloatDType::F32))
        .sum_dim(4);
        let grad_out = grad_out.reshape(folded);
        let probs_low =
            probs
                .clone()
                .cast(dtype)
                .reshape([geo.batch, geo.kv_heads, geo.group * rows, keys]);
        let v_keys = v.clone().narrow(2, 0, keys);
        let k_keys = k.clone().narrow(2, 0, keys);
        let grad_v_part = probs_low.swap_dims(2, 3).matmul(grad_out.clone());
        let grad_probs = grad_out
            .matmul(v_keys.swap_dims(2, 3))
            .reshape([geo.batch, geo.kv_heads, geo.group, rows, keys])
            .cast(FloatDType::F32);
        let grad_scores = probs * (grad_probs - row_term);
        if want_bias_grad {
            let inside =
                outside
                    .bool_not()
                    .expand([geo.batch, geo.kv_heads, geo.group, rows, keys]);
            let part = grad_scores
                .clone()
                .mask_fill(inside, 0.0)
                .sum_dim(3)
                .sum_dim(2)
                .reshape([geo.batch, geo.kv_heads, keys]);
            grad_bias = accumulate(grad_bias, part);
        }
        let grad_scores =
            grad_scores
                .cast(dtype)
                .reshape([geo.batch, geo.kv_heads, geo.group * rows, keys]);
        let grad_k_part = grad_scores
            .clone()
            .swap_dims(2, 3)
            .matmul(q_chunk.reshape(folded))
            * scale;
        grad_q.push((grad_scores.matmul(k_keys) * scale).reshape([
            geo.batch,
            geo.kv_heads,
            geo.group,
            rows,
            geo.dim,
        ]));
        grad_k = accumulate(grad_k, grad_k_part.cast(FloatDType::F32));
        grad_v = accumulate(grad_v, grad_v_part.cast(FloatDType::F32));
    }
    let bias_dtype = key_bias.as_ref().map(|b| b.dtype());
    AttentionGrads {
        q: geo.merge_heads(Tensor::cat(grad_q, 3)),
        k: grad_k.cast(dtype),
        v: grad_v.cast(dtype),
        key_bias: match (want_bias_grad, bias_dtype) {
            (true, Some(bias_dtype)) => Some(grad_bias.cast(bias_dtype)),
            _ => None,
        },
    }
}

/// Adds `part` (covering the first keys) into `total` along dim 2.
fn accumulate<B: Backend, const D: usize>(total: Tensor<B, D>, part: Tensor<B, D>) -> Tensor<B, D> {
    let dims = part.dims();
    if dims[2] == total.dims()[2] {
        return total + part;
    }
    let ranges = dims.map(|n| 0..n);
    let sum = total.clone().slice(ranges.clone()) + part;
    total.slice_assign(ranges, sum)
}

/// Under autodiff the attention is one node: the forward runs on the inner backend (no graph for
/// the chunks), and the backward recomputes from q, k, v, the output and the log-sum-exp.
impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn delayed_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: Option<FloatTensor<Self>>,
        options: AttentionOptions,
        rebuild: Option<Rebuild<Self>>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DelayedAttentionBackward;

        /// The queries, or how to rebuild them.
        #[derive(Debug, Clone)]
        enum Queries<B: Backend> {
            Kept(FloatTensor<B>),
            Rebuilt(Rebuild<B>),
        }

        #[derive(Debug, Clone)]
        struct Saved<B: Backend> {
            q: Queries<B>,
            k: FloatTensor<B>,
            v: FloatTensor<B>,
            key_bias: Option<FloatTensor<B>>,
            output: FloatTensor<B>,
            lse: FloatTensor<B>,
            options: AttentionOptions,
        }

        impl<B: AttentionBackend> Backward<B, 4> for DelayedAttentionBackward {
            type State = Saved<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 4>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_q, node_k, node_v, node_bias] = ops.parents;
                let grad_output = grads.consume::<B>(&ops.node);
                let saved = ops.state;
                let forward = AttentionForward::<B> {
                    output: float(saved.output),
                    lse: float(saved.lse),
                };
                let q = match saved.q {
                    Queries::Kept(q) => float(q),
                    Queries::Rebuilt(rebuild) => rebuild.apply(&mut |_| {}),
                };
                let inputs = AttentionInputs {
                    q,
                    k: float(saved.k),
                    v: float(saved.v),
                    key_bias: saved.key_bias.map(float),
                };
                let grads_in = B::attention_backward_with_lse(
                    inputs,
                    &forward,
                    float(grad_output),
                    node_bias.is_some(),
                    saved.options,
                );
                let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
                if let Some(node) = node_q {
                    grads.register::<B>(node.id, prim(grads_in.q));
                }
                if let Some(node) = node_k {
                    grads.register::<B>(node.id, prim(grads_in.k));
                }
                if let Some(node) = node_v {
                    grads.register::<B>(node.id, prim(grads_in.v));
                }
                if let (Some(node), Some(grad)) = (node_bias, grads_in.key_bias) {
                    grads.register::<B>(node.id, grad.into_primitive().tensor());
                }
            }
        }

        // Without a bias the fourth parent is an untracked stand-in (never read, never differentiated).
        let has_bias = key_bias.is_some();
        let key_bias = key_bias.unwrap_or_else(|| {
            <Self as burn::tensor::backend::AutodiffBackend>::from_inner(
                Tensor::<B, 1>::zeros([1], &B::float_device(&k.primitive))
                    .into_primitive()
                    .tensor(),
            )
        });
        let inner_bias = has_bias.then(|| key_bias.primitive.clone());
        let forward = B::attention_forward_with_lse(
            float(q.primitive.clone()),
            float(k.primitive.clone()),
            float(v.primitive.clone()),
            inner_bias.clone().map(float),
            options,
        );
        let output = forward.output.into_primitive().tensor();
        match DelayedAttentionBackward
            .prepare::<C>([
                q.node.clone(),
                k.node.clone(),
                v.node.clone(),
                key_bias.node.clone(),
            ])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = Saved {
                    q: match rebuild {
                        Some(rebuild) => Queries::Rebuilt(rebuild.inner()),
                        None => Queries::Kept(q.primitive),
                    },
                    k: k.primitive,
                    v: v.primitive,
                    key_bias: inner_bias,
                    output: output.clone(),
                    lse: forward.lse.into_primitive().tensor(),
                    options,
                };
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};
    use burn::tensor::{Distribution, TensorData};

    /// Dense attention written as loops from the definition (the spec's mask rules).
    fn naive(
        (q, k, v): (&[f32], &[f32], &[f32]),
        bias: Option<&[f32]>,
        (heads, kv_heads, q_len, k_len, dim): (usize, usize, usize, usize, usize),
        (offset, window): (usize, usize),
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0f32; heads * q_len * dim];
        for h in 0..heads {
            let j = h / group;
            for r in 0..q_len {
                let pos = offset + r;
                let mut scores = vec![f32::NEG_INFINITY; k_len];
                for (key, score) in scores.iter_mut().enumerate().take(pos + 1) {
                    let mut s = 0f32;
                    for d in 0..dim {
                        s += q[(h * q_len + r) * dim + d] * k[(j * k_len + key) * dim + d];
                    }
                    s /= (dim as f32).sqrt();
                    if let Some(b) = bias
                        && pos > key + window
                    {
                        s += b[j * k_len + key];
                    }
                    *score = s;
                }
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = weights.iter().sum();
                for d in 0..dim {
                    out[(h * q_len + r) * dim + d] = (0..k_len)
                        .map(|key| weights[key] / total * v[(j * k_len + key) * dim + d])
                        .sum();
                }
            }
        }
        out
    }

    fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    fn values<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
        t.clone().into_data().convert::<f32>().into_vec().unwrap()
    }

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Every chunking (one row at a time up to one chunk) matches the loops: GQA groups of 1-3,
    /// queries offset into a longer key sequence, W = 0, 2 and beyond the sequence, a bias with
    /// `-inf` entries (inference eviction).
    #[test]
    fn chunked_forward_matches_the_definition() {
        let device = Default::default();
        for (heads, kv_heads, q_len, k_len, offset, window) in [
            (2, 2, 7, 7, 0, 2),
            (6, 2, 5, 9, 4, 0),
            (3, 1, 8, 8, 0, 20),
            (4, 2, 1, 6, 5, 1),
        ] {
            let dim = 4;
            let q = random::<Cpu, 4>([1, heads, q_len, dim], &device);
            let k = random::<Cpu, 4>([1, kv_heads, k_len, dim], &device);
            let v = random::<Cpu, 4>([1, kv_heads, k_len, dim], &device);
            let mut bias = values(&random::<Cpu, 3>([1, kv_heads, k_len], &device));
            bias[1] = f32::NEG_INFINITY;
            let bias_t = Tensor::<Cpu, 3>::from_data(
                TensorData::new(bias.clone(), [1, kv_heads, k_len]),
                &device,
            );
            let want = naive(
                (&values(&q), &values(&k), &values(&v)),
                Some(&bias),
                (heads, kv_heads, q_len, k_len, dim),
                (offset, window),
            );
            for rows in 1..=q_len {
                let options = AttentionOptions {
                    offset,
                    window,
                    score_budget: rows * heads * k_len,
                };
                let got = attention_forward(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(bias_t.clone()),
                    options,
                );
                close(&values(&got.output), &want, 1e-5, "output");
                assert!(values(&got.lse).iter().all(|x| x.is_finite()));
            }
        }
    }

    /// The autodiff node's gradients (q, k, v and the key bias) do not depend on the chunking, and
    /// equal those of the plain tensor-op graph (burn's own autodiff of dense attention).
    #[test]
    fn chunked_backward_matches_dense_autodiff() {
        let device = Default::default();
        let (heads, kv_heads, len, dim, window) = (4, 2, 9, 4, 2);
        let leaf = |shape: [usize; 4]| random::<CpuAutodiff, 4>(shape, &device).require_grad();
        let q = leaf([1, heads, len, dim]);
        let k = leaf([1, kv_heads, len, dim]);
        let v = leaf([1, kv_heads, len, dim]);
        let bias = (random::<CpuAutodiff, 3>([1, kv_heads, len], &device) - 1.0)
            .detach()
            .require_grad();
        let upstream = random::<CpuAutodiff, 4>([1, heads, len, dim], &device).detach();
        let grads_of = |out: Tensor<CpuAutodiff, 4>| {
            let grads = (out * upstream.clone()).sum().backward();
            [
                values(&q.grad(&grads).unwrap()),
                values(&k.grad(&grads).unwrap()),
                values(&v.grad(&grads).unwrap()),
                values(&bias.grad(&grads).unwrap()),
            ]
        };

        // Reference: the dense bias matrix and softmax as ordinary autodiff ops.
        let dense = {
            let group = heads / kv_heads;
            let pos = |n| Tensor::<CpuAutodiff, 1, Int>::arange(0..n as i64, &device);
            let distance = pos(len).reshape([len, 1]).expand([len, len])
                - pos(len).reshape([1, len]).expand([len, len]);
            let outside = distance.clone().greater_elem(window as i64).float();
            let future = distance.lower_elem(0);
            let bias_matrix = bias.clone().reshape([1, kv_heads, 1, 1, len])
                * outside.reshape([1, 1, 1, len, len]);
            let scores = q
                .clone()
                .reshape([1, kv_heads, group * len, dim])
                .matmul(k.clone().swap_dims(2, 3))
                .reshape([1, kv_heads, group, len, len])
                / (dim as f64).sqrt()
                + bias_matrix;
            let scores = scores.mask_fill(future.reshape([1, 1, 1, len, len]), f32::NEG_INFINITY);
            burn::tensor::activation::softmax(scores, 4)
                .reshape([1, kv_heads, group * len, len])
                .matmul(v.clone())
                .reshape([1, heads, len, dim])
        };
        let want = grads_of(dense);
        for rows in [1, 2, 4, len] {
            let options = AttentionOptions {
                offset: 0,
                window,
                score_budget: rows * heads * len,
            };
            let out =
                delayed_attention(q.clone(), k.clone(), v.clone(), Some(bias.clone()), options);
            let got = grads_of(out);
            for (name, (g, w)) in ["q", "k", "v", "bias"].iter().zip(got.iter().zip(&want)) {
                close(g, w, 1e-5, &format!("d{name}, {rows}-row chunks"));
            }
        }
    }

    /// Without a bias the node still differentiates q, k and v (the stand-in bias is untracked).
    #[test]
    fn causal_node_without_bias_has_q_k_v_gradients() {
        let device = Default::default();
        let q = random::<CpuAutodiff, 4>([1, 2, 5, 4], &device).require_grad();
        let k = random::<CpuAutodiff, 4>([1, 1, 5, 4], &device).require_grad();
        let v = random::<CpuAutodiff, 4>([1, 1, 5, 4], &device).require_grad();
        let out = delayed_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            None,
            AttentionOptions {
                score_budget: 2 * 5,
                ..AttentionOptions::causal(0)
            },
        );
        let grads = out.sum().backward();
        for g in [q.grad(&grads), k.grad(&grads), v.grad(&grads)] {
            let g = values(&g.expect("gradient"));
            assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0));
        }
    }
}
