#!/usr/bin/env python3
"""Runs the memory-bound kernels of src/ops/cuda/elementwise.cu (the distillation KL and its
student gradient, RMSNorm, SwiGLU, the attention backward's delta) straight from PyTorch (NVRTC + the CUDA driver through ctypes,
as scripts/attention-kernels.py does; no Rust build), checks each against an independent float64
PyTorch reference of its definition, and times it in GB/s beside the card's copy bandwidth
(a PyTorch device-to-device copy). For kernel work on a GPU machine:

    python3 scripts/elementwise-kernels.py [--tokens 4096] [--kl-rows 1024] [--vocab 151936]
        [--hidden 4096] [--intermediate 12288] [--define MACRO[=V]]... [--json out.json]

bf16 inputs and outputs, as training runs them. Bytes counted: what the kernel must read and write
once (a kernel that sweeps a row twice moves more).
"""
import argparse
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_kernels = load_script("check_kernels", "check-kernels.py")
# Its ctypes driver (module load, launches on PyTorch's stream) and event timing.
attention_kernels = load_script("attention_kernels", "attention-kernels.py")
BLOCK = 256  # common.cu


def time_ms(fn, iters=20):
    return attention_kernels.time_ms(fn, iters)


class Driver(attention_kernels.Driver):
    """Launches by kernel name with BLOCK threads and no dynamic shared memory."""

    def launch(self, name, grid, args):
        functions = self.__dict__.setdefault("functions", {})
        if name not in functions:
            functions[name] = self.function(name, 0)
        super().launch(functions[name], (grid, 1, 1), BLOCK, 0, args)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bf16_bytes(*shapes):
    return sum(2 * torch.Size(s).numel() for s in shapes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--kl-rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=12288)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--define", action="append", default=[])
    parser.add_argument("--json")
    args = parser.parse_args()

    major, minor = torch.cuda.get_device_capability()
    arch = "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"
    driver = Driver(check_kernels.compile_ptx(arch, args.define))
    card = torch.cuda.get_device_name()
    torch.manual_seed(0)
    dev = "cuda"

    big = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev)  # 1 GiB
    copy_ms = time_ms(lambda: big.clone(), 10)
    copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6
    del big
    print(f"{card}: device copy {copy_gbs:.0f} GB/s (read + write); defines {args.define or 'none'}")
    rows = []

    def report(op, shape, ms, nbytes, diff, tol):
        gbs = nbytes / ms / 1e6
        ok = diff <= tol
        rows.append(dict(op=op, shape=list(shape), ms=ms, gb_per_s=gbs,
                         of_copy=gbs / copy_gbs, rel_diff=diff, tolerance=tol, ok=ok))
        print(f"{op:<24} {str(list(shape)):<22} {ms:8.3f} ms {gbs:8.0f} GB/s "
              f"({100 * gbs / copy_gbs:3.0f}% of copy)  rel diff {diff:.2e} "
              f"{'ok' if ok else 'FAIL > %.0e' % tol}")

    # Distillation KL (f32 per row) and its student gradient.
    r, v = args.kl_rows, args.vocab
    s = (torch.randn(r, v, device=dev) * 3).bfloat16()
    t = (torch.randn(r, v, device=dev) * 3).bfloat16()
    g = torch.randn(r, device=dev)
    log_s = torch.log_softmax(s.double(), -1)
    log_t = torch.log_softmax(t.double(), -1)
    p = log_s.exp()
    kl_ref = (p * (log_s - log_t)).sum(-1)
    grad_ref = g.double()[:, None] * p * (log_s - log_t - kl_ref[:, None])
    del log_s, log_t, p
    kl = torch.empty(r, device=dev)
    run_kl = lambda: driver.launch("kl_rows_bf16", r, [s, t, kl, v])
    report("token_kl", (r, v), time_ms(run_kl), bf16_bytes((r, v), (r, v)), rel(kl, kl_ref), 1e-5)
    d = torch.empty_like(s)
    run_grad = lambda: driver.launch("kl_student_grad_rows_bf16", r, [s, t, g, d, v])
    report("token_kl student grad", (r, v), time_ms(run_grad), bf16_bytes(*[(r, v)] * 3),
           rel(d, grad_ref), 1e-2)
    del s, t, d, grad_ref

    # A student near its teacher (KL ~4e-3, early distillation) that rules some tokens out
    # (-inf): a small difference of two ~16-sized log-sum-exps.
    s = torch.randn(r, v, device=dev) * 3
    t = (s + 0.1 * torch.randn(r, v, device=dev)).bfloat16()
    s = s.bfloat16()
    s[:, ::1009] = float("-inf")
    log_s = torch.log_softmax(s.double(), -1)
    log_t = torch.log_softmax(t.double(), -1)
    p = log_s.exp()
    terms = torch.where(p > 0, p * (log_s - log_t), 0.0)
    kl_ref = terms.sum(-1)
    grad_ref = torch.where(p > 0, g.double()[:, None] * p * (log_s - log_t - kl_ref[:, None]), 0.0)
    del log_s, log_t, p, terms
    report("token_kl near teacher", (r, v), time_ms(run_kl), bf16_bytes((r, v), (r, v)),
           rel(kl, kl_ref), 5e-5)
    d = torch.empty_like(s)
    report("token_kl grad near teacher", (r, v), time_ms(run_grad), bf16_bytes(*[(r, v)] * 3),
           rel(d, grad_ref), 1e-2)
    # A NaN logit reaches its row's KL and gradient wherever it sits: alone among -inf in its 16
    # bytes (where a plain fmaxf would skip it), among finite logits, or in the teacher; the other
    # rows stay finite. (Ruled-out student logits keep a 0 gradient even in a NaN row.)
    s[0, :8] = float("-inf")
    s[0, 0] = float("nan")
    s[1, 5] = float("nan")
    t[2, 100] = float("nan")
    run_kl()
    run_grad()
    torch.cuda.synchronize()
    nan_rows = kl[:3].isnan().tolist()
    nan_grads = d[:3].isnan().any(-1).tolist()  # not silently 0
    others_finite = bool(kl[3:].isfinite().all()) and bool(d[3:].isfinite().all())
    ok = all(nan_rows) and all(nan_grads) and others_finite
    rows.append(dict(op="token_kl NaN logits", nan_rows=nan_rows, nan_grad_rows=nan_grads,
                     others_finite=others_finite, ok=ok))
    print(f"{'token_kl NaN logits':<24} rows with a NaN give NaN KL: {nan_rows}, NaN gradients: "
          f"{nan_grads}, the others finite: {others_finite} {'ok' if ok else 'FAIL'}")
    del s, t, d, grad_ref

    # RMSNorm over the hidden size and over q heads.
    eps = 1e-6
    for name, (n, dim) in [("rms_norm", (args.tokens, args.hidden)),
                           ("rms_norm (q heads)", (args.tokens * args.heads, args.head_dim))]:
        x = torch.randn(n, dim, device=dev).bfloat16()
        w = (1 + 0.1 * torch.randn(dim, device=dev)).bfloat16()
        dy = torch.randn(n, dim, device=dev).bfloat16()
        xd = x.double()
        inv = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
        ref = (xd * inv).bfloat16().double() * w.double()
        out = torch.empty_like(x)
        # As src/ops/cuda/elementwise.rs: rows of one 16-byte vector per lane for a power of two
        # of lanes go 32 / lanes to a warp (`--define NORM_SHORT_ROWS=0`: one row per warp).
        lanes = dim // 8
        per_warp = 32 // lanes if dim % 8 == 0 and lanes <= 32 and lanes & (lanes - 1) == 0 else 1
        if "NORM_SHORT_ROWS=0" in args.define:
            per_warp = 1
        grid = (n + per_warp * BLOCK // 32 - 1) // (per_warp * BLOCK // 32)
        run = lambda: driver.launch("rms_norm_rows_bf16", grid, [x, w, out, n, dim, eps])
        report(name, (n, dim), time_ms(run), bf16_bytes((n, dim), (n, dim)), rel(out, ref), 1e-2)
        gw = (dy.double() * w.double()).bfloat16().double()
        xh = xd * inv
        dx_ref = (gw - xh * (gw * xh).mean(-1, keepdim=True)) * inv
        dx = torch.empty_like(x)
        run = lambda: driver.launch("rms_norm_grad_rows_bf16", grid, [x, w, dy, dx, n, dim, eps])
        report(name + " grad", (n, dim), time_ms(run), bf16_bytes(*[(n, dim)] * 3), rel(dx, dx_ref),
               1e-2)
        # Warps striding over the rows: 3 blocks for an odd number of rows (the last warp's
        # group of lanes partly past the end); the rows after them must stay untouched.
        m = n - 3
        out.fill_(7.0), dx.fill_(7.0)
        driver.launch("rms_norm_rows_bf16", 3, [x, w, out, m, dim, eps])
        driver.launch("rms_norm_grad_rows_bf16", 3, [x, w, dy, dx, m, dim, eps])
        torch.cuda.synchronize()
        untouched = bool((out[m:] == 7).all()) and bool((dx[m:] == 7).all())
        diff = max(rel(out[:m], ref[:m]), rel(dx[:m], dx_ref[:m]))
        ok = diff <= 1e-2 and untouched
        rows.append(dict(op=name + " strided", shape=[m, dim], rel_diff=diff, untouched=untouched,
                         ok=ok))
        print(f"{name + ' strided':<24} {str([m, dim]):<22} 3 blocks: rel diff {diff:.2e}, rows "
              f"past the end untouched: {untouched} {'ok' if ok else 'FAIL'}")

    # SwiGLU and its gradients.
    shape = (args.tokens, args.intermediate)
    n = args.tokens * args.intermediate
    gate = (2 * torch.randn(shape, device=dev)).bfloat16()
    up = torch.randn(shape, device=dev).bfloat16()
    dy = torch.randn(shape, device=dev).bfloat16()
    gd, ud = gate.double(), up.double()
    sig = torch.sigmoid(gd)
    ref = (gd * sig).bfloat16().double() * ud
    out = torch.empty_like(gate)
    grid = min((n + 8 * BLOCK - 1) // (8 * BLOCK), 1 << 16)
    run = lambda: driver.launch("swiglu_bf16", grid, [gate, up, out, ("long", n)])
    report("swiglu", shape, time_ms(run), bf16_bytes(*[shape] * 3), rel(out, ref), 1e-2)
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(gate)
    run = lambda: driver.launch("swiglu_grads_bf16", grid, [gate, up, dy, d_gate, d_up, ("long", n)])
    dref_up = dy.double() * gd * sig
    dref_gate = dy.double() * ud * sig * (1 + gd * (1 - sig))
    report("swiglu grads", shape, time_ms(run), bf16_bytes(*[shape] * 5),
           max(rel(d_gate, dref_gate), rel(d_up, dref_up)), 1e-2)

    # The attention backward's row term delta = sum_d dO O (f32), dO and O token-major
    # ([B, T, H, D] seen as [B, H, T, D], as the flash forward and the output projection leave
    # them) and, second, dO contiguous [B, H, T, D].
    heads, hd, tokens = args.heads, args.head_dim, args.tokens
    dout = torch.randn(1, tokens, heads, hd, device=dev).bfloat16().transpose(1, 2)
    o = torch.randn(1, tokens, heads, hd, device=dev).bfloat16().transpose(1, 2)
    for label, g_ in (("token-major", dout), ("dO contiguous", dout.contiguous())):
        delta = torch.full((1, heads, tokens), float("nan"), device=dev)
        ref = (g_.double() * o.double()).sum(-1)
        strides = [("long", st) for st in (*g_.stride()[:3], *o.stride()[:3])]
        rows_ = heads * tokens
        run = lambda: driver.launch("attention_delta_rows_bf16", (rows_ + 7) // 8,
                                    [g_, o, delta, heads, tokens, hd, *strides, ("long", rows_)])
        report(f"attention delta {label}", (heads, tokens, hd), time_ms(run),
               bf16_bytes(g_.shape, o.shape) + 2 * delta.numel(), rel(delta, ref), 1e-5)

    if args.json:
        json.dump(dict(card=card, copy_gb_per_s=copy_gbs, defines=args.define, rows=rows),
                  open(args.json, "w"), indent=1)
    if not all(row["ok"] for row in rows):
        sys.exit("some kernels differ from the reference beyond tolerance")


if __name__ == "__main__":
    main()
