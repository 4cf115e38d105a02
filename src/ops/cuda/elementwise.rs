//! RMSNorm, SwiGLU, RoPE and the per-token distillation KL as one NVRTC kernel each
//! (`elementwise.cu`), forward and backward.
//! Each function returns `None` (nothing run) where the kernels do not apply (a dtype other than
//! bf16/f32, NVRTC unavailable); the caller then uses burn's tensor ops.

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::{BLOCK, Cube, KernelArg, Kernels, Typed, kernel_dtype, on_cubecl_stream};
use crate::backend::Cuda;

fn contiguous<const D: usize>(t: Tensor<Cuda, D>) -> Cube {
    into_contiguous(t.into_primitive().tensor())
}

fn tensor<const D: usize>(t: Cube) -> Tensor<Cuda, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn empty_like(like: &Cube) -> Cube {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(like.meta.shape().to_vec()),
        like.dtype,
    )
}

/// Blocks for a grid-stride loop over `n` elements (enough to fill the GPU many times over).
fn grid_for(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32, 1, 1)
}

/// Values per thread in the kernels' 16-byte path (8 bf16 or 4 f32): their grid-stride loops
/// need `n / width` threads (the per-value fallback covers `n` with the same grid).
fn per_thread(like: &Cube) -> usize {
    16 / like.dtype.size().max(1)
}

/// Blocks for one warp per row.
fn grid_for_rows(rows: usize) -> (u32, u32, u32) {
    (rows.div_ceil(BLOCK as usize / 32).max(1) as u32, 1, 1)
}

/// Blocks for the RMSNorm kernels over rows of `dim` values like `like`: where a row is one
/// 16-byte vector per lane for a power of two of lanes (head_dim 64 / 128), a warp takes 32 /
/// lanes rows at a time (the kernels stride over the rows, so a grid for fewer rows per warp,
/// as where the pointers turn out unaligned, still covers them).
fn grid_for_norm_rows(rows: usize, dim: usize, like: &Cube) -> (u32, u32, u32) {
    let width = per_thread(like);
    let lanes = dim / width;
    let rows_per_warp = if dim.is_multiple_of(width) && lanes <= 32 && lanes.is_power_of_two() {
        32 / lanes
    } else {
        1
    };
    grid_for_rows(rows.div_ceil(rows_per_warp))
}

/// Whether `tensors` share one kernel dtype and the sizes fit the kernels' 32-bit row counts.
fn applies(tensors: &[&Cube], rows: usize, dim: usize) -> bool {
    let dtype = tensors[0].dtype;
    kernel_dtype(dtype)
        && tensors.iter().all(|t| t.dtype == dtype)
        && rows <= i32::MAX as usize
        && dim <= i32::MAX as usize
        && rows * dim > 0
}

/// Runs the `elementwise.cu` kernel `kernel` (in `tensors[0]`'s dtype) with the device addresses
/// of `tensors` (inputs, then outputs) followed by `sizes`.
fn run(
    kernel: fn(&Kernels) -> &Typed,
    tensors: &[&Cube],
    grid: (u32, u32, u32),
    sizes: &[KernelArg],
) -> Option<()> {
    let dtype = tensors[0].dtype;
    let sizes = sizes.to_vec();
    on_cubecl_stream(tensors, true, move |context, pointers| {
        let function = kernel(context.kernels()?).of(dtype);
        let mut args: Vec<KernelArg> = pointers.iter().map(|&p| KernelArg::Pointer(p)).collect();
        args.extend(sizes);
        context.launch(&function, grid, BLOCK, &args)
    })
}

/// Rows and row length of `x` seen as `[rows, last dim]`.
fn rows_of(x: &Cube) -> Option<(usize, usize)> {
    let dim = *x.meta.shape().last()?;
    Some((x.meta.shape().iter().product::<usize>() / dim.max(1), dim))
}

/// `round(x / rms(x)) * weight` over the last axis; `weight` in `x`'s dtype.
pub fn rms_norm<const D: usize>(
    x: Tensor<Cuda, D>,
    weight: Tensor<Cuda, 1>,
    eps: f64,
) -> Option<Tensor<Cuda, D>> {
    let (x, weight) = (contiguous(x), contiguous(weight));
    let (rows, dim) = rows_of(&x)?;
    if !applies(&[&x, &weight], rows, dim) || weight.meta.shape()[0] != dim {
        return None;
    }
    let out = empty_like(&x);
    run(
        |k| &k.rms_norm_rows,
        &[&x, &weight, &out],
        grid_for_norm_rows(rows, dim, &x),
        &[
            KernelArg::Int(rows as i32),
            KernelArg::Int(dim as i32),
            KernelArg::Float(eps as f32),
        ],
    )?;
    Some(tensor(out))
}

