#!/usr/bin/env bash
# One DMS distillation step (adapter-only, batch 1, random weights) with dms-retrofit on the GPU,
# beside the official NVIDIA DMS step and the dense PyTorch step on the same card, in one table.
#
#   BIN=path/to/dms-retrofit (built with --features cuda)
#   CONFIGS="qwen3-1.7b:4096 qwen3-8b:4096"   our configs (shape:seq); set but empty skips ours
#   OURS_ARGS="--profile"                      extra `bench step` arguments for our runs
#   TORCH_REF=path/to/torch_reference_step.py  dense PyTorch step (fixed plan: qwen3-0.6b, -1.7b,
#                                              -8b at 4096, then a matmul ceiling; no selection)
#   OFFICIAL_REF=path/to/official_dms_step.py  official DMS step (NVIDIA Model-Optimizer
#                                              experimental/dms, exported into .dmsref/)
#   REF_SITE=dir     wheels installed with `pip install --target` (transformers 4.57.3 ...); put on
#                    PYTHONPATH for the official step only, with DMSREF after it
#   DMSREF=dir       experimental/dms folder (default: $PWD/.dmsref/experimental/dms)
#   OFFICIAL_CONFIGS="qwen3-8b:4096:bf16 qwen3-1.7b:4096:fp32"  run only these configs of the
#                    official step (shape:seq[:bf16|fp32]); unset: the script's own plan
#                    (qwen3-1.7b and qwen3-8b at 4096, bf16 and fp32 weights; LONG=1: qwen3-8b at
#                    8192, 16384, 32768, bf16)
#   LONG=1           passed to the official step; also makes the default CONFIGS the long ones;
#                    the torch step is skipped (it runs 4096 only)
#   REF_TIMEOUT=s    wall-clock limit for each reference script (default 540)
#   OUT_DIR=dir      results (default /tmp/bench-gpu); files already there are kept, so calls
#                    with the same OUT_DIR add up; SUMMARY_ONLY=1 rebuilds the table from OUT_DIR
#                    alone (no GPU needed)
#   scripts/bench-gpu.sh
# Peak GPU memory of ours is the largest `nvidia-smi` used-memory reading while each run is alive
# (it includes the allocator's reserved pools and the CUDA context). The references report
# torch.cuda.max_memory_allocated (their JSON `peak_gib`); the table also gives their nvidia-smi
# peak ("smi"), sampled the same way as ours over the time between one result line and the next.
# Summary: $OUT_DIR/summary.txt and $OUT_DIR/summary.json.
set -uo pipefail
bin=${BIN:-target/release/dms-retrofit}
long=
case "${LONG:-}" in "" | 0 | false | no) ;; *) long=1 ;; esac
if [ -n "$long" ]; then
    default_configs="qwen3-8b:8192 qwen3-8b:16384 qwen3-8b:32768"
else
    default_configs="smollm2-135m:4096 qwen3-1.7b:4096 qwen3-1.7b:8192 qwen3-8b:4096"
fi
configs=${CONFIGS-$default_configs}
out=${OUT_DIR:-/tmp/bench-gpu}
ref_timeout=${REF_TIMEOUT:-540}
dmsref=${DMSREF:-$PWD/.dmsref/experimental/dms}
mkdir -p "$out"

smi_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; }

peak_of() { # run a command, sampling GPU memory every 0.2 s; prints the peak MiB on fd 3
    "$@" &
    local pid=$! peak=0 used
    while kill -0 $pid 2>/dev/null; do
        used=$(smi_used)
        [ "${used:-0}" -gt "$peak" ] && peak=$used
        sleep 0.2
    done
    wait $pid; local rc=$?
    echo "$peak" >&3
    return $rc
}

# run_ref NAME CMD...: runs a reference script under REF_TIMEOUT; its stdout goes to NAME.jsonl
# and, each line stamped with its arrival time, to NAME.tsv; stderr to NAME.log; nvidia-smi
# readings ("time MiB") to NAME.smi; the exit status to NAME.rc.
run_ref() {
    local name=$1; shift
    local smi_pid rc
    rm -f "$out/$name.jsonl" "$out/$name.tsv" "$out/$name.log" "$out/$name.smi" "$out/$name.rc"
    (while :; do printf '%s %s\n' "$(date +%s.%N)" "$(smi_used)"; sleep 0.2; done) > "$out/$name.smi" &
    smi_pid=$!
    printf '%s\t#start\n' "$(date +%s.%N)" > "$out/$name.tsv"
    PYTHONUNBUFFERED=1 timeout "$ref_timeout" "$@" 2> "$out/$name.log" |
        while IFS= read -r line; do
            printf '%s\n' "$line" >> "$out/$name.jsonl"
            printf '%s\t%s\n' "$(date +%s.%N)" "$line" >> "$out/$name.tsv"
        done
    rc=${PIPESTATUS[0]}
    printf '%s\t#end rc=%s\n' "$(date +%s.%N)" "$rc" >> "$out/$name.tsv"
    kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null
    echo "$rc" > "$out/$name.rc"
    [ "$rc" = 124 ] && echo "timed out after ${ref_timeout}s" >> "$out/$name.log"
    return 0
}

