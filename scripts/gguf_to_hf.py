#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file (llama.cpp) into a Hugging Face model folder.

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype bf16|f32]

Writes into OUT_DIR:
  model.safetensors       weights in HF names, dequantized, q/k rows un-permuted
  config.json             LlamaForCausalLM config, every hyperparameter read from GGUF metadata
  generation_config.json
  tokenizer.json          byte-level BPE built from tokenizer.ggml.{tokens,merges,token_type}
  tokenizer_config.json   special tokens and the chat template from GGUF metadata

Needs only `gguf`, `numpy` and `safetensors` (no torch). The output is deterministic: the same
GGUF and options give byte-identical files.

Scope: `general.architecture == "llama"` with a `gpt2` (byte-level BPE) tokenizer whose
pre-tokenizer is one this script knows (`smollm`, `gpt-2`, `default`). Anything else is
refused with a clear error rather than converted wrongly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors import TensorSpec, serialize_file

# llama.cpp GGUF tensor names -> HF Llama names (per block, then global).
BLOCK_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp may store that HF Llama does not have (precomputed, not weights).
IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

# GGUF token types (llama.cpp llama_token_type / gguf.TokenType).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# Byte-level pre-tokenizer pieces, as HF tokenizers write them.
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    # SmolLM / StarCoder style: every digit split on its own, then GPT-2 byte-level regex.
    # (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 regex.)
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, dict(_BYTELEVEL)],
    },
    "gpt-2": dict(_BYTELEVEL),
    "default": dict(_BYTELEVEL),
}


def die(msg: str) -> None:
    print(f"gguf_to_hf: error: {msg}", file=sys.stderr)
    sys.exit(1)


