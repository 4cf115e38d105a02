#!/usr/bin/env python3
"""Load a dms-retrofit export with STOCK transformers (as its base architecture, no DMS code) and
compare its logits with dms-retrofit's own forward pass with eviction off.

    check_export_transformers.py EXPORT_DIR [--bin target/release/dms-retrofit] [--text "..."]

Needs torch + transformers (any recent version). Prints which tensors transformers did not use
(the DMS adapter tensors are expected there), the max |logit diff| and top-1 agreement; exits 1
when the logits disagree beyond --tol.
"""
import argparse
import json
import subprocess
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--bin", default="target/release/dms-retrofit")
    ap.add_argument("--text", default="To be, or not to be, that is the question:")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.export)
    ids = tok(args.text, add_special_tokens=False)["input_ids"]
    model, info = AutoModelForCausalLM.from_pretrained(
        args.export, torch_dtype=torch.float32, output_loading_info=True)
    model.eval()
    unexpected = sorted(info.get("unexpected_keys", []))
    missing = sorted(info.get("missing_keys", []))
    dms_unexpected = [k for k in unexpected if "dms_proj_alpha" in k]
    other_unexpected = [k for k in unexpected if "dms_proj_alpha" not in k]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"loaded as {type(model).__name__}; unused DMS tensors: {len(dms_unexpected)}; "
          f"other unused: {other_unexpected}; missing: {missing}")

    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    out = subprocess.run([args.bin, "logits", args.export, "--ids", ",".join(map(str, ids)),
                          "--eviction", "off"], check=True, capture_output=True, text=True)
    ours = torch.tensor(json.loads(out.stdout)["logits"])
    diff = (ours - theirs).abs()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"tokens: {len(ids)}; max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}; "
          f"top-1 agreement {top1 * 100:.1f}%")
    ok = diff.max().item() <= args.tol and not other_unexpected and not missing
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
