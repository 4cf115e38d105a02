//! The attention forward and backward on CUDA: per KV head and query chunk, batched cuBLASLt GEMMs
//! around fused kernels (`softmax.cu`). Same definition and outputs as
//! `model::attention::attention_forward` / `attention_backward` (the chunked tensor-op version),
//! which `bench attention` compares them against on the GPU.

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::{BLOCK, Cube, DeviceContext, Gemm, KernelArg, Matrix, on_cubecl_stream};
use super::{
    HOPPER_BACKWARD_KV_SHARED, HOPPER_BACKWARD_Q_SHARED, HOPPER_FORWARD_SHARED,
    flash_tile_shared_bytes as tile_shared, flash_wide_shared_bytes as wide_shared,
};
use crate::backend::Cuda;
use crate::ops::attention::{AttentionForward, AttentionGrads, AttentionInputs, AttentionOptions};
use cudarc::driver::CudaFunction;

/// Longest query chunk: shorter chunks skip more of the causal upper triangle, longer ones
/// launch fewer GEMMs.
const MAX_CHUNK_ROWS: usize = 1024;

/// Sizes both directions share.
#[derive(Clone, Copy)]
struct Geometry {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    k_len: usize,
    dim: usize,
    rows_per_chunk: usize,
    dtype: DType,
    /// Bytes per element of `dtype`.
    elem: u64,
}

/// One query chunk of one KV head's query group.
struct Chunk {
    /// `batch * kv_heads + kv_head`.
    head: usize,
    start: usize,
    rows: usize,
    /// Keys the chunk reads: `0 .. offset + start + rows` (causal block skipping).
    keys: usize,
}

impl Geometry {
    /// `None` where this path does not apply: a dtype other than bf16/f32 (for `q` and every
    /// tensor of `others`), or shapes the chunked version would reject.
    fn new(
        q: &Tensor<Cuda, 4>,
        k: &Tensor<Cuda, 4>,
        others: &[DType],
        options: &AttentionOptions,
    ) -> Option<Self> {
        let dtype = q.dtype();
        if !super::kernel_dtype(dtype) || k.dtype() != dtype || others.iter().any(|&d| d != dtype) {
            return None;
        }
        let [batch, heads, q_len, dim] = q.dims();
        let [_, kv_heads, k_len, _] = k.dims();
        if q_len == 0 || kv_heads == 0 || heads % kv_heads != 0 || options.offset + q_len > k_len {
            return None;
        }
        let group = heads / kv_heads;
        Some(Self {
            batch,
            heads,
            kv_heads,
            group,
            q_len,
            k_len,
            dim,
            rows_per_chunk: (options.score_budget / (group * k_len).max(1))
                .clamp(1, MAX_CHUNK_ROWS),
            dtype,
            elem: dtype.size() as u64,
        })
    }

    /// Elements of the largest chunk's scores (the scratch size).
    fn most_scores(&self) -> usize {
        self.group * self.rows_per_chunk.min(self.q_len) * self.k_len
    }