def field(reader: GGUFReader, key: str, default=None, required: bool = False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            die(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp convert_hf_to_gguf's LlamaModel.permute for q_proj/k_proj rows.

    Forward (HF -> GGUF): w.reshape(n_head, 2, dim // n_head // 2, *rest).swapaxes(1, 2)
    i.e. within each head the rows go from [half][i] (rotate-half) to [i][half] (interleaved).
    """
    dim = w.shape[0]
    if dim % (2 * n_head):
        die(f"cannot un-permute a tensor of {dim} rows over {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even like torch's .to(bfloat16)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    if np.isnan(a).any():
        die("NaN in weights")
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_MAP:
        return GLOBAL_MAP[gguf_name]
    if gguf_name in IGNORED:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in BLOCK_MAP:
        return f"model.layers.{int(parts[1])}.{BLOCK_MAP[parts[2]]}.weight"
    die(f"unknown GGUF tensor {gguf_name!r} (no HF Llama equivalent known)")
    return None


def build_tokenizer(reader: GGUFReader):
    model = field(reader, "tokenizer.ggml.model", required=True)
    if model != "gpt2":
        die(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        die(f"tokenizer.ggml.pre is {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
    tokens = field(reader, "tokenizer.ggml.tokens", required=True)
    merges = field(reader, "tokenizer.ggml.merges", required=True)
    types = field(reader, "tokenizer.ggml.token_type", [TT_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        die("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            die(f"duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    for m in merges:
        if m.count(" ") != 1:
            die(f"merge {m!r} does not split into exactly two parts")
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TT_CONTROL, TT_UNKNOWN, TT_USER_DEFINED):
            added.append({
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": ty == TT_USER_DEFINED,
                "special": ty != TT_USER_DEFINED,
            })
        elif ty not in (TT_NORMAL, TT_UNUSED, TT_BYTE):
            die(f"token {i} {t!r} has unknown token_type {ty}")
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": list(merges),
        },
    }
    return tok, tokens, added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16",
                    help="storage dtype of model.safetensors (default bf16, as HF ships SmolLM2)")
    args = ap.parse_args()
    t0 = time.time()

    if not args.gguf.is_file():
        die(f"{args.gguf} is not a file")
    h = hashlib.sha256()
    with open(args.gguf, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    gguf_sha = h.hexdigest()

    r = GGUFReader(str(args.gguf))
    arch = field(r, "general.architecture", required=True)
    if arch != "llama":
        die(f"general.architecture is {arch!r}; only 'llama' is supported")

    def hp(key, default=None, required=True):
        return field(r, f"{arch}.{key}", default, required=required and default is None)

    n_layer = int(hp("block_count"))
    hidden = int(hp("embedding_length"))
    ffn = int(hp("feed_forward_length"))
    n_head = int(hp("attention.head_count"))
    n_kv = int(hp("attention.head_count_kv", n_head))
    head_dim = int(field(r, f"{arch}.attention.key_length", None) or hp("rope.dimension_count", hidden // n_head))
    ctx = int(hp("context_length"))
    theta = float(hp("rope.freq_base", 10000.0))
    eps = float(hp("attention.layer_norm_rms_epsilon"))
    # float32 in GGUF: 1e-5 reads back as 9.99999974e-06. Print it the way the HF config had it.
    eps = float(np.format_float_positional(np.float32(eps), unique=True, trim="-")) if eps else eps
    if field(r, f"{arch}.rope.scaling.type", None) not in (None, "none"):
        die("rope scaling in GGUF metadata is not supported by this converter")

    tok_json, tokens, added = build_tokenizer(r)
    vocab_size = int(hp("vocab_size", len(tokens)))
    if vocab_size != len(tokens):
        die(f"{arch}.vocab_size {vocab_size} != {len(tokens)} tokens")

    def tok_id(key):
        v = field(r, key, None)
        return None if v is None else int(v)

    bos_id, eos_id = tok_id("tokenizer.ggml.bos_token_id"), tok_id("tokenizer.ggml.eos_token_id")
    pad_id, unk_id = tok_id("tokenizer.ggml.padding_token_id"), tok_id("tokenizer.ggml.unknown_token_id")

    # ---- weights ----
    names = {t.name for t in r.tensors}
    tied = "output.weight" not in names
    tensors: dict[str, np.ndarray] = {}
    qtypes: dict[str, int] = {}
    for t in r.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        qt = GGMLQuantizationType(t.tensor_type)
        qtypes[qt.name] = qtypes.get(qt.name, 0) + 1
        w = dequantize(t.data, qt).astype(np.float32, copy=False)
        # GGUF shape lists ne0 (innermost) first; HF shape is the reverse.
        want = tuple(int(x) for x in reversed(list(t.shape)))
        w = w.reshape(want)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute(w, n_kv)
        tensors[name] = f32_to_bf16_bits(w) if args.dtype == "bf16" else np.ascontiguousarray(w, dtype=np.float32)

    # Shape sanity against the metadata.
    expect = {"model.embed_tokens.weight": (vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        expect.update({
            p + "self_attn.q_proj.weight": (n_head * head_dim, hidden),
            p + "self_attn.k_proj.weight": (n_kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (n_kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, n_head * head_dim),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    if not tied:
        expect["lm_head.weight"] = (vocab_size, hidden)
    missing = sorted(set(expect) - set(tensors))
    extra = sorted(set(tensors) - set(expect))
    if missing or extra:
        die(f"tensor set mismatch: missing={missing[:5]} extra={extra[:5]}")
    for k, shp in expect.items():
        if tensors[k].shape != shp:
            die(f"{k}: shape {tensors[k].shape}, expected {shp}")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    st_dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    specs = {
        k: TensorSpec(dtype=st_dtype, shape=list(v.shape), data_ptr=v.ctypes.data, data_len=v.nbytes)
        for k, v in sorted(tensors.items())
    }
    # One metadata key only: safetensors keeps __metadata__ in a hash map, so several keys are
    # written in a different order each run and the file would not be byte-reproducible.
    meta = {"format": "pt"}
    serialize_file(specs, str(out / "model.safetensors"), metadata=meta)
    del specs

    torch_dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": ctx,
        "mlp_bias": False,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    gen = {k: v for k, v in gen.items() if v is not None}

    def tok_str(i):
        return None if i is None else tokens[i]

    special = [a["content"] for a in added if a["special"]]
    tok_cfg = {
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(r, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
        "bos_token": tok_str(bos_id),
        "eos_token": tok_str(eos_id),
        "pad_token": tok_str(pad_id),
        "unk_token": tok_str(unk_id),
        "clean_up_tokenization_spaces": False,
        "model_max_length": ctx,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    extra_special = [s for s in (tok_str(bos_id), tok_str(eos_id)) if s is not None]
    if extra_special:
        tok_cfg["additional_special_tokens"] = list(dict.fromkeys(extra_special))
    tmpl = field(r, "tokenizer.chat_template", None)
    if tmpl is not None:
        tok_cfg["chat_template"] = tmpl
    tok_cfg = {k: v for k, v in tok_cfg.items() if v is not None}

    def dump(name, obj):
        with open(out / name, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False)
            fh.write("\n")

    dump("config.json", config)
    dump("generation_config.json", gen)
    dump("tokenizer.json", tok_json)
    dump("tokenizer_config.json", tok_cfg)

    st_size = os.path.getsize(out / "model.safetensors")
    n_params = sum(int(np.prod(v.shape)) for v in tensors.values())
    print(f"gguf_to_hf: {args.gguf.name} (sha256 {gguf_sha[:16]}…) -> {out}")
    print(f"  arch llama: {n_layer} layers, hidden {hidden}, heads {n_head}/{n_kv} kv, head_dim {head_dim}, "
          f"ffn {ffn}, vocab {vocab_size}, ctx {ctx}, rope_theta {theta:g}, rms_eps {eps:g}, tied {tied}")
    print(f"  tensors: {len(tensors)} ({n_params:,} params), GGUF types {dict(sorted(qtypes.items()))}, "
          f"stored {st_dtype}, model.safetensors {st_size:,} bytes")
    print(f"  tokenizer: {len(tokens)} tokens, {len(tok_json['model']['merges'])} merges, "
          f"{len(added)} added ({len(special)} special), pre={field(r, 'tokenizer.ggml.pre', 'default')}; "
          f"bos={tok_str(bos_id)!r} eos={tok_str(eos_id)!r} pad={tok_str(pad_id)!r}; "
          f"chat_template {'yes' if tmpl else 'no'}")
    print(f"  done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
