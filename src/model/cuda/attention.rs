//! The attention forward on CUDA: per KV head and query chunk, one batched cuBLASLt GEMM for the
//! scores of the head's query group (f32, scaled), one fused kernel for bias, causal mask, softmax
//! and log-sum-exp (`softmax.cu`), and one batched GEMM from the probabilities into the output.
//! Same definition and outputs as `model::attention::attention_forward` (the chunked tensor-op
//! version), which `bench attention` compares it against on the GPU.

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::{Cube, Gemm, KernelArg, Matrix, on_our_stream};
use crate::backend::Cuda;
use crate::model::attention::AttentionOptions;

/// Longest query chunk: shorter chunks skip more of the causal upper triangle, longer ones
/// launch fewer GEMMs.
const MAX_CHUNK_ROWS: usize = 1024;

/// Output `[batch, heads, q_len, dim]` and log-sum-exp `[batch, kv_heads, group, q_len]` (f32), or
/// `None` where this path does not apply (dtype other than bf16/f32, cuBLASLt or NVRTC missing).
pub fn attention_forward(
    q: Tensor<Cuda, 4>,
    k: Tensor<Cuda, 4>,
    v: Tensor<Cuda, 4>,
    key_bias: Option<Tensor<Cuda, 3>>,
    options: &AttentionOptions,
) -> Option<(Tensor<Cuda, 4>, Tensor<Cuda, 4>)> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F32) || k.dtype() != dtype || v.dtype() != dtype {
        return None;
    }
    let [batch, heads, q_len, dim] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    if q_len == 0 || kv_heads == 0 || heads % kv_heads != 0 || options.offset + q_len > k_len {
        return None;
    }
    let group = heads / kv_heads;
    let cube = |t: Tensor<Cuda, 4>| into_contiguous(t.into_primitive().tensor());
    let (q, k, v) = (cube(q), cube(k), cube(v));
    let bias = key_bias.map(|b| into_contiguous(b.cast(FloatDType::F32).into_primitive().tensor()));
    let (client, device) = (q.client.clone(), q.device.clone());
    let out = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::from(vec![batch, heads, q_len, dim]),
        dtype,
    );
    let lse = empty_device_contiguous_dtype(
        client,
        device,
        Shape::from(vec![batch, kv_heads, group, q_len]),
        DType::F32,
    );
    let rows_per_chunk = (options.score_budget / (group * k_len).max(1)).clamp(1, MAX_CHUNK_ROWS);
    let mut tensors = vec![&q, &k, &v, &out, &lse];
    if let Some(bias) = &bias {
        tensors.push(bias);
    }
    let elem = dtype.size() as u64;
    on_our_stream(&tensors, |context, ptrs| {
        let (q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr) = (ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4]);
        let bias_ptr = ptrs.get(5).copied();
        let most_scores = group * rows_per_chunk.min(q_len) * k_len;
        let scores = context.scratch(0, most_scores * 4)?;
        let probs = context.scratch(1, most_scores * elem as usize)?;
        let kernels = context.kernels()?;
        let softmax = match dtype {
            DType::BF16 => kernels.softmax_rows_bf16.clone(),
            _ => kernels.softmax_rows_f32.clone(),
        };
        for b in 0..batch {
            for h in 0..kv_heads {
                let head = b * kv_heads + h;
                // The group's query heads are consecutive: head `h * group + g`.
                let first_q_head = b * heads + h * group;
                let k_head = k_ptr + (head * k_len * dim) as u64 * elem;
                let v_head = v_ptr + (head * k_len * dim) as u64 * elem;
                for start in (0..q_len).step_by(rows_per_chunk) {
                    let rows = rows_per_chunk.min(q_len - start);
                    let keys = (options.offset + start + rows).min(k_len);
                    let q_rows = ((first_q_head * q_len + start) * dim) as u64 * elem;
                    context.gemm(&Gemm {
                        a: Matrix {
                            ptr: q_ptr + q_rows,
                            rows,
                            cols: dim,
                            ld: dim,
                            batch_stride: q_len * dim,
                            dtype,
                        },
                        a_transposed: false,
                        b: Matrix {
                            ptr: k_head,
                            rows: keys,
                            cols: dim,
                            ld: dim,
                            batch_stride: 0,
                            dtype,
                        },
                        b_transposed: true,
                        c: Matrix {
                            ptr: scores,
                            rows,
                            cols: keys,
                            ld: keys,
                            batch_stride: rows * keys,
                            dtype: DType::F32,
                        },
                        batch: group,
                        alpha: 1.0 / (dim as f32).sqrt(),
                        beta: 0.0,
                    })?;
                    let lse_rows = lse_ptr + ((head * group * q_len + start) * 4) as u64;
                    let bias_head = bias_ptr.map_or(0, |p| p + (head * k_len * 4) as u64);
                    context.launch(
                        &softmax,
                        (rows as u32, group as u32, 1),
                        256,
                        &[
                            KernelArg::Pointer(scores),
                            KernelArg::Pointer(probs),
                            KernelArg::Pointer(lse_rows),
                            KernelArg::Pointer(bias_head),
                            KernelArg::Int(keys as i32),
                            KernelArg::Int(rows as i32),
                            KernelArg::Int(q_len as i32),
                            KernelArg::Int((options.offset + start) as i32),
                            KernelArg::Int(options.window.min(i32::MAX as usize) as i32),
                        ],
                    )?;
                    context.gemm(&Gemm {
                        a: Matrix {
                            ptr: probs,
                            rows,
                            cols: keys,
                            ld: keys,
                            batch_stride: rows * keys,
                            dtype,
                        },
                        a_transposed: false,
                        b: Matrix {
                            ptr: v_head,
                            rows: keys,
                            cols: dim,
                            ld: dim,
                            batch_stride: 0,
                            dtype,
                        },
                        b_transposed: false,
                        c: Matrix {
                            ptr: out_ptr + q_rows,
                            rows,
                            cols: dim,
                            ld: dim,
                            batch_stride: q_len * dim,
                            dtype,
                        },
                        batch: group,
                        alpha: 1.0,
                        beta: 0.0,
                    })?;
                }
            }
        }
        Ok(())
    })?;
    let float = |t: Cube| Tensor::from_primitive(TensorPrimitive::Float(t));
    Some((float(out), float(lse)))
}

