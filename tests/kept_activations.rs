//! What a DMS training step keeps between its forward and its backward, per layer, measured as
//! the heap growth over the student forward of `dms-retrofit bench step --profile` on the CPU
//! (the binary counts its heap; see `src/heap.rs`). Guards the memory work of issue 18: the MLP
//! and the DMS adapter keep the residual, not also their normalised copies, and the attention
//! rebuilds its queries from the q-norm's input instead of keeping them.

use std::process::Command;

use serde_json::Value;

/// Qwen3-0.6B's shape (hidden 1024, 16 query heads of 128 = 2x hidden, 8 KV heads, 28 layers):
/// a layer keeps its input (1 unit of hidden-sized f32 per token), the q- and k-norm inputs
/// (2 + 1), the keys and values (1 + 1), the attention output (2) and the residual after the
/// attention (1): 9 units. Before the issue-18 changes it was 13 (the MLP's and the adapter's
/// normalised inputs, the queries after RoPE).
#[test]
fn a_layer_keeps_nine_hidden_sized_vectors_per_token() {
    let (seq, hidden, layers) = (64usize, 1024usize, 28usize);
    let out = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(["bench", "step", "--shape", "qwen3-0.6b", "--seq"])
        .arg(seq.to_string())
        .args(["--steps", "1", "--profile", "--device", "cpu"])
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "bench step failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("bench step prints JSON");
    let after = &report["pool_gib"]["in_use_after"];
    let gib = |phase: &str| {
        after[phase]
            .as_f64()
            .unwrap_or_else(|| panic!("no heap sample for {phase}: {report}"))
    };
    let kept = (gib("2 student forward") - gib("1 teacher forward")) * (1u64 << 30) as f64;
    let units = kept / (layers * seq * hidden * 4) as f64;
    // 9.16 measured (the rest: the final hidden states, the noise, the decisions).
    assert!(
        (8.8..9.6).contains(&units),
        "the student forward kept {units:.2} hidden-sized vectors per token and layer, expected ~9"
    );
}