    /// Every KV head's query chunks, heads outermost.
    fn chunks(&self, offset: usize) -> impl Iterator<Item = Chunk> + '_ {
        (0..self.batch * self.kv_heads).flat_map(move |head| {
            (0..self.q_len)
                .step_by(self.rows_per_chunk)
                .map(move |start| {
                    let rows = self.rows_per_chunk.min(self.q_len - start);
                    Chunk {
                        head,
                        start,
                        rows,
                        keys: (offset + start + rows).min(self.k_len),
                    }
                })
        })
    }

    /// Byte offset of the chunk's first row in the group's first query head (`[B, H, T, D]`; the
    /// group's query heads `h * group + g` are consecutive, `q_len * dim` elements apart).
    fn q_rows(&self, c: &Chunk) -> u64 {
        let batch = c.head / self.kv_heads;
        let first_q_head = batch * self.heads + (c.head % self.kv_heads) * self.group;
        ((first_q_head * self.q_len + c.start) * self.dim) as u64 * self.elem
    }

    /// Element offset of the chunk's KV head in `[B, Hkv, T, D]`.
    fn kv_head(&self, c: &Chunk) -> u64 {
        (c.head * self.k_len * self.dim) as u64
    }

    /// Byte offset of the chunk's first row in a `[B, Hkv, group, T]` f32 tensor (lse, delta).
    fn f32_rows(&self, c: &Chunk) -> u64 {
        ((c.head * self.group * self.q_len + c.start) * 4) as u64
    }

    /// Address of the chunk's KV head in the f32 `[B, Hkv, T]` key bias, or 0 without one.
    fn bias_head(&self, c: &Chunk, bias: Option<u64>) -> u64 {
        bias.map_or(0, |p| p + (c.head * self.k_len * 4) as u64)
    }

    /// The arguments every row kernel ends with: keys, rows, the stride between the group's
    /// rows in lse / delta, the first query's position, the window.
    fn row_args(&self, c: &Chunk, options: &AttentionOptions) -> [KernelArg; 5] {
        [
            KernelArg::Int(c.keys as i32),
            KernelArg::Int(c.rows as i32),
            KernelArg::Int(self.q_len as i32),
            KernelArg::Int((options.offset + c.start) as i32),
            KernelArg::Int(options.window.min(i32::MAX as usize) as i32),
        ]
    }

    /// The arguments every flash kernel ends with: heads, KV heads, query and key lengths, the
    /// first query's position, the window and the score scale.
    fn flash_args(&self, options: &AttentionOptions) -> [KernelArg; 7] {
        [
            KernelArg::Int(self.heads as i32),
            KernelArg::Int(self.kv_heads as i32),
            KernelArg::Int(self.q_len as i32),
            KernelArg::Int(self.k_len as i32),
            KernelArg::Int(options.offset as i32),
            KernelArg::Int(options.window.min(i32::MAX as usize) as i32),
            KernelArg::Float(1.0 / (self.dim as f32).sqrt()),
        ]
    }

    /// Grid of the flash kernels with one block per `rows` query rows of a query head.
    fn flash_query_grid(&self, rows: usize) -> (u32, u32, u32) {
        (
            self.q_len.div_ceil(rows) as u32,
            self.heads as u32,
            self.batch as u32,
        )
    }

    fn empty(&self, like: &Cube, shape: Vec<usize>, dtype: DType) -> Cube {
        empty_device_contiguous_dtype(
            like.client.clone(),
            like.device.clone(),
            Shape::from(shape),
            dtype,
        )
    }
}

fn contiguous<const D: usize>(t: Tensor<Cuda, D>) -> Cube {
    into_contiguous(t.into_primitive().tensor())
}

fn tensor<const D: usize>(t: Cube) -> Tensor<Cuda, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Query rows and keys per block, and threads per block, of `flash.cu`.
const FLASH_ROWS: usize = 64;
const FLASH_KEYS: usize = 64;
const FLASH_THREADS: u32 = 128;

/// Threads per block of `flash_hopper.cu`'s kernels (two warpgroups), and the query rows of a
/// forward / dQ block and keys of a dK/dV block (64 per warpgroup).
const HOPPER_THREADS: u32 = 256;
const HOPPER_BLOCK: usize = 128;

/// Which flash kernels run, from `DMS_RETROFIT_FLASH_KERNEL` (for comparisons): `hopper` (the
/// default; wgmma, compute capability 9.0 and head_dim 128, else the next), `wide` (`mma.sync`,
/// forward with 128 query rows per block; the default elsewhere) or `narrow` (64-row forward).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlashKernel {
    Hopper,
    Wide,
    Narrow,
}

fn flash_kernel() -> FlashKernel {
    static CHOICE: std::sync::OnceLock<FlashKernel> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(
        || match std::env::var("DMS_RETROFIT_FLASH_KERNEL").as_deref() {
            Ok("narrow") => FlashKernel::Narrow,
            Ok("wide") => FlashKernel::Wide,
            Ok("hopper") | Err(_) => FlashKernel::Hopper,
            Ok(other) => {
                tracing::warn!(
                    "DMS_RETROFIT_FLASH_KERNEL={other:?} is not hopper, wide or narrow; using the default (hopper where the GPU has it)"
                );
                FlashKernel::Hopper
            }
        },
    )
}

