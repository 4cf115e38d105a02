#!/usr/bin/env bash
# CPU figures for the README / issue notes: training tokens/s and peak memory (tiny recipe,
# SmolLM2-135M at seq 512), and decode tokens/s + KV bytes at ~4K context, dense vs DMS.
#   BIN=target/release/dms-retrofit  SMOLLM2=models/SmolLM2-135M-Instruct  SMOLLM2_DMS=<run or export>
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/dms-retrofit}
smollm2=${SMOLLM2:-models/SmolLM2-135M-Instruct}
work=${WORK:-/tmp/dms-bench-cpu}
rm -rf "$work"; mkdir -p "$work"
rss() { grep "Maximum resident set size" "$1" | awk '{printf "%.0f", $NF/1024}'; }

echo "== training (CPU, $(nproc) cores)"
printf "%-34s %10s %12s\n" run tokens/s peak_RSS_MB
/usr/bin/time -v "$bin" train --recipe recipes/tiny.toml --set run.output_dir="$work/tiny" --quiet --json \
    > "$work/tiny.json" 2> "$work/tiny.time"
printf "%-34s %10.0f %12s\n" "tiny recipe (seq 128, batch 4)" \
    "$(python3 -c "import json;print(json.load(open('$work/tiny.json'))['tokens_per_s'])")" "$(rss "$work/tiny.time")"
if [ -f "$smollm2/model.safetensors" ]; then
    /usr/bin/time -v "$bin" train --recipe recipes/smollm2-135m.toml --set run.output_dir="$work/smollm2" \
        --set "model.source=\"$(realpath "$smollm2")\"" --set train.max_steps=3 --set train.micro_batch=1 \
        --set 'run.device="cpu"' --set data.seq_len=512 --set dms.window=64 \
        --set 'data.train_files=["../data/shakespeare/train.jsonl"]' \
        --set 'data.eval_files=["../data/shakespeare/eval.jsonl"]' \
        --set run.eval_every=0 --quiet --json > "$work/smollm2.json" 2> "$work/smollm2.time"
    printf "%-34s %10.1f %12s\n" "SmolLM2-135M (seq 512, batch 1)" \
        "$(python3 -c "import json;print(json.load(open('$work/smollm2.json'))['tokens_per_s'])")" "$(rss "$work/smollm2.time")"
fi

echo; echo "== decode after a ~4K-token prompt (64 new tokens, greedy)"
printf "%-34s %10s %12s %12s %8s\n" model tokens/s KV_used KV_dense CR
decode() { # label model prompt-file
    "$bin" generate "$2" --prompt "$(cat "$3")" --max-new-tokens 64 --json > "$work/gen.out" 2> /dev/null
    python3 - "$1" "$work/gen.out" <<'PY'
import json, sys
text = open(sys.argv[2]).read()
s = json.loads(text[text.index("{\n"):])
mib = lambda b: f"{b / 2**20:.2f} MiB"
print(f"{sys.argv[1]:<34} {s['decode_tokens_per_s']:10.1f} {mib(s['kv_bytes']):>12} {mib(s['kv_bytes_dense']):>12} {s['measured_cr']:8.2f}")
PY
}
head -c 4000 data/shakespeare/eval.jsonl > "$work/prompt-bytes.txt"
decode "tiny base (dense)" data/tiny-llama "$work/prompt-bytes.txt"
decode "tiny DMS (tiny recipe, CR 4)" "$work/tiny" "$work/prompt-bytes.txt"
if [ -f "$smollm2/model.safetensors" ]; then
    head -c 16000 data/shakespeare/eval.jsonl > "$work/prompt-smol.txt"
    decode "SmolLM2 base (dense)" "$smollm2" "$work/prompt-smol.txt"
    if [ -n "${SMOLLM2_DMS:-}" ]; then
        decode "SmolLM2 DMS" "$SMOLLM2_DMS" "$work/prompt-smol.txt"
    fi
fi
