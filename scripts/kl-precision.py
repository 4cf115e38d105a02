#!/usr/bin/env python3
"""How close the distillation KL kernel's f32 arithmetic (src/ops/cuda/elementwise.cu, `row_kl`)
comes to float64, on the CPU: a numpy model of its order of operations (256 threads, 8 values per
16-byte load, running-max rescaling, butterfly warp merges, then the 8 warps; every operation
rounded to f32, exp2 taken exact), with the log-sum-exp difference taken as the kernel does,
`(max_s - max_t) + log(sum_s / sum_t)`, and as it did before, `lse_s - lse_t`.

    python3 scripts/kl-precision.py [--vocab 151936] [--rows 3] [--seed 1]
"""
import argparse

import numpy as np

f32 = np.float32
LOG2E = f32(1.4426950408889634)
BLOCK, WIDTH = 256, 8


def exp2(x):
    return np.exp2(x.astype(np.float64)).astype(f32)


def merge(a, b):
    (ams, ass, acr, amt, ast), (bms, bss, bcr, bmt, bst) = a, b
    ms, mt = np.maximum(ams, bms), np.maximum(amt, bmt)
    ca, cb = exp2((ams - ms) * LOG2E), exp2((bms - ms) * LOG2E)
    ta, tb = exp2((amt - mt) * LOG2E), exp2((bmt - mt) * LOG2E)
    return (ms, (ass * ca).astype(f32) + (bss * cb).astype(f32),
            (acr * ca).astype(f32) + (bcr * cb).astype(f32),
            mt, (ast * ta).astype(f32) + (bst * tb).astype(f32))


def kernel_kl(s, t, new_difference):
    groups = s.size // WIDTH
    sg, tg = s[:groups * WIDTH].reshape(groups, WIDTH), t[:groups * WIDTH].reshape(groups, WIDTH)
    ms = np.full(BLOCK, -np.inf, f32); mt = ms.copy()
    ss = np.zeros(BLOCK, f32); cr = ss.copy(); st = ss.copy()
    for turn in range(-(-groups // BLOCK)):
        idx = np.arange(BLOCK) + turn * BLOCK
        live = idx < groups
        idx = np.minimum(idx, groups - 1)
        sv, tv = sg[idx], tg[idx]
        for m, total, rest, v in ((ms, ss, cr, sv), (mt, st, None, tv)):
            new = np.where(live, np.maximum(m, v.max(1)), m)
            c = exp2((m - new) * LOG2E)
            grow = new > m
            total[:] = np.where(grow, (total * c).astype(f32), total)
            if rest is not None:
                rest[:] = np.where(grow, (rest * c).astype(f32), rest)
            m[:] = np.where(grow, new, m)
        for i in range(WIDTH):
            e = exp2((sv[:, i] - ms) * LOG2E)
            ss[:] = np.where(live, ss + e, ss)
            term = (e * (sv[:, i] - tv[:, i]).astype(f32)).astype(f32)
            cr[:] = np.where(live & (e > 0), cr + term, cr)
            st[:] = np.where(live, st + exp2((tv[:, i] - mt) * LOG2E), st)
    state = (ms, ss, cr, mt, st)
    lane = np.arange(BLOCK)
    for o in (16, 8, 4, 2, 1):
        state = merge(state, tuple(x[lane ^ o] for x in state))
    total = tuple(np.array([v], f32) for v in (-np.inf, 0, 0, -np.inf, 0))
    for w in range(BLOCK // 32):
        total = merge(total, tuple(x[w * 32:w * 32 + 1] for x in state))
    ms, ss, cr, mt, st = (f32(x[0]) for x in total)
    lse_s = f32(ms + f32(np.log(ss)))
    if new_difference:
        return f32(f32(cr / ss) - f32(f32(ms - mt) + f32(np.log(f32(ss / st)))))
    return f32(f32(f32(cr / ss) - lse_s) + f32(mt + f32(np.log(st))))


def kl_f64(s, t):
    s, t = s.astype(np.float64), t.astype(np.float64)
    log_s = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
    log_t = t - (t.max() + np.log(np.exp(t - t.max()).sum()))
    return (np.exp(log_s) * (log_s - log_t)).sum()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'rows':<28} {'KL (f64)':>10} {'lse_s - lse_t':>22} {'max diff + log ratio':>22}")
    for name, near in (("t = s + N(0, 0.1^2)", True), ("t independent", False)):
        for _ in range(args.rows):
            s = (3 * rng.standard_normal(args.vocab)).astype(f32)
            t = (s + 0.1 * rng.standard_normal(args.vocab) if near
                 else 3 * rng.standard_normal(args.vocab)).astype(f32)
            want = kl_f64(s, t)
            errors = [abs(float(kernel_kl(s, t, new)) - want) for new in (False, True)]
            cells = [f"{e:.1e} ({e / want:.1e})" for e in errors]
            print(f"{name:<28} {want:>10.3e} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
