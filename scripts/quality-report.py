#!/usr/bin/env python3
"""Tables and a plot of a SmolLM2 retrofit campaign (scripts/gpu-smollm2-campaign.sh results laid out
as docs/quality/<date>/): per candidate, held-out perplexity against the original model's, the
measured CR, and the best training-free baseline at the same KV budget.

    python3 scripts/quality-report.py docs/quality/2026-12-02   # prints markdown, writes ppl-vs-cr.svg

Baselines always run on the original weights: `base/*.json` (eval of the base model at a fixed CR)
and the reports of adapter-only runs (whose non-DMS weights are the original's). A candidate's own
report is used for the baselines only when they ran on the original weights: adapter-only runs, and
reports whose "original" names a separate model (eval loads the recorded base since 2026-12-02).
"""
import glob
import json
import os
import re
import sys

root = sys.argv[1]
BASELINES = ["StreamingLLM", "TOVA", "H2O", "SnapKV", "Recent"]


def load(path):
    with open(path) as f:
        return json.load(f)


def rows(report):
    length = report["lengths"][0]
    return length["seq_len"], {r["method"]: r for r in length["rows"]}


# The original model's perplexity and baseline points (length -> list of (cr, method, ppl)).
original = {}
points = {}
for path in sorted(glob.glob(os.path.join(root, "base", "*.json"))):
    seq, r = rows(load(path))
    original[seq] = r["original (dense)"]["perplexity"]
    for m in BASELINES:
        points.setdefault(seq, []).append((r[m]["compression_ratio"], m, r[m]["perplexity"]))

def train_lines(d):
    for name in ("metrics-thinned.jsonl", "metrics-every-20.jsonl"):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            with open(path) as f:
                return [l for l in map(json.loads, filter(str.strip, f)) if l.get("kind") == "train"]
    return []


def train_cr_cell(d, summary):
    """Train CR at the last step, and the mean over the last 60 steps where every step was kept
    (one micro-batch's CR is noisy), against the target."""
    lines = train_lines(d)
    last = summary["last"] if summary else (lines[-1] if lines else None)
    if last is None:
        return "-"
    cell = f"{last['train_cr']:.2f}"
    tail = [l["train_cr"] for l in lines if l["step"] > lines[-1]["step"] - 60]
    if len(tail) == 60:
        cell += f", mean {sum(tail) / 60:.2f}"
    cell += f" ({last['target_cr']:.0f})"
    if not summary:
        # Stopped by a time limit before its summary: say which checkpoint was evaluated.
        log = os.path.join(d, "export.log")
        step = re.search(r"\(step (\d+)", open(log).read()) if os.path.isfile(log) else None
        cell += f" [stopped; evaluated step {step.group(1) if step else '?'}]"
    return cell


runs = sorted(d for d in os.listdir(root)
              if d != "base" and glob.glob(os.path.join(root, d, "eval-*.json")))
table = []
for name in runs:
    d = os.path.join(root, name)
    path = os.path.join(d, "summary.json")
    summary = load(path) if os.path.isfile(path) else None
    adapter_only = "adapter" in name and "attention" not in name
    entry = {"name": name, "summary": summary, "lengths": {}}
    for path in sorted(glob.glob(os.path.join(d, "eval-*.json"))):
        report = load(path)
        seq, r = rows(report)
        entry["lengths"][seq] = r
        # Reports written since eval loads the recorded base say so in "original"; earlier ones
        # ran their baselines on the retrofit's own weights.
        separate_original = not report.get("original", "").startswith("the model itself")
        if adapter_only or ("original" in report and separate_original):
            for m in BASELINES:
                points.setdefault(seq, []).append((r[m]["compression_ratio"], m, r[m]["perplexity"]))
    table.append(entry)


def best_baseline(seq, cr):
    """The best baseline measured at a CR from `cr - 0.3` to `cr + 0.05` (a baseline given more KV
    bytes than DMS only flatters the baseline)."""
    near = [p for p in points.get(seq, []) if cr - 0.3 <= p[0] <= cr + 0.05]
    return min(near, key=lambda p: p[2]) if near else None


print("| run | train CR (target) | " + " | ".join(
    f"{s} tok: PPL (vs original) | CR | best baseline at that CR" for s in sorted(original)) + " |")
