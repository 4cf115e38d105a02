//! Quality on held-out text: perplexity and KL to the original model, scored from final hidden
//! states a chunk of positions at a time (so `[batch, chunk, vocab]` logits exist at once, never
//! `[batch, seq, vocab]`), for a batch of equally long sequences at once.

use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation};
use serde::Serialize;

use crate::data::Sequence;
use crate::dms::losses::{loss_mask, token_kl};
use crate::dms::mask::{inference_key_decisions, retained_fraction};
use crate::dms::{DmsModel, Mode};
use crate::ops::attention::AttentionBackend;

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

/// Logit rows (batch x positions) scored at once: bounds the `[rows, vocab]` f32 temporaries
/// (~1.2 GB per tensor at a 152K vocabulary).
pub const SCORE_ROWS: usize = 2048;

/// A batch of equally long sequences on the device.
pub struct Batch<'a, B: AttentionBackend> {
    pub sequences: &'a [Sequence],
    /// `[batch, seq]`
    pub ids: Tensor<B, 2, Int>,
}

impl<'a, B: AttentionBackend> Batch<'a, B> {
    pub fn new(sequences: &'a [Sequence], device: &B::Device) -> Self {
        let len = sequences[0].input_ids.len();
        assert!(
            sequences.iter().all(|s| s.input_ids.len() == len),
            "a batch holds sequences of one length"
        );
        let ids: Vec<i64> = sequences
            .iter()
            .flat_map(|s| s.input_ids.iter().copied())
            .collect();
        Self {
            sequences,
            ids: Tensor::from_data(TensorData::new(ids, [sequences.len(), len]), device),
        }
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.sequences[0].input_ids.len()
    }

    /// Next-token targets `[batch, seq - 1, 1]` and their weights (attention mask of the target)
    /// `[batch, seq - 1]`, for positions `start .. start + rows` of the predictions.
    fn targets(
        &self,
        start: usize,
        rows: usize,
        device: &B::Device,
    ) -> (Tensor<B, 3, Int>, Tensor<B, 2>) {
        let batch = self.len();
        let mut ids = Vec::with_capacity(batch * rows);
        let mut weights = Vec::with_capacity(batch * rows);
        for s in self.sequences {
            ids.extend_from_slice(&s.input_ids[start + 1..start + 1 + rows]);
            weights.extend(
                s.attention_mask[start + 1..start + 1 + rows]
                    .iter()
                    .map(|&m| m as f32),
            );
        }
        (
            Tensor::from_data(TensorData::new(ids, [batch, rows, 1]), device),
            // Explicitly f32: on a bf16 device the data's dtype is not what the ops assume.
            Tensor::<B, 2>::from_data(TensorData::new(weights, [batch, rows]), device)
                .cast(FloatDType::F32),
        )
    }

    /// The distillation loss mask (attention mask 1, not EOS) for positions `start .. start + rows`.
    fn kl_mask(&self, start: usize, rows: usize, eos: &[u32], device: &B::Device) -> Tensor<B, 2> {
        let mut ids = Vec::with_capacity(self.len() * rows);
        let mut attention = Vec::with_capacity(self.len() * rows);
        for s in self.sequences {
            ids.extend_from_slice(&s.input_ids[start..start + rows]);
            attention.extend_from_slice(&s.attention_mask[start..start + rows]);
        }
        loss_mask::<B>(&ids, &attention, [self.len(), rows], eos, device)
    }
}

/// Scores `hidden` (final hidden states before the norm, `[batch, seq, hidden]`) against the
/// batch's next tokens, and against `teacher_hidden` by KL(original || model) on the loss mask.
/// `teacher_hidden = None` scores the original model itself (KL 0, logits computed once).
pub fn score_hidden<B: AttentionBackend>(
    model: &DmsModel<B>,
    batch: &Batch<B>,
    hidden: Tensor<B, 3>,
    teacher_hidden: Option<&Tensor<B, 3>>,
    eos: &[u32],
) -> Totals {
    let device = hidden.device();
    let [size, len, _] = hidden.dims();
    let chunk = (SCORE_ROWS / size).max(1);
    let zero = || Tensor::<B, 1>::zeros([1], &device).cast(FloatDType::F32);
    let (mut nll, mut predicted, mut kl, mut kl_tokens) = (zero(), zero(), zero(), zero());
    let mut start = 0;
    while start < len {
        let rows = chunk.min(len - start);
        let logits = model.logits(hidden.clone().narrow(1, start, rows));
        // Predictions exist for positions with a next token.
        let scored = rows.min(len - 1 - start.min(len - 1));
        if scored > 0 {
            let log_probs = activation::log_softmax(
                logits.clone().narrow(1, 0, scored).cast(FloatDType::F32),
                2,
            );
            let (targets, weights) = batch.targets(start, scored, &device);
            let picked = log_probs.gather(2, targets).reshape([size, scored]);
            nll = nll - (picked * weights.clone()).sum();
            predicted = predicted + weights.sum();
        }
        if let Some(teacher) = teacher_hidden {
            let teacher_logits = model.logits(teacher.clone().narrow(1, start, rows));
            let mask = batch
                .kl_mask(start, rows, eos, &device)
                .cast(FloatDType::F32);
            kl = kl + (token_kl(logits, teacher_logits).cast(FloatDType::F32) * mask.clone()).sum();
            kl_tokens = kl_tokens + mask.sum();
        }
        start += rows;
    }
    // One read-back for the whole batch.
    let values = Tensor::cat(vec![nll, predicted, kl, kl_tokens], 0)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("f64");
    Totals {
        nll: values[0],
        predicted: values[1],
        kl: values[2],
        kl_tokens: values[3],
    }
}

/// The original model's final hidden states, `[batch, seq, hidden]`.
pub fn original_hidden<B: AttentionBackend>(model: &DmsModel<B>, batch: &Batch<B>) -> Tensor<B, 3> {
    model.forward(batch.ids.clone(), &Mode::Original).hidden
}

/// The DMS model under the exact inference mask: its final hidden states and the retained
/// fraction per (sequence, layer, KV head) at the last position, summed over the batch
/// (`[layers][kv_heads]`).
pub fn dms_hidden<B: AttentionBackend>(
    model: &DmsModel<B>,
    batch: &Batch<B>,
) -> (Tensor<B, 3>, Vec<Vec<f64>>) {
    let dms = &model.dms;
    let out = model.forward(batch.ids.clone(), &Mode::Inference);
    let retained = out
        .layers
        .into_iter()
        .map(|layer| {
            let per_sequence =
                retained_fraction(inference_key_decisions(layer.logits), dms.window).sum_dim(0);
            per_sequence
                .into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .expect("f64")
        })
        .collect();
    (out.hidden, retained)
}