/// Whether the flash kernel (`flash.cu`) runs the forward: bf16, head_dim 64 or 128, sizes within
/// its 32-bit indices, and not switched off with `DMS_RETROFIT_FLASH=0` (the GEMM + softmax path
/// then runs; `bench attention` compares both against the tensor ops).
fn flash_applies(geo: &Geometry) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("DMS_RETROFIT_FLASH").map_or(true, |v| v != "0"));
    enabled
        && geo.dtype == DType::BF16
        && matches!(geo.dim, 64 | 128)
        && geo.k_len < i32::MAX as usize
        && geo.heads <= 65_535
        && geo.batch <= 65_535
}

/// Output `[batch, heads, q_len, dim]` and log-sum-exp `[batch, kv_heads, group, q_len]` (f32), or
/// `None` where this path does not apply (dtype other than bf16/f32, cuBLASLt or NVRTC missing).
/// Per chunk: one batched GEMM for the group's scores (f32, scaled), one fused kernel for bias,
/// causal mask, softmax and log-sum-exp, one batched GEMM from the probabilities into the output.
pub fn attention_forward(
    q: Tensor<Cuda, 4>,
    k: Tensor<Cuda, 4>,
    v: Tensor<Cuda, 4>,
    key_bias: Option<Tensor<Cuda, 3>>,
    options: &AttentionOptions,
) -> Option<(Tensor<Cuda, 4>, Tensor<Cuda, 4>)> {
    let geo = Geometry::new(&q, &k, &[v.dtype()], options)?;
    let Geometry {
        batch,
        heads,
        kv_heads,
        group,
        q_len,
        dim,
        dtype,
        elem,
        ..
    } = geo;
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let bias = key_bias.map(|b| contiguous(b.cast(FloatDType::F32)));
    let flash = flash_applies(&geo);
    // The flash kernels write the output token-major, `[B, T, H, D]`, returned as its `[B, H, T,
    // D]` view: the output projection's layout, so merging the heads is free and training keeps
    // one copy of the context (the attention's saved output is the projection's saved input).
    let out = match flash {
        true => geo.empty(&q, vec![batch, q_len, heads, dim], dtype),
        false => geo.empty(&q, vec![batch, heads, q_len, dim], dtype),
    };
    let lse = geo.empty(&q, vec![batch, kv_heads, group, q_len], DType::F32);
    let mut tensors = vec![&q, &k, &v, &out, &lse];
    tensors.extend(&bias);
    let options = *options;
    if flash {
        on_cubecl_stream(&tensors, true, move |context, ptrs| {
            let kernels = context.kernels()?;
            let choice = flash_kernel();
            // head_dim 64 (SmolLM2) keeps the 64-row kernel: its wide variant compiles without
            // spills but has not been checked on a GPU yet.
            let (kernel, rows, threads, shared) = match (&kernels.hopper, dim, choice) {
                (Some(hopper), 128, FlashKernel::Hopper) => (
                    &hopper.forward,
                    HOPPER_BLOCK,
                    HOPPER_THREADS,
                    HOPPER_FORWARD_SHARED,
                ),
                (_, 64, _) => (
                    &kernels.flash_forward_d64,
                    FLASH_ROWS,
                    FLASH_THREADS,
                    tile_shared(64),
                ),
                (_, _, FlashKernel::Narrow) => (
                    &kernels.flash_forward_d128,
                    FLASH_ROWS,
                    FLASH_THREADS,
                    tile_shared(128),
                ),
                _ => (
                    &kernels.flash_forward_wide_d128,
                    2 * FLASH_ROWS,
                    FLASH_THREADS,
                    wide_shared(128),
                ),
            };
            let kernel = kernel.clone();
            let mut args = vec![
                KernelArg::Pointer(ptrs[0]),
                KernelArg::Pointer(ptrs[1]),
                KernelArg::Pointer(ptrs[2]),
                KernelArg::Pointer(ptrs.get(5).copied().unwrap_or(0)),
                KernelArg::Pointer(ptrs[3]),
                KernelArg::Pointer(ptrs[4]),
            ];
            args.extend(geo.flash_args(&options));
            context.launch_with_shared(&kernel, geo.flash_query_grid(rows), threads, shared, &args)
        })?;
        return Some((tensor::<4>(out).swap_dims(1, 2), tensor(lse)));
    }
    on_cubecl_stream(&tensors, true, move |context, ptrs| {
        let options = &options;
        let [q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr] =
            <[u64; 5]>::try_from(&ptrs[..5]).map_err(|_| "pointers".to_string())?;
        let bias_ptr = ptrs.get(5).copied();
        let scores = context.scratch(0, geo.most_scores() * 4)?;
        let probs = context.scratch(1, geo.most_scores() * elem as usize)?;
        let kernels = context.kernels()?;
        let softmax = kernels.softmax_rows.of(dtype);
        let per_head = q_len * dim;
        for chunk in geo.chunks(options.offset) {
            let Chunk { rows, keys, .. } = chunk;
            let q_rows = geo.q_rows(&chunk);
            let kv_head = geo.kv_head(&chunk) * elem;
            let scores_at = rows * keys;
            context.gemm(&Gemm {
                a: Matrix::packed(q_ptr + q_rows, rows, dim, per_head, dtype),
                a_transposed: false,
                b: Matrix::packed(k_ptr + kv_head, keys, dim, 0, dtype),
                b_transposed: true,
                c: Matrix::packed(scores, rows, keys, scores_at, DType::F32),
                batch: group,
                alpha: 1.0 / (dim as f32).sqrt(),
                beta: 0.0,
            })?;
            let mut args = vec![
                KernelArg::Pointer(scores),
                KernelArg::Pointer(probs),
                KernelArg::Pointer(lse_ptr + geo.f32_rows(&chunk)),
                KernelArg::Pointer(geo.bias_head(&chunk, bias_ptr)),
            ];
            args.extend(geo.row_args(&chunk, options));
            context.launch(&softmax, (rows as u32, group as u32, 1), BLOCK, &args)?;
            context.gemm(&Gemm {
                a: Matrix::packed(probs, rows, keys, scores_at, dtype),
                a_transposed: false,
                b: Matrix::packed(v_ptr + kv_head, keys, dim, 0, dtype),
                b_transposed: false,
                c: Matrix::packed(out_ptr + q_rows, rows, dim, per_head, dtype),
                batch: group,
                alpha: 1.0,
                beta: 0.0,
            })?;
        }
        Ok(())
    })?;
    Some((tensor(out), tensor(lse)))
}

