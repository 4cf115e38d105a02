//! One `eval` measurement: the original model, the DMS model under the exact inference mask and
//! the training-free baselines on the same sequences, as rows of perplexity, KL to the original
//! and measured compression ratio.

use std::path::PathBuf;

use serde::Serialize;

use super::quality::{Totals, score, score_baseline, score_dms, teacher_logits};
use super::{Budget, Decoding, Policy};
use crate::data::Sequence;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::ModelConfig;
use crate::model::attention::AttentionBackend;

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
    /// Measured CR per layer (rows) and KV head (columns), DMS only.
    pub cr_per_layer_head: Option<Vec<Vec<f64>>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
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

/// Scores `sequences` (all `seq_len` tokens long): the original model, DMS when `dms` is given,
/// and unless `baselines` is `None`, StreamingLLM, TOVA and H2O decoding the original model at the
/// compression ratio it names.
pub fn evaluate_length<B: AttentionBackend>(
    model: &DmsModel<B>,
    cfg: &ModelConfig,
    dms: Option<&DmsConfig>,
    seq_len: usize,
    sequences: &[Sequence],
    eos: u32,
    baselines: Baselines,
) -> LengthReport {
    // Baselines run on the original model: the same weights with eviction off.
    let dms_for_teacher = dms.cloned().unwrap_or_default();
    let plain = Decoding::new(model, cfg, None);
    let mut original = Totals::default();
    let mut dms_totals = Totals::default();
    let mut retained_sum: Vec<Vec<f64>> = Vec::new();
    let mut teachers = Vec::new();
    for seq in sequences {
        let teacher = teacher_logits(model, cfg, &dms_for_teacher, seq);
        original.add(&score(teacher.clone(), teacher.clone(), seq, &[eos]));
        if let Some(dms) = dms {
            let (totals, retained) = score_dms(model, cfg, dms, seq, teacher.clone(), &[eos]);
            dms_totals.add(&totals);
            if retained_sum.is_empty() {
                retained_sum = retained.iter().map(|l| vec![0.0; l.len()]).collect();
            }
            for (sum, layer) in retained_sum.iter_mut().zip(&retained) {
                for (s, r) in sum.iter_mut().zip(layer) {
                    *s += r;
                }
            }
        }
        // Kept only for the baselines, which are scored against the same teacher.
        if baselines != Baselines::None {
            teachers.push(teacher);
        }
    }
    let n = sequences.len() as f64;
    let mut rows = vec![row("original (dense)", &original, 1.0)];
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
    if dms.is_some() {
        rows.push(row("DMS", &dms_totals, dms_cr));
    }
    let budget_cr = match baselines {
        Baselines::None => None,
        Baselines::AtDmsCr => Some(dms_cr),
        Baselines::AtCr(cr) => Some(cr),
    };
    if let Some(cr) = budget_cr {
        let budget = Budget {
            compression_ratio: cr,
        };
        for (name, policy) in [
            ("StreamingLLM", Policy::StreamingLlm { sinks: 4 }),
            ("TOVA", Policy::Tova),
            ("H2O", Policy::H2o),
        ] {
            let mut totals = Totals::default();
            let mut crs = 0.0;
            for (seq, teacher) in sequences.iter().zip(&teachers) {
                let (t, measured) =
                    score_baseline(&plain, policy, budget, seq, teacher.clone(), &[eos]);
                totals.add(&t);
                crs += measured;
            }
            rows.push(row(name, &totals, crs / n));
        }
    }
    LengthReport {
        seq_len,
        sequences: sequences.len(),
        rows,
        cr_per_layer_head: per_head,
    }
}
