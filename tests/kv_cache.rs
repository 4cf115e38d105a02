//! The physically evicting cache: prefill + cached decode gives the same logits as the
//! teacher-forced forward under the inference mask (f32, 1e-4), for both DMS variants, and the
//! cache really holds fewer entries.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::{Checkpoint, SafetensorsStore};
use dms_retrofit::dms::{DmsConfig, DmsModel, Granularity, Mode, Variant};
use dms_retrofit::eval::{Decoding, Policy};
use dms_retrofit::model::FloatFormat;
use serde_json::Value;

/// A DMS model from a golden case (its adapter weights and settings give mixed decisions).
fn golden_model(case: &str) -> (Checkpoint, DmsModel<Cpu>, DmsConfig, Vec<u32>) {
    let dir = common::fixtures().join("dms").join(case);
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
        common::fixtures()
            .join(c["model"].as_str().unwrap())
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let device = Default::default();
    let base = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let mut adapters =
        SafetensorsStore::open(&[dir.join("inputs.safetensors")], FloatFormat::F32).unwrap();
    let model = DmsModel::new(base, &ckpt.config, &dms, Some(&mut adapters), &device).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| ((i * 53 + 11) % 250 + 3) as u32).collect();
    (ckpt, model, dms, ids)
}

fn forward_logits(
    model: &DmsModel<Cpu>,
    ckpt: &Checkpoint,
    dms: &DmsConfig,
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
    let out = model.forward(input, &ckpt.config, dms, &mode);
    let v = model
        .logits(out.hidden)
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    v.chunks(ckpt.config.vocab_size)
        .map(<[f32]>::to_vec)
        .collect()
}

fn values(t: Tensor<Cpu, 1>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn check_case(case: &str) {
    let (ckpt, model, dms, ids) = golden_model(case);
    let reference = forward_logits(&model, &ckpt, &dms, &ids, Mode::Inference);
    let decoding = Decoding::new(&model, &ckpt.config, Some(&dms));
    for prompt in [1, 9, 25] {
        let mut cache = decoding.cache(None, None);
        let first = decoding.prefill(&ids[..prompt], &mut cache);
        common::assert_close(
            &values(first),
            &reference[prompt - 1],
            1e-4,
            &format!("{case} prefill {prompt}"),
        );
        for t in prompt..ids.len() {
            let logits = decoding.step(ids[t], &mut cache);
            common::assert_close(
                &values(logits),
                &reference[t],
                1e-4,
                &format!("{case} prompt {prompt} step {t}"),
            );
        }
        assert_eq!(cache.seen(), ids.len());
        let cr = cache.compression_ratio();
        assert!(cr > 1.2, "{case}: the cache must actually shrink (CR {cr})");
        assert!(
            cache.bytes(4) < cache.dense_bytes(4),
            "{case}: bytes must fall"
        );
    }
}

#[test]
fn adapter_prefill_and_decode_equal_the_masked_forward() {
    check_case("llama_adapter_head");
}

#[test]
fn q_neuron_prefill_and_decode_equal_the_masked_forward() {
    check_case("qwen3_qneuron_head");
}

#[test]
fn window_zero_prefill_and_decode_equal_the_masked_forward() {
    check_case("qwen2_adapter_head_w0");
}

#[test]
fn dense_cache_equals_the_original_model() {
    let (ckpt, model, dms, ids) = golden_model("llama_adapter_head");
    let reference = forward_logits(&model, &ckpt, &dms, &ids, Mode::Original);
    let decoding = Decoding::new(&model, &ckpt.config, None);
    let mut cache = decoding.cache(None, None);
    assert_eq!(cache.policy, Policy::Dense);
    let first = decoding.prefill(&ids[..5], &mut cache);
    common::assert_close(&values(first), &reference[4], 1e-4, "dense prefill");
    for t in 5..ids.len() {
        common::assert_close(
            &values(decoding.step(ids[t], &mut cache)),
            &reference[t],
            1e-4,
            "dense step",
        );
    }
    assert_eq!(cache.bytes(4), cache.dense_bytes(4));
}