/// Gradients of [`attention_forward`]: `dq`, `dk`, `dv` in the activation dtype and, when asked
/// for and a bias was given, the key-bias gradient in the bias's dtype. Per chunk: the scores and
/// `dO Vᵀ` recomputed by two batched GEMMs, one fused kernel for `P` and `dS = P (dP - delta)`, one
/// for the key-bias gradient, and GEMMs for `dV += Pᵀ dO`, `dK += dSᵀ Q` (f32 accumulators) and
/// `dQ = dS K`.
pub fn attention_backward(
    inputs: AttentionInputs<Cuda>,
    forward: &AttentionForward<Cuda>,
    grad_output: Tensor<Cuda, 4>,
    want_bias_grad: bool,
    options: &AttentionOptions,
) -> Option<AttentionGrads<Cuda>> {
    let AttentionInputs { q, k, v, key_bias } = inputs;
    let (output, lse) = (forward.output.clone(), forward.lse.clone());
    let geo = Geometry::new(&q, &k, &[v.dtype(), grad_output.dtype()], options)?;
    let Geometry {
        batch,
        heads,
        kv_heads,
        group,
        q_len,
        k_len,
        dim,
        dtype,
        ..
    } = geo;
    // delta_i = sum_d dO_id O_id, the softmax backward's row term, in f32: one kernel reading
    // both through their strides (burn's ops: two f32 casts, a product and a sum, ~8x the bytes).
    let delta = super::elementwise::attention_delta(grad_output.clone(), output.clone())
        .unwrap_or_else(|| {
            (grad_output.clone().cast(FloatDType::F32) * output.cast(FloatDType::F32)).sum_dim(3)
        })
        .reshape([batch, kv_heads, group, q_len]);
    let (q, k, v, grad_output) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(grad_output),
    );
    let (lse, delta) = (contiguous(lse.cast(FloatDType::F32)), contiguous(delta));
    let bias_dtype = key_bias.as_ref().map(|b| b.dtype());
    let with_bias_grad = want_bias_grad && key_bias.is_some();
    let bias = key_bias.map(|b| contiguous(b.cast(FloatDType::F32)));
    let grad_q = geo.empty(&q, vec![batch, heads, q_len, dim], dtype);
    // dK, dV and the bias gradient are f32 sums (over each KV head's query heads, or chunks).
    let grad_k = geo.empty(&q, vec![batch, kv_heads, k_len, dim], DType::F32);
    let grad_v = geo.empty(&q, vec![batch, kv_heads, k_len, dim], DType::F32);
    let grad_bias = geo.empty(&q, vec![batch, kv_heads, k_len], DType::F32);
    let mut tensors = vec![
        &q,
        &k,
        &v,
        &grad_output,
        &lse,
        &delta,
        &grad_q,
        &grad_k,
        &grad_v,
        &grad_bias,
    ];
    tensors.extend(&bias);
    if flash_applies(&geo) {
        flash_backward(&geo, &tensors, with_bias_grad, options)?;
    } else {
        gemm_backward(&geo, &tensors, with_bias_grad, options)?;
    }
    Some(AttentionGrads {
        q: tensor(grad_q),
        k: tensor::<4>(grad_k).cast(dtype),
        v: tensor::<4>(grad_v).cast(dtype),
        key_bias: match (with_bias_grad, bias_dtype) {
            (true, Some(bias_dtype)) => Some(tensor::<3>(grad_bias).cast(bias_dtype)),
            _ => None,
        },
    })
}

