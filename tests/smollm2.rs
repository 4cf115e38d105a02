//! Real-model agreement: SmolLM2-135M-Instruct (built by `scripts/get-smollm2.sh`) against the
//! transformers logits recorded in `tests/fixtures/smollm2/reference.json` by
//! `scripts/check_smollm2.py`. Runs whenever the model folder exists (`DMS_SMOLLM2_DIR`, default
//! `models/SmolLM2-135M-Instruct`); prints why it skipped otherwise.

mod common;

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::Cpu;
use dms_retrofit::checkpoint::Checkpoint;
use dms_retrofit::data::{ChatTemplate, Message, Tokenizer};
use dms_retrofit::model::{FloatFormat, RopeTables};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompt_text: String,
    input_ids: Vec<Vec<u32>>,
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
    greedy_new_ids: Vec<u32>,
    greedy_text: String,
    tokenizer_cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
}

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DMS_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct")
        });
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} not found (run scripts/get-smollm2.sh)",
            dir.display()
        );
        None
    }
}

#[test]
fn smollm2_matches_transformers_on_a_chat_prompt() {
    let Some(dir) = model_dir() else { return };
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("smollm2/reference.json")).unwrap(),
    )
    .unwrap();

    // Chat template and tokenizer reproduce the prompt ids.
    let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap();
    let messages = [Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = template
        .render(&messages, true, &Default::default())
        .unwrap();
    assert_eq!(prompt, reference.prompt_text);
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids, reference.input_ids[0]);
    for case in &reference.tokenizer_cases {
        assert_eq!(
            tokenizer.encode(&case.text, false).unwrap(),
            case.ids,
            "{:?}",
            case.text
        );
    }

    // Logits: top-1 identical everywhere, top-10 logits close.
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let device = Default::default();
    let decoder = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device).unwrap();
    let forward = |ids: &[u32]| {
        let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let input =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device);
        let rope = RopeTables::for_model(&ckpt.config, 0, ids.len(), &device);
        decoder.forward(input, &rope)
    };
    let vocab = ckpt.config.vocab_size;
    let logits = forward(&ids).into_data().into_vec::<f32>().unwrap();
    let mut worst = 0f32;
    for (pos, (top_ids, top_logits)) in reference
        .top_ids
        .iter()
        .zip(&reference.top_logits)
        .enumerate()
    {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let argmax = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(argmax as u32, top_ids[0], "top-1 differs at position {pos}");
        for (&id, &expected) in top_ids.iter().zip(top_logits) {
            worst = worst.max((row[id as usize] - expected).abs());
        }
    }
    eprintln!("smollm2: max |diff| over top-10 logits = {worst:e}");
    assert!(worst < 2e-3, "top-10 logits differ by {worst}");

    // Greedy continuation reproduces transformers' answer.
    let mut sequence = ids.clone();
    for _ in 0..reference.greedy_new_ids.len() {
        let logits = forward(&sequence);
        let last = logits
            .slice([0..1, sequence.len() - 1..sequence.len(), 0..vocab])
            .argmax(2)
            .into_data()
            .into_vec::<i64>()
            .unwrap()[0];
        sequence.push(last as u32);
    }
    assert_eq!(&sequence[ids.len()..], reference.greedy_new_ids.as_slice());
    let answer = tokenizer.decode(&sequence[ids.len()..], true).unwrap();
    assert_eq!(answer, reference.greedy_text);
}
