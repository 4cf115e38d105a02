#!/usr/bin/env bash
# The SmolLM2-135M-Instruct retrofit campaign (issue 16) on one GPU: several candidate recipes
# trained side by side (a 135M model leaves an H200 mostly idle, so N processes share it), then
# each evaluated with GPU `eval` on held-out text at 2K and 4K tokens beside every baseline at the
# same measured KV bytes.
#
#   MODEL=dir    SmolLM2-135M-Instruct folder (scripts/get-smollm2.sh)
#   BIN=path     dms-retrofit built with --features cuda
#   WORK=dir     one folder per candidate (default /tmp/campaign)
#   CORPUS=dir   scripts/get-shakespeare.sh output (default data/corpus/shakespeare)
#   ONLY="a b"   candidates to run (default: all below)
#   PHASE=gendata|train|eval|all   (default all = train + eval; gendata samples $CORPUS/chat.jsonl
#                  from the base model for the chat candidates, from scripts/make-chat-prompts.py)
#   TRAIN_TIMEOUT=seconds  per training run (default 520); a run stopped by it keeps its checkpoints
#   scripts/gpu-smollm2-campaign.sh
# Results: $WORK/<name>/train.log, run/metrics.jsonl, run/summary.json, eval-<len>.json.
set -uo pipefail
bin=${BIN:-target/release/dms-retrofit}
model=${MODEL:?set MODEL to the SmolLM2-135M-Instruct folder}
work=${WORK:-/tmp/campaign}
corpus=${CORPUS:-data/corpus/shakespeare}
phase=${PHASE:-all}

# Every candidate starts from recipes/smollm2-135m.toml with these settings (adapter-only training
# as the official recipe; the shipped recipe is candidate d), then its own.
common=(
    'train.trainable="adapter"' "train.lr=1e-3" 'run.device="cuda:0"'
    "data.train_files=[\"$corpus/train.jsonl\"]" "data.eval_files=[\"$corpus/heldout.jsonl\"]"
    "data.seq_len=2048" "dms.window=256" "train.micro_batch=4" "train.max_steps=360"
    "dms.steps_per_cr=35" "dms.cr_final=8.0" "run.checkpoint_every=40" "run.eval_every=100"
    "run.eval_sequences=4"
)
declare -A candidates=(
    [a-adapter]=""
    [b-adapter-cw10]="dms.compression_weight=10.0"
    [c-adapter-fast]="dms.steps_per_cr=22"
    [d-attention]="train.trainable=\"adapter+attention\" train.lr=1e-4"
    [e-all]="train.trainable=\"all\" train.lr=3e-5"
    [f-adapter-cr10]="dms.cr_final=10.0 dms.steps_per_cr=27"
    [g-attention-cr4]="train.trainable=\"adapter+attention\" train.lr=1e-4 dms.cr_final=4.0"
    [h-all-cr4]="train.trainable=\"all\" train.lr=3e-5 dms.cr_final=4.0"
    [i-attention-cr10]="train.trainable=\"adapter+attention\" train.lr=1e-4 dms.cr_final=10.0 dms.steps_per_cr=27"
    [j-all-lr1e-4]="train.trainable=\"all\" train.lr=1e-4"
    # Second round, same 360 steps: a longer hold (CR 8 at step 154 instead of 245), tau,
    # self-generated chat data (gen-data) alone and mixed with Shakespeare. (The overshoot's fix, the
    # two-sided compression loss, is run as the shipped recipes/smollm2-135m-cr4.toml itself.)
    [l-attention-hold]="train.trainable=\"adapter+attention\" train.lr=1e-4 dms.steps_per_cr=22"
    [m-attention-tau0.3]="train.trainable=\"adapter+attention\" train.lr=1e-4 dms.tau=0.3"
    [n-attention-chat]="train.trainable=\"adapter+attention\" train.lr=1e-4 data.train_files=[\"$corpus/chat.jsonl\"] data.chat_template=true"
    [o-attention-mix]="train.trainable=\"adapter+attention\" train.lr=1e-4 data.train_files=[\"$corpus/train.jsonl\",\"$corpus/chat.jsonl\"] data.chat_template=true"
)
names=${ONLY:-a-adapter b-adapter-cw10 c-adapter-fast d-attention e-all f-adapter-cr10}

