//! Distillation and compression losses (spec §3.1-3.2).

use crate::ops::elementwise::ElementwiseBackend;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation};

/// KL(student ‖ teacher) at temperature 1 for every token, over the full vocabulary, in f32:
/// `Σ_v p_s (log p_s - log p_t)`. (The official code labels this "forward KL"; the formula is
/// what is replicated.) One backend operation ([`ElementwiseBackend::token_kl`]): a fused kernel
/// on CUDA, and under autodiff a node that keeps only the two logits tensors.
///
/// # Shapes
/// - `student`, `teacher`: `[batch, seq, vocab]` → `[batch, seq]`
pub fn token_kl<B: ElementwiseBackend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
) -> Tensor<B, 2> {
    crate::ops::elementwise::token_kl(student, teacher)
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
pub fn distillation_loss<B: ElementwiseBackend>(
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

/// [`distillation_loss`] for training, back-propagated one chunk at a time so that only one
/// chunk's `batch x chunk x vocab` logits (and, with burn's formula, their softmax intermediates)
/// ever exist: at 32K tokens and a 152K vocabulary the whole-sequence graph would hold ~20 GB per
/// f32 copy.
///
/// Each chunk's logits are computed from a detached slice of the student's hidden states and
/// differentiated at once; `chunk_grads` receives each chunk's gradients (the final norm and LM
/// head, when they train). Returns the loss value (detached) and its gradient with respect to
/// `student_hidden`, both multiplied by `scale`; the caller continues the backward through the
/// model with `(student_hidden * grad).sum()`.
///
/// # Shapes
/// - as [`distillation_loss`]; the gradient is `[batch, seq, hidden]`
pub fn distillation_loss_chunked_backward<B: AutodiffBackend + ElementwiseBackend>(
    student_hidden: &Tensor<B, 3>,
    teacher_hidden: Tensor<B, 3>,
    logits: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    mask: Tensor<B, 2>,
    chunk: usize,
    scale: f64,
    chunk_grads: &mut dyn FnMut(B::Gradients),
) -> (Tensor<B, 1>, Tensor<B, 3>) {
    let [_, seq, _] = student_hidden.dims();
    let chunk = chunk.max(1);
    let mask = mask.cast(FloatDType::F32).detach();
    let count = mask.clone().sum().clamp_min(1.0);
    let mut total: Option<Tensor<B, 1>> = None;
    let mut grads = Vec::new();
    for start in (0..seq).step_by(chunk) {
        let len = chunk.min(seq - start);
        let hidden =
            Tensor::<B, 3>::from_inner(student_hidden.clone().narrow(1, start, len).inner())
                .require_grad();
        let student = logits(hidden.clone());
        let teacher = logits(teacher_hidden.clone().narrow(1, start, len)).detach();
        let kl = (token_kl(student, teacher) * mask.clone().narrow(1, start, len)).sum()
            / count.clone()
            * scale;
        let chunk_graph = kl.backward();
        grads.push(
            hidden
                .grad(&chunk_graph)
                .expect("the chunk's hidden states are part of its graph"),
        );
        chunk_grads(chunk_graph);
        let kl = kl.detach();
        total = Some(match total {
            Some(t) => t + kl,
            None => kl,
        });
    }
    let grad = Tensor::from_inner(Tensor::cat(grads, 1));
    (total.expect("seq > 0"), grad)
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

/// Which compression loss pulls the decisions towards the scheduled fraction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionLoss {
    /// The official one-sided hinge ([`compression_loss`]): compressing more than scheduled is
    /// free, so a run may overshoot its target CR.
    #[default]
    Hinge,
    /// `mean_b |target - frac_closed[b]|`: also pulls back decisions that overshoot, so the run
    /// ends at its scheduled CR (not in the official recipe).
    TwoSided,
}

impl CompressionLoss {
    pub fn loss<B: Backend>(self, frac_closed: Tensor<B, 1>, target: f64) -> Tensor<B, 1> {
        match self {
            CompressionLoss::Hinge => compression_loss(frac_closed, target),
            CompressionLoss::TwoSided => (frac_closed.cast(FloatDType::F32).neg() + target)
                .abs()
                .mean(),
        }
    }
}

/// Token ids as an Int tensor.
pub fn ids_tensor<B: Backend>(
    ids: &[i64],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    /// Back-propagating the KL chunk by chunk gives the whole-graph loss and the same gradients,
    /// for the hidden states and for a parameter inside `logits` (the head), at every chunk size.
    #[test]
    fn chunked_backward_matches_the_whole_graph() {
        let device = Default::default();
        let (batch, seq, hidden, vocab) = (2, 7, 5, 11);
        let student =
            Tensor::<Cpu, 3>::random([batch, seq, hidden], Distribution::Default, &device);
        let teacher =
            Tensor::<Cpu, 3>::random([batch, seq, hidden], Distribution::Default, &device);
        let head =
            Tensor::<Cpu, 2>::random([hidden, vocab], Distribution::Normal(0.0, 2.0), &device);
        let mask_values: Vec<f32> = (0..batch * seq)
            .map(|i| (i % 4 != 0) as u8 as f32)
            .collect();
        let mask = Tensor::<Cpu, 2>::from_data(TensorData::new(mask_values, [batch, seq]), &device);
        let values = |t: Tensor<Cpu, 3>| t.into_data().to_vec::<f32>().unwrap();

        let w = Tensor::<CpuAutodiff, 2>::from_inner(head.clone()).require_grad();
        let h = Tensor::<CpuAutodiff, 3>::from_inner(student.clone()).require_grad();
        let logits = |x: Tensor<CpuAutodiff, 3>| x.matmul(w.clone().unsqueeze());
        let whole = distillation_loss(
            h.clone(),
            Tensor::from_inner(teacher.clone()),
            &logits,
            Tensor::from_inner(mask.clone()),
            3,
        ) * 0.5;
        let grads = whole.backward();
        let want_loss = whole.into_scalar();
        let want_h = values(h.grad(&grads).unwrap());
        let want_w = w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();

        for chunk in [1, 3, seq] {
            let w = Tensor::<CpuAutodiff, 2>::from_inner(head.clone()).require_grad();
            let h = Tensor::<CpuAutodiff, 3>::from_inner(student.clone()).require_grad();
            let logits = |x: Tensor<CpuAutodiff, 3>| x.matmul(w.clone().unsqueeze());
            let mut grad_w = Tensor::<Cpu, 2>::zeros([hidden, vocab], &device);
            let (loss, grad_h) = distillation_loss_chunked_backward(
                &h,
                Tensor::from_inner(teacher.clone()),
                &logits,
                Tensor::from_inner(mask.clone()),
                chunk,
                0.5,
                &mut |g| grad_w = grad_w.clone() + w.grad(&g).unwrap(),
            );
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (g, e) in got.iter().zip(want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{what} chunk {chunk}: {g} vs {e}"
                    );
                }
            };
            close(&[loss.into_scalar()], &[want_loss], "loss");
            close(&values(grad_h.inner()), &want_h, "d hidden");
            close(
                &grad_w.into_data().to_vec::<f32>().unwrap(),
                &want_w,
                "d head",
            );
        }
    }

    /// The two-sided loss equals the hinge below the target and pulls an overshoot back (its
    /// gradient on the closed fraction is +1/B above the target, -1/B below).
    #[test]
    fn two_sided_loss_pulls_back_overshoot() {
        let device = Default::default();
        let frac = Tensor::<CpuAutodiff, 1>::from_floats([0.5, 0.9], &device).require_grad();
        let target = 0.75;
        let hinge = CompressionLoss::Hinge.loss(frac.clone(), target);
        let two = CompressionLoss::TwoSided.loss(frac.clone(), target);
        assert!((hinge.clone().into_scalar() - 0.125).abs() < 1e-6);
        assert!((two.clone().into_scalar() - 0.2).abs() < 1e-6);
        let grads = two.backward();
        let g: Vec<f32> = frac.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(g, vec![-0.5, 0.5]);
        let grads = hinge.backward();
        let g: Vec<f32> = frac.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(g, vec![-0.5, 0.0]);
    }
}
