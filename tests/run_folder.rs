//! The run folder under interruption and misuse (tiny recipe, CPU): a run stopped anywhere resumes
//! to the uninterrupted result, summary included; one process writes a folder at a time; signals
//! checkpoint; leftovers of killed processes are cleaned; the folder works from any directory.

mod common;

use common::metrics_without_clock;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dms_retrofit::backend::CpuAutodiff;
use dms_retrofit::model::FloatFormat;
use dms_retrofit::recipe::Recipe;
use dms_retrofit::run::RunLock;
use dms_retrofit::train::{TrainOptions, TrainSummary, train};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Short runs whose CR schedule passes 2, 3 and 4 (cr-K snapshots at steps 4, 7, 10).
const SHORT: [&str; 7] = [
    "train.max_steps=12",
    "dms.final_step=10",
    "data.seq_len=32",
    "run.checkpoint_every=4",
    "run.eval_every=3",
    "run.eval_sequences=2",
    "train.lr=1e-2",
];

fn recipe(out: &Path, extra: &[&str]) -> Recipe {
    let mut sets: Vec<String> = SHORT.iter().chain(extra).map(|s| s.to_string()).collect();
    sets.push(format!("run.output_dir=\"{}\"", out.display()));
    Recipe::load(&root().join("recipes/tiny.toml"), &sets).unwrap()
}

fn try_run(
    out: &Path,
    extra: &[&str],
    resume: bool,
    stop_after: Option<u64>,
) -> anyhow::Result<TrainSummary> {
    let options = TrainOptions {
        resume,
        recipe_dir: root().join("recipes"),
        quiet: true,
        stop_after,
    };
    train::<CpuAutodiff>(
        &recipe(out, extra),
        &options,
        FloatFormat::F32,
        &Default::default(),
    )
}

fn run(out: &Path, resume: bool, stop_after: Option<u64>) -> TrainSummary {
    try_run(out, &[], resume, stop_after).unwrap()
}

/// `summary.json` without its wall-clock field.
fn summary(run: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("tokens_per_s");
    v.as_object_mut().unwrap().remove("run_dir");
    v
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/step-12/trainable.safetensors")).unwrap()
}

/// Asserts that `b` ended exactly as the uninterrupted run `a`.
fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(
        metrics_without_clock(a),
        metrics_without_clock(b),
        "metrics differ"
    );
    assert!(final_weights(a) == final_weights(b), "final weights differ");
    assert_eq!(summary(a), summary(b), "summaries differ");
    for k in [2, 3, 4] {
        let w = |r: &Path| std::fs::read(r.join(format!("cr-{k}/trainable.safetensors"))).unwrap();
        assert!(w(a) == w(b), "cr-{k} differs");
    }
}

#[test]
fn resumed_runs_end_as_the_uninterrupted_one_summary_included() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let expected = run(&straight, false, None);
    assert_eq!(expected.cr_snapshots, [2, 3, 4]);
    assert!(expected.last.contains_key("eval_kl") && expected.last["loss"].is_finite());

    // Stopped after 6 steps (cr-2 written by the first process, cr-3 and cr-4 by the second).
    let twice = dir.path().join("twice");
    assert!(run(&twice, false, Some(6)).interrupted);
    let resumed = run(&twice, true, None);
    assert_eq!(resumed.cr_snapshots, [2, 3, 4]);
    assert_same_run(&straight, &twice);

    // Killed after the final checkpoint, before the summary: --resume only rebuilds it.
    std::fs::remove_file(twice.join("summary.json")).unwrap();
    let again = run(&twice, true, None);
    assert!(again.tokens_per_s > 0.0, "throughput from the metrics");
    assert_same_run(&straight, &twice);
}

#[test]
fn a_folder_without_a_checkpoint_resumes_from_step_zero() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    run(&straight, false, None);
    // What a run killed before its first checkpoint leaves: metrics of its first steps, a cr-2
    // snapshot, a partial checkpoint of a dead process.
    let killed = dir.path().join("killed");
    std::fs::create_dir_all(killed.join("checkpoints/.step-4.partial-4194321")).unwrap();
    let first_lines: Vec<String> = std::fs::read_to_string(straight.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(
        killed.join("metrics.jsonl"),
        first_lines.join("\n") + "\n{\"kind\":",
    )
    .unwrap();

    let err = format!("{:#}", try_run(&killed, &[], false, None).unwrap_err());
    assert!(err.contains("--resume"), "{err}");
    run(&killed, true, None);
    assert_same_run(&straight, &killed);
    assert!(!killed.join("checkpoints/.step-4.partial-4194321").exists());
}

#[test]
fn non_finite_loss_before_the_first_checkpoint_advises_what_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // An absurd learning rate overflows the adapter's weights to infinity after one step.
    let err = try_run(&out, &["train.lr=1e38"], false, None).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("non-finite"), "{err}");
    assert!(
        err.contains("No checkpoint was written yet") && err.contains("starts from step 0"),
        "{err}"
    );
    // ... and what it advises works: a resume with a sane rate starts afresh.
    let summary = try_run(&out, &[], true, None).unwrap();
    assert_eq!(summary.steps, 12);
}

