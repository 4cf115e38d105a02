//! Our logits against transformers' on committed tiny random models (`scripts/make_fixtures.py`).
//! Each case exercises one set of architecture flags; breaking any component (RoPE, norm, GQA
//! grouping, bias, RoPE scaling, q/k norm, tied head) makes at least one case fail.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::model::{FloatFormat, RopeTables};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
}

/// Compares logits for a fixture name (or an absolute folder path).
fn check(case: &str) {
    let dir = common::fixtures().join(case);
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let device = Default::default();
    let decoder = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    let (batch, seq) = (reference.input_ids.len(), reference.input_ids[0].len());
    let ids: Vec<i64> = reference.input_ids.concat();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let rope = RopeTables::for_model(&ckpt.config, 0, seq, &device);
    let logits = decoder.forward(ids, &rope);
    assert_eq!(logits.dims(), [batch, seq, ckpt.config.vocab_size]);
    let actual = logits.into_data().into_vec::<f32>().unwrap();
    let expected: Vec<f32> = reference.logits.concat().concat();
    let diff = common::assert_close(&actual, &expected, 1e-4, case);
    eprintln!("{case}: max |diff| = {diff:e}");
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn llama3_rope_scaling_tied_embeddings_gqa4_matches_transformers() {
    check("llama3_tied");
}

#[test]
fn llama3_transformers4_config_layout_matches_transformers() {
    check("llama3_tied_tf4");
}

#[test]
fn qwen2_bias_matches_transformers() {
    check("qwen2");
}

#[test]
fn qwen2_bf16_weights_convert_exactly() {
    check("qwen2_bf16");
}

#[test]
fn qwen3_qk_norm_explicit_head_dim_matches_transformers() {
    check("qwen3");
}

/// Splits a fixture into two shards + index, as large hub checkpoints are stored, and checks the
/// logits are unchanged.
#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let src = common::fixtures().join("qwen3");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "reference.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<_> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(ckpt.files.weights.len(), 2);
    drop(ckpt);
    // Reuse the golden comparison on the sharded copy.
    let case = dir.path().to_str().unwrap().to_string();
    check(&case);
}
