#!/usr/bin/env bash
# Peak host memory (max RSS) while loading a ~1 GB checkpoint onto the CPU, against the file size.
#   scripts/bench-load.sh            # uses target/release/dms-retrofit (or BIN=...)
# Needs python3 with numpy + safetensors (scripts/get-smollm2.sh makes such a venv: .venv-convert).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/dms-retrofit}
py=${PYTHON:-.venv-convert/bin/python}
work=${WORK:-/tmp/dms-bench-load}
mkdir -p "$work"
[ -f "$work/f32/model.safetensors" ] || "$py" scripts/make_synthetic_checkpoint.py "$work/f32" --params-millions 250 --dtype f32
[ -f "$work/bf16/model.safetensors" ] || "$py" scripts/make_synthetic_checkpoint.py "$work/bf16" --params-millions 500 --dtype bf16
printf "%-6s %12s %14s %14s %10s %8s\n" file file_MB loaded_f32_MB max_rss_MB rss/file seconds
for kind in f32 bf16; do
    dir="$work/$kind"
    file_bytes=$(stat -c %s "$dir/model.safetensors")
    # Drop the file from the page cache's accounting of *our* process: RSS counts only our mapping.
    /usr/bin/time -v "$bin" inspect "$dir" --load --json >"$work/$kind.json" 2>"$work/$kind.time"
    rss_kb=$(grep "Maximum resident set size" "$work/$kind.time" | awk '{print $NF}')
    python3 - "$work/$kind.json" "$file_bytes" "$rss_kb" "$kind" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); file_bytes = int(sys.argv[2]); rss = int(sys.argv[3]) * 1024
print(f"{sys.argv[4]:<6} {file_bytes/1e6:12.0f} {r['load']['bytes_f32']/1e6:14.0f} {rss/1e6:14.0f} "
      f"{rss/file_bytes:10.2f} {r['load']['seconds']:8.2f}")
PY
done
