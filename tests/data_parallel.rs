//! Data-parallel ranks on the CPU (issue 19): N simulated ranks (`run.devices = ["cpu", ...]`,
//! threads of one process summing through the in-process all-reduce) train exactly the run one
//! rank does with the same `train.grad_accum`, and a run resumes across rank counts.

mod common;

use common::metrics_without_clock;

use std::path::{Path, PathBuf};

use dms_retrofit::backend::CpuAutodiff;
use dms_retrofit::model::FloatFormat;
use dms_retrofit::recipe::Recipe;
use dms_retrofit::train::{TrainOptions, TrainSummary, train_ranks};
use safetensors::SafeTensors;

fn recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes")
}

fn recipe(out: &Path, sets: &[&str], ranks: usize) -> Recipe {
    let mut overrides: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("run.output_dir=\"{}\"", out.display()));
    overrides.push(format!("run.devices={:?}", vec!["cpu"; ranks]));
    Recipe::load(&recipes().join("tiny.toml"), &overrides).unwrap()
}

/// Trains (or resumes) with `ranks` CPU ranks, as `dms-retrofit train` does for `run.devices`.
fn run(out: &Path, sets: &[&str], ranks: usize, resume: bool, stop: Option<u64>) -> TrainSummary {
    let recipe = recipe(out, sets, ranks);
    assert_eq!(recipe.devices().unwrap().len(), ranks);
    let options = TrainOptions {
        resume,
        recipe_dir: recipes(),
        quiet: true,
        stop_after: stop,
    };
    let devices = vec![Default::default(); ranks];
    train_ranks::<CpuAutodiff>(&recipe, &options, FloatFormat::F32, &devices).unwrap()
}

fn weights(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step}/trainable.safetensors"))).unwrap()
}