train_one() {
    local name=$1 dir=$work/$1 sets=()
    mkdir -p "$dir"
    for s in "${common[@]}" ${candidates[$name]}; do sets+=(--set "$s"); done
    local start=$(date +%s)
    timeout "${TRAIN_TIMEOUT:-520}" "$bin" train --recipe recipes/smollm2-135m.toml \
        --set "model.source=\"$model\"" --set "run.output_dir=\"$dir/run\"" \
        --set 'run.device="cuda:0"' "${sets[@]}" > "$dir/train.log" 2>&1
    echo "$name: train rc $? in $(( $(date +%s) - start )) s" | tee -a "$dir/train.log"
}

eval_one() {
    local name=$1 dir=$work/$1
    # The last checkpoint: cr-8 (cr-10) is a snapshot on the schedule, the hold comes after it.
    [ -d "$dir/export" ] || "$bin" export "$dir/run" --out "$dir/export" > "$dir/export.log" 2>&1 \
        || { tail -3 "$dir/export.log"; return; }
    for len in 2048 4096; do
        local n=$(( ${EVAL_TOKENS:-32768} / len ))
        timeout "${EVAL_TIMEOUT:-600}" "$bin" eval "$dir/export" --data "$corpus/heldout.jsonl" --seq-len $len --max-sequences $n \
            --device cuda:0 --json > "$dir/eval-$len.json" 2> "$dir/eval-$len.err" \
            || tail -3 "$dir/eval-$len.err"
    done
    echo "$name: eval done"
}

if [[ $phase == gendata ]]; then
    [ -f "$corpus/chat-prompts.jsonl" ] || python3 scripts/make-chat-prompts.py "$corpus"
    "$bin" gen-data --model "$model" --prompts "$corpus/chat-prompts.jsonl" --out "$corpus/chat.jsonl" \
        --max-new-tokens 384 --temperature 0.7 --batch 128 --device cuda:0 --force
    exit
fi
if [[ $phase == train || $phase == all ]]; then
    for n in $names; do train_one "$n" & done; wait
fi
if [[ $phase == eval || $phase == all ]]; then
    for n in $names; do eval_one "$n" & done; wait
fi
python3 - "$work" $names <<'PY'
import json, os, sys
work, names = sys.argv[1], sys.argv[2:]
for name in names:
    d = os.path.join(work, name)
    try:
        lines = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if l.strip()]
        train = [l for l in lines if l.get("kind") == "train"]
        evals = [l for l in lines if l.get("kind") == "eval"]
        t = train[-1]
        print(f"{name}: step {t['step']} train KL {t['kl']:.4f} train CR {t['train_cr']:.2f} "
              f"(target {t['target_cr']:.2f}) {t['tokens_per_s']:.0f} tokens/s {t['elapsed_s']:.0f} s")
        for e in evals[-2:]:
            print(f"  held-out at step {e['step']}: KL {e['eval_kl']:.4f} CR {e['eval_cr']:.2f}")
    except Exception as e:
        print(f"{name}: metrics: {e}")
    for length in (2048, 4096):
        try:
            r = json.load(open(os.path.join(d, f"eval-{length}.json")))
            for l in r["lengths"]:
                print(f"  {l['seq_len']} x {l['sequences']}: " + "  ".join(
                    f"{row['method']} {row['perplexity']:.3f}/{row['kl_to_original']:.3f}/CR{row['compression_ratio']:.2f}"
                    for row in l["rows"]))
        except Exception as e:
            print(f"  eval {length}: {e}")
PY
