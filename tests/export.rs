//! `dms-retrofit export`: exports of short tiny runs (both variants) load back with identical
//! logits (eviction on and off), untouched tensors are byte-identical, sharding and overwrite
//! rules hold, and an export can seed a new run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};
use dms_retrofit::backend::{Cpu, CpuAutodiff};
use dms_retrofit::checkpoint::{Checkpoint, SafetensorsStore};
use dms_retrofit::dms::{DmsModel, Mode};
use dms_retrofit::model::FloatFormat;
use dms_retrofit::recipe::Recipe;
use dms_retrofit::run::snapshot::{load_trainable, read_state};
use dms_retrofit::train::{TrainOptions, train};

fn recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes")
}

fn short_run(out: &Path, extra: &[&str]) {
    let mut sets: Vec<String> = [
        "train.max_steps=4",
        "dms.final_step=2",
        "data.seq_len=32",
        "run.eval_every=0",
        "train.lr=1e-2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("run.output_dir=\"{}\"", out.display()));
    let recipe = Recipe::load(&recipes().join("tiny.toml"), &sets).unwrap();
    let options = TrainOptions {
        recipe_dir: recipes(),
        quiet: true,
        ..Default::default()
    };
    train::<CpuAutodiff>(&recipe, &options, FloatFormat::F32, &Default::default()).unwrap();
}

fn export(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .arg("export")
        .args(args)
        .output()
        .unwrap()
}