/// The input gradient of [`rms_norm`].
pub fn rms_norm_input_grad<const D: usize>(
    x: Tensor<Cuda, D>,
    weight: Tensor<Cuda, 1>,
    eps: f64,
    grad: Tensor<Cuda, D>,
) -> Option<Tensor<Cuda, D>> {
    let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
    let (rows, dim) = rows_of(&x)?;
    if !applies(&[&x, &weight, &grad], rows, dim) || grad.meta.shape() != x.meta.shape() {
        return None;
    }
    let dx = empty_like(&x);
    run(
        |k| &k.rms_norm_grad_rows,
        &[&x, &weight, &grad, &dx],
        grid_for_norm_rows(rows, dim, &x),
        &[
            KernelArg::Int(rows as i32),
            KernelArg::Int(dim as i32),
            KernelArg::Float(eps as f32),
        ],
    )?;
    Some(tensor(dx))
}

/// Contiguous copies of `tensors` when they share one shape and kernel dtype, and their size.
fn same_shape<const N: usize>(tensors: [Cube; N]) -> Option<([Cube; N], usize)> {
    let tensors = tensors.map(into_contiguous);
    let n = tensors[0].meta.shape().iter().product::<usize>();
    let refs: Vec<&Cube> = tensors.iter().collect();
    let shapes_match = tensors
        .iter()
        .all(|t| t.meta.shape() == tensors[0].meta.shape());
    (shapes_match && applies(&refs, 1, n)).then_some((tensors, n))
}

/// `round(silu(gate)) * up`.
pub fn swiglu<const D: usize>(
    gate: Tensor<Cuda, D>,
    up: Tensor<Cuda, D>,
) -> Option<Tensor<Cuda, D>> {
    let ([gate, up], n) = same_shape([gate, up].map(|t| t.into_primitive().tensor()))?;
    let out = empty_like(&gate);
    run(
        |k| &k.swiglu,
        &[&gate, &up, &out],
        grid_for(n.div_ceil(per_thread(&gate))),
        &[KernelArg::Long(n as i64)],
    )?;
    Some(tensor(out))
}

/// The gradients of [`swiglu`] with respect to `gate` and `up`.
pub fn swiglu_grads<const D: usize>(
    gate: Tensor<Cuda, D>,
    up: Tensor<Cuda, D>,
    grad: Tensor<Cuda, D>,
) -> Option<(Tensor<Cuda, D>, Tensor<Cuda, D>)> {
    let ([gate, up, grad], n) = same_shape([gate, up, grad].map(|t| t.into_primitive().tensor()))?;
    let (d_gate, d_up) = (empty_like(&gate), empty_like(&gate));
    run(
        |k| &k.swiglu_grads,
        &[&gate, &up, &grad, &d_gate, &d_up],
        grid_for(n.div_ceil(per_thread(&gate))),
        &[KernelArg::Long(n as i64)],
    )?;
    Some((tensor(d_gate), tensor(d_up)))
}

/// RoPE of `x` `[batch, heads, seq, dim]` read in place through its strides (the decoder passes a
/// transposed view), written contiguous; `cos`, `sin` `[seq, dim]` are used in f32.
pub fn rope(
    x: Tensor<Cuda, 4>,
    cos: Tensor<Cuda, 2>,
    sin: Tensor<Cuda, 2>,
    inverse: bool,
) -> Option<Tensor<Cuda, 4>> {
    let table = |t: Tensor<Cuda, 2>| contiguous(t.cast(FloatDType::F32));
    let (cos, sin) = (table(cos), table(sin));
    let x: Cube = x.into_primitive().tensor();
    let [batch, heads, seq, dim] = <[usize; 4]>::try_from(x.meta.shape().to_vec()).ok()?;
    let n = batch * heads * seq * dim;
    if !applies(&[&x], 1, n)
        || dim % 2 != 0
        || cos.meta.shape().to_vec() != [seq, dim]
        || sin.meta.shape().to_vec() != [seq, dim]
        || cos.dtype != DType::F32
    {
        return None;
    }
    let strides: Vec<i64> = x.meta.strides().iter().map(|&s| s as i64).collect();
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::from(vec![batch, heads, seq, dim]),
        x.dtype,
    );
    run(
        |k| &k.rope,
        &[&x, &out, &cos, &sin],
        // Each thread rotates a value and its partner in the 16-byte path.
        grid_for(n.div_ceil(2 * per_thread(&x))),
        &[
            KernelArg::Int(heads as i32),
            KernelArg::Int(seq as i32),
            KernelArg::Int(dim as i32),
            KernelArg::Long(strides[0]),
            KernelArg::Long(strides[1]),
            KernelArg::Long(strides[2]),
            KernelArg::Long(strides[3]),
            KernelArg::Long(n as i64),
            KernelArg::Float(if inverse { -1.0 } else { 1.0 }),
        ],
    )?;
    Some(tensor(out))
}

