//! DMS decisions, masks, losses and gradients against the independent PyTorch reference
//! (`scripts/dms_reference.py`, written from the spec, not from this code). Goldens live in
//! `tests/fixtures/dms/<case>/`.

mod common;

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use dms_retrofit::backend::CpuAutodiff;
use dms_retrofit::checkpoint::{Checkpoint, SafetensorsStore};
use dms_retrofit::dms::losses::{
    compression_loss, distillation_loss, frac_closed, ids_tensor, loss_mask,
};
use dms_retrofit::dms::mask::{inference_key_decisions, retained_fraction};
use dms_retrofit::dms::{DmsConfig, DmsModel, Granularity, Mode, Variant};
use dms_retrofit::model::FloatFormat;
use serde::Deserialize;

type B = CpuAutodiff;

#[derive(Deserialize)]
struct Case {
    model: String,
    variant: String,
    granularity: String,
    window: usize,
    tau: f64,
    alpha_scale: f64,
    offset: f64,
    target_cr: f64,
    compression_weight: f64,
    eos_token_id: u32,
}

/// Named f32 / i64 tensors of a safetensors file.
struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(path: &Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap(),
        }
    }

    fn get(&self, name: &str) -> (Vec<usize>, TensorData) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor '{name}' missing"));
        let shape = view.shape().to_vec();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => TensorData::new(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<_>>(),
                shape.clone(),
            ),
            safetensors::Dtype::I64 => TensorData::new(
                view.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<_>>(),
                shape.clone(),
            ),
            other => panic!("unexpected dtype {other:?}"),
        };
        (shape, data)
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        self.get(name).1.into_vec::<f32>().unwrap()
    }

    fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (shape, data) = self.get(name);
        (shape, data.into_vec::<i64>().unwrap())
    }
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// `max |a - e| <= rel * max|e| + 1e-6`
fn assert_rel(actual: &[f32], expected: &[f32], rel: f32, label: &str) {
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    common::assert_close(actual, expected, rel * scale + 1e-6, label);
}

fn stack_layers<Bk: Backend>(layers: Vec<Tensor<Bk, 3>>) -> Vec<f32> {
    values(Tensor::stack::<4>(layers, 0))
}

