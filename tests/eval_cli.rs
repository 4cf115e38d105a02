//! `eval` and `generate` end to end on the tiny model: a DMS run shows fewer KV bytes than dense,
//! baselines are evaluated at the DMS model's measured CR, the report and heatmap are written.

use std::path::{Path, PathBuf};
use std::process::Command;

use dms_retrofit::backend::CpuAutodiff;
use dms_retrofit::model::FloatFormat;
use dms_retrofit::recipe::Recipe;
use dms_retrofit::train::{TrainOptions, train};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_run(out: &Path) {
    tiny_run_with(out, &[]);
}

fn tiny_run_with(out: &Path, extra: &[&str]) {
    let mut sets: Vec<String> = vec![
        "train.max_steps=30".into(),
        "dms.final_step=20".into(),
        "data.seq_len=64".into(),
        "run.eval_every=0".into(),
        "train.lr=3e-3".into(),
        format!("run.output_dir=\"{}\"", out.display()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let recipe = Recipe::load(&root().join("recipes/tiny.toml"), &sets).unwrap();
    let options = TrainOptions {
        recipe_dir: root().join("recipes"),
        quiet: true,
        ..Default::default()
    };
    train::<CpuAutodiff>(&recipe, &options, FloatFormat::F32, &Default::default()).unwrap();
}

/// The JSON object a command prints after its human-readable lines.
fn json_after_text(stdout: &str) -> Value {
    let json: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with('{')).collect();
    serde_json::from_str(&json.join("\n")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn eval_and_generate_show_the_cache_shrinking() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    tiny_run(&run);
    let report_dir = dir.path().join("report");
    let report = eval_report(&run, &["--out", report_dir.to_str().unwrap()]);
    let data = root().join("data/shakespeare/eval.jsonl");
    let length = &report["lengths"][0];
    let rows = length["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "original (dense)",
            "DMS",
            "StreamingLLM",
            "Recent",
            "TOVA",
            "H2O",
            "SnapKV"
        ]
    );
    let dms_cr = rows[1]["compression_ratio"].as_f64().unwrap();
    assert!(dms_cr > 1.2, "DMS CR {dms_cr}");
    for baseline in &rows[2..] {
        let cr = baseline["compression_ratio"].as_f64().unwrap();
        assert!(
            (cr / dms_cr - 1.0).abs() < 0.15,
            "{}: CR {cr} vs DMS {dms_cr}",
            baseline["method"]
        );
        assert!(baseline["kl_to_original"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(rows[0]["kl_to_original"].as_f64().unwrap(), 0.0);
    let grid = length["cr_per_layer_head"].as_array().unwrap();
    assert_eq!(grid.len(), 2);
    assert_eq!(grid[0].as_array().unwrap().len(), 2);
    assert!(report_dir.join("report.json").is_file());
    let svg = std::fs::read_to_string(report_dir.join("cr-heatmap-96.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("layer 1"));

    // generate: DMS run vs the dense base model.
    let (ok, stdout, stderr) = cli(&[
        "generate",
        run.to_str().unwrap(),
        "--prompt",
        "KING. What say you",
        "--max-new-tokens",
        "80",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let stats = json_after_text(&stdout);
    assert!(stats["kv_bytes"].as_u64().unwrap() < stats["kv_bytes_dense"].as_u64().unwrap());
    assert!(stats["measured_cr"].as_f64().unwrap() > 1.0);
    let single_text = stdout.lines().next().unwrap_or("").to_string();

    // A batch of prompts decodes together; greedy completions do not depend on the batch.
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"KING. What say you\"}\n\"ROMEO. O\"\n{\"prompt\": \"To\"}\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = cli(&[
        "generate",
        run.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "80",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let mut completions: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with("{\"index\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    completions.sort_by_key(|c| c["index"].as_u64().unwrap());
    assert_eq!(completions.len(), 3, "{stdout}");
    assert_eq!(completions[1]["prompt"], "ROMEO. O");
    assert_eq!(
        completions[0]["completion"].as_str().unwrap(),
        single_text,
        "the first prompt alone and in a batch"
    );
    let stats = json_after_text(
        &stdout
            .lines()
            .filter(|l| !l.starts_with("{\"index\""))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(stats["batch"], 3);
    assert!(stats["kv_live_bytes"].as_u64().unwrap() < stats["kv_bytes_dense"].as_u64().unwrap());

    let base = root().join("data/tiny-llama");
    let (ok, stdout, stderr) = cli(&[
        "generate",
        base.to_str().unwrap(),
        "--prompt",
        "KING.",
        "--max-new-tokens",
        "20",
        "--json",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]);
    assert!(ok, "{stderr}");
    let stats = json_after_text(&stdout);
    assert_eq!(stats["kv_live_bytes"], stats["kv_bytes_dense"]);
    assert!(stats["kv_bytes"].as_u64().unwrap() >= stats["kv_live_bytes"].as_u64().unwrap());

    // A base model without --cr is one clear error.
    let (ok, _, stderr) = cli(&[
        "eval",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("--cr"), "{stderr}");
}

/// Runs the binary from the repository root and returns its one-line error.
fn error_of(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    err
}

#[test]
fn bad_flags_are_one_error_naming_the_flag_and_its_range() {
    let model = "data/tiny-llama";
    let data = "data/shakespeare/eval.jsonl";
    for cr in ["0", "-2", "NaN", "inf"] {
        let err = error_of(&["eval", model, "--data", data, &format!("--cr={cr}")]);
        assert!(err.contains("--cr") && err.contains(">= 1"), "{err}");
    }
    let err = error_of(&["eval", model, "--data", "README.md", "--cr", "2"]);
    assert!(
        err.contains("--data") && !err.contains("data.train_files"),
        "{err}"
    );
    let err = error_of(&[
        "eval",
        model,
        "--data",
        data,
        "--cr",
        "2",
        "--seq-len",
        "1024",
    ]);
    assert!(
        err.contains("--seq-len") && err.contains("max_position_embeddings = 512"),
        "{err}"
    );
    for temperature in ["NaN", "-1", "inf"] {
        let flag = format!("--temperature={temperature}");
        let err = error_of(&["generate", model, "--prompt", "KING", &flag]);
        assert!(err.contains("--temperature"), "{err}");
    }
    let err = error_of(&["generate", model, "--prompt", "KING", "--top-p", "NaN"]);
    assert!(err.contains("--top-p"), "{err}");
    let err = error_of(&[
        "generate",
        model,
        "--prompt",
        "KING",
        "--max-new-tokens",
        "600",
    ]);
    assert!(
        err.contains("--max-new-tokens") && err.contains("max_position_embeddings = 512"),
        "{err}"
    );
}

#[test]
fn seq_len_beyond_the_model_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = error_of(&[
        "train",
        "--recipe",
        "recipes/tiny.toml",
        "--set",
        "data.seq_len=513",
        "--set",
        &format!("run.output_dir=\"{}\"", out.display()),
    ]);
    assert!(
        err.contains("data.seq_len = 513") && err.contains("max_position_embeddings = 512"),
        "{err}"
    );
}

#[test]
fn device_and_dtype_flags_are_checked_before_loading() {
    let model = "data/tiny-llama";
    let data = "data/shakespeare/eval.jsonl";
    for command in [
        vec!["eval", model, "--data", data],
        vec!["generate", model, "--prompt", "hi"],
        vec!["logits", model, "--ids", "1,2"],
    ] {
        let with = |extra: &[&str]| {
            let mut args = command.clone();
            args.extend_from_slice(extra);
            error_of(&args)
        };
        let err = with(&["--device", "tpu"]);
        assert!(
            err.contains("--device 'tpu'") && err.contains("cuda:N"),
            "{err}"
        );
        let err = with(&["--dtype", "bf16"]);
        assert!(
            err.contains("--dtype bfloat16 needs --device cuda"),
            "{err}"
        );
        let err = with(&["--device", "cuda", "--dtype", "f64"]);
        if cfg!(feature = "cuda") {
            assert!(
                err.contains("--dtype 'f64' must be f32, bf16 or f16"),
                "{err}"
            );
        } else {
            assert!(err.contains("needs a CUDA build"), "{err}");
        }
    }
}

/// The same eval on the CPU through the backend-generic path as before: explicit `--device cpu
/// --dtype f32` equals the defaults.
#[test]
fn explicit_cpu_f32_equals_the_defaults() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "data/tiny-llama",
            "--data",
            "data/shakespeare/eval.jsonl",
            "--seq-len",
            "32",
            "--max-sequences",
            "1",
            "--cr",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
            .args(&args)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&[]), run(&["--device", "cpu", "--dtype", "f32"]));
}

/// The report of `eval MODEL` over the eval sample at 96 tokens, with extra flags.
fn eval_report(model: &Path, extra: &[&str]) -> Value {
    let data = root().join("data/shakespeare/eval.jsonl");
    let mut args = vec![
        "eval",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "96",
        "--max-sequences",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = cli(&args);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn row<'a>(report: &'a Value, method: &str) -> &'a Value {
    report["lengths"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == method)
        .unwrap()
}

#[test]
fn a_retrofit_that_changed_base_weights_is_compared_with_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    tiny_run_with(&run, &["train.trainable=\"adapter+attention\""]);
    let export = dir.path().join("export");
    let (ok, _, stderr) = cli(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let base = root().join("data/tiny-llama");
    // The original model's rows, evaluated on their own at the retrofit's measured CR.
    let from_run = eval_report(&run, &[]);
    let cr = row(&from_run, "DMS")["compression_ratio"].as_f64().unwrap();
    let cr = format!("{cr}");
    let alone = eval_report(&base, &["--cr", &cr]);
    for model in [&run, &export] {
        let report = eval_report(model, &[]);
        assert!(
            report["original"]
                .as_str()
                .unwrap()
                .contains("base checkpoint"),
            "{}",
            report["original"]
        );
        for method in ["original (dense)", "H2O", "TOVA"] {
            let (a, b) = (row(&report, method), row(&alone, method));
            assert!(
                (a["perplexity"].as_f64().unwrap() - b["perplexity"].as_f64().unwrap()).abs()
                    < 1e-6 * b["perplexity"].as_f64().unwrap(),
                "{method}: {a} vs {b}"
            );
        }
    }
    // `--original self`: the retrofit's own weights with eviction off, another perplexity.
    let own = eval_report(&export, &["--original", "self"]);
    assert_eq!(own["original"], "the model itself with eviction off");
    let (own_ppl, base_ppl) = (
        row(&own, "original (dense)")["perplexity"]
            .as_f64()
            .unwrap(),
        row(&alone, "original (dense)")["perplexity"]
            .as_f64()
            .unwrap(),
    );
    assert!((own_ppl - base_ppl).abs() > 1e-4, "{own_ppl} vs {base_ppl}");
    // A DMS model is no original.
    let err = error_of(&[
        "eval",
        export.to_str().unwrap(),
        "--data",
        root().join("data/shakespeare/eval.jsonl").to_str().unwrap(),
        "--original",
        export.to_str().unwrap(),
    ]);
    assert!(err.contains("is a DMS model"), "{err}");
}