/// `export` that must succeed (its stderr is the failure message).
fn export_ok(args: &[&str]) {
    let result = export(args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn bits(t: Tensor<Cpu, 3>) -> Vec<u32> {
    t.into_data()
        .into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Logits of the run's model (base + trained tensors) and of the export, eviction on and off.
fn assert_same_model(snapshot: &Path, exported: &Path) {
    let device = Default::default();
    let state = read_state(snapshot).unwrap();
    let base = Checkpoint::open(state.base_dir.to_str().unwrap()).unwrap();
    let (mut run_model, _) = base
        .load_dms_model::<Cpu>(Some(&state.dms), FloatFormat::F32, &device)
        .unwrap();
    load_trainable(snapshot, &mut run_model).unwrap();

    let export = Checkpoint::open(exported.to_str().unwrap()).unwrap();
    let exported_dms = export.dms.clone().expect("export carries dms_* keys");
    assert_eq!(exported_dms.config, state.dms);
    let (export_model, _) = export
        .load_dms_model::<Cpu>(None, FloatFormat::F32, &device)
        .unwrap();

    let ids: Vec<i64> = (0..2 * 40).map(|i| (i * 7 % 250) as i64 + 1).collect();
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [2, 40]), &device);
    for mode in [Mode::Inference, Mode::Original] {
        let a = run_model.logits(run_model.forward(input.clone(), &mode).hidden);
        let b = export_model.logits(export_model.forward(input.clone(), &mode).hidden);
        assert_eq!(bits(a), bits(b), "logits differ after export");
    }
    let _: &DmsModel<Cpu> = &export_model;
}

#[test]
fn adapter_export_round_trips_and_copies_untouched_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    short_run(&run, &[]);
    let out = dir.path().join("export");
    export_ok(&[
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dms_separate_alpha"], true);
    assert_eq!(config["dms_window_size"], 16);
    assert_eq!(config["dms_alpha_per"], "head");
    // The official loader asserts 0 < block size < window (16 here).
    assert_eq!(config["dms_paged_attention_block_size"], 8);
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");

    // Every base tensor is byte-identical (adapter-only run, same dtype).
    let snapshot = run.join("checkpoints/step-4");
    let state = read_state(&snapshot).unwrap();
    let base = SafetensorsStore::open(
        &[state.base_dir.join("model.safetensors")],
        FloatFormat::F32,
    )
    .unwrap();
    let exported =
        SafetensorsStore::open(&[out.join("model.safetensors")], FloatFormat::F32).unwrap();
    let mut compared = 0;
    for name in base.names() {
        assert_eq!(
            base.raw(name).unwrap().bytes,
            exported.raw(name).unwrap().bytes,
            "{name}"
        );
        compared += 1;
    }
    assert!(compared > 10);
    assert!(
        exported
            .names()
            .any(|n| n == "model.layers.1.self_attn.dms_proj_alpha.weight")
    );
    assert!(
        exported
            .names()
            .any(|n| n == "model.layers.0.self_attn.dms_proj_alpha_norm.weight")
    );
    assert_same_model(&snapshot, &out);

    // inspect recognises the DMS settings.
    let inspect = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(["inspect", out.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(report["dms"]["window"], 16);
    assert_eq!(report["dms_tensors"], 4);

    // No overwrite without --force; with it, the folder is replaced.
    let again = export(&[run.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = export(&[
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(forced.status.success());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["dtype"].as_str().or(config["torch_dtype"].as_str()),
        Some("bfloat16")
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left behind");

    // Sharded export loads identically.
    let sharded = dir.path().join("sharded");
    export_ok(&[
        snapshot.to_str().unwrap(),
        "--out",
        sharded.to_str().unwrap(),
        "--dtype",
        "f32",
        "--max-shard-size",
        "100KB",
    ]);
    assert!(sharded.join("model.safetensors.index.json").is_file());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<_> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(shards.len() >= 2, "{shards:?}");
    for shard in &shards {
        assert!(sharded.join(shard).is_file(), "{shard}");
    }
    assert_same_model(&snapshot, &sharded);

    // An export is a valid starting point for another run.
    let seeded = dir.path().join("seeded");
    short_run(&seeded, &[&format!("model.source=\"{}\"", out.display())]);
}

#[test]
fn q_neuron_export_has_no_extra_tensors_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    short_run(
        &run,
        &[
            "dms.variant=q_neuron",
            "train.trainable=\"adapter+attention\"",
        ],
    );
    let out = dir.path().join("export");
    export_ok(&[
        run.join("cr-2").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dms_separate_alpha"], false);
    // cr-2 is saved at the first step whose scheduled CR is >= 2 (2.5 on this coarse schedule).
    let state = read_state(&run.join("cr-2")).unwrap();
    assert!(state.scheduled_cr >= 2.0);
    assert_eq!(config["dms_cr"].as_f64().unwrap(), state.scheduled_cr);
    let exported =
        SafetensorsStore::open(&[out.join("model.safetensors")], FloatFormat::F32).unwrap();
    assert!(!exported.names().any(|n| n.contains("dms_proj_alpha")));
    assert_same_model(&run.join("cr-2"), &out);
}

#[test]
fn export_of_a_non_run_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(&[
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cr-K") && !err.contains("panicked"), "{err}");
}

/// Copies a folder's files (one level deep).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn force_never_replaces_the_run_its_parent_a_snapshot_or_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    // A private copy of the base model: a failing guard must not destroy the repository's.
    let base = dir.path().join("models/tiny");
    copy_dir(&recipes().join("../data/tiny-llama"), &base);
    let run = dir.path().join("runs/run");
    short_run(&run, &[&format!("model.source=\"{}\"", base.display())]);
    let other = dir.path().join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "a run's notes").unwrap();
    let before_run = tree(&run);
    let before_base = tree(&base);
    let cr = run.join("cr-2");
    for (snapshot, out) in [
        (&run, &run),
        (&run, &dir.path().join("runs")),
        (&run, &base),
        (&run, &dir.path().join("models")),
        (&run, &run.join("checkpoints")),
        (&cr, &cr),
        (&cr, &run),
        (&cr, &run.join("checkpoints")),
    ] {
        let result = export(&[
            snapshot.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--force",
        ]);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(
            !result.status.success(),
            "--out {} was replaced",
            out.display()
        );
        assert!(
            err.contains("--force never replaces") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    assert_eq!(tree(&run), before_run, "the run is intact");
    assert_eq!(tree(&base), before_base, "the base model is intact");
    // An unrelated folder is still replaced with --force, as documented.
    export_ok(&[
        run.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        "--force",
    ]);
    assert!(!other.join("keep.txt").exists() && other.join("config.json").is_file());
}

#[test]
fn block_size_is_one_the_official_loader_accepts() {
    use dms_retrofit::checkpoint::export::paged_block_size;
    for (window, expected) in [
        (16, 8),
        (64, 32),
        (256, 128),
        (257, 256),
        (512, 256),
        (4096, 256),
    ] {
        let block = paged_block_size(window).unwrap();
        assert_eq!(block, expected, "window {window}");
        // Qwen3ConfigDMS: assert block_size > 0 and dms_window_size > block_size.
        assert!(
            block > 0 && window > block,
            "window {window}, block {block}"
        );
    }
    for window in [2, 3, 5, 1000] {
        let block = paged_block_size(window).unwrap();
        assert!(block > 0 && window > block && block.is_power_of_two());
    }
    let err = format!("{:#}", paged_block_size(1).unwrap_err());
    assert!(err.contains("dms.window") && err.contains(">= 2"), "{err}");
}
