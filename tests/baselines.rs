//! The chunked, batched baselines (`eval::baselines`) against the token-by-token cache
//! (`eval::cache`): with one token per chunk they are the same rule, so they give the same logits
//! (f32, 1e-4) and the same held entries; with larger chunks the decisions only move to chunk
//! boundaries, and the budget still holds at every boundary.

mod common;

use burn::tensor::Tensor;
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::data::Sequence;
use dms_retrofit::dms::{DmsConfig, DmsModel};
use dms_retrofit::eval::baselines::{Baseline, run_baseline};
use dms_retrofit::eval::quality::Batch;
use dms_retrofit::eval::{Budget, Decoding};
use dms_retrofit::model::FloatFormat;

fn model() -> (Checkpoint, DmsModel<Cpu>) {
    let ckpt = Checkpoint::open(common::fixtures().join("llama").to_str().unwrap()).unwrap();
    let device = Default::default();
    let base = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let model = DmsModel::new(base, &DmsConfig::default(), None, &device).unwrap();
    (ckpt, model)
}

fn sequences(count: usize, len: usize) -> Vec<Sequence> {
    (0..count)
        .map(|s| Sequence {
            input_ids: (0..len)
                .map(|i| ((i * 53 + s * 29 + 11) % 250 + 3) as i64)
                .collect(),
            attention_mask: vec![1; len],
        })
        .collect()
}

fn rows(t: Tensor<Cpu, 3>, vocab: usize) -> Vec<Vec<f32>> {
    t.into_data()
        .into_vec::<f32>()
        .unwrap()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn one_token_chunks_equal_the_per_token_cache_for_every_rule() {
    let (ckpt, model) = model();
    let cfg = &ckpt.config;
    let (count, len) = (2, 37);
    let seqs = sequences(count, len);
    let batch = Batch::<Cpu>::new(&seqs, &Default::default());
    let decoding = Decoding::new(&model, false);
    for cr in [2.0, 3.5, 8.0] {
        let budget = Budget {
            compression_ratio: cr,
        };
        for baseline in [
            Baseline::StreamingLlm { sinks: 4 },
            Baseline::Recent,
            Baseline::Tova,
            Baseline::H2o,
        ] {
            let run = run_baseline(&model, &batch, baseline, budget, 1);
            let chunked = rows(model.logits(run.hidden), cfg.vocab_size);
            for (s, seq) in seqs.iter().enumerate() {
                let mut cache = decoding.cache(baseline.exact_policy(), Some(budget));
                for (t, &id) in seq.input_ids.iter().enumerate() {
                    let exact = decoding
                        .step(id as u32, &mut cache)
                        .into_data()
                        .into_vec::<f32>()
                        .unwrap();
                    common::assert_close(
                        &chunked[s * len + t],
                        &exact,
                        1e-4,
                        &format!("{} CR {cr} sequence {s} token {t}", baseline.name()),
                    );
                }
                // The last query attended to budget(len) entries in both.
                assert_eq!(
                    run.compression_ratio,
                    len as f64 / budget.at(len) as f64,
                    "{} CR {cr}",
                    baseline.name()
                );
            }
        }
    }
}

#[test]
fn larger_chunks_hold_the_budget_at_boundaries_and_a_whole_sequence_chunk_is_dense() {
    let (_, model) = model();
    let len = 64;
    let seqs = sequences(3, len);
    let batch = Batch::<Cpu>::new(&seqs, &Default::default());
    let budget = Budget {
        compression_ratio: 4.0,
    };
    let dense = model.logits(
        model
            .forward(batch.ids.clone(), &dms_retrofit::dms::Mode::Original)
            .hidden,
    );
    for baseline in Baseline::ALL {
        for chunk in [4, 16, 64] {
            let run = run_baseline(&model, &batch, baseline, budget, chunk);
            // The last chunk starts with budget(start + 1) - 1 entries and adds its own tokens.
            let start = (len - 1) / chunk * chunk;
            let rows = len - start;
            let floor = usize::from(!matches!(
                baseline,
                Baseline::StreamingLlm { .. } | Baseline::Recent
            ));
            let held = if start == 0 {
                len
            } else {
                let limit = match baseline {
                    Baseline::StreamingLlm { sinks } => budget.with_sinks(start + 1, sinks),
                    _ => budget.at(start + 1),
                };
                limit.saturating_sub(1).max(floor).min(start) + rows
            };
            assert_eq!(
                run.compression_ratio,
                len as f64 / held as f64,
                "{} chunk {chunk}",
                baseline.name()
            );
            let logits = model.logits(run.hidden);
            assert_eq!(logits.dims(), dense.dims());
            if chunk == 64 {
                // One chunk covers the whole sequence: nothing is evicted before it ends.
                let diff = (logits - dense.clone()).abs().max().into_scalar();
                assert!(diff < 1e-4, "{} chunk {chunk}: {diff}", baseline.name());
            }
        }
    }
}