/// The backward as the two flash kernels (bf16, head_dim 64 or 128): dK, dV and the bias
/// gradient per key block of a KV head, dQ per query block. `tensors` as for [`gemm_backward`].
fn flash_backward(
    geo: &Geometry,
    tensors: &[&Cube],
    with_bias_grad: bool,
    options: &AttentionOptions,
) -> Option<()> {
    let Geometry {
        batch,
        heads,
        kv_heads,
        k_len,
        dim,
        ..
    } = *geo;
    let (geo, options) = (*geo, *options);
    on_cubecl_stream(tensors, true, move |context, p| {
        let (geo, options) = (&geo, &options);
        let kv_bytes = batch * kv_heads * k_len * dim * 4;
        context.zero(p[7], kv_bytes)?;
        context.zero(p[8], kv_bytes)?;
        context.zero(p[9], batch * kv_heads * k_len * 4)?;
        let kernels = context.kernels()?;
        // (dK/dV kernel, keys per block, dQ kernel, query rows per block, threads, shared bytes
        // of each)
        let launch = match (&kernels.hopper, dim, flash_kernel()) {
            (Some(hopper), 128, FlashKernel::Hopper) => (
                hopper.backward_kv.clone(),
                HOPPER_BLOCK,
                hopper.backward_q.clone(),
                HOPPER_BLOCK,
                HOPPER_THREADS,
                (HOPPER_BACKWARD_KV_SHARED, HOPPER_BACKWARD_Q_SHARED),
            ),
            (_, 64, _) => (
                kernels.flash_backward_kv_d64.clone(),
                FLASH_KEYS,
                kernels.flash_backward_q_d64.clone(),
                FLASH_ROWS,
                FLASH_THREADS,
                (0, tile_shared(64)),
            ),
            _ => (
                kernels.flash_backward_kv_d128.clone(),
                FLASH_KEYS,
                kernels.flash_backward_q_d128.clone(),
                FLASH_ROWS,
                FLASH_THREADS,
                (0, tile_shared(128)),
            ),
        };
        let (kv_kernel, kv_keys, q_kernel, q_rows, threads, (kv_shared, q_shared)) = launch;
        let bias_ptr = KernelArg::Pointer(p.get(10).copied().unwrap_or(0));
        let inputs = || {
            [
                KernelArg::Pointer(p[0]),
                KernelArg::Pointer(p[1]),
                KernelArg::Pointer(p[2]),
                KernelArg::Pointer(p[3]),
                KernelArg::Pointer(p[4]),
                KernelArg::Pointer(p[5]),
            ]
        };
        let sizes = geo.flash_args(options);
        let mut kv_args = Vec::from(inputs());
        kv_args.push(bias_ptr.clone());
        kv_args.extend([
            KernelArg::Pointer(p[7]),
            KernelArg::Pointer(p[8]),
            KernelArg::Pointer(if with_bias_grad { p[9] } else { 0 }),
        ]);
        kv_args.extend(sizes.clone());
        context.launch_with_shared(
            &kv_kernel,
            (k_len.div_ceil(kv_keys) as u32, heads as u32, batch as u32),
            threads,
            kv_shared,
            &kv_args,
        )?;
        let mut q_args = Vec::from(inputs());
        q_args.extend([bias_ptr, KernelArg::Pointer(p[6])]);
        q_args.extend(sizes);
        context.launch_with_shared(
            &q_kernel,
            geo.flash_query_grid(q_rows),
            threads,
            q_shared,
            &q_args,
        )
    })
}

