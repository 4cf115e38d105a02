//! DMS parameters train as f32 master weights whatever the activation dtype (bf16 on the GPU).
//! The CPU backend refuses arithmetic between two float dtypes (it panics), so training steps with
//! f64 activations beside the f32 adapters prove that every crossing between the two is an
//! explicit cast; on the GPU a missed one would silently misread bytes instead.

use burn::module::Param;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{DType, FloatDType, Tensor};
use dms_retrofit::backend::CpuAutodiff;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::data::Sequence;
use dms_retrofit::dms::noise::NoiseKey;
use dms_retrofit::dms::{DmsConfig, DmsModel};
use dms_retrofit::model::{FloatFormat, ParamSlot};
use dms_retrofit::recipe::Trainable;
use dms_retrofit::train::{
    StepSetup, apply_trainable, clip_global_norm, distillation_micro_step, make_batch,
};

type B = CpuAutodiff;

fn to_f64<const D: usize>(p: &mut Param<Tensor<B, D>>) {
    *p = p.clone().map(|t| t.cast(FloatDType::F64));
}

fn dtypes(model: &mut DmsModel<B>) -> Vec<(bool, DType)> {
    model
        .params_mut()
        .into_iter()
        .map(|(key, slot)| match slot {
            ParamSlot::Vector(p) => (key.is_adapter(), p.val().dtype()),
            ParamSlot::Matrix(p) => (key.is_adapter(), p.val().dtype()),
        })
        .collect()
}

#[test]
fn adapters_train_in_f32_beside_f64_activations() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
    let ckpt = Checkpoint::open(dir).unwrap();
    let cfg = &ckpt.config;
    let device = Default::default();
    let dms = DmsConfig {
        window: 2,
        ..DmsConfig::default()
    };
    let decoder = ckpt.load_decoder::<B>(FloatFormat::F32, &device).unwrap();
    let mut model = DmsModel::new(decoder, &dms, None, &device).unwrap();
    for (key, slot) in model.params_mut() {
        if !key.is_adapter() {
            match slot {
                ParamSlot::Vector(p) => to_f64(p),
                ParamSlot::Matrix(p) => to_f64(p),
            }
        }
    }
    let mut model = apply_trainable(model, Trainable::Adapter);
    for (dms_param, dtype) in dtypes(&mut model) {
        let want = if dms_param { DType::F32 } else { DType::F64 };
        assert_eq!(dtype, want, "dms parameter: {dms_param}");
    }

    let mut optimizer = AdamWConfig::new().init::<B, DmsModel<B>>();
    let sequence = Sequence {
        input_ids: (0..12)
            .map(|i| (i * 37 + 5) % cfg.vocab_size as i64)
            .collect(),
        attention_mask: vec![1; 12],
    };
    let setup = StepSetup {
        cfg,
        target: 0.5,
        compression_weight: 1.0,
        compression_loss: Default::default(),
        eos: u32::MAX,
        kl_chunk: 5,
        loss_scale: 1.0,
        recompute_layers: false,
        graph_layers: 0,
    };
    let before = model.adapters[0].proj.weight.val().into_data();
    for step in 0..2 {
        let batch = make_batch::<B>(&[&sequence], &device);
        let noise = NoiseKey {
            seed: 1,
            step,
            micro_batch: 0,
            rank: 0,
        };
        let (mut grads, stats) =
            distillation_micro_step(&model, None, &batch, noise, &setup, &mut |_| {});
        let loss = stats.read().loss;
        assert!(loss.is_finite(), "step {step}: loss {loss}");
        clip_global_norm(&mut model, &mut grads, 1.0);
        model = optimizer.step(1e-2, model, grads);
    }
    let after = model.adapters[0].proj.weight.val();
    assert_eq!(
        after.dtype(),
        DType::F32,
        "the update keeps the master dtype"
    );
    assert_ne!(after.into_data(), before, "the adapter was updated");
}