fn run_case(name: &str) {
    let dir = common::fixtures().join("dms").join(name);
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let dms = DmsConfig {
        variant: match case.variant.as_str() {
            "adapter" => Variant::Adapter,
            _ => Variant::QNeuron,
        },
        granularity: match case.granularity.as_str() {
            "head" => Granularity::Head,
            _ => Granularity::Layer,
        },
        window: case.window,
        tau: case.tau,
        alpha_scale: case.alpha_scale,
        offset: case.offset,
    };
    let inputs = Golden::open(&dir.join("inputs.safetensors"));
    let expected = Golden::open(&dir.join("expected.safetensors"));
    let device = Default::default();

    // Model: base frozen; trainable = adapters, or q_proj for the q-neuron variant.
    let ckpt = Checkpoint::open(common::fixtures().join(&case.model).to_str().unwrap()).unwrap();
    let cfg = &ckpt.config;
    let mut base = ckpt
        .load_decoder::<B>(FloatFormat::F32, &device)
        .unwrap()
        .no_grad();
    if dms.variant == Variant::QNeuron {
        for layer in &mut base.layers {
            layer.self_attn.q_proj.weight =
                layer.self_attn.q_proj.weight.clone().set_require_grad(true);
        }
    }
    let mut adapter_source =
        SafetensorsStore::open(&[dir.join("inputs.safetensors")], FloatFormat::F32).unwrap();
    let model = DmsModel::new(base, &dms, Some(&mut adapter_source), &device).unwrap();
    assert_eq!(
        model.adapters.len(),
        if dms.variant == Variant::Adapter {
            cfg.num_layers
        } else {
            0
        }
    );

    let (shape, ids) = inputs.i64("input_ids");
    let shape = [shape[0], shape[1]];
    let (_, attention) = inputs.i64("attention_mask");
    let (noise_shape, noise) = inputs.get("noise");
    assert_eq!(
        noise_shape,
        vec![cfg.num_layers, shape[0], cfg.num_kv_heads, shape[1]]
    );
    let noise = Tensor::<B, 4>::from_data(noise, &device);
    let input = ids_tensor::<B>(&ids, shape, &device);

    // Teacher: the original model.
    let teacher = model.forward(input.clone(), &Mode::Original);
    assert!(teacher.layers.is_empty());
    let teacher_hidden = teacher.hidden.detach();
    assert_rel(
        &values(model.logits(teacher_hidden.clone())),
        &expected.f32("teacher_logits"),
        1e-4,
        "teacher logits",
    );

    // Student (train mode).
    let student = model.forward(input.clone(), &Mode::Train { noise: &noise });
    let logits: Vec<_> = student.layers.iter().map(|l| l.logits.clone()).collect();
    assert_rel(
        &stack_layers(logits),
        &expected.f32("decision_logits"),
        1e-4,
        "decision logits",
    );
    let probs: Vec<_> = student
        .layers
        .iter()
        .map(|l| l.probs.clone().unwrap())
        .collect();
    assert_rel(&stack_layers(probs), &expected.f32("probs"), 1e-4, "probs");
    let decisions: Vec<_> = student.layers.iter().map(|l| l.decisions.clone()).collect();
    assert_rel(
        &stack_layers(decisions.clone()),
        &expected.f32("decisions"),
        1e-6,
        "decisions",
    );
    assert_rel(
        &values(model.logits(student.hidden.clone())),
        &expected.f32("student_logits"),
        1e-4,
        "student logits",
    );

    // Losses: chunked KL (odd chunk size on purpose), hinge, total.
    let mask = loss_mask::<B>(&ids, &attention, shape, &[case.eos_token_id], &device);
    let kl = distillation_loss(
        student.hidden,
        teacher_hidden,
        &|h| model.logits(h),
        mask,
        7,
    );
    let frac = frac_closed(&decisions);
    assert_rel(
        &values(frac.clone()),
        &expected.f32("frac_closed"),
        1e-5,
        "frac_closed",
    );
    let compression = compression_loss(frac, 1.0 - 1.0 / case.target_cr);
    let loss = kl.clone() + compression.clone() * case.compression_weight;
    assert_rel(&values(kl), &expected.f32("kl"), 1e-4, "kl");
    assert_rel(
        &values(compression),
        &expected.f32("compression_loss"),
        1e-5,
        "compression",
    );
    assert_rel(&values(loss.clone()), &expected.f32("loss"), 1e-4, "loss");

    // Gradients of the trainable DMS parameters.
    let grads = loss.backward();
    let mut checked = 0;
    for i in 0..cfg.num_layers {
        let mut check = |name: String, grad: Option<Tensor<_, 2>>| {
            let grad = grad.unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_rel(
                &values(grad),
                &expected.f32(&format!("grad.{name}")),
                1e-4,
                &name,
            );
            checked += 1;
        };
        let prefix = format!("model.layers.{i}.self_attn");
        match dms.variant {
            Variant::Adapter => {
                let a = &model.adapters[i];
                check(
                    format!("{prefix}.dms_proj_alpha.weight"),
                    a.proj.weight.val().grad(&grads),
                );
                let norm = a.norm.weight.val().grad(&grads).map(|g| g.unsqueeze::<2>());
                check(format!("{prefix}.dms_proj_alpha_norm.weight"), norm);
            }
            Variant::QNeuron => {
                let q = &model.base.layers[i].self_attn.q_proj;
                check(
                    format!("{prefix}.q_proj.weight"),
                    q.weight.val().grad(&grads),
                );
            }
        }
    }
    assert!(checked >= cfg.num_layers);
    // Frozen base weights get no gradient.
    assert!(
        model.base.layers[0]
            .mlp
            .up_proj
            .weight
            .val()
            .grad(&grads)
            .is_none()
    );

    // Inference: hard decisions, exact eviction mask, retained fraction.
    let inference = model.forward(input, &Mode::Inference);
    assert_rel(
        &values(model.logits(inference.hidden)),
        &expected.f32("inference_logits"),
        1e-4,
        "inference logits",
    );
    let logits: Vec<_> = inference.layers.iter().map(|l| l.logits.clone()).collect();
    assert_rel(
        &stack_layers(logits.clone()),
        &expected.f32("inference_decision_logits"),
        1e-4,
        "inference decision logits",
    );
    let retained: Vec<_> = logits
        .into_iter()
        .map(|l| retained_fraction(inference_key_decisions(l), dms.window))
        .collect();
    let retained = values(Tensor::stack::<3>(retained, 0));
    assert_rel(
        &retained,
        &expected.f32("inference_retained"),
        1e-6,
        "retained",
    );
}

#[test]
fn llama_adapter_per_head_with_padding_and_eos() {
    run_case("llama_adapter_head");
}

#[test]
fn qwen3_q_neuron_per_head() {
    run_case("qwen3_qneuron_head");
}

#[test]
fn llama3_group4_adapter_per_layer() {
    run_case("llama3_tied_adapter_layer");
}

#[test]
fn qwen2_adapter_window_zero() {
    run_case("qwen2_adapter_head_w0");
}

#[test]
fn llama_adapter_window_beyond_sequence() {
    run_case("llama_adapter_head_wbig");
}