first_error() { # the first line of a log that names an error (tracebacks: the exception line)
    local e
    e=$(grep -m1 -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(:|$)|panicked|out of memory|^timed out' "$1" 2>/dev/null)
    [ -z "$e" ] && e=$(grep -v '^\s*$' "$1" 2>/dev/null | tail -1)
    printf '%s' "$e" | cut -c1-160
}

if [ -z "${SUMMARY_ONLY:-}" ]; then
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    echo "${card:-unknown}" > "$out/card.txt"
    echo "card: ${card:-unknown}"

    [ -n "$configs" ] && printf "%-14s %6s %12s %10s %12s\n" shape seq tokens/s peak_GiB first_step_s > "$out/ours.txt"
    for c in $configs; do
        shape=${c%%:*}; seq=${c##*:}
        base="$out/ours-$shape-$seq"
        rm -f "$base.json" "$base.peak" "$base.err"
        echo "ours $shape $seq ..."
        peak=$( { peak_of "$bin" bench step --shape "$shape" --seq "$seq" --steps 3 --device cuda:0 \
            ${OURS_ARGS:-} > "$base.json" 2> "$base.log"; } 3>&1 )
        echo "$peak" > "$base.peak"
        if [ -s "$base.json" ]; then
            python3 - "$base.json" "$peak" "$shape" "$seq" >> "$out/ours.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[3]:<14} {sys.argv[4]:>6} {r['tokens_per_s']:12.0f} {int(sys.argv[2]) / 1024:10.1f} {r['first_step_s']:12.1f}")
PY
        else
            err=$(first_error "$base.log")
            echo "${err:-no output}" > "$base.err"
            printf "%-14s %6s %12s %10s  %s\n" "$shape" "$seq" failed "$((peak / 1024))" "${err:0:80}" >> "$out/ours.txt"
        fi
    done

    if [ -n "${OFFICIAL_REF:-}" ]; then
        echo "official DMS step ($OFFICIAL_REF) ..."
        [ -d "$dmsref" ] || echo "warning: $dmsref missing (export experimental/dms there)"
        if [ -n "${OFFICIAL_CONFIGS:-}" ]; then
            echo "configs $OFFICIAL_CONFIGS" > "$out/official.plan"
            # imports the official script as a module and calls its run() per config
            run_ref official env -u LONG PYTHONPATH="${REF_SITE:+$REF_SITE:}$dmsref" \
                python3 -c '
import sys, json, importlib.util, torch
spec = importlib.util.spec_from_file_location("official_dms_step", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
dtypes = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "f32": torch.float32, "float32": torch.float32}
for c in sys.argv[2:]:
    shape, seq, w = (c.split(":") + ["bf16"])[:3]
    try:
        m.run(shape, int(seq), dtypes[w])
    except Exception as e:
        print(json.dumps(dict(shape=shape, seq=int(seq), weights=w, error=repr(e)[:300])), flush=True)
        torch.cuda.empty_cache()
' "$OFFICIAL_REF" $OFFICIAL_CONFIGS
        elif [ -n "$long" ]; then
            echo "long" > "$out/official.plan"
            run_ref official env PYTHONPATH="${REF_SITE:+$REF_SITE:}$dmsref" LONG=1 python3 "$OFFICIAL_REF"
        else
            echo "default" > "$out/official.plan"
            run_ref official env -u LONG PYTHONPATH="${REF_SITE:+$REF_SITE:}$dmsref" python3 "$OFFICIAL_REF"
        fi
    fi

    if [ -n "${TORCH_REF:-}" ]; then
        if [ -n "$long" ]; then
            echo "dense PyTorch step skipped under LONG=1 (it runs 4096 only)"
        else
            echo "dense PyTorch step ($TORCH_REF) ..."
            run_ref torch python3 "$TORCH_REF"
        fi
    fi
fi

# error lines of the references, for the summary
for name in official torch; do
    [ -f "$out/$name.rc" ] || continue
    first_error "$out/$name.log" > "$out/$name.err"
done

[ -s "$out/ours.txt" ] && { echo; echo "dms-retrofit ($(cat "$out/card.txt" 2>/dev/null)):"; cat "$out/ours.txt"; }
echo
python3 - "$out" "$configs" <<'PY' | tee "$out/summary.txt"
import glob, json, os, re, sys

out, configs = sys.argv[1], sys.argv[2].split()
def read(name, default=""):
    try:
        return open(os.path.join(out, name)).read().strip()
    except OSError:
        return default

card = read("card.txt", "unknown")
W = {"bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
     "float32": "fp32", "torch.float32": "fp32", "fp32": "fp32", "f32": "fp32"}

# ---- ours: ours-SHAPE-SEQ.json / .peak / .err
ours = {}
for path in glob.glob(os.path.join(out, "ours-*.peak")):
    m = re.match(r"ours-(.+)-(\d+)\.peak$", os.path.basename(path))
    if not m:
        continue
    key = (m.group(1), int(m.group(2)))
    base = path[: -len(".peak")]
    r = {"peak_gib": None, "tok_s": None, "error": None}
    try:
        r["peak_gib"] = round(int(open(path).read().strip() or 0) / 1024, 1)
    except ValueError:
        pass
    try:
        j = json.loads(open(base + ".json").read().strip().splitlines()[-1])
        r["tok_s"] = j["tokens_per_s"]
        r["first_step_s"] = j.get("first_step_s")
        r["dtype"] = j.get("dtype")
    except Exception:
        r["error"] = (read(os.path.basename(base) + ".err") or "failed (no output)")[:160]
    ours[key] = r

# ---- references: NAME.tsv (time \t line), NAME.smi (time MiB), NAME.rc, NAME.err
def ref_records(name):
    """Result lines of a reference, each with the nvidia-smi peak of its window
    (from the previous result line, or the start, to this one)."""
    tsv = os.path.join(out, name + ".tsv")
    if not os.path.exists(tsv):
        return None
    samples = []
    for line in open(os.path.join(out, name + ".smi")) if os.path.exists(os.path.join(out, name + ".smi")) else []:
        p = line.split()
        if len(p) == 2 and p[1].isdigit():
            samples.append((float(p[0]), int(p[1])))
    recs, t_prev = [], None
    for line in open(tsv):
        t, _, text = line.rstrip("\n").partition("\t")
        try:
            t = float(t)
        except ValueError:
            continue
        if text == "#start":
            t_prev = t
            continue
        try:
            r = json.loads(text)
        except Exception:
            continue
        if not isinstance(r, dict):
            continue
        win = [mib for (ts, mib) in samples if (t_prev is None or ts >= t_prev) and ts <= t]
        r["smi_peak_gib"] = round(max(win) / 1024, 1) if win else None
        t_prev = t
        recs.append(r)
    return recs

def ref_status(name, recs):
    if recs is None:
        return None
    rc = read(name + ".rc", "?")
    ok = [r for r in recs if "tok_s" in r]
    st = {"rc": rc, "results": len(ok), "error": None}
    if rc != "0" or not ok:
        st["error"] = read(name + ".err") or ("exit status " + rc)
        if rc == "124" and not st["error"].startswith("timed out"):
            st["error"] = "timed out; " + st["error"]
    return st

plan = read("official.plan", "default")
if plan == "long":
    official_plan = [("qwen3-8b", s, "bf16") for s in (8192, 16384, 32768)]
elif plan.startswith("configs"):
    official_plan = []
    for c in plan.split()[1:]:
        s, q, w = (c.split(":") + ["bf16"])[:3]
        official_plan.append((s, int(q), W.get(w, w)))
else:
    official_plan = [(s, 4096, w) for s in ("qwen3-1.7b", "qwen3-8b") for w in ("bf16", "fp32")]

official = {}  # (shape, seq, weights) -> record
o_recs = ref_records("official")
o_status = ref_status("official", o_recs)
if o_recs is not None:
    todo = list(official_plan)
    for r in o_recs:
        if "tok_s" not in r and "error" not in r:
            continue
        w = W.get(str(r.get("weights", "bf16")), str(r.get("weights")))
        seq = r.get("seq")
        if seq is None:  # the script's error lines carry no seq: take the next planned one
            cand = [p for p in todo if p[0] == r.get("shape") and p[2] == w]
            seq = cand[0][1] if cand else None
        key = (r.get("shape"), seq, w)
        if key in todo:
            todo.remove(key)
        official[key] = r
    if o_status["error"]:  # configs never reached: whole-script failure or timeout
        for p in todo:
            official.setdefault(p, {"error": "not reached: " + o_status["error"]})

torch_res, matmul = {}, {}
t_recs = ref_records("torch")
t_status = ref_status("torch", t_recs)
if t_recs is not None:
    todo = [(s, 4096) for s in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-8b")]
    for r in t_recs:
        if "matmul_bf16_tflops" in r or "matmul_f32_tflops" in r:
            matmul.update({k: v for k, v in r.items() if k.startswith("matmul")})
            continue
        if "tok_s" not in r and "error" not in r:
            continue
        key = (r.get("shape"), r.get("seq", 4096))
        if key in todo:
            todo.remove(key)
        torch_res[key] = r
    if t_status["error"]:
        for p in todo:
            torch_res.setdefault(p, {"error": "not reached: " + t_status["error"]})

# ---- rows: ours' configs first (in the order asked), then what only the references ran
keys = []
for c in configs:
    s, _, q = c.rpartition(":")
    if q.isdigit() and (s, int(q)) not in keys:
        keys.append((s, int(q)))
for k in sorted(ours):
    if k not in keys:
        keys.append(k)
for (s, q, w) in official:
    if (s, q) not in keys and q is not None:
        keys.append((s, q))
for k in torch_res:
    if k not in keys:
        keys.append(k)

def ratio(a, b):
    return round(a / b, 2) if a and b else None

rows, errors = [], []
for (s, q) in keys:
    o, b, f, t = ours.get((s, q)), official.get((s, q, "bf16")), official.get((s, q, "fp32")), torch_res.get((s, q))
    if not (o or b or f or t):
        continue
    row = {"shape": s, "seq": q,
           "ours_tok_s": o and o["tok_s"], "ours_peak_gib": o and o["peak_gib"],
           "ours_first_step_s": o and o.get("first_step_s"), "ours_error": o and o["error"],
           "official_tok_s": b and b.get("tok_s"), "official_peak_gib": b and b.get("peak_gib"),
           "official_smi_peak_gib": b and b.get("smi_peak_gib"),
           "official_first_step_s": b and b.get("first_step_s"), "official_error": b and b.get("error"),
           "official_fp32_tok_s": f and f.get("tok_s"), "official_fp32_peak_gib": f and f.get("peak_gib"),
           "official_fp32_error": f and f.get("error"),
           "torch_tok_s": t and t.get("tok_s"), "torch_peak_gib": t and t.get("peak_gib"),
           "torch_smi_peak_gib": t and t.get("smi_peak_gib"), "torch_error": t and t.get("error")}
    row["ratio_ours_official"] = ratio(row["ours_tok_s"], row["official_tok_s"])
    row["ratio_ours_torch"] = ratio(row["ours_tok_s"], row["torch_tok_s"])
    rows.append(row)
    for who, rec in (("ours", o), ("official bf16", b), ("official fp32", f), ("torch", t)):
        if rec and rec.get("error"):
            errors.append(f"{who} {s} {q}: failed: {str(rec['error'])[:160]}")

def cell(rec, key, fmt):
    if rec is None:
        return "-"
    if rec.get("error") and rec.get(key) is None:
        return "failed"
    v = rec.get(key)
    return "-" if v is None else format(v, fmt)

print(f"card: {card}")
hdr = ("shape", "seq", "ours tok/s", "ours GiB", "off tok/s", "off GiB", "off smi", "off32 tok/s",
       "torch tok/s", "ours/off", "ours/torch")
fmt = "{:<13} {:>6} {:>10} {:>8} {:>10} {:>8} {:>8} {:>11} {:>11} {:>8} {:>10}"
print(fmt.format(*hdr))
for row in rows:
    s, q = row["shape"], row["seq"]
    o, b, f, t = ours.get((s, q)), official.get((s, q, "bf16")), official.get((s, q, "fp32")), torch_res.get((s, q))
    print(fmt.format(s, q, cell(o, "tok_s", ".0f"), cell(o, "peak_gib", ".1f"),
                     cell(b, "tok_s", ".0f"), cell(b, "peak_gib", ".1f"), cell(b, "smi_peak_gib", ".1f"),
                     cell(f, "tok_s", ".0f"), cell(t, "tok_s", ".0f"),
                     "-" if row["ratio_ours_official"] is None else f"{row['ratio_ours_official']:.2f}x",
                     "-" if row["ratio_ours_torch"] is None else f"{row['ratio_ours_torch']:.2f}x"))
print("ours GiB: nvidia-smi peak; off GiB: official torch max_memory_allocated (bf16 weights); "
      "off smi: its nvidia-smi peak; off32: official with fp32 master weights")
for name, st in (("official", o_status), ("torch", t_status)):
    if st is None:
        print(f"{name}: not run")
    elif st["error"]:
        print(f"{name}: failed (rc={st['rc']}, {st['results']} results): {st['error'][:160]}")
for e in errors:
    print("  " + e)
if matmul:
    print("matmul ceiling (TFLOP/s): " + ", ".join(f"{k[7:]} {v}" for k, v in matmul.items()))

json.dump({"card": card, "official_plan": plan, "rows": rows,
           "references": {"official": o_status, "torch": t_status}, "matmul_tflops": matmul},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
