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
    let sets: Vec<String> = vec![
        "train.max_steps=30".into(),
        "dms.final_step=20".into(),
        "data.seq_len=64".into(),
        "run.eval_every=0".into(),
        "train.lr=3e-3".into(),
        format!("run.output_dir=\"{}\"", out.display()),
    ];
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
    let data = root().join("data/shakespeare/eval.jsonl");
    let report_dir = dir.path().join("report");
    let (ok, stdout, stderr) = cli(&[
        "eval",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "96",
        "--max-sequences",
        "2",
        "--out",
        report_dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let length = &report["lengths"][0];
    let rows = length["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["original (dense)", "DMS", "StreamingLLM", "TOVA", "H2O"]
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
    assert_eq!(stats["kv_bytes"], stats["kv_bytes_dense"]);

    // A base model without --cr is one clear error.
    let (ok, _, stderr) = cli(&[
        "eval",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("--cr"), "{stderr}");
}
