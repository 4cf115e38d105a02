//! Distillation and compression losses (spec §3.1-3.2).

use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation, backend::Backend};

/// KL(student ‖ teacher) at temperature 1 for every token, over the full vocabulary, in f32:
/// `Σ_v p_s (log p_s - log p_t)`. (The official code labels this "forward KL"; the formula is
/// what is replicated.)
///
/// # Shapes
/// - `student`, `teacher`: `[batch, seq, vocab]` → `[batch, seq]`
pub fn token_kl<B: Backend>(student: Tensor<B, 3>, teacher: Tensor<B, 3>) -> Tensor<B, 2> {
    let log_s = activation::log_softmax(student.cast(FloatDType::F32), 2);
    let log_t = activation::log_softmax(teacher.cast(FloatDType::F32), 2);
    let [batch, seq, _] = log_s.dims();
    (log_s.clone().exp() * (log_s - log_t))
        .sum_dim(2)
        .reshape([batch, seq])
}

/// Which tokens count in the distillation loss: `attention_mask == 1` and not an EOS id.
///
/// # Shapes
/// - `input_ids`, `attention_mask`: `[batch, seq]` (row-major) → `[batch, seq]` of 0/1
pub fn loss_mask<B: Backend>(
    input_ids: &[i64],
    attention_mask: &[i64],
    shape: [usize; 2],
    eos_ids: &[u32],
    device: &B::Device,
) -> Tensor<B, 2> {
    let mask: Vec<f32> = input_ids
        .iter()
        .zip(attention_mask)
        .map(|(&id, &keep)| {
            let eos = eos_ids.iter().any(|&e| e as i64 == id);
            if keep != 0 && !eos { 1.0 } else { 0.0 }
        })
        .collect();
    Tensor::from_data(TensorData::new(mask, shape), device)
}

/// Mean KL over the masked tokens, with logits produced `chunk` positions at a time from the
/// final hidden states, so no more than `batch x chunk x vocab` logits (per model) exist at once
/// in the forward pass.
///
/// # Shapes
/// - `student_hidden`, `teacher_hidden`: `[batch, seq, hidden]`; `mask`: `[batch, seq]` → `[1]`
pub fn distillation_loss<B: Backend>(
    student_hidden: Tensor<B, 3>,
    teacher_hidden: Tensor<B, 3>,
    logits: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    mask: Tensor<B, 2>,
    chunk: usize,
) -> Tensor<B, 1> {
    let [_, seq, _] = student_hidden.dims();
    let chunk = chunk.max(1);
    let mask = mask.cast(FloatDType::F32);
    let count = mask.clone().sum().clamp_min(1.0);
    let mut total: Option<Tensor<B, 1>> = None;
    for start in (0..seq).step_by(chunk) {
        let len = chunk.min(seq - start);
        let student = logits(student_hidden.clone().narrow(1, start, len));
        let teacher = logits(teacher_hidden.clone().narrow(1, start, len)).detach();
        let kl = (token_kl(student, teacher) * mask.clone().narrow(1, start, len)).sum();
        total = Some(match total {
            Some(t) => t + kl,
            None => kl,
        });
    }
    total.expect("seq > 0") / count
}

/// Fraction of closed decisions per sequence: mean over layers, KV heads and positions of the
/// straight-through decisions.
///
/// # Shapes
/// - `decisions`: one `[batch, kv_heads, seq]` per layer → `[batch]`
pub fn frac_closed<B: Backend>(decisions: &[Tensor<B, 3>]) -> Tensor<B, 1> {
    let stacked: Tensor<B, 4> = Tensor::stack(decisions.to_vec(), 0);
    let [layers, batch, heads, seq] = stacked.dims();
    stacked
        .swap_dims(0, 1)
        .reshape([batch, layers * heads * seq])
        .mean_dim(1)
        .reshape([batch])
}

/// One-sided hinge towards the target fraction: `mean_b max(0, target - frac_closed[b])`.
/// Over-compression is not penalised.
pub fn compression_loss<B: Backend>(frac_closed: Tensor<B, 1>, target: f64) -> Tensor<B, 1> {
    activation::relu(frac_closed.cast(FloatDType::F32).neg() + target).mean()
}

/// Token ids as an Int tensor.
pub fn ids_tensor<B: Backend>(
    ids: &[i64],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), shape), device)
}
