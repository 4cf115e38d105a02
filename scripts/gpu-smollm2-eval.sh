#!/usr/bin/env bash
# Retrofit SmolLM2-135M-Instruct to CR 8 on one GPU, then measure it there: eval with every
# baseline at 4 x 4096 tokens (timed, start-up included), the baselines' chunking against their
# exact per-token version at 512 tokens, and generate (one prompt streamed, a batch of prompts).
#
#   MODEL=dir  SmolLM2-135M-Instruct as a Hugging Face folder (scripts/get-smollm2.sh)
#   BIN=path   dms-retrofit built with --features cuda (default target/release/dms-retrofit)
#   WORK=dir   run folder, export and results (default /tmp/smollm2-gpu)
#   DEVICE=cuda:0
#   SKIP_TRAIN=1   reuse $WORK/run
#   STUDY_CR=4     compression ratio of the chunking study
#   scripts/gpu-smollm2-eval.sh
# Results: $WORK/results/*.json (eval reports, generate stats) and the timings on stdout.
set -uo pipefail
bin=${BIN:-target/release/dms-retrofit}
model=${MODEL:?set MODEL to the SmolLM2-135M-Instruct folder}
work=${WORK:-/tmp/smollm2-gpu}
device=${DEVICE:-cuda:0}
res=$work/results
mkdir -p "$res"
long=data/shakespeare/eval-long.jsonl

exec 3>&1
timed() { # label, command...: runs it, prints the wall time (to the script's stdout)
    local label=$1; shift
    local start=$(date +%s%N)
    "$@"; local rc=$?
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%-40s %4d.%01d s (rc %d)\n' "$label" $((ms / 1000)) $((ms % 1000 / 100)) $rc >&3
    return $rc
}

if [ -z "${SKIP_TRAIN:-}" ]; then
    timed "train (recipes/smollm2-135m.toml)" "$bin" train --recipe recipes/smollm2-135m.toml \
        --set "model.source=\"$model\"" --set "run.output_dir=\"$work/run\"" \
        --set "run.device=\"$device\"" > "$res/train.log" 2>&1 || tail -20 "$res/train.log"
fi
timed "export" "$bin" export "$work/run" --out "$work/export" > "$res/export.log" 2>&1 \
    || tail -5 "$res/export.log"

# 1. The issue's target: 4 x 4096 tokens with every baseline, start-up included.
timed "eval 4x4096 + all baselines" "$bin" eval "$work/export" --data "$long" --seq-len 4096 \
    --max-sequences 4 --device "$device" --json > "$res/eval-4096.json" 2> "$res/eval-4096.err" \
    || tail -5 "$res/eval-4096.err"
# Longer: the model's whole context.
timed "eval 4x8192 + all baselines" "$bin" eval "$work/export" --data "$long" --seq-len 8192 \
    --max-sequences 4 --device "$device" --json > "$res/eval-8192.json" 2> "$res/eval-8192.err" \
    || tail -5 "$res/eval-8192.err"

# 2. Approximation study: the baselines decide per chunk; chunk 1 is the exact per-token rule.
# On the base model at a fixed CR, so every run has the same budget.
for chunk in 1 auto 64; do
    flag=(); [ "$chunk" != auto ] && flag=(--baseline-chunk "$chunk")
    timed "eval 8x512, baseline chunk $chunk" "$bin" eval "$model" --cr "${STUDY_CR:-4}" \
        --data "$long" --seq-len 512 --max-sequences 8 --device "$device" "${flag[@]}" --json \
        > "$res/eval-512-chunk-$chunk.json" 2> "$res/eval-512-chunk-$chunk.err" \
        || tail -5 "$res/eval-512-chunk-$chunk.err"
done

# 3. Generate: one prompt (streamed), then a batch, DMS and dense.
timed "generate (DMS, 1 prompt)" "$bin" generate "$work/export" --chat --device "$device" \
    --prompt "Write a short poem about the sea." --max-new-tokens 128 --json \
    > "$res/generate-dms.txt" 2> "$res/generate-dms.err" || tail -5 "$res/generate-dms.err"
printf '%s\n' '{"prompt": "What is the capital of France?"}' '{"prompt": "Name three colours."}' \
    '{"prompt": "Explain what a KV cache is in one sentence."}' '{"prompt": "Count from one to ten."}' \
    > "$work/prompts.jsonl"
for which in export base; do
    m=$work/export; [ $which = base ] && m=$model
    timed "generate --prompts (4, $which)" "$bin" generate "$m" --chat --device "$device" \
        --prompts "$work/prompts.jsonl" --max-new-tokens 256 --ignore-eos --json \
        > "$res/generate-batch-$which.jsonl" 2> "$res/generate-batch-$which.err" \
        || tail -5 "$res/generate-batch-$which.err"
done

python3 - "$res" <<'PY'
import json, sys, glob, os
res = sys.argv[1]
def report(name):
    try:
        return json.load(open(os.path.join(res, name)))
    except Exception as e:
        print(f"{name}: {e}"); return None
for name in ["eval-4096.json", "eval-8192.json"]:
    r = report(name)
    if not r: continue
    for length in r["lengths"]:
        print(f"\n{name}: {length['seq_len']} tokens x {length['sequences']}, baseline chunk {length.get('baseline_chunk')}")
        for row in length["rows"]:
            print(f"  {row['method']:<18} ppl {row['perplexity']:9.4f}  KL {row['kl_to_original']:.5f}  CR {row['compression_ratio']:.2f}")
print("\napproximation study, 8 x 512 tokens: PPL / KL / CR per baseline chunk")
runs = {c: report(f"eval-512-chunk-{c}.json") for c in ["1", "auto", "64"]}
if all(runs.values()):
    chunks = {c: runs[c]["lengths"][0].get("baseline_chunk") for c in runs}
    print("  chunk sizes:", chunks)
    for i, row in enumerate(runs["1"]["lengths"][0]["rows"]):
        cells = []
        for c in ["1", "auto", "64"]:
            r = runs[c]["lengths"][0]["rows"][i]
            cells.append(f"{r['perplexity']:8.3f} / {r['kl_to_original']:.4f} / {r['compression_ratio']:.2f}")
        print(f"  {row['method']:<18} " + "   ".join(cells))
for which in ["export", "base"]:
    try:
        lines = open(os.path.join(res, f"generate-batch-{which}.jsonl")).read().splitlines()
        done = [json.loads(l) for l in lines if l.startswith('{"index"')]
        stats = json.loads("\n".join(l for l in lines if not l.startswith('{"index"')))
        print(f"\ngenerate batch ({which}):", {k: stats[k] for k in ["batch", "generated_tokens", "decode_tokens_per_s", "kv_bytes", "kv_live_bytes", "kv_bytes_dense", "measured_cr"]})
        for d in done[:2]:
            print("  ", d["index"], repr(d["completion"][:100]))
    except Exception as e:
        print(f"generate batch {which}: {e}")
PY
