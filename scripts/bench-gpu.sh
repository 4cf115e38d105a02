#!/usr/bin/env bash
# One DMS distillation step (adapter-only, batch 1, random weights) with dms-retrofit on the GPU,
# beside the dense PyTorch step (shared/bench/torch_reference_step.py) on the same card.
#   BIN=path/to/dms-retrofit (built with --features cuda)  TORCH_REF=path/to/torch_reference_step.py
#   CONFIGS="qwen3-1.7b:4096 qwen3-8b:4096"   scripts/bench-gpu.sh
# Peak GPU memory is the largest `nvidia-smi` used-memory reading while each run is alive
# (it includes the allocator's reserved pools, as torch's max_memory_reserved would).
set -uo pipefail
bin=${BIN:-target/release/dms-retrofit}
configs=${CONFIGS:-"smollm2-135m:4096 qwen3-1.7b:4096 qwen3-1.7b:8192 qwen3-8b:4096"}
out=${OUT_DIR:-/tmp/bench-gpu}
mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"

peak_of() { # run a command, sampling GPU memory every 0.2 s; prints the peak MiB on fd 3
    "$@" &
    local pid=$! peak=0 used
    while kill -0 $pid 2>/dev/null; do
        used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
        [ "${used:-0}" -gt "$peak" ] && peak=$used
        sleep 0.2
    done
    wait $pid; local rc=$?
    echo "$peak" >&3
    return $rc
}

printf "%-14s %6s %12s %10s %12s\n" shape seq tokens/s peak_GiB first_step_s > "$out/ours.txt"
for c in $configs; do
    shape=${c%%:*}; seq=${c##*:}
    peak=$( { peak_of "$bin" bench step --shape "$shape" --seq "$seq" --steps 3 --device cuda:0 \
        > "$out/ours-$shape-$seq.json" 2> "$out/ours-$shape-$seq.log"; } 3>&1 )
    if [ -s "$out/ours-$shape-$seq.json" ]; then
        python3 - "$out/ours-$shape-$seq.json" "$peak" "$shape" "$seq" >> "$out/ours.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[3]:<14} {sys.argv[4]:>6} {r['tokens_per_s']:12.0f} {int(sys.argv[2]) / 1024:10.1f} {r['first_step_s']:12.1f}")
PY
    else
        err=$(grep -m1 -iE "out of memory|error|panicked" "$out/ours-$shape-$seq.log" | cut -c1-80)
        printf "%-14s %6s %12s %10s  %s\n" "$shape" "$seq" failed "$((peak / 1024))" "$err" >> "$out/ours.txt"
    fi
done

if [ -n "${TORCH_REF:-}" ]; then
    python3 "$TORCH_REF" > "$out/torch.jsonl" 2> "$out/torch.log" || true
fi

echo; echo "dms-retrofit ($card):"; cat "$out/ours.txt"
if [ -s "$out/torch.jsonl" ]; then
    echo; echo "dense PyTorch step ($card):"; cat "$out/torch.jsonl"
    echo; echo "ratios (dms-retrofit tokens/s / PyTorch tokens/s, same card):"
    python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
torch = {}
for line in open(os.path.join(out, "torch.jsonl")):
    try:
        r = json.loads(line)
    except Exception:
        continue
    if "tok_s" in r:
        torch[(r["shape"], r["seq"])] = r
for path in sorted(glob.glob(os.path.join(out, "ours-*.json"))):
    try:
        r = json.load(open(path))
    except Exception:
        continue
    t = torch.get((r["shape"], r["seq"]))
    if t:
        print(f"  {r['shape']} seq {r['seq']}: {r['tokens_per_s']:.0f} / {t['tok_s']} = {r['tokens_per_s'] / t['tok_s']:.2f}x")
PY
fi
