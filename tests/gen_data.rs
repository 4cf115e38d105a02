//! `gen-data` end to end on the tiny model: chat records a training recipe reads, one per (prompt,
//! sample), written whole or not at all, and a run interrupted midway resumes without losing or
//! repeating a unit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use dms_retrofit::data::{ChatTemplate, DataConfig, Dataset, Tokenizer};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gen_data(out: &Path, prompts: &Path, extra: &[&str]) -> (bool, String) {
    let model = root().join("data/tiny-llama");
    let mut args = vec![
        "gen-data",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--keep-truncated",
    ];
    args.extend_from_slice(extra);
    let output = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(&args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn units(records: &[Value]) -> BTreeSet<(u64, u64)> {
    records
        .iter()
        .map(|r| {
            (
                r["prompt_index"].as_u64().unwrap(),
                r["sample"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn write_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"Who is there?\"}\n\"Stand and unfold yourself.\"\n\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Long live\"}, \
         {\"role\": \"assistant\", \"content\": \"the king!\"}, \
         {\"role\": \"user\", \"content\": \"Bernardo?\"}]}\n",
    )
    .unwrap();
    path
}

#[test]
fn records_are_chat_data_a_recipe_reads() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    let out = dir.path().join("self.jsonl");
    let (ok, stderr) = gen_data(
        &out,
        &prompts,
        &["--samples", "2", "--batch", "4", "--temperature", "1.0"],
    );
    assert!(ok, "{stderr}");
    let recs = records(&out);
    assert_eq!(recs.len(), 6, "3 prompts x 2 samples");
    let expected: BTreeSet<(u64, u64)> = (0..3).flat_map(|i| (0..2).map(move |k| (i, k))).collect();
    assert_eq!(units(&recs), expected);
    // Nothing but the finished file is left.
    assert!(!dir.path().join("self.jsonl.partial").exists());
    assert!(!dir.path().join("self.jsonl.done").exists());
    for r in &recs {
        let messages = r["messages"].as_array().unwrap();
        let last = messages.last().unwrap();
        assert_eq!(last["role"], "assistant");
        assert_eq!(r["finish"], "length");
        assert_eq!(r["generated_tokens"], 6);
        // The conversation given is repeated before the answer.
        if r["prompt_index"] == 2 {
            assert_eq!(messages.len(), 4);
            assert_eq!(messages[1]["content"], "the king!");
        }
    }
    // Two samples of one prompt differ (seeded per unit).
    let answer = |i: u64, k: u64| {
        recs.iter()
            .find(|r| r["prompt_index"] == i && r["sample"] == k)
            .map(|r| r["messages"].as_array().unwrap().last().unwrap()["content"].clone())
            .unwrap()
    };
    assert_ne!(answer(0, 0), answer(0, 1));

    // The file trains: a recipe's data section reads it with the chat template.
    let tiny = root().join("data/tiny-llama");
    let tokenizer = Tokenizer::from_file(&tiny.join("tokenizer.json")).unwrap();
    let template =
        ChatTemplate::from_tokenizer_config(&tiny.join("tokenizer_config.json")).unwrap();
    let mut cfg = DataConfig::new(vec![out.clone()], 64);
    cfg.chat_template = true;
    cfg.heldout_fraction = 0.0;
    let ds = Dataset::build(
        &cfg,
        dir.path(),
        &tokenizer,
        Some(&template),
        None,
        256,
        256,
    )
    .unwrap();
    assert_eq!(ds.stats.documents, 6);

    // An existing dataset is not replaced without --force.
    let (ok, stderr) = gen_data(&out, &prompts, &[]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
}

#[test]
fn an_interrupted_run_resumes_without_losing_or_repeating_units() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    let whole = dir.path().join("whole.jsonl");
    let (ok, stderr) = gen_data(
        &whole,
        &prompts,
        &["--samples", "2", "--batch", "3", "--temperature", "0"],
    );
    assert!(ok, "{stderr}");
    let all = records(&whole);

    // A run killed after two records, the second's `done` entry missing and a third record
    // half-written.
    let resumed = dir.path().join("resumed.jsonl");
    let text = std::fs::read_to_string(&whole).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let partial = format!(
        "{}\n{}\n{}",
        lines[0],
        lines[1],
        &lines[2][..lines[2].len() / 2]
    );
    std::fs::write(dir.path().join("resumed.jsonl.partial"), partial).unwrap();
    let first = &all[0];
    std::fs::write(
        dir.path().join("resumed.jsonl.done"),
        format!("{} {}\n", first["prompt_index"], first["sample"]),
    )
    .unwrap();
    let (ok, stderr) = gen_data(
        &resumed,
        &prompts,
        &["--samples", "2", "--batch", "3", "--temperature", "0"],
    );
    assert!(ok, "{stderr}");
    let again = records(&resumed);
    assert_eq!(again.len(), 6, "no unit lost or repeated");
    assert_eq!(units(&again), units(&all));
    assert_eq!(again[0], all[0]);
    assert_eq!(again[1], all[1]);
    // Greedy answers do not depend on which units share a batch.
    let by_unit = |recs: &[Value]| -> Vec<(u64, u64, Value)> {
        let mut v: Vec<_> = recs
            .iter()
            .map(|r| {
                (
                    r["prompt_index"].as_u64().unwrap(),
                    r["sample"].as_u64().unwrap(),
                    r["messages"].clone(),
                )
            })
            .collect();
        v.sort_by_key(|(i, k, _)| (*i, *k));
        v
    };
    assert_eq!(by_unit(&again), by_unit(&all));
}

#[test]
fn bad_prompts_are_one_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("bad.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n{\"question\": \"no\"}\n").unwrap();
    let (ok, stderr) = gen_data(&dir.path().join("x.jsonl"), &prompts, &[]);
    assert!(!ok && stderr.contains("bad.jsonl:2"), "{stderr}");
    assert!(!dir.path().join("x.jsonl").exists());
}
