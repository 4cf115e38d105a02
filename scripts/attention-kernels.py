#!/usr/bin/env python3
"""Runs the flash attention kernels of src/ops/cuda/*.cu straight from PyTorch (NVRTC + the CUDA
driver through ctypes, no Rust build) against an independent float32 PyTorch reference of the
same definition (causal, DMS key bias past the window), and times them beside PyTorch's causal
SDPA (FlashAttention / cuDNN) on the same shapes, in TFLOP/s. For kernel work on a GPU machine:

    python3 scripts/attention-kernels.py [--seq 4096,8192] [--heads 32 --kv-heads 8 --dim 128]
        [--window 256] [--kernels hopper,wide,narrow] [--backward [--backward-kernels hopper,narrow]]
        [--queries N] [--no-bias] [--no-check] [--define MACRO[=V]] [--json out.json]

`--queries N` takes only the last N positions as queries (q_len N, offset seq - N: a chunk after
a cached prefix, as the eviction baselines run); SDPA is then not timed. FLOPs counted as
4 S^2 D H / 2 (causal) for the forward and 2.5x that for the backward, as scripts/bench-sdpa.py
and `bench attention` count them (visible query-key pairs with --queries).
"""
import argparse
import ctypes
import importlib.util
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_kernels", os.path.join(ROOT, "scripts/check-kernels.py"))
check_kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_kernels)

ATTR_MAX_DYNAMIC_SHARED = 8
# Dynamic shared memory per kernel at head_dim 128 (the host's figures in src/ops/cuda/mod.rs).
TILE_SHARED = 4 * 64 * (128 + 8) * 2 + 2 * 64 * 4
SHARED = {
    "narrow": ("flash_forward_d128", 64, 128, TILE_SHARED),
    "wide": ("flash_forward_wide_d128", 128, 128, TILE_SHARED + 128 * (128 + 8) * 2),
}


def hopper_shared(stages):
    """Dynamic shared memory of flash_hopper.cu's forward, dK/dV and dQ kernels with `stages`
    buffers (src/ops/cuda/mod.rs's HOPPER_*_SHARED at 3): 1 KB of alignment slack, then the
    forward's two Q tiles and per stage a K/V tile pair and bias; dK/dV's K and V tiles and per
    stage Q / dO tiles, lse and delta; dQ's two Q / dO tile pairs and per stage K / V and bias."""
    return (1024 + 2 * 64 * 128 * 2 + stages * (2 * 128 * 128 * 2 + 128 * 4),
            1024 + 2 * 128 * 128 * 2 + stages * (2 * 64 * 128 * 2 + 2 * 64 * 4),
            1024 + 4 * 64 * 128 * 2 + stages * (2 * 64 * 128 * 2 + 64 * 4))


def hopper_stages(args):
    """HOPPER_STAGES from --define, else the kernels' default (3)."""
    stages = [int(d.split("=")[1]) for d in args.define if d.startswith("HOPPER_STAGES=")]
    return stages[-1] if stages else 3


class Driver:
    def __init__(self, ptx):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.check(self.cuda.cuInit(0), "cuInit")
        torch.zeros(1, device="cuda")  # the primary context, current on this thread
        self.module = ctypes.c_void_p()
        self.check(self.cuda.cuModuleLoadData(ctypes.byref(self.module), ctypes.c_char_p(ptx)), "cuModuleLoadData")

    def check(self, status, what):
        if status:
            name = ctypes.c_char_p()
            self.cuda.cuGetErrorName(status, ctypes.byref(name))
            sys.exit(f"{what}: {name.value.decode() if name.value else status}")

    def function(self, name, shared):
        f = ctypes.c_void_p()
        self.check(self.cuda.cuModuleGetFunction(ctypes.byref(f), self.module, name.encode()), name)
        self.check(self.cuda.cuFuncSetAttribute(f, ATTR_MAX_DYNAMIC_SHARED, shared), f"{name} shared")
        return f

    def launch(self, f, grid, threads, shared, args):
        holders = []
        for a in args:
            if isinstance(a, torch.Tensor):
                holders.append(ctypes.c_uint64(a.data_ptr()))
            elif a is None:
                holders.append(ctypes.c_uint64(0))
            elif isinstance(a, float):
                holders.append(ctypes.c_float(a))
            elif isinstance(a, tuple) and a[0] == "long":  # a 64-bit size (index_t)
                holders.append(ctypes.c_uint64(a[1]))
            else:
                holders.append(ctypes.c_int32(a))
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.cuda.cuLaunchKernel(f, *grid, threads, 1, 1, shared, stream, params, None), "launch")


def distances(q, k):
    """Query position minus key position; the queries are the last q rows of the sequence."""
    n, s = q.shape[2], k.shape[2]
    return (s - n + torch.arange(n, device=q.device))[:, None] - torch.arange(s, device=q.device)[None, :]