print("|---|---|" + "---|---|---|" * len(original))
for e in table:
    cells = [e["name"], train_cr_cell(os.path.join(root, e["name"]), e["summary"])]
    for seq in sorted(original):
        r = e["lengths"].get(seq)
        if not r:
            cells += ["-", "-", "-"]
            continue
        dms = r["DMS"]
        delta = 100 * (dms["perplexity"] / original[seq] - 1)
        cells += [f"{dms['perplexity']:.3f} ({delta:+.2f}%)", f"{dms['compression_ratio']:.2f}"]
        b = best_baseline(seq, dms["compression_ratio"])
        if b:
            bd = 100 * (b[2] / original[seq] - 1)
            cells.append(f"{b[1]} {b[2]:.3f} ({bd:+.2f}%) at CR {b[0]:.2f}; {bd / max(delta, 1e-9):.1f}x DMS's increase" if delta > 0.05 else f"{b[1]} {b[2]:.3f} ({bd:+.2f}%) at CR {b[0]:.2f}")
        else:
            cells.append("-")
    print("| " + " | ".join(cells) + " |")
print()
print("original (dense) perplexity: " + ", ".join(f"{s} tokens {p:.3f}" for s, p in sorted(original.items())))

# The plot: perplexity increase (%) against measured CR, one panel per length.
W, H, PAD = 420, 300, 50
colors = {"DMS": "#d62728", "StreamingLLM": "#1f77b4", "TOVA": "#2ca02c", "H2O": "#9467bd", "SnapKV": "#8c564b"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(original)}" height="{H + 40}" font-family="sans-serif" font-size="11">']
for i, seq in enumerate(sorted(original)):
    x0 = i * W
    dms = [(e["lengths"][seq]["DMS"]["compression_ratio"], e["lengths"][seq]["DMS"]["perplexity"], e["name"])
           for e in table if seq in e["lengths"]]
    pts = [(c, m, p) for c, m, p in points.get(seq, []) if m != "Recent"]
    ys = [100 * (p / original[seq] - 1) for _, p, _ in dms] + [100 * (p / original[seq] - 1) for _, _, p in pts]
    xs = [c for c, _, _ in dms] + [c for c, _, _ in pts]
    xmin, xmax = min(xs) - 0.3, max(xs) + 0.3
    ymin, ymax = min(0, min(ys)) - 1, max(ys) + 2
    sx = lambda c: x0 + PAD + (c - xmin) / (xmax - xmin) * (W - 1.5 * PAD)
    sy = lambda v: 20 + (ymax - v) / (ymax - ymin) * (H - PAD)
    svg.append(f'<text x="{x0 + W / 2}" y="14" text-anchor="middle">{seq} tokens: perplexity increase over the original vs measured CR</text>')
    svg.append(f'<line x1="{sx(xmin)}" y1="{sy(0)}" x2="{sx(xmax)}" y2="{sy(0)}" stroke="#999" stroke-dasharray="3,3"/>')
    svg.append(f'<rect x="{sx(xmin)}" y="{sy(ymax)}" width="{sx(xmax) - sx(xmin)}" height="{sy(ymin) - sy(ymax)}" fill="none" stroke="#333"/>')
    for t in range(int(ymin), int(ymax) + 1, 2):
        svg.append(f'<text x="{sx(xmin) - 4}" y="{sy(t) + 4}" text-anchor="end">{t}%</text>')
    c = int(xmin) + 1
    while c <= xmax:
        svg.append(f'<text x="{sx(c)}" y="{sy(ymin) + 14}" text-anchor="middle">{c}</text>')
        c += 1
    for c, m, p in pts:
        svg.append(f'<rect x="{sx(c) - 3}" y="{sy(100 * (p / original[seq] - 1)) - 3}" width="6" height="6" fill="{colors[m]}"><title>{m} CR {c:.2f} PPL {p:.3f}</title></rect>')
    for c, p, name in dms:
        svg.append(f'<circle cx="{sx(c)}" cy="{sy(100 * (p / original[seq] - 1))}" r="4" fill="{colors["DMS"]}"><title>{name} CR {c:.2f} PPL {p:.3f}</title></circle>')
    for j, (m, col) in enumerate(colors.items()):
        svg.append(f'<circle cx="{x0 + PAD + 8 + j * 72}" cy="{H + 18}" r="4" fill="{col}"/><text x="{x0 + PAD + 15 + j * 72}" y="{H + 22}">{m}</text>')
svg.append("</svg>")
with open(os.path.join(root, "ppl-vs-cr.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