/// The backward as cuBLASLt GEMMs around the `softmax.cu` row kernels, chunk by chunk, into the
/// zeroed f32 `dK`, `dV` and bias-gradient accumulators. `tensors`: q, k, v, dO, lse, delta, dQ,
/// dK, dV, d(bias) and the bias if any.
fn gemm_backward(
    geo: &Geometry,
    tensors: &[&Cube],
    with_bias_grad: bool,
    options: &AttentionOptions,
) -> Option<()> {
    let Geometry {
        batch,
        kv_heads,
        group,
        q_len,
        k_len,
        dim,
        dtype,
        elem,
        ..
    } = *geo;
    let scale = 1.0 / (dim as f32).sqrt();
    let (geo, options) = (*geo, *options);
    on_cubecl_stream(tensors, true, move |context, ptrs| {
        let (geo, options) = (&geo, &options);
        let [
            q_ptr,
            k_ptr,
            v_ptr,
            do_ptr,
            lse_ptr,
            delta_ptr,
            dq_ptr,
            dk_ptr,
            dv_ptr,
            db_ptr,
        ] = <[u64; 10]>::try_from(&ptrs[..10]).map_err(|_| "pointers".to_string())?;
        let bias_ptr = ptrs.get(10).copied();
        let kv_bytes = batch * kv_heads * k_len * dim * 4;
        context.zero(dk_ptr, kv_bytes)?;
        context.zero(dv_ptr, kv_bytes)?;
        context.zero(db_ptr, batch * kv_heads * k_len * 4)?;
        let most = geo.most_scores();
        let scores = context.scratch(0, most * 4)?;
        let grad = context.scratch(2, most * 4)?;
        let probs = context.scratch(1, most * elem as usize)?;
        let grad_low = context.scratch(3, most * elem as usize)?;
        let kernels = context.kernels()?;
        let grad_rows = kernels.attention_grad_rows.of(dtype);
        let bias_columns = kernels.bias_grad_columns.clone();
        let per_head = q_len * dim;
        for chunk in geo.chunks(options.offset) {
            let Chunk { rows, keys, .. } = chunk;
            let q_rows = geo.q_rows(&chunk);
            let kv_head = geo.kv_head(&chunk);
            let (k_head, v_head) = (k_ptr + kv_head * elem, v_ptr + kv_head * elem);
            let (dk_head, dv_head) = (dk_ptr + kv_head * 4, dv_ptr + kv_head * 4);
            let scores_at = rows * keys;
            // S = scale Q Kᵀ and dP = dO Vᵀ for the group's heads.
            for (left, right, out, alpha) in
                [(q_ptr, k_head, scores, scale), (do_ptr, v_head, grad, 1.0)]
            {
                context.gemm(&Gemm {
                    a: Matrix::packed(left + q_rows, rows, dim, per_head, dtype),
                    a_transposed: false,
                    b: Matrix::packed(right, keys, dim, 0, dtype),
                    b_transposed: true,
                    c: Matrix::packed(out, rows, keys, scores_at, DType::F32),
                    batch: group,
                    alpha,
                    beta: 0.0,
                })?;
            }
            let f32_rows = geo.f32_rows(&chunk);
            let mut args = vec![
                KernelArg::Pointer(scores),
                KernelArg::Pointer(grad),
                KernelArg::Pointer(probs),
                KernelArg::Pointer(grad_low),
                KernelArg::Pointer(lse_ptr + f32_rows),
                KernelArg::Pointer(delta_ptr + f32_rows),
                KernelArg::Pointer(geo.bias_head(&chunk, bias_ptr)),
            ];
            args.extend(geo.row_args(&chunk, options));
            context.launch(&grad_rows, (rows as u32, group as u32, 1), BLOCK, &args)?;
            if with_bias_grad {
                add_bias_grad(context, &bias_columns, geo, &chunk, grad, db_ptr, options)?;
            }
            // dQ = scale dS K for the group's heads (each row's keys are all here).
            context.gemm(&Gemm {
                a: Matrix::packed(grad_low, rows, keys, scores_at, dtype),
                a_transposed: false,
                b: Matrix::packed(k_head, keys, dim, 0, dtype),
                b_transposed: false,
                c: Matrix::packed(dq_ptr + q_rows, rows, dim, per_head, dtype),
                batch: group,
                alpha: scale,
                beta: 0.0,
            })?;
            accumulate_kv_grads(
                context,
                geo,
                &chunk,
                [probs, grad_low],
                [do_ptr, q_ptr],
                [dv_head, dk_head],
                scale,
            )?;
        }
        Ok(())
    })
}

