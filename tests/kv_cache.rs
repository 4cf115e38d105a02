//! The physically evicting cache: prefill + cached decode gives the same logits as the
//! teacher-forced forward under the inference mask (f32, 1e-4), for both DMS variants, and the
//! cache really holds fewer entries.

mod common;

use burn::tensor::Tensor;
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::dms::{DmsConfig, DmsModel, Mode};
use dms_retrofit::eval::{Decoding, Policy};

/// A DMS model from a golden case and a 40-token sequence.
fn golden_model(case: &str) -> (Checkpoint, DmsModel<Cpu>, DmsConfig, Vec<u32>) {
    let (ckpt, model, dms) = common::golden_dms_model(case);
    let ids: Vec<u32> = (0..40).map(|i| ((i * 53 + 11) % 250 + 3) as u32).collect();
    (ckpt, model, dms, ids)
}

fn values(t: Tensor<Cpu, 1>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn check_case(case: &str) {
    let (ckpt, model, _, ids) = golden_model(case);
    let reference = common::forward_logits(&model, &ckpt, &ids, Mode::Inference);
    let decoding = Decoding::new(&model, true);
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
    let (ckpt, model, _, ids) = golden_model("llama_adapter_head");
    let reference = common::forward_logits(&model, &ckpt, &ids, Mode::Original);
    let decoding = Decoding::new(&model, false);
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