/// The attention backward's row term `delta = Σ_d grad · out` in f32, `[batch, heads, seq, 1]`,
/// from `grad` and `out` `[batch, heads, seq, dim]` read through their strides (each row's `dim`
/// values contiguous; other layouts are copied first).
pub fn attention_delta(grad: Tensor<Cuda, 4>, out: Tensor<Cuda, 4>) -> Option<Tensor<Cuda, 4>> {
    let rows_contiguous = |t: Tensor<Cuda, 4>| -> Cube {
        let t: Cube = t.into_primitive().tensor();
        match t.meta.strides()[3] {
            1 => t,
            _ => into_contiguous(t),
        }
    };
    let (grad, out) = (rows_contiguous(grad), rows_contiguous(out));
    let [batch, heads, seq, dim] = <[usize; 4]>::try_from(grad.meta.shape().to_vec()).ok()?;
    let rows = batch * heads * seq;
    if !applies(&[&grad, &out], rows, dim) || out.meta.shape() != grad.meta.shape() {
        return None;
    }
    let stride = |t: &Cube, axis: usize| KernelArg::Long(t.meta.strides()[axis] as i64);
    let delta = empty_device_contiguous_dtype(
        grad.client.clone(),
        grad.device.clone(),
        Shape::from(vec![batch, heads, seq, 1]),
        DType::F32,
    );
    run(
        |k| &k.attention_delta_rows,
        &[&grad, &out, &delta],
        grid_for_rows(rows),
        &[
            KernelArg::Int(heads as i32),
            KernelArg::Int(seq as i32),
            KernelArg::Int(dim as i32),
            stride(&grad, 0),
            stride(&grad, 1),
            stride(&grad, 2),
            stride(&out, 0),
            stride(&out, 1),
            stride(&out, 2),
            KernelArg::Long(rows as i64),
        ],
    )?;
    Some(tensor(delta))
}

/// Logits `[batch, seq, vocab]` pairs for the KL kernels: contiguous, one kernel dtype, same shape.
fn kl_operands(student: Tensor<Cuda, 3>, teacher: Tensor<Cuda, 3>) -> Option<(Cube, Cube, usize)> {
    let (student, teacher) = (contiguous(student), contiguous(teacher));
    let (rows, vocab) = rows_of(&student)?;
    (applies(&[&student, &teacher], rows, vocab) && student.meta.shape() == teacher.meta.shape())
        .then_some((student, teacher, vocab))
}

/// f32 `[batch, seq]` for the rows of `like` `[batch, seq, vocab]`.
fn empty_rows(like: &Cube) -> Cube {
    let shape = like.meta.shape();
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(vec![shape[0], shape[1]]),
        DType::F32,
    )
}

/// KL(softmax(student) ‖ softmax(teacher)) per token, in f32: one block per token.
pub fn token_kl(student: Tensor<Cuda, 3>, teacher: Tensor<Cuda, 3>) -> Option<Tensor<Cuda, 2>> {
    let (student, teacher, vocab) = kl_operands(student, teacher)?;
    let kl = empty_rows(&student);
    let rows = kl.meta.shape().iter().product::<usize>();
    run(
        |k| &k.kl_rows,
        &[&student, &teacher, &kl],
        (rows as u32, 1, 1),
        &[KernelArg::Int(vocab as i32)],
    )?;
    Some(tensor(kl))
}

/// The student gradient of [`token_kl`] for the per-token gradient `grad` (f32 `[batch, seq]`).
pub fn token_kl_student_grad(
    student: Tensor<Cuda, 3>,
    teacher: Tensor<Cuda, 3>,
    grad: Tensor<Cuda, 2>,
) -> Option<Tensor<Cuda, 3>> {
    let (student, teacher, vocab) = kl_operands(student, teacher)?;
    let grad = contiguous(grad.cast(FloatDType::F32));
    let rows = grad.meta.shape().iter().product::<usize>();
    if grad.meta.shape().to_vec() != student.meta.shape()[..2] {
        return None;
    }
    let d_student = empty_like(&student);
    run(
        |k| &k.kl_student_grad_rows,
        &[&student, &teacher, &grad, &d_student],
        (rows as u32, 1, 1),
        &[KernelArg::Int(vocab as i32)],
    )?;
    Some(tensor(d_student))
}
