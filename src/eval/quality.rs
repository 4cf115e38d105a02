//! Quality and memory on held-out text: perplexity, KL to the original model, measured CR per
//! layer and KV head, for the DMS model (teacher-forced, exact inference mask) and for
//! training-free baselines evicting to the same budget (decoded token by token).

use burn::tensor::{Int, Tensor, TensorData, activation, backend::Backend};
use serde::Serialize;

use super::cache::{Budget, Policy};
use super::decode::Decoding;
use crate::data::Sequence;
use crate::dms::losses::{loss_mask, token_kl};
use crate::dms::mask::{inference_key_decisions, retained_fraction};
use crate::dms::{DmsConfig, DmsModel, Mode};
use crate::model::ModelConfig;
use crate::model::attention::AttentionBackend;

/// Sums over tokens, so several sequences combine exactly.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub nll: f64,
    pub predicted: f64,
    pub kl: f64,
    pub kl_tokens: f64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.nll += other.nll;
        self.predicted += other.predicted;
        self.kl += other.kl;
        self.kl_tokens += other.kl_tokens;
    }

    pub fn perplexity(&self) -> f64 {
        (self.nll / self.predicted.max(1.0)).exp()
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl / self.kl_tokens.max(1.0)
    }
}

fn input<B: Backend>(seq: &Sequence, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(seq.input_ids.clone(), [1, seq.input_ids.len()]),
        device,
    )
}

/// NLL of next-token prediction (targets with attention mask 1) and KL to `teacher` on the
/// training loss mask.
///
/// # Shapes
/// - `logits`, `teacher`: `[1, seq, vocab]`
pub fn score<B: crate::model::elementwise::ElementwiseBackend>(
    logits: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    seq: &Sequence,
    eos: &[u32],
) -> Totals {
    let device = logits.device();
    let [_, len, vocab] = logits.dims();
    let mut totals = Totals::default();
    if len >= 2 {
        let log_probs = activation::log_softmax(logits.clone().narrow(1, 0, len - 1), 2);
        let targets: Vec<i64> = seq.input_ids[1..].to_vec();
        let index =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, len - 1, 1]), &device);
        let picked = log_probs.gather(2, index).reshape([len - 1]);
        let weights: Vec<f32> = seq.attention_mask[1..].iter().map(|&m| m as f32).collect();
        let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [len - 1]), &device);
        totals.nll = -(picked * weights.clone()).sum().into_scalar().elem::<f64>();
        totals.predicted = weights.sum().into_scalar().elem::<f64>();
    }
    let mask = loss_mask::<B>(&seq.input_ids, &seq.attention_mask, [1, len], eos, &device)
        .cast(burn::tensor::FloatDType::F32);
    totals.kl = (token_kl(logits, teacher) * mask.clone())
        .sum()
        .into_scalar()
        .elem::<f64>();
    totals.kl_tokens = mask.sum().into_scalar().elem::<f64>();
    let _ = vocab;
    totals
}

use burn::tensor::ElementConversion;

/// The original model's logits `[1, seq, vocab]`.
pub fn teacher_logits<B: AttentionBackend>(
    model: &DmsModel<B>,
    cfg: &ModelConfig,
    dms: &DmsConfig,
    seq: &Sequence,
) -> Tensor<B, 3> {
    let device = model.base.embed_tokens.val().device();
    model.logits(
        model
            .forward(input::<B>(seq, &device), cfg, dms, &Mode::Original)
            .hidden,
    )
}

/// The DMS model under the exact inference mask: scores and the retained fraction per
/// (layer, KV head) at the last position.
pub fn score_dms<B: AttentionBackend>(
    model: &DmsModel<B>,
    cfg: &ModelConfig,
    dms: &DmsConfig,
    seq: &Sequence,
    teacher: Tensor<B, 3>,
    eos: &[u32],
) -> (Totals, Vec<Vec<f64>>) {
    let device = model.base.embed_tokens.val().device();
    let out = model.forward(input::<B>(seq, &device), cfg, dms, &Mode::Inference);
    let retained = out
        .layers
        .iter()
        .map(|layer| {
            retained_fraction(inference_key_decisions(layer.logits.clone()), dms.window)
                .into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .expect("f64")
        })
        .collect();
    let logits = model.logits(out.hidden);
    (score(logits, teacher, seq, eos), retained)
}

/// The original model decoding token by token with a budgeted eviction policy.
pub fn score_baseline<B: AttentionBackend>(
    decoding: &Decoding<B>,
    policy: Policy,
    budget: Budget,
    seq: &Sequence,
    teacher: Tensor<B, 3>,
    eos: &[u32],
) -> (Totals, f64) {
    let mut cache = decoding.cache(Some(policy), Some(budget));
    let rows: Vec<Tensor<B, 1>> = seq
        .input_ids
        .iter()
        .map(|&id| decoding.step(id as u32, &mut cache))
        .collect();
    let logits = Tensor::stack::<2>(rows, 0).unsqueeze::<3>();
    (score(logits, teacher, seq, eos), cache.compression_ratio())
}
