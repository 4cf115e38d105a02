#!/usr/bin/env bash
# eval / generate / logits on cuda:0 (f32, then bf16) beside CPU results made beforehand, as a table.
# Prepare on the build machine (everything under gpu-bin/, which travels to the GPU machine):
#   B=target/debug/dms-retrofit
#   $B train --recipe recipes/tiny.toml --set 'run.output_dir="gpu-bin/tiny-run"'
#   $B export gpu-bin/tiny-run --out gpu-bin/tiny-dms && mkdir -p gpu-bin/cpu
#   $B eval gpu-bin/tiny-dms --data data/shakespeare/eval.jsonl --seq-len 64,256 --max-sequences 2 --json > gpu-bin/cpu/eval.json
#   $B generate gpu-bin/tiny-dms --prompt "To be or not" --max-new-tokens 40 --json > gpu-bin/cpu/gen.txt
#   $B logits gpu-bin/tiny-dms --ids 1,5,9,200,31,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21 --eviction on > gpu-bin/cpu/logits.json
# and the CUDA release binary as gpu-bin/dms-retrofit; then on the GPU machine: OUT=dir scripts/gpu-eval-agreement.sh
set -u
B=${BIN:-./gpu-bin/dms-retrofit}; M=gpu-bin/tiny-dms; D=data/shakespeare/eval.jsonl
for dt in f32 bf16; do
  /usr/bin/time -f "eval $dt %e s" $B eval $M --data $D --seq-len 64,256 --max-sequences 2 --json --device cuda:0 --dtype $dt > $OUT/eval-$dt.json 2>$OUT/eval-$dt.err; tail -1 $OUT/eval-$dt.err
  $B generate $M --prompt "To be or not" --max-new-tokens 40 --json --device cuda:0 --dtype $dt > $OUT/gen-$dt.txt 2>$OUT/gen-$dt.err || tail -3 $OUT/gen-$dt.err
  $B logits $M --ids 1,5,9,200,31,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21 --eviction on --device cuda:0 --dtype $dt > $OUT/logits-$dt.json 2>$OUT/logits-$dt.err || tail -3 $OUT/logits-$dt.err
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
cpu = json.load(open("gpu-bin/cpu/eval.json"))
cpu_text = open("gpu-bin/cpu/gen.txt").read().split("\n{")[0]
cpu_logits = json.load(open("gpu-bin/cpu/logits.json"))["logits"]
for dt in ["f32", "bf16"]:
    try:
        g = json.load(open(f"{out}/eval-{dt}.json"))
    except Exception as e:
        print(dt, "eval failed", e); continue
    print(f"== {dt}: method, seq_len: cpu ppl / gpu ppl, cpu KL / gpu KL, cpu CR / gpu CR")
    for lc, lg in zip(cpu["lengths"], g["lengths"]):
        for rc, rg in zip(lc["rows"], lg["rows"]):
            print(f"{rc['method']:<18} {lc['seq_len']:>4}  {rc['perplexity']:.4f} / {rg['perplexity']:.4f}   {rc['kl_to_original']:.5f} / {rg['kl_to_original']:.5f}   {rc['compression_ratio']:.3f} / {rg['compression_ratio']:.3f}")
    try:
        text = open(f"{out}/gen-{dt}.txt").read().split("\n{")[0]
        print("generate greedy text equal to CPU:", text == cpu_text, repr(text[:60]))
    except Exception as e:
        print("generate failed", e)
    try:
        lg = json.load(open(f"{out}/logits-{dt}.json"))["logits"]
        diff = max(abs(a - b) for ra, rb in zip(lg, cpu_logits) for a, b in zip(ra, rb))
        scale = max(abs(b) for rb in cpu_logits for b in rb)
        top = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in zip(lg, cpu_logits))
        print(f"logits (eviction on): max rel diff {diff/scale:.2e}, top-1 agreement {top}/{len(lg)}")
    except Exception as e:
        print("logits failed", e)
PY