#[test]
fn a_second_writer_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let lock = RunLock::acquire(&out).unwrap();
    for resume in [false, true] {
        let err = format!("{:#}", try_run(&out, &[], resume, None).unwrap_err());
        assert!(
            err.contains(&format!("in use by process {}", std::process::id())),
            "{err}"
        );
    }
    assert!(!out.join("metrics.jsonl").exists(), "nothing was written");
    drop(lock);
    run(&out, false, Some(1));
}

#[test]
fn leftovers_of_killed_processes_are_removed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&out, false, Some(5));
    let dead = 4_194_321; // above the kernel's largest pid: no such process
    let leftovers = [
        out.join(format!("checkpoints/.step-8.partial-{dead}")),
        out.join(format!(".cr-3.partial-{dead}")),
        out.join(format!(".metrics.svg.tmp{dead}")),
        // An older version's half-pruned checkpoint: only its optimizer state left.
        out.join("checkpoints/step-1"),
    ];
    for path in &leftovers {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("optimizer.mpk"), "x").unwrap();
    }
    run(&out, true, None);
    for path in &leftovers {
        assert!(!path.exists(), "{} left behind", path.display());
    }
    let checkpoints: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(checkpoints.len(), 2, "keep_last = 2: {checkpoints:?}");
}

fn dms_retrofit(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Two steps of the tiny recipe into `out`, from the repository root, with more `--set`s.
fn train_two_steps(out: &Path, sets: &[&str]) -> Output {
    let output_dir = format!("run.output_dir=\"{}\"", out.display());
    let mut args = vec!["train", "--recipe", "recipes/tiny.toml", "--quiet"];
    for set in ["train.max_steps=2", "data.seq_len=32", &output_dir]
        .into_iter()
        .chain(sets.iter().copied())
    {
        args.extend(["--set", set]);
    }
    dms_retrofit(&args, &root())
}

#[test]
fn a_run_folder_works_from_any_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Trained from the repository root with the recipe's relative model path.
    let train = train_two_steps(&out, &[]);
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/step-2/state.json")).unwrap(),
    )
    .unwrap();
    assert!(Path::new(state["base_dir"].as_str().unwrap()).is_absolute());
    assert_eq!(state["base_source"], "../data/tiny-llama");
    // Used from elsewhere.
    let elsewhere = tempfile::tempdir().unwrap();
    let run = out.to_str().unwrap();
    let generate = dms_retrofit(
        &["generate", run, "--prompt", "KING", "--max-new-tokens", "4"],
        elsewhere.path(),
    );
    assert!(
        generate.status.success(),
        "{}",
        String::from_utf8_lossy(&generate.stderr)
    );
    let export_dir = elsewhere.path().join("export");
    let export = dms_retrofit(
        &["export", run, "--out", export_dir.to_str().unwrap()],
        elsewhere.path(),
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
}

/// Starts a long training in the background and waits until it has finished a step.
fn start_training(out: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_dms-retrofit"))
        .args([
            "train",
            "--recipe",
            "recipes/tiny.toml",
            "--quiet",
            "--set",
            "train.max_steps=100000",
            "--set",
            "data.seq_len=32",
            "--set",
            "run.checkpoint_every=0",
            "--set",
            &format!("run.output_dir=\"{}\"", out.display()),
        ])
        .args(extra)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|m| m.contains("\"train\""))
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step within 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_checkpoints_like_ctrl_c_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("term");
    let child = start_training(&out, &[]);
    signal(&child, "TERM");
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["interrupted"], true);
    let step = summary["steps"].as_u64().unwrap();
    assert!(
        out.join(format!("checkpoints/step-{step}/state.json"))
            .is_file(),
        "a checkpoint at the step it stopped: {stderr}"
    );

    // A second signal during the step the first one lets finish does not wait for it. (Steps of
    // 32 x 256 tokens take about a second here, well beyond the pause between the signals.)
    let out = dir.path().join("twice");
    let child = start_training(
        &out,
        &["--set", "train.grad_accum=8", "--set", "data.seq_len=256"],
    );
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, "TERM");
    let result = child.wait_with_output().unwrap();
    assert_eq!(
        result.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // It can still be resumed: no checkpoint, so from step 0.
    let resumed = dms_retrofit(
        &[
            "train",
            "--recipe",
            "recipes/tiny.toml",
            "--quiet",
            "--resume",
            "--set",
            "train.max_steps=3",
            "--set",
            "data.seq_len=32",
            "--set",
            "run.checkpoint_every=0",
            "--set",
            &format!("run.output_dir=\"{}\"", out.display()),
        ],
        &root(),
    );
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
}

/// `train.graph_layers`: a count above the model's layers is one error naming both; a valid one
/// (the tiny model's last layer keeps its graph, the first is recomputed) trains.
#[test]
fn graph_layers_are_checked_against_the_model_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let run = |graph_layers: &str, name: &str| {
        let graph_layers = format!("train.graph_layers={graph_layers}");
        train_two_steps(
            &dir.path().join(name),
            &["train.recompute_layers=true", &graph_layers],
        )
    };
    let too_many = run("99", "too-many");
    assert!(!too_many.status.success());
    let stderr = String::from_utf8_lossy(&too_many.stderr);
    assert!(
        stderr.contains("train.graph_layers = 99") && stderr.contains("layers"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let one = run("1", "one");
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
}