def reference(q, k, v, bias, window):
    """float32 attention with the DMS key bias, one query head at a time: output and lse."""
    b, h, s, d = q.shape
    group = h // k.shape[1]
    dist = distances(q, k)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=q.device)
    for hi in range(h):
        kv = hi // group
        scores = (q[0, hi].float() @ k[0, kv].float().T) / math.sqrt(d)
        if bias is not None:
            scores = scores + torch.where(dist > window, bias[0, kv][None, :], 0.0)
        scores = scores.masked_fill(dist < 0, float("-inf"))
        lse[0, hi] = torch.logsumexp(scores, -1)
        out[0, hi] = (torch.softmax(scores, -1) @ v[0, kv].float()).to(q.dtype)
    return out, lse


def reference_grads(q, k, v, bias, window, dout):
    """Autograd through the float32 reference, one KV head (its query heads) at a time."""
    b, h, s, d = q.shape
    kvh = k.shape[1]
    group = h // kvh
    dist = distances(q, k)
    dq, dk, dv = torch.empty_like(q, dtype=torch.float32), torch.empty_like(k, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)
    dbias = torch.zeros(b, kvh, k.shape[2], device=q.device)
    for kv in range(kvh):
        qs = q[0, kv * group:(kv + 1) * group].float().requires_grad_()
        ks, vs = k[0, kv].float().requires_grad_(), v[0, kv].float().requires_grad_()
        bs = bias[0, kv].clone().requires_grad_() if bias is not None else None
        scores = (qs @ ks.T) / math.sqrt(d)
        if bs is not None:
            scores = scores + torch.where(dist > window, bs[None, :], 0.0)
        scores = scores.masked_fill(dist < 0, float("-inf"))
        out = torch.softmax(scores, -1) @ vs
        grads = torch.autograd.grad(out, [qs, ks, vs] + ([bs] if bs is not None else []),
                                    dout[0, kv * group:(kv + 1) * group].float())
        dq[0, kv * group:(kv + 1) * group], dk[0, kv], dv[0, kv] = grads[0], grads[1], grads[2]
        if bs is not None:
            dbias[0, kv] = grads[3]
    return dq, dk, dv, dbias


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def token_major_output(q):
    """The forward kernels' output buffer: token-major [B, T, H, D] (the output projection's
    layout), returned as its [B, H, T, D] view to compare with q-shaped references."""
    b, h, n, d = q.shape
    return torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def backward(driver, args, row, q, k, v, bias, s, flops):
    h, kvh, d = args.heads, args.kv_heads, args.dim
    n = q.shape[2]
    out = token_major_output(q)
    lse = torch.empty(1, h, n, device="cuda")
    name, rows_per_block, threads, shared = SHARED["wide"]
    fwd = driver.function(name, shared)
    driver.launch(fwd, ((n + 127) // 128, h, 1), threads, shared,
                  [q, k, v, bias, out, lse, h, kvh, n, s, s - n, args.window, 1.0 / math.sqrt(d)])
    dout = torch.randn_like(q)
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.empty_like(q)
    dk = torch.zeros(1, kvh, s, d, device="cuda")
    dv = torch.zeros_like(dk)
    dbias = torch.zeros(1, kvh, s, device="cuda")
    sizes = [h, kvh, n, s, s - n, args.window, 1.0 / math.sqrt(d)]
    result = {}
    for name in args.backward_kernels.split(","):
        # (kv kernel, keys per block, q kernel, rows per block, threads, kv shared, q shared)
        if name == "hopper":
            _, kv_shared, q_shared = hopper_shared(hopper_stages(args))
            spec = ("flash_backward_kv_hopper_d128", 128, "flash_backward_q_hopper_d128", 128, 256,
                    kv_shared, q_shared)
        else:
            spec = ("flash_backward_kv_d128", 64, "flash_backward_q_d128", 64, 128, 0, TILE_SHARED)
        kv_name, kv_keys, q_name, q_rows, threads, kv_shared, q_shared = spec
        kv_kernel = driver.function(kv_name, kv_shared)
        q_kernel = driver.function(q_name, q_shared)

        def call():
            dk.zero_(), dv.zero_(), dbias.zero_()
            driver.launch(kv_kernel, ((s + kv_keys - 1) // kv_keys, h, 1), threads, kv_shared,
                          [q, k, v, dout, lse, delta, bias, dk, dv, dbias if bias is not None else None] + sizes)
            driver.launch(q_kernel, ((n + q_rows - 1) // q_rows, h, 1), threads, q_shared,
                          [q, k, v, dout, lse, delta, bias, dq] + sizes)

        dq.fill_(float("nan"))
        call()
        torch.cuda.synchronize()
        ms = time_ms(call, args.iters)
        bflops = 2.5 * flops
        entry = {"backward_ms": ms, "tflops": bflops / ms / 1e9}
        msg = f"  backward {name:<7} {ms:7.3f} ms {bflops / ms / 1e9:6.0f} TFLOP/s"
        if s <= 4096 and not args.no_check:
            if "ref" not in result:
                result["ref"] = reference_grads(q, k, v, bias, args.window, dout)
            ref = result["ref"]
            errs = [rel(dq, ref[0]), rel(dk, ref[1]), rel(dv, ref[2])] + ([rel(dbias, ref[3])] if bias is not None else [])
            entry["rel_err_q_k_v_bias"] = errs
            msg += "  rel err q/k/v/bias " + " ".join(f"{e:.2e}" for e in errs)
        print(msg)
        result[name] = entry
    result.pop("ref", None)
    bflops = 2.5 * flops
    if n == s:
        qg = q.detach().clone().requires_grad_()
        kg = k.repeat_interleave(h // kvh, 1).detach().requires_grad_()
        vg = v.repeat_interleave(h // kvh, 1).detach().requires_grad_()
        sdpa_out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        sdpa_ms = time_ms(lambda: torch.autograd.grad(sdpa_out, (qg, kg, vg), dout, retain_graph=True), args.iters)
        print(f"  SDPA causal backward {sdpa_ms:7.3f} ms {bflops / sdpa_ms / 1e9:6.0f} TFLOP/s")
        result["sdpa_backward_ms"] = sdpa_ms
    row["backward"] = result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", default="4096,8192")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--kernels", default="hopper,wide,narrow")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--define", action="append", default=[], help="a macro for NVRTC (kernel experiments)")
    parser.add_argument("--no-bias", action="store_true", help="no DMS key bias (the teacher's attention)")
    parser.add_argument("--no-check", action="store_true", help="timing only, no reference")
    parser.add_argument("--backward", action="store_true", help="also the backward kernels (checked up to 4096)")
    parser.add_argument("--backward-kernels", default="hopper,narrow")
    parser.add_argument("--queries", type=int, help="only the last N positions as queries (a chunk after a "
                        "cached prefix: q_len N, offset seq - N); default all")
    parser.add_argument("--json")
    args = parser.parse_args()
    major, minor = torch.cuda.get_device_capability()
    ptx = check_kernels.compile_ptx(f"sm_{major}{minor}{'a' if major == 9 else ''}", args.define)
    driver = Driver(ptx)
    SHARED["hopper"] = ("flash_forward_hopper_d128", 128, 256, hopper_shared(hopper_stages(args))[0])
    torch.manual_seed(0)
    rows = []
    for s in [int(x) for x in args.seq.split(",")]:
        h, kvh, d = args.heads, args.kv_heads, args.dim
        n = min(args.queries or s, s)
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kvh, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, kvh, s, d, device="cuda", dtype=torch.bfloat16)
        bias = None if args.no_bias else -4.0 * torch.rand(1, kvh, s, device="cuda")
        ref_out, ref_lse = (None, None) if args.no_check else reference(q, k, v, bias, args.window)
        # Visible (query, key) pairs: s^2 / 2 for a whole causal sequence, as SDPA is counted.
        flops = 4 * d * h * (s * s / 2 if n == s else n * (s - n) + n * (n + 1) / 2)
        row = {"seq": s, "queries": n}
        if n == s:
            kq, vq = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
            sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kq, vq, is_causal=True), args.iters)
            row.update({"sdpa_forward_ms": sdpa, "sdpa_forward_tflops": flops / sdpa / 1e9})
            print(f"seq {s}: SDPA causal forward {sdpa:.3f} ms ({flops / sdpa / 1e9:.0f} TFLOP/s)")
        else:
            print(f"seq {s}, the last {n} positions as queries (offset {s - n}):")
        for name in args.kernels.split(","):
            kernel, rows_per_block, threads, shared = SHARED[name]
            f = driver.function(kernel, shared)
            out = token_major_output(q)
            lse = torch.empty(1, h, n, device="cuda")
            grid = ((n + rows_per_block - 1) // rows_per_block, h, 1)
            call = lambda: driver.launch(f, grid, threads, shared,
                                         [q, k, v, bias, out, lse, h, kvh, n, s, s - n, args.window, 1.0 / math.sqrt(d)])
            out.fill_(float("nan"))
            call()
            torch.cuda.synchronize()
            err = lse_err = float("nan")
            if ref_out is not None:
                err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
                lse_err = (lse - ref_lse).abs().max().item()
            ms = time_ms(call, args.iters)
            row[name] = {"forward_ms": ms, "tflops": flops / ms / 1e9, "rel_err": err, "lse_abs_err": lse_err}
            print(f"  {name:<7} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  output rel err {err:.2e}  lse abs err {lse_err:.2e}")
        if args.backward:
            backward(driver, args, row, q, k, v, bias, s, flops)
        rows.append(row)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
