//! DMS properties on the tiny fixtures: the teacher is the base model bit-for-bit, a zero-initialised
//! adapter evicts nothing, an all-evicting model keeps exactly its window, single-token inputs work.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::dms::mask::{inference_key_decisions, retained_fraction};
use dms_retrofit::dms::noise::NoiseKey;
use dms_retrofit::dms::{DmsConfig, DmsModel, Granularity, Mode, Variant};
use dms_retrofit::model::{FloatFormat, ModelConfig, RopeTables};

const CASES: [&str; 4] = ["llama", "llama3_tied", "qwen2", "qwen3"];

fn load(case: &str, dms: &DmsConfig) -> (ModelConfig, DmsModel<Cpu>) {
    let ckpt = Checkpoint::open(common::fixtures().join(case).to_str().unwrap()).unwrap();
    let device = Default::default();
    let base = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let model = DmsModel::new(base, dms, None, &device).unwrap();
    (ckpt.config, model)
}

fn ids(batch: usize, seq: usize) -> Tensor<Cpu, 2, Int> {
    let data: Vec<i64> = (0..batch * seq)
        .map(|i| (i * 37 % 250 + 3) as i64)
        .collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), &Default::default())
}

fn bits(t: Tensor<Cpu, 3>) -> Vec<u32> {
    t.into_data()
        .into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn original_mode_is_the_base_model_bit_for_bit() {
    for variant in [Variant::Adapter, Variant::QNeuron] {
        let dms = DmsConfig {
            variant,
            ..DmsConfig::default()
        };
        for case in CASES {
            let (cfg, model) = load(case, &dms);
            let input = ids(2, 11);
            let rope = RopeTables::for_model(&cfg, 0, 11, &Default::default());
            let base = model.base.forward(input.clone(), &rope);
            let out = model.forward(input, &Mode::Original);
            assert_eq!(
                bits(model.logits(out.hidden)),
                bits(base),
                "{case} {variant:?}"
            );
        }
    }
}

#[test]
fn zero_initialised_adapter_evicts_nothing_at_inference() {
    let dms = DmsConfig {
        window: 2,
        ..DmsConfig::default()
    };
    for case in CASES {
        let (_, model) = load(case, &dms);
        let input = ids(2, 13);
        let teacher = model.forward(input.clone(), &Mode::Original);
        let student = model.forward(input, &Mode::Inference);
        for layer in &student.layers {
            let logits = layer.logits.clone().into_data().into_vec::<f32>().unwrap();
            assert!(
                logits.iter().all(|&l| l == -5.0),
                "{case}: zero adapter gives -offset"
            );
        }
        assert_eq!(
            bits(model.logits(student.hidden)),
            bits(model.logits(teacher.hidden)),
            "{case}: no eviction must reproduce the teacher exactly"
        );
    }
}

#[test]
fn all_evicting_model_keeps_exactly_its_window() {
    // Zero adapter with a negative offset: every logit is +5, every key is evicted.
    for granularity in [Granularity::Head, Granularity::Layer] {
        let dms = DmsConfig {
            window: 3,
            offset: -5.0,
            granularity,
            ..DmsConfig::default()
        };
        let (cfg, model) = load("llama", &dms);
        let seq = 16;
        let out = model.forward(ids(2, seq), &Mode::Inference);
        for layer in out.layers {
            let retained = retained_fraction(inference_key_decisions(layer.logits), dms.window)
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            assert_eq!(retained.len(), 2 * cfg.num_kv_heads);
            for r in retained {
                assert!((r - 4.0 / seq as f32).abs() < 1e-6, "{r}");
            }
        }
        // Train mode: straight-through decisions are (almost surely) all 1.
        let noise_values = NoiseKey {
            seed: 1,
            step: 0,
            micro_batch: 0,
            rank: 0,
        }
        .logistic(cfg.num_layers * 2 * cfg.num_kv_heads * seq);
        let noise = Tensor::<Cpu, 4>::from_data(
            TensorData::new(noise_values, [cfg.num_layers, 2, cfg.num_kv_heads, seq]),
            &Default::default(),
        );
        let train = model.forward(ids(2, seq), &Mode::Train { noise: &noise });
        let frac = dms_retrofit::dms::losses::frac_closed(
            &train
                .layers
                .iter()
                .map(|l| l.decisions.clone())
                .collect::<Vec<_>>(),
        )
        .into_data()
        .into_vec::<f32>()
        .unwrap();
        assert!(frac.iter().all(|&f| f > 0.95), "{frac:?}");
    }
}

#[test]
fn single_token_inputs_work_in_every_mode() {
    for variant in [Variant::Adapter, Variant::QNeuron] {
        let dms = DmsConfig {
            variant,
            window: 0,
            offset: -5.0,
            ..DmsConfig::default()
        };
        let (cfg, model) = load("qwen3", &dms);
        let input = ids(3, 1);
        let noise = Tensor::<Cpu, 4>::zeros(
            [cfg.num_layers, 3, cfg.num_kv_heads, 1],
            &Default::default(),
        );
        let teacher = model.logits(model.forward(input.clone(), &Mode::Original).hidden);
        for mode in [Mode::Inference, Mode::Train { noise: &noise }] {
            let out = model.forward(input.clone(), &mode);
            assert_eq!(out.layers[0].decisions.dims(), [3, cfg.num_kv_heads, 1]);
            let logits = model.logits(out.hidden);
            if variant == Variant::Adapter {
                // One token only ever sees itself, which is always inside the window.
                assert_eq!(bits(logits), bits(teacher.clone()));
            } else {
                assert_eq!(logits.dims(), teacher.dims());
            }
        }
    }
}
