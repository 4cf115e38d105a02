#!/usr/bin/env python3
"""kill -9 a training at random moments, resume it, and check that it ends bit-identical to an
uninterrupted run: metrics (wall-clock fields aside), final weights, every cr-K snapshot and
summary.json (throughput and folder aside).

    cargo build --release
    python3 scripts/kill-resume.py --trials 20 [--bin target/release/dms-retrofit] [--seed 1]

Kill times are drawn uniformly over [0, 1.1 x the uninterrupted run's wall time], so they land
during start-up (before the first checkpoint), mid-run and while files are written; every fifth
trial instead kills the moment the final checkpoint appears (after the last checkpoint, before
the summary). Prints one row per trial and exits non-zero if any trial differs.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = [
    "train.max_steps=40",
    "dms.final_step=30",
    "data.seq_len=64",
    "run.checkpoint_every=8",
    "run.eval_every=5",
    "run.eval_sequences=2",
    "train.lr=1e-2",
]


def train_cmd(binary, out, resume):
    cmd = [str(binary), "train", "--recipe", "recipes/tiny.toml", "--quiet"]
    for s in SETS + [f'run.output_dir="{out}"']:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def deterministic_metrics(run):
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        v.pop("tokens_per_s", None)
        v.pop("elapsed_s", None)
        lines.append(v)
    return lines


def summary(run):
    v = json.loads((run / "summary.json").read_text())
    v.pop("tokens_per_s", None)
    v.pop("run_dir", None)
    return v


def files_of(run):
    out = {"metrics": deterministic_metrics(run), "summary": summary(run)}
    for path in sorted(run.glob("cr-*/trainable.safetensors")):
        out[path.parent.name] = path.read_bytes()
    final = sorted(run.glob("checkpoints/step-*"), key=lambda p: int(p.name[5:]))[-1]
    out["final"] = (final.name, (final / "trainable.safetensors").read_bytes())
    return out


def state_at_kill(run):
    steps = sorted(int(p.name[5:]) for p in run.glob("checkpoints/step-*"))
    metrics = run / "metrics.jsonl"
    lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    hidden = [p.name for p in run.rglob(".*") if p.name != ".lock"]
    return steps, lines, hidden


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=str(ROOT / "target/release/dms-retrofit"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the rows as JSON lines to this file")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    try:
        straight = work / "straight"
        start = time.monotonic()
        subprocess.run(train_cmd(args.bin, straight, False), cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        expected = files_of(straight)
        print(f"uninterrupted run: {wall:.2f} s, final {expected['final'][0]}")
        print(f"{'trial':>5} {'kill at s':>9} {'checkpoints then':<18} {'metric lines':>12} "
              f"{'leftovers':>9} {'resumes':>7}  result")
        rows, failures = [], 0
        for trial in range(1, args.trials + 1):
            run = work / f"trial-{trial}"
            at = rng.uniform(0.0, 1.1 * wall)
            child = subprocess.Popen(train_cmd(args.bin, run, False), cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            final = run / "checkpoints" / "step-40"
            if trial % 5 == 0:
                at = None
                while child.poll() is None and not final.exists():
                    time.sleep(0.001)
            else:
                time.sleep(at)
            finished_first = child.poll() is not None
            if not finished_first:
                child.send_signal(signal.SIGKILL)
            child.wait()
            steps, lines, hidden = state_at_kill(run) if run.exists() else ([], 0, [])
            resumes = 0
            while True:
                resumes += 1
                done = subprocess.run(train_cmd(args.bin, run, True), cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode == 0 or resumes >= 3:
                    break
            problems = []
            if done.returncode != 0:
                problems.append(f"resume failed: {done.stderr.strip().splitlines()[-1:]}")
            else:
                got = files_of(run)
                problems += [k for k in expected if got.get(k) != expected[k]]
                problems += [f"extra {k}" for k in got if k not in expected]
                left = [p.name for p in run.rglob(".*") if p.name != ".lock"]
                if left:
                    problems.append(f"leftovers {left}")
            ok = not problems
            failures += not ok
            result = "identical" if ok else "DIFFERS: " + ", ".join(map(str, problems))
            note = " (had finished)" if finished_first else ""
            when = "final" if at is None else f"{at:.2f}"
            print(f"{trial:>5} {when:>9} {str(steps):<18} {lines:>12} {len(hidden):>9} "
                  f"{resumes:>7}  {result}{note}")
            rows.append({"trial": trial, "kill_at_s": at, "checkpoints": steps,
                         "metric_lines": lines, "leftovers": hidden, "finished_first":
                         finished_first, "resumes": resumes, "identical": ok,
                         "problems": problems})
        if args.json:
            with open(args.json, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        print(f"{args.trials - failures} of {args.trials} trials identical to the uninterrupted run")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
