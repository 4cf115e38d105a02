//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::{Checkpoint, SafetensorsStore};
use dms_retrofit::dms::{DmsConfig, DmsModel, Granularity, Mode, Variant};
use dms_retrofit::model::FloatFormat;
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Largest absolute difference, with a label in the failure message.
pub fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, label: &str) -> f32 {
    assert_eq!(actual.len(), expected.len(), "{label}: length differs");
    let mut worst = 0f32;
    let mut worst_at = 0;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let diff = (a - e).abs();
        assert!(
            diff.is_finite(),
            "{label}: non-finite value at {i}: {a} vs {e}"
        );
        if diff > worst {
            worst = diff;
            worst_at = i;
        }
    }
    assert!(
        worst <= tolerance,
        "{label}: max |diff| {worst:e} at flat index {worst_at} ({} vs {}) exceeds {tolerance:e}",
        actual[worst_at],
        expected[worst_at]
    );
    worst
}

/// A DMS model from a golden case of `tests/fixtures/dms` (its adapter weights and settings give
/// mixed decisions), with its base checkpoint and DMS settings.
pub fn golden_dms_model(case: &str) -> (Checkpoint, DmsModel<Cpu>, DmsConfig) {
    let dir = fixtures().join("dms").join(case);
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let dms = DmsConfig {
        variant: if c["variant"] == "adapter" {
            Variant::Adapter
        } else {
            Variant::QNeuron
        },
        granularity: if c["granularity"] == "head" {
            Granularity::Head
        } else {
            Granularity::Layer
        },
        window: c["window"].as_u64().unwrap() as usize,
        tau: c["tau"].as_f64().unwrap(),
        alpha_scale: c["alpha_scale"].as_f64().unwrap(),
        offset: c["offset"].as_f64().unwrap(),
    };
    let ckpt = Checkpoint::open(
        fixtures()
            .join(c["model"].as_str().unwrap())
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let device = Default::default();
    let base = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let mut adapters =
        SafetensorsStore::open(&[dir.join("inputs.safetensors")], FloatFormat::F32).unwrap();
    let model = DmsModel::new(base, &dms, Some(&mut adapters), &device).unwrap();
    (ckpt, model, dms)
}

/// Teacher-forced logits of one sequence, one `[vocab]` row per position.
pub fn forward_logits(
    model: &DmsModel<Cpu>,
    ckpt: &Checkpoint,
    ids: &[u32],
    mode: Mode<Cpu>,
) -> Vec<Vec<f32>> {
    let input = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, ids.len()],
        ),
        &Default::default(),
    );
    let out = model.forward(input, &mode);
    let v = model
        .logits(out.hidden)
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    v.chunks(ckpt.config.vocab_size)
        .map(<[f32]>::to_vec)
        .collect()
}

/// A run folder's `metrics.jsonl` without its wall-clock fields (`tokens_per_s`, `elapsed_s`):
/// what two runs of the same recipe must agree on.
pub fn metrics_without_clock(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}
