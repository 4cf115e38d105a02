//! One `eval` measurement: the original model, the DMS model under the exact inference mask and
//! the training-free baselines on the same sequences, as rows of perplexity, KL to the original
//! and measured compression ratio.

use std::path::PathBuf;

use serde::Serialize;

use super::Budget;
use super::baselines::{Baseline, run_baseline};
use super::quality::{Batch, Totals, dms_hidden, original_hidden, score_hidden};
use crate::data::Sequence;
use crate::dms::{DmsConfig, DmsModel};
use crate::ops::attention::AttentionBackend;

#[derive(Clone, Debug, Serialize)]
pub struct MethodRow {
    pub method: String,
    pub perplexity: f64,
    pub kl_to_original: f64,
    pub compression_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LengthReport {
    pub seq_len: usize,
    pub sequences: usize,
    pub rows: Vec<MethodRow>,
    /// Positions per eviction decision of the baselines (1 = exact per-token eviction); absent
    /// without baselines.
    pub baseline_chunk: Option<usize>,
    /// Measured CR per layer (rows) and KV head (columns), DMS only.
    pub cr_per_layer_head: Option<Vec<Vec<f64>>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    /// What the original rows, the baselines and the KL ran on.
    pub original: String,
    pub data: Vec<PathBuf>,
    pub dms: Option<DmsConfig>,
    pub lengths: Vec<LengthReport>,
}

fn row(method: &str, totals: &Totals, cr: f64) -> MethodRow {
    MethodRow {
        method: method.to_string(),
        perplexity: totals.perplexity(),
        kl_to_original: totals.mean_kl(),
        compression_ratio: cr,
    }
}

/// Which training-free baselines a measurement includes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Baselines {
    None,
    /// At the DMS model's measured compression ratio (needs a DMS model).
    AtDmsCr,
    /// At this compression ratio (a model without DMS).
    AtCr(f64),
}

/// How one length is measured.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Sequences per forward pass.
    pub batch: usize,
    pub baselines: Baselines,
    /// Positions per eviction decision of the baselines (1 = per token, exact); 0 picks 1/16
    /// of the budget at the sequence's end.
    pub baseline_chunk: usize,
}

/// The default chunk: a chunk adds at most 1/16 of the final budget to what a query sees.
pub fn auto_chunk(seq_len: usize, budget: Budget) -> usize {
    (budget.at(seq_len) / 16).max(1)
}

/// What one measurement runs: the model under test and what it is compared with.
pub struct Models<'a, B: AttentionBackend> {
    pub model: &'a DmsModel<B>,
    /// The original model when it is not `model` with eviction off (training changed weights).
    pub original: Option<&'a DmsModel<B>>,
    /// Whether `model` evicts (a DMS model, with its own settings); false for a dense model
    /// (baselines only).
    pub evict: bool,
}

/// Scores `sequences` (all `seq_len` tokens long) `settings.batch` at a time: the original model
/// (`original`, else `model` with eviction off), `model` under DMS when it evicts (exact
/// inference mask), and unless the baselines are `None`, every [`Baseline`] decoding the original
/// model at the compression ratio they name.
pub fn evaluate_length<B: AttentionBackend>(
    models: Models<'_, B>,
    seq_len: usize,
    sequences: &[Sequence],
    eos: u32,
    settings: Settings,
) -> LengthReport {
    let Models {
        model,
        original,
        evict,
    } = models;
    let device = model.base.embed_tokens.val().device();
    let reference = original.unwrap_or(model);
    let eos = [eos];
    let mut original_totals = Totals::default();
    let mut dms_totals = Totals::default();
    let mut retained_sum: Vec<Vec<f64>> = Vec::new();
    // The original model's hidden states per batch, kept for the baselines' KL.
    let mut teachers = Vec::new();
    let batches: Vec<&[Sequence]> = sequences.chunks(settings.batch.max(1)).collect();
    let started = std::time::Instant::now();
    for seqs in &batches {
        let batch = Batch::new(seqs, &device);
        let teacher = original_hidden(reference, &batch);
        original_totals.add(&score_hidden(
            reference,
            &batch,
            teacher.clone(),
            None,
            &eos,
        ));
        if evict {
            let (hidden, retained) = dms_hidden(model, &batch);
            dms_totals.add(&score_hidden(model, &batch, hidden, Some(&teacher), &eos));
            if retained_sum.is_empty() {
                retained_sum = retained.iter().map(|l| vec![0.0; l.len()]).collect();
            }
            for (sum, layer) in retained_sum.iter_mut().zip(&retained) {
                for (s, r) in sum.iter_mut().zip(layer) {
                    *s += r;
                }
            }
        }
        if settings.baselines != Baselines::None {
            teachers.push(teacher);
        }
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "original and DMS scored"
    );
    let n = sequences.len() as f64;
    let mut rows = vec![row("original (dense)", &original_totals, 1.0)];
    let per_head: Option<Vec<Vec<f64>>> = (!retained_sum.is_empty()).then(|| {
        retained_sum
            .iter()
            .map(|layer| layer.iter().map(|s| n / s.max(f64::MIN_POSITIVE)).collect())
            .collect()
    });
    let dms_cr = retained_sum.iter().flatten().count() as f64 * n
        / retained_sum
            .iter()
            .flatten()
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
    if evict {
        rows.push(row("DMS", &dms_totals, dms_cr));
    }
    let budget_cr = match settings.baselines {
        Baselines::None => None,
        Baselines::AtDmsCr => Some(dms_cr),
        Baselines::AtCr(cr) => Some(cr),
    };
    let mut baseline_chunk = None;
    if let Some(cr) = budget_cr {
        let budget = Budget {
            compression_ratio: cr,
        };
        let chunk = match settings.baseline_chunk {
            0 => auto_chunk(seq_len, budget),
            chunk => chunk,
        };
        baseline_chunk = Some(chunk);
        tracing::info!(chunk, budget_cr = cr, "baselines decide once per chunk");
        for baseline in Baseline::ALL {
            let started = std::time::Instant::now();
            let mut totals = Totals::default();
            let mut crs = 0.0;
            for (seqs, teacher) in batches.iter().zip(&teachers) {
                let batch = Batch::new(seqs, &device);
                let run = run_baseline(reference, &batch, baseline, budget, chunk);
                totals.add(&score_hidden(
                    reference,
                    &batch,
                    run.hidden,
                    Some(teacher),
                    &eos,
                ));
                crs += run.compression_ratio * seqs.len() as f64;
            }
            tracing::info!(
                baseline = baseline.name(),
                seconds = started.elapsed().as_secs_f64(),
                "baseline scored"
            );
            rows.push(row(baseline.name(), &totals, crs / n));
        }
    }
    LengthReport {
        seq_len,
        sequences: sequences.len(),
        rows,
        baseline_chunk,
        cr_per_layer_head: per_head,
    }
}