/// Gradients of [`attention_forward`]: `dq` `[batch, heads, q_len, dim]`, `dk`, `dv`
/// `[batch, kv_heads, k_len, dim]` (activation dtype) and, when asked for and a bias was given,
/// the key-bias gradient `[batch, kv_heads, k_len]` (f32). Per KV head and query chunk: the
/// scores and `dO Vᵀ` recomputed by two batched GEMMs, one fused kernel for `P` and
/// `dS = P (dP - delta)`, one for the key-bias gradient, and GEMMs for `dV += Pᵀ dO`,
/// `dK += dSᵀ Q` (f32 accumulators) and `dQ = dS K`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: Tensor<Cuda, 4>,
    k: Tensor<Cuda, 4>,
    v: Tensor<Cuda, 4>,
    key_bias: Option<Tensor<Cuda, 3>>,
    output: Tensor<Cuda, 4>,
    lse: Tensor<Cuda, 4>,
    grad_output: Tensor<Cuda, 4>,
    want_bias_grad: bool,
    options: &AttentionOptions,
) -> Option<AttentionGradsCuda> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F32)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || grad_output.dtype() != dtype
    {
        return None;
    }
    let [batch, heads, q_len, dim] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    if q_len == 0 || kv_heads == 0 || heads % kv_heads != 0 || options.offset + q_len > k_len {
        return None;
    }
    let group = heads / kv_heads;
    // delta_i = sum_d dO_id O_id, the softmax backward's row term, in f32.
    let delta = (grad_output.clone().cast(FloatDType::F32) * output.cast(FloatDType::F32))
        .sum_dim(3)
        .reshape([batch, kv_heads, group, q_len]);
    let cube4 = |t: Tensor<Cuda, 4>| into_contiguous(t.into_primitive().tensor());
    let (q, k, v, grad_output) = (cube4(q), cube4(k), cube4(v), cube4(grad_output));
    let (lse, delta) = (cube4(lse.cast(FloatDType::F32)), cube4(delta));
    let with_bias_grad = want_bias_grad && key_bias.is_some();
    let bias = key_bias.map(|b| into_contiguous(b.cast(FloatDType::F32).into_primitive().tensor()));
    let (client, device) = (q.client.clone(), q.device.clone());
    let empty = |shape: Vec<usize>, dtype| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::from(shape), dtype)
    };
    let grad_q = empty(vec![batch, heads, q_len, dim], dtype);
    let grad_k = empty(vec![batch, kv_heads, k_len, dim], DType::F32);
    let grad_v = empty(vec![batch, kv_heads, k_len, dim], DType::F32);
    let grad_bias = empty(vec![batch, kv_heads, k_len], DType::F32);
    let rows_per_chunk = (options.score_budget / (group * k_len).max(1)).clamp(1, MAX_CHUNK_ROWS);
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
    if let Some(bias) = &bias {
        tensors.push(bias);
    }
    let elem = dtype.size() as u64;
    let scale = 1.0 / (dim as f32).sqrt();
    on_our_stream(&tensors, |context, ptrs| {
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
        let most = group * rows_per_chunk.min(q_len) * k_len;
        let scores = context.scratch(0, most * 4)?;
        let grad = context.scratch(2, most * 4)?;
        let probs = context.scratch(1, most * elem as usize)?;
        let grad_low = context.scratch(3, most * elem as usize)?;
        let kernels = context.kernels()?;
        let grad_rows = match dtype {
            DType::BF16 => kernels.attention_grad_rows_bf16.clone(),
            _ => kernels.attention_grad_rows_f32.clone(),
        };
        let bias_columns = kernels.bias_grad_columns.clone();
        let matrix = |ptr, rows, cols, batch_stride, dtype| Matrix {
            ptr,
            rows,
            cols,
            ld: cols,
            batch_stride,
            dtype,
        };
        for b in 0..batch {
            for h in 0..kv_heads {
                let head = b * kv_heads + h;
                let first_q_head = b * heads + h * group;
                let kv_offset = (head * k_len * dim) as u64;
                let (k_head, v_head) = (k_ptr + kv_offset * elem, v_ptr + kv_offset * elem);
                let (dk_head, dv_head) = (dk_ptr + kv_offset * 4, dv_ptr + kv_offset * 4);
                for start in (0..q_len).step_by(rows_per_chunk) {
                    let rows = rows_per_chunk.min(q_len - start);
                    let keys = (options.offset + start + rows).min(k_len);
                    let q_rows = ((first_q_head * q_len + start) * dim) as u64 * elem;
                    let per_head = q_len * dim;
                    let chunk = rows * keys;
                    // S = scale Q Kᵀ and dP = dO Vᵀ for the group's heads.
                    for (left, right, out, alpha) in
                        [(q_ptr, k_head, scores, scale), (do_ptr, v_head, grad, 1.0)]
                    {
                        context.gemm(&Gemm {
                            a: matrix(left + q_rows, rows, dim, per_head, dtype),
                            a_transposed: false,
                            b: matrix(right, keys, dim, 0, dtype),
                            b_transposed: true,
                            c: matrix(out, rows, keys, chunk, DType::F32),
                            batch: group,
                            alpha,
                            beta: 0.0,
                        })?;
                    }
                    let row_offset = ((head * group * q_len + start) * 4) as u64;
                    let bias_head = bias_ptr.map_or(0, |p| p + (head * k_len * 4) as u64);
                    let window = options.window.min(i32::MAX as usize) as i32;
                    let qpos0 = (options.offset + start) as i32;
                    context.launch(
                        &grad_rows,
                        (rows as u32, group as u32, 1),
                        256,
                        &[
                            KernelArg::Pointer(scores),
                            KernelArg::Pointer(grad),
                            KernelArg::Pointer(probs),
                            KernelArg::Pointer(grad_low),
                            KernelArg::Pointer(lse_ptr + row_offset),
                            KernelArg::Pointer(delta_ptr + row_offset),
                            KernelArg::Pointer(bias_head),
                            KernelArg::Int(keys as i32),
                            KernelArg::Int(rows as i32),
                            KernelArg::Int(q_len as i32),
                            KernelArg::Int(qpos0),
                            KernelArg::Int(window),
                        ],
                    )?;
                    if with_bias_grad {
                        let splits = (group * rows).div_ceil(64);
                        context.launch(
                            &bias_columns,
                            (keys.div_ceil(256) as u32, splits as u32, 1),
                            256,
                            &[
                                KernelArg::Pointer(grad),
                                KernelArg::Pointer(db_ptr + (head * k_len * 4) as u64),
                                KernelArg::Int(keys as i32),
                                KernelArg::Int(rows as i32),
                                KernelArg::Int(group as i32),
                                KernelArg::Int(qpos0),
                                KernelArg::Int(window),
                                KernelArg::Int(64),
                            ],
                        )?;
                    }
                    // dQ = scale dS K for the group's heads (each row's keys are all here).
                    context.gemm(&Gemm {
                        a: matrix(grad_low, rows, keys, chunk, dtype),
                        a_transposed: false,
                        b: matrix(k_head, keys, dim, 0, dtype),
                        b_transposed: false,
                        c: matrix(dq_ptr + q_rows, rows, dim, per_head, dtype),
                        batch: group,
                        alpha: scale,
                        beta: 0.0,
                    })?;
                    // dV += Pᵀ dO and dK += scale dSᵀ Q, head by head into the shared KV head.
                    for g in 0..group {
                        let head_rows = q_rows + (g * per_head) as u64 * elem;
                        let chunk_at = (g * chunk) as u64 * elem;
                        for (left, right, out, alpha) in [
                            (probs, do_ptr, dv_head, 1.0),
                            (grad_low, q_ptr, dk_head, scale),
                        ] {
                            context.gemm(&Gemm {
                                a: matrix(left + chunk_at, rows, keys, 0, dtype),
                                a_transposed: true,
                                b: matrix(right + head_rows, rows, dim, 0, dtype),
                                b_transposed: false,
                                c: matrix(out, keys, dim, 0, DType::F32),
                                batch: 1,
                                alpha,
                                beta: 1.0,
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    let float4 = |t: Cube| Tensor::<Cuda, 4>::from_primitive(TensorPrimitive::Float(t));
    Some(AttentionGradsCuda {
        q: float4(grad_q),
        k: float4(grad_k).cast(dtype),
        v: float4(grad_v).cast(dtype),
        key_bias: with_bias_grad
            .then(|| Tensor::<Cuda, 3>::from_primitive(TensorPrimitive::Float(grad_bias))),
    })
}

/// [`attention_backward`]'s result; the key-bias gradient is f32.
pub struct AttentionGradsCuda {
    pub q: Tensor<Cuda, 4>,
    pub k: Tensor<Cuda, 4>,
    pub v: Tensor<Cuda, 4>,
    pub key_bias: Option<Tensor<Cuda, 3>>,
}
