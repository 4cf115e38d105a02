//! `dms-retrofit inspect` end to end: on a fixture folder, on a Hugging Face cache layout (offline),
//! and on bad input (one clear error, no panic).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn dms_retrofit(args: &[&str], envs: &[(&str, &Path)], offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"));
    cmd.args(args)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn inspect_json(model: &str, envs: &[(&str, &Path)]) -> Value {
    let out = dms_retrofit(&["inspect", model, "--json"], envs, true);
    assert!(out.status.success(), "inspect failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn inspect_reports_architecture_parameters_and_kv_memory() {
    let dir = common::fixtures().join("qwen3");
    let report = inspect_json(dir.to_str().unwrap(), &[]);
    assert_eq!(report["architecture"], "Qwen3ForCausalLM");
    let cfg = &report["config"];
    assert_eq!(cfg["head_dim"], 32);
    assert_eq!(cfg["num_layers"], 2);
    // Parameter count must equal the number of stored values.
    let text = std::fs::read(dir.join("model.safetensors")).unwrap();
    let stored: usize = safetensors::SafeTensors::deserialize(&text)
        .unwrap()
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    assert_eq!(report["parameters"].as_u64().unwrap() as usize, stored);
    // 2 (K and V) x layers x kv_heads x head_dim x bytes.
    let per_token =
        2 * cfg["num_layers"].as_u64().unwrap() * cfg["num_kv_heads"].as_u64().unwrap() * 32 * 4;
    assert_eq!(report["kv_dtype"], "f32");
    assert_eq!(report["kv_bytes_per_token"].as_u64().unwrap(), per_token);
    let row = &report["kv_cache"][0];
    assert_eq!(row["context"], 4096);
    assert_eq!(row["dense_bytes"].as_u64().unwrap(), per_token * 4096);
    assert_eq!(
        row["dms_bytes"]["cr8"].as_u64().unwrap(),
        per_token * 4096 / 8
    );

    let table = dms_retrofit(&["inspect", dir.to_str().unwrap()], &[], true);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("DMS CR8") && text.contains("131072"),
        "{text}"
    );
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--tiny-org--tiny-llama");
    copy_dir(
        &common::fixtures().join("llama"),
        &repo.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();

    // HF_HUB_CACHE, by branch and by commit.
    let envs = [("HF_HUB_CACHE", cache.path())];
    for spec in [
        "tiny-org/tiny-llama",
        &format!("tiny-org/tiny-llama@{commit}"),
    ] {
        let report = inspect_json(spec, &envs);
        assert_eq!(report["architecture"], "LlamaForCausalLM");
        assert!(
            report["origin"].as_str().unwrap().contains(commit),
            "{report}"
        );
    }

    // HF_HOME/hub is the fallback location.
    let home = tempfile::tempdir().unwrap();
    std::fs::rename(
        cache.path().join("models--tiny-org--tiny-llama"),
        home.path().join("hub"),
    )
    .ok();
    std::fs::create_dir_all(home.path().join("hub")).unwrap();
    copy_dir(
        &common::fixtures().join("llama"),
        &home
            .path()
            .join("hub/models--tiny-org--tiny-llama/snapshots")
            .join(commit),
    );
    std::fs::create_dir_all(home.path().join("hub/models--tiny-org--tiny-llama/refs")).unwrap();
    std::fs::write(
        home.path()
            .join("hub/models--tiny-org--tiny-llama/refs/main"),
        commit,
    )
    .unwrap();
    let report = inspect_json("tiny-org/tiny-llama", &[("HF_HOME", home.path())]);
    assert_eq!(report["architecture"], "LlamaForCausalLM");

    // Not cached + offline: one clear error naming the id and the variable.
    let out = dms_retrofit(&["inspect", "tiny-org/absent"], &envs, true);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("tiny-org/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs inspect on a mutated copy of a fixture and returns the error text.
fn error_for(mutate: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("qwen2"), dir.path());
    mutate(dir.path());
    let out = dms_retrofit(&["inspect", dir.path().to_str().unwrap()], &[], true);
    assert!(!out.status.success(), "inspect should fail");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one error line expected: {err}"
    );
    err
}

/// Rewrites model.safetensors through `edit(name, shape, bytes)`, which may drop or change tensors.
fn rewrite_weights(
    dir: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            owned.push((t, view.dtype()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|((name, shape, data), dtype)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    drop(st);
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let err = error_for(|dir| {
        rewrite_weights(dir, |name, shape, data| {
            (name != "model.layers.1.mlp.up_proj.weight").then(|| (name.to_string(), shape, data))
        })
    });
    assert!(
        err.contains("missing tensors: model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let err = error_for(|dir| {
        rewrite_weights(dir, |name, shape, data| {
            let name = if name == "model.norm.weight" {
                "model.extra_norm.weight"
            } else {
                name
            };
            Some((name.to_string(), shape, data))
        })
    });
    assert!(
        err.contains("unexpected tensors: model.extra_norm.weight"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("qwen2"), dir.path());
    rewrite_weights(dir.path(), |name, shape, data| {
        if name == "model.layers.0.self_attn.k_proj.bias" {
            let half = data.len() / 2;
            Some((name.to_string(), vec![shape[0] / 2], data[..half].to_vec()))
        } else {
            Some((name.to_string(), shape, data))
        }
    });
    // inspect reads headers only; loading the weights is what checks shapes.
    let ckpt = dms_retrofit::checkpoint::Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
    let err = ckpt
        .load_decoder::<dms_retrofit::backend::Cpu>(
            dms_retrofit::model::FloatFormat::F32,
            &Default::default(),
        )
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.bias"),
        "{err}"
    );
    assert!(err.contains("[16]") && err.contains("[32]"), "{err}");
}

#[test]
fn unsupported_architecture_is_one_clear_error() {
    let err = error_for(|dir| {
        let path = dir.join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        std::fs::write(&path, cfg.to_string()).unwrap();
    });
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn missing_weights_file_is_explained() {
    let err = error_for(|dir| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    });
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn truncated_weights_file_is_explained() {
    let err = error_for(|dir| {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..20]).unwrap();
    });
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn nonexistent_folder_is_explained() {
    let out = dms_retrofit(&["inspect", "./no/such/folder"], &[], true);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn inspect_load_checks_every_weight() {
    let dir = common::fixtures().join("qwen2_bf16");
    let out = dms_retrofit(
        &["inspect", dir.to_str().unwrap(), "--load", "--json"],
        &[],
        true,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let params = report["parameters"].as_u64().unwrap();
    assert_eq!(report["load"]["bytes_f32"].as_u64().unwrap(), 4 * params);
}

#[test]
fn non_finite_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("qwen2"), dir.path());
    rewrite_weights(dir.path(), |name, shape, mut data| {
        if name == "model.layers.1.self_attn.o_proj.weight" {
            data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((name.to_string(), shape, data))
    });
    let out = dms_retrofit(
        &["inspect", dir.path().to_str().unwrap(), "--load"],
        &[],
        true,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("model.layers.1.self_attn.o_proj.weight") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn tensor_data_past_the_end_of_the_file_is_named() {
    let err = error_for(|dir| {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    });
    assert!(
        err.contains("not a valid safetensors file") && err.contains("data_offsets"),
        "{err}"
    );
    assert!(err.contains("tensor '"), "the tensor is named: {err}");
}

#[test]
fn config_values_out_of_range_name_the_key_and_the_range() {
    for (key, value, expected) in [
        ("max_position_embeddings", serde_json::json!(0), ">= 1"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "> 0"),
    ] {
        let err = error_for(|dir| {
            let path = dir.join("config.json");
            let mut cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            cfg[key] = value;
            std::fs::write(&path, cfg.to_string()).unwrap();
        });
        assert!(
            err.contains(key) && err.contains(expected) && err.contains("config.json"),
            "{err}"
        );
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    // ~200 tokens x 256 logits: far more than a pipe buffer, so the writer meets the closed end.
    let text = "To be, or not to be, that is the question. ".repeat(5);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(["logits", "data/tiny-llama", "--text", &text])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // The read end is closed here (dropped), as `| head -c 16` does.
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "a panic's exit code: {err}");
}
