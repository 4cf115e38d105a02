//! `dms-retrofit bench load` end to end on a fixture: every base tensor reaches the device once per
//! repeat, with and without the read-ahead thread, and bad input is one clear error; and `bench
//! step`'s argument check that runs before any weights are made.

use std::process::Command;

use serde_json::Value;

fn bench_load(args: &[&str], prefetch: bool) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(["bench", "load"])
        .args(args)
        .env("DMS_RETROFIT_PREFETCH", if prefetch { "1" } else { "0" })
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stderr)
}

#[test]
fn loads_every_base_tensor_each_repeat() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen3");
    for prefetch in [true, false] {
        let (ok, report, stderr) = bench_load(&[dir, "--repeats", "2"], prefetch);
        assert!(ok, "bench load failed: {stderr}");
        assert_eq!(report["read_ahead"], prefetch);
        // Direct reads into device staging exist on CUDA only.
        assert_eq!(report["from_file"], 0);
        // 2 layers x (4 projections + 3 MLP + 4 norms) + embedding, final norm, head.
        assert_eq!(report["tensors"], 25);
        // f32 on the CPU: the fixture's parameter count x 4 bytes.
        assert_eq!(report["bytes"], 526_080);
        let loads = report["loads"].as_array().unwrap();
        assert_eq!(loads.len(), 2);
        for load in loads {
            assert!(load["seconds"].as_f64().unwrap() > 0.0);
            assert!(load["host_s"].as_f64().unwrap() <= load["seconds"].as_f64().unwrap());
        }
    }
}

#[test]
fn bad_input_is_one_clear_error() {
    let (ok, _, stderr) = bench_load(&["/nonexistent/checkpoint"], true);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/checkpoint"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen3");
    let (ok, _, stderr) = bench_load(&[dir, "--repeats", "0"], true);
    assert!(!ok && stderr.contains("--repeats"), "{stderr}");
}

/// `bench step --graph-layers` above the shape's layer count is one error naming both numbers
/// (before any weights are made).
#[test]
fn bench_step_rejects_more_graph_layers_than_the_shape_has() {
    let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(["bench", "step", "--shape", "qwen3-8b", "--recompute-layers"])
        .args(["--graph-layers", "99", "--device", "cpu"])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--graph-layers 99") && stderr.contains("36 layers"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