/// Largest relative difference between two runs' trainable weights (same names, f32).
fn weight_difference(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (
        SafeTensors::deserialize(a).unwrap(),
        SafeTensors::deserialize(b).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut other = b.names();
    other.sort();
    assert_eq!(names, other);
    let mut worst = 0f64;
    for name in names {
        let values = |t: &SafeTensors| -> Vec<f32> {
            t.tensor(name)
                .unwrap()
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        for (x, y) in values(&a).iter().zip(values(&b)) {
            let scale = x.abs().max(y.abs()).max(1e-3) as f64;
            worst = worst.max((x - y).abs() as f64 / scale);
        }
    }
    worst
}

/// Two finished runs agree on every metric and on their final (step 8) weights, bit for bit.
fn assert_same_run(a: &Path, b: &Path, label: &str) {
    assert_eq!(
        metrics_without_clock(a),
        metrics_without_clock(b),
        "{label}: every metric"
    );
    assert!(
        weights(a, 8) == weights(b, 8),
        "{label}: bit-identical weights"
    );
}

const SMALL: [&str; 7] = [
    "train.max_steps=8",
    "dms.final_step=6",
    "data.seq_len=64",
    "train.micro_batch=2",
    "run.checkpoint_every=0",
    "run.eval_every=4",
    "run.eval_sequences=2",
];

#[test]
fn two_ranks_train_exactly_what_one_rank_does_with_the_same_grad_accum() {
    // One micro-batch per rank: the all-reduce adds the gradients in the order one rank
    // accumulates them, so metrics and weights are bit-identical.
    for trainable in ["adapter", "adapter+attention"] {
        let sets: Vec<String> = SMALL
            .iter()
            .map(|s| s.to_string())
            .chain([
                "train.grad_accum=2".to_string(),
                format!("train.trainable=\"{trainable}\""),
            ])
            .collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        run(&one, &sets, 1, false, None);
        let summary = run(&two, &sets, 2, false, None);
        assert_eq!(summary.steps, 8);
        assert_same_run(&one, &two, trainable);
    }
}

#[test]
fn ranks_with_several_micro_batches_each_match_one_rank_to_rounding() {
    // Two micro-batches per rank: each rank sums its own pair first, so the sum is associated
    // differently from one rank's running sum; f32 rounding only (tolerance 1e-5 relative).
    let sets: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain(["train.grad_accum=4"])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run(&one, &sets, 1, false, None);
    run(&two, &sets, 2, false, None);
    let (a, b) = (metrics_without_clock(&one), metrics_without_clock(&two));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (key, value) in x.as_object().unwrap() {
            let (Some(p), Some(q)) = (value.as_f64(), y[key].as_f64()) else {
                assert_eq!(value, &y[key], "{key}");
                continue;
            };
            assert!(
                (p - q).abs() <= 1e-5 * p.abs().max(q.abs()).max(1e-3),
                "{key}: {p} vs {q} at {x}"
            );
        }
    }
    let worst = weight_difference(&weights(&one, 8), &weights(&two, 8));
    assert!(worst < 1e-5, "weights differ by {worst:e} (relative)");
}

#[test]
fn a_run_resumes_across_rank_counts_as_if_never_stopped() {
    let sets: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain(["train.grad_accum=2"])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (straight, moved) = (dir.path().join("straight"), dir.path().join("moved"));
    run(&straight, &sets, 1, false, None);
    // 2 ranks for 3 steps, 1 rank for 3 more, then 2 ranks to the end.
    assert!(run(&moved, &sets, 2, false, Some(3)).interrupted);
    assert!(run(&moved, &sets, 1, true, Some(3)).interrupted);
    let last = run(&moved, &sets, 2, true, None);
    assert_eq!((last.steps, last.interrupted), (8, false));
    assert_same_run(&straight, &moved, "2 -> 1 -> 2 ranks");
}

#[test]
fn grad_accum_must_split_evenly_over_the_devices() {
    let mut overrides = vec![
        "train.grad_accum=2".to_string(),
        "run.devices=[\"cpu\", \"cpu\", \"cpu\"]".to_string(),
    ];
    let err = Recipe::load(&recipes().join("tiny.toml"), &overrides).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("train.grad_accum = 2") && message.contains("train.grad_accum = 3"),
        "{message}"
    );
    overrides[0] = "train.grad_accum=3".to_string();
    assert_eq!(
        Recipe::load(&recipes().join("tiny.toml"), &overrides)
            .unwrap()
            .devices()
            .unwrap()
            .len(),
        3
    );
    overrides[1] = "run.devices=[\"cuda:1\", \"cuda:1\", \"cuda:0\"]".to_string();
    let err = Recipe::load(&recipes().join("tiny.toml"), &overrides).unwrap_err();
    assert!(format!("{err:#}").contains("cuda:1 twice"), "{err:#}");
}

fn file_size(path: PathBuf) -> u64 {
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

#[test]
fn a_sharded_optimizer_trains_the_same_weights_and_resumes_across_rank_counts() {
    let sets: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain([
            "train.grad_accum=2",
            "train.trainable=\"adapter+attention\"",
        ])
        .collect();
    let sharded: Vec<&str> = sets
        .iter()
        .copied()
        .chain(["run.shard_optimizer=true"])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (one, two, moved) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("moved"),
    );
    run(&one, &sets, 1, false, None);
    run(&two, &sharded, 2, false, None);
    assert_same_run(&one, &two, "sharded");

    // Each rank saved only its share of the AdamW moments.
    let whole = file_size(one.join("checkpoints/step-8/optimizer.mpk"));
    let shards: Vec<u64> = (0..2)
        .map(|r| file_size(two.join(format!("checkpoints/step-8/optimizer-rank-{r}.mpk"))))
        .collect();
    assert!(!two.join("checkpoints/step-8/optimizer.mpk").exists());
    assert!(
        shards.iter().all(|&s| s < whole * 3 / 4) && shards.iter().sum::<u64>() >= whole * 9 / 10,
        "shards {shards:?} of a {whole}-byte state"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&two)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    // Sharded on 2 ranks, then whole on 1, then sharded on 2 again: the straight run.
    assert!(run(&moved, &sharded, 2, false, Some(3)).interrupted);
    assert!(run(&moved, &sets, 1, true, Some(3)).interrupted);
    run(&moved, &sharded, 2, true, None);
    assert_same_run(&one, &moved, "sharded 2 -> whole 1 -> sharded 2");
}
