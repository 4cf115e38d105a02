//! The batched slot cache (`eval::slot_cache`, what `generate` decodes with): prompts of different
//! lengths prefilled into one batch and decoded together give, per sequence, the teacher-forced
//! logits under the inference mask (f32, 1e-4), hold exactly the entries of the per-token
//! reference cache, and reuse evicted slots so the tables stay smaller than the tokens seen.

mod common;

use dms_retrofit::dms::Mode;
use dms_retrofit::eval::{CacheMemory, Decoding};

/// Three sequences with prompts of 1, 9 and 25 tokens, decoded together for 16 tokens.
fn check(case: &str, use_dms: bool) {
    check_batch(case, &[1, 9, 25], 16, use_dms);
}

/// Sequences with `prompts` tokens of prompt each, prefilled into one cache and decoded together
/// for `steps` tokens, against the teacher-forced logits and the per-token reference cache.
fn check_batch(case: &str, prompts: &[usize], steps: usize, use_dms: bool) -> CacheMemory {
    let (ckpt, model, _) = common::golden_dms_model(case);
    let vocab = ckpt.config.vocab_size;
    let streams: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| {
            (0..prompts[s] + steps)
                .map(|i| ((i * 53 + s * 71 + 11) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    let references: Vec<Vec<Vec<f32>>> = streams
        .iter()
        .map(|ids| {
            let mode = if use_dms {
                Mode::Inference
            } else {
                Mode::Original
            };
            common::forward_logits(&model, &ckpt, ids, mode)
        })
        .collect();
    let decoding = Decoding::new(&model, use_dms);
    let mut cache = decoding.slot_cache(prompts.len());
    for (s, &p) in prompts.iter().enumerate() {
        let first = decoding.prefill_slots(&streams[s][..p], s, &mut cache);
        common::assert_close(
            &first.into_data().into_vec::<f32>().unwrap(),
            &references[s][p - 1],
            1e-4,
            &format!("{case} prefill of sequence {s}"),
        );
    }
    for t in 0..steps {
        let ids: Vec<u32> = prompts
            .iter()
            .enumerate()
            .map(|(s, &p)| streams[s][p + t])
            .collect();
        let logits = decoding
            .step_slots(&ids, &mut cache)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for (s, &p) in prompts.iter().enumerate() {
            common::assert_close(
                &logits[s * vocab..(s + 1) * vocab],
                &references[s][p + t],
                1e-4,
                &format!("{case} sequence {s} step {t}"),
            );
        }
    }
    // The same entries as the per-token reference cache, sequence by sequence.
    let kv_heads = ckpt.config.num_kv_heads;
    let lengths = cache.lengths();
    for (s, &p) in prompts.iter().enumerate() {
        let mut reference = decoding.cache(None, None);
        decoding.prefill(&streams[s][..p], &mut reference);
        for &id in &streams[s][p..] {
            decoding.step(id, &mut reference);
        }
        for (layer, heads) in reference.lengths().iter().enumerate() {
            assert_eq!(
                &lengths[layer][s * kv_heads..(s + 1) * kv_heads],
                heads.as_slice(),
                "{case}: live entries of sequence {s}, layer {layer}"
            );
        }
    }
    let memory = cache.memory(4);
    let tokens: usize = cache.seen().iter().sum();
    assert_eq!(
        tokens,
        prompts.iter().sum::<usize>() + prompts.len() * steps
    );
    if use_dms {
        assert!(memory.live_bytes < memory.dense_bytes, "{case}: {memory:?}");
        assert!(memory.compression_ratio > 1.2, "{case}: {memory:?}");
    } else {
        assert_eq!(memory.live_bytes, memory.dense_bytes);
    }
    assert!(memory.allocated_bytes >= memory.live_bytes);
    memory
}

#[test]
fn adapter_batch_decode_equals_the_masked_forward() {
    check("llama_adapter_head", true);
}

#[test]
fn q_neuron_batch_decode_equals_the_masked_forward() {
    check("qwen3_qneuron_head", true);
}

#[test]
fn window_zero_batch_decode_equals_the_masked_forward() {
    check("qwen2_adapter_head_w0", true);
}

#[test]
fn layer_granularity_batch_decode_equals_the_masked_forward() {
    check("llama3_tied_adapter_layer", true);
}

#[test]
fn dense_batch_decode_equals_the_original_model() {
    check("llama_adapter_head", false);
}

#[test]
fn evicted_slots_are_reused_so_the_tables_stop_growing() {
    let (_, model, _) = common::golden_dms_model("qwen2_adapter_head_w0");
    let decoding = Decoding::new(&model, true);
    let mut cache = decoding.slot_cache(2);
    let prompt: Vec<u32> = (0..4).map(|i| i + 5).collect();
    for s in 0..2 {
        decoding.prefill_slots(&prompt, s, &mut cache);
    }
    let mut capacities = Vec::new();
    for t in 0..300u32 {
        decoding.step_slots(&[(t * 7) % 200 + 3, (t * 11) % 200 + 3], &mut cache);
        capacities.push(cache.capacities().into_iter().max().unwrap());
    }
    let memory = cache.memory(4);
    // Live entries are what a mixed-decision model retains; the table only holds its largest row.
    let longest = cache.lengths().into_iter().flatten().max().unwrap();
    assert!(longest < 304, "some head evicted: {longest}");
    assert!(
        *capacities.last().unwrap() < 304,
        "tables grew with every token: {capacities:?}"
    );
    assert!(memory.allocated_bytes < memory.dense_bytes, "{memory:?}");
}

#[test]
fn a_repeated_cache_decodes_like_its_original_in_every_copy() {
    let (ckpt, model, _) = common::golden_dms_model("llama_adapter_head");
    let vocab = ckpt.config.vocab_size;
    let decoding = Decoding::new(&model, true);
    let prompt: Vec<u32> = (0..30).map(|i| (i * 37 + 5) % 250 + 3).collect();
    let mut single = decoding.slot_cache(1);
    decoding.prefill_slots(&prompt, 0, &mut single);
    let mut copies = single.repeat(3);
    for t in 0..12u32 {
        let id = (t * 13) % 200 + 3;
        let one = decoding
            .step_slots(&[id], &mut single)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let three = decoding
            .step_slots(&[id; 3], &mut copies)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for copy in 0..3 {
            common::assert_close(
                &three[copy * vocab..(copy + 1) * vocab],
                &one,
                1e-5,
                &format!("copy {copy} step {t}"),
            );
        }
    }
    let (one, three) = (single.memory(4), copies.memory(4));
    assert_eq!(three.live_bytes, 3 * one.live_bytes);
    assert_eq!(three.dense_bytes, 3 * one.dense_bytes);
}

#[test]
fn long_prompts_span_many_pages_and_still_match() {
    let memory = check_batch("llama_adapter_head", &[300, 170], 24, true);
    assert!(memory.compression_ratio > 1.5, "{memory:?}");
}
