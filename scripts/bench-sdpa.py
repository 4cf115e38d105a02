#!/usr/bin/env python3
"""The dense attention ceiling for `dms-retrofit bench attention`: PyTorch's causal
scaled_dot_product_attention (the FlashAttention backend on Hopper) forward and backward, bf16,
on the same head shapes, without the DMS key bias (SDPA's flash path takes no additive bias).

    python3 scripts/bench-sdpa.py [--shape qwen3-8b] [--seq 4096,32768] [--repeats 5]

Prints one JSON line per length: median milliseconds and TFLOP/s. FLOPs are counted the way
`bench attention` counts them: forward 4 * heads * head_dim * (causal query-key pairs), backward
2.5x the forward (FlashAttention's convention)."""
import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # query heads, KV heads, head_dim
    "qwen3-8b": (32, 8, 128),
    "qwen3-1.7b": (16, 8, 128),
    "smollm2-135m": (9, 3, 64),
}


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    parser.add_argument("--seq", default="4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    heads, kv_heads, dim = SHAPES[args.shape]
    for seq in [int(s) for s in args.seq.split(",")]:
        q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        out = forward()

        def backward():
            torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        fwd_ms = timed(forward, args.repeats)
        bwd_ms = timed(backward, args.repeats)
        flops = 4.0 * heads * dim * seq * (seq + 1) / 2
        print(json.dumps({
            "shape": args.shape, "seq": seq, "sdpa_fwd_ms": round(fwd_ms, 3),
            "sdpa_bwd_ms": round(bwd_ms, 3), "fwd_tflops": round(flops / fwd_ms / 1e9, 1),
            "bwd_tflops": round(2.5 * flops / bwd_ms / 1e9, 1),
            "backend": "torch " + torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