/// One chunk's key-bias gradient: the columns of `dS` (f32, at `grad`) summed over the group's
/// rows into the KV head's f32 accumulator in `db_ptr`.
fn add_bias_grad(
    context: &mut DeviceContext,
    kernel: &CudaFunction,
    geo: &Geometry,
    chunk: &Chunk,
    grad: u64,
    db_ptr: u64,
    options: &AttentionOptions,
) -> Result<(), String> {
    let splits = (geo.group * chunk.rows).div_ceil(64);
    let [keys_arg, rows_arg, _, qpos0, window] = geo.row_args(chunk, options);
    context.launch(
        kernel,
        (chunk.keys.div_ceil(BLOCK as usize) as u32, splits as u32, 1),
        BLOCK,
        &[
            KernelArg::Pointer(grad),
            KernelArg::Pointer(geo.bias_head(chunk, Some(db_ptr))),
            keys_arg,
            rows_arg,
            KernelArg::Int(geo.group as i32),
            qpos0,
            window,
            KernelArg::Int(64),
        ],
    )
}

/// `dV += Pᵀ dO` and `dK += scale dSᵀ Q` for one chunk, head by head of the group into the shared
/// KV head's f32 accumulators. `[probs, grad_low]`: the chunk's `P` and `dS` in the activation
/// dtype; `[do_ptr, q_ptr]`: `dO` and `Q`; `[dv_head, dk_head]`: the KV head's accumulators.
fn accumulate_kv_grads(
    context: &mut DeviceContext,
    geo: &Geometry,
    chunk: &Chunk,
    [probs, grad_low]: [u64; 2],
    [do_ptr, q_ptr]: [u64; 2],
    [dv_head, dk_head]: [u64; 2],
    scale: f32,
) -> Result<(), String> {
    let (rows, keys, dim, elem, dtype) = (chunk.rows, chunk.keys, geo.dim, geo.elem, geo.dtype);
    let q_rows = geo.q_rows(chunk);
    let per_head = geo.q_len * dim;
    let scores_at = rows * keys;
    for g in 0..geo.group {
        let head_rows = q_rows + (g * per_head) as u64 * elem;
        let chunk_at = (g * scores_at) as u64 * elem;
        for (left, right, out, alpha) in [
            (probs, do_ptr, dv_head, 1.0),
            (grad_low, q_ptr, dk_head, scale),
        ] {
            context.gemm(&Gemm {
                a: Matrix::packed(left + chunk_at, rows, keys, 0, dtype),
                a_transposed: true,
                b: Matrix::packed(right + head_rows, rows, dim, 0, dtype),
                b_transposed: false,
                c: Matrix::packed(out, keys, dim, 0, DType::F32),
                batch: 1,
                alpha,
                beta: 1.0,
            })?;
        }
    }
    Ok(())
}
