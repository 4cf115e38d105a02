#!/usr/bin/env python3
"""Generate tiny golden model fixtures for dms-retrofit's logits-parity tests.

What it makes
-------------
Under tests/fixtures/<case>/ (relative to the repo root) for every case:

  config.json        written by transformers' ``save_pretrained``
  model.safetensors  written by ``save_pretrained(safe_serialization=True)``
  reference.json     {"input_ids": [[...], [...]],             # batch 2 x seq 24, no padding
                      "logits": [[[...]]],                     # float32, [batch, seq, vocab]
                      "transformers_version": "...",
                      "torch_version": "..."}

Cases (all: hidden 64, 2 layers, vocab 256, intermediate 128, eager attention,
float32 compute, rms_norm_eps 1e-5, weights re-initialised with a large
spread so that every component visibly moves the logits):

  llama        LlamaForCausalLM, 4 heads / 2 KV heads, rope_theta 1e4, untied
  llama3_tied  LlamaForCausalLM, 4 heads / 1 KV head, head_dim 16, tied
               embeddings, rope_theta 5e5, rope_type "llama3" (factor 8,
               low_freq_factor 1, high_freq_factor 4,
               original_max_position_embeddings 64 -> the 8 RoPE bands hit
               all three llama3 regimes: 1 kept, 1 smoothed, 6 divided by 8)
  qwen2        Qwen2ForCausalLM, q/k/v bias, rope_theta 1e6, untied
  qwen3        Qwen3ForCausalLM, head_dim 32 (!= 64/4), q_norm/k_norm, no bias,
               untied
  qwen2_bf16   the qwen2 weights rounded to bfloat16 and saved as bf16; its
               reference logits come from the bf16 weights upcast to float32
               and run in float32 (a bf16->f32 loader must match at 1e-4)
  llama3_tied_tf4 / llama3_tied_tf5
               the llama3_tied weights + reference with config.json rewritten
               in the *other* transformers major's key layout (4.x: top-level
               rope_theta + rope_scaling + torch_dtype; 5.x: rope_parameters +
               dtype). Only one of the two is produced, depending on which
               layout the installed transformers wrote.

The script also prints, per case, max |logit|, logit std and a set of
"sensitivity" diffs (max |delta logits| when a component is deliberately
broken: rope_theta x2, interleaved instead of rotate-half RoPE, norm weights
reset to 1, biases zeroed, GQA head->kv mapping h % n_kv instead of
h // group, llama3 scaling dropped, q/k-norm dropped).

How to run
----------
    python3 -m venv /work/venv-ref
    /work/venv-ref/bin/pip install torch transformers safetensors numpy tokenizers jinja2
    /work/venv-ref/bin/python scripts/make_fixtures.py          # from the repo root

Deterministic: fixed torch.manual_seed per case, CPU, float32.

Versions used to generate the committed fixtures
------------------------------------------------
    python 3.11.7, torch 2.15.0 (CPU wheel from PyPI), transformers 5.24.0,
    safetensors 0.8.0, numpy 2.4.6, tokenizers 0.23.3, huggingface_hub 2.4.0
"""

import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures")
TF_MAJOR = int(transformers.__version__.split(".")[0])

BATCH, SEQ = 2, 24
LINEAR_STD = 0.15
EMBED_STD = 0.15
BIAS_STD = 0.1

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def rope_kwargs(theta, scaling=None):
    """RoPE config kwargs in the layout the installed transformers expects."""
    if TF_MAJOR >= 5:
        params = {"rope_type": "default", "rope_theta": float(theta)}
        if scaling:
            params = dict(scaling)
            params["rope_theta"] = float(theta)
        return {"rope_parameters": params}
    kw = {"rope_theta": float(theta)}
    if scaling:
        kw["rope_scaling"] = dict(scaling)
    return kw


def make_config(cls, rope_theta, rope_scaling=None, **overrides):
    kw = dict(COMMON)
    kw.update(overrides)
    kw.update(rope_kwargs(rope_theta, rope_scaling))
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build_model(model_cls, cfg):
    model = model_cls(cfg).to(torch.float32)
    model.config._attn_implementation = "eager"
    model.eval()
    return model


@torch.no_grad()
def reinit_(model, seed):
    """Large-spread deterministic re-initialisation of every parameter."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():  # tied params are yielded once
        if name.endswith("norm.weight"):  # input/post_attention/final norm, q_norm, k_norm
            p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, BIAS_STD)
        elif "embed_tokens" in name:
            p.normal_(0.0, EMBED_STD)
        elif p.dim() == 2:
            p.normal_(0.0, LINEAR_STD)
        else:
            raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")


def make_input_ids(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)  # avoid pad/bos/eos ids 0..2
    assert not torch.equal(ids[0], ids[1])
    return ids


@torch.no_grad()
def logits_of(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float()


def f32_json(x):
    """Shortest round-trip decimal text for a float32 value (valid JSON number)."""
    s = str(np.float32(x))
    assert "nan" not in s and "inf" not in s
    return s


def nested_json(arr):
    if arr.ndim == 1:
        return "[" + ",".join(f32_json(v) for v in arr) + "]"
    return "[" + ",".join(nested_json(a) for a in arr) + "]"


def write_reference(folder, ids, logits):
    text = (
        "{"
        + '"input_ids":' + json.dumps(ids.tolist())
        + ',"logits":' + nested_json(logits.numpy().astype(np.float32))
        + ',"transformers_version":' + json.dumps(transformers.__version__)
        + ',"torch_version":' + json.dumps(torch.__version__)
        + "}\n"
    )
    with open(os.path.join(folder, "reference.json"), "w") as f:
        f.write(text)
    # round-trip check
    back = json.load(open(os.path.join(folder, "reference.json")))
    assert np.array_equal(np.array(back["logits"], dtype=np.float32), logits.numpy())


def save_case(name, model, ids, logits):
    folder = os.path.join(OUT, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    model.save_pretrained(folder, safe_serialization=True)
    # save_pretrained may add generation_config.json; keep only what the tests need
    for extra in os.listdir(folder):
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(folder, extra))
    write_reference(folder, ids, logits)
    for fn in os.listdir(folder):
        os.chmod(os.path.join(folder, fn), 0o644)
    return folder


# ---------------------------------------------------------------- sensitivity checks

def maxdiff(a, b):
    return float((a - b).abs().max())


def with_config_change(model, model_cls, **cfg_changes):
    cfg = copy.deepcopy(model.config)
    for k, v in cfg_changes.items():
        setattr(cfg, k, v)
    m = build_model(model_cls, cfg)
    m.load_state_dict(model.state_dict())
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m


def head_rows_perm(n_heads, head_dim, inner_perm):
    idx = []
    for h in range(n_heads):
        idx += [h * head_dim + j for j in inner_perm]
    return torch.tensor(idx)


@torch.no_grad()
def sensitivity(name, model, model_cls, ids, base):
    cfg = model.config
    res = {}
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    # rope_theta x2
    if TF_MAJOR >= 5:
        rp = copy.deepcopy(cfg.rope_parameters)
        rp["rope_theta"] = rp["rope_theta"] * 2
        m = with_config_change(model, model_cls, rope_parameters=rp)
    else:
        m = with_config_change(model, model_cls, rope_theta=cfg.rope_theta * 2)
    res["rope_theta_x2"] = maxdiff(logits_of(m, ids), base)

    # interleaved (GPT-J) RoPE instead of rotate_half == permute q/k dims by P
    # (P maps interleaved pairs (2i, 2i+1) onto half-split pairs (i, i + hd/2))
    inner = [2 * i for i in range(hd // 2)] + [2 * i + 1 for i in range(hd // 2)]
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        att = layer.self_attn
        for proj, n in ((att.q_proj, nh), (att.k_proj, nkv)):
            perm = head_rows_perm(n, hd, inner)
            proj.weight.copy_(proj.weight[perm])
            if proj.bias is not None:
                proj.bias.copy_(proj.bias[perm])
        for nm in ("q_norm", "k_norm"):
            if hasattr(att, nm):
                getattr(att, nm).weight.copy_(getattr(att, nm).weight[torch.tensor(inner)])
    res["rope_interleaved"] = maxdiff(logits_of(m, ids), base)

    # all RMSNorm weights reset to 1
    m = copy.deepcopy(model)
    for n_, p in m.named_parameters():
        if n_.endswith("norm.weight"):
            p.fill_(1.0)
    res["norm_weights_1"] = maxdiff(logits_of(m, ids), base)

    # q_norm / k_norm dropped (qwen3)
    if hasattr(model.model.layers[0].self_attn, "q_norm"):
        m = copy.deepcopy(model)
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
        res["qk_norm_weights_1"] = maxdiff(logits_of(m, ids), base)

    # biases zeroed
    if any(n_.endswith(".bias") for n_, _ in model.named_parameters()):
        m = copy.deepcopy(model)
        for n_, p in m.named_parameters():
            if n_.endswith(".bias"):
                p.zero_()
        res["bias_zeroed"] = maxdiff(logits_of(m, ids), base)

    # wrong GQA mapping (q head h -> kv head h % nkv instead of h // group):
    # equivalent to permuting q heads and o_proj input columns with perm p where p(s) % nkv == s // group
    if 1 < nkv < nh:
        group = nh // nkv
        p = [None] * nh
        for s in range(nh):
            kv, r = s // group, s % group
            p[s] = kv + r * nkv
        m = copy.deepcopy(model)
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in p])
        for layer in m.model.layers:
            att = layer.self_attn
            att.q_proj.weight.copy_(att.q_proj.weight[rows])
            if att.q_proj.bias is not None:
                att.q_proj.bias.copy_(att.q_proj.bias[rows])
            att.o_proj.weight.copy_(att.o_proj.weight[:, rows])
        res["gqa_modulo_mapping"] = maxdiff(logits_of(m, ids), base)

    # llama3 rope scaling dropped
    if TF_MAJOR >= 5:
        rp = cfg.rope_parameters
        scaled = rp.get("rope_type", "default") != "default"
    else:
        scaled = bool(getattr(cfg, "rope_scaling", None))
    if scaled:
        if TF_MAJOR >= 5:
            m = with_config_change(
                model, model_cls, rope_parameters={"rope_type": "default", "rope_theta": rp["rope_theta"]}
            )
        else:
            m = with_config_change(model, model_cls, rope_scaling=None)
        res["rope_scaling_dropped"] = maxdiff(logits_of(m, ids), base)
        res["rope_scaling_dropped_mean_abs"] = float((logits_of(m, ids) - base).abs().mean())
        inv_scaled = model.model.rotary_emb.inv_freq.clone()
        inv_plain = m.model.rotary_emb.inv_freq.clone()
        print(f"  [{name}] inv_freq default : {[f'{v:.3e}' for v in inv_plain.tolist()]}")
        print(f"  [{name}] inv_freq llama3  : {[f'{v:.3e}' for v in inv_scaled.tolist()]}")
        print(f"  [{name}] ratio            : {[f'{v:.3f}' for v in (inv_scaled / inv_plain).tolist()]}")
    return res


# ---------------------------------------------------------------- cases

def report(name, logits, extra=None):
    print(
        f"[{name}] logits shape {tuple(logits.shape)}  max|logit| {logits.abs().max():.4f}  "
        f"std {logits.std():.4f}  mean {logits.mean():.4f}"
    )
    if extra:
        for k, v in extra.items():
            print(f"  [{name}] sensitivity {k:28s} {v:.4f}")


def run_case(name, model_cls, cfg, seed, summary):
    model = build_model(model_cls, cfg)
    reinit_(model, seed)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = make_input_ids(seed + 1000, cfg.vocab_size)
    logits = logits_of(model, ids)
    save_case(name, model, ids, logits)
    sens = sensitivity(name, model, model_cls, ids, logits)
    report(name, logits, sens)
    summary[name] = {
        "max_abs_logit": float(logits.abs().max()),
        "logit_std": float(logits.std()),
        "sensitivity": sens,
    }
    return model, ids, logits


def tf_other_layout(src_name, summary):
    """Rewrite <src>/config.json into the other transformers major's layout."""
    src = os.path.join(OUT, src_name)
    cfg = json.load(open(os.path.join(src, "config.json")))
    wrote_v5 = "rope_parameters" in cfg
    layout = "transformers-5 (rope_parameters + dtype)" if wrote_v5 else "transformers-4 (rope_theta/rope_scaling + torch_dtype)"
    print(f"transformers {transformers.__version__} wrote config.json in the {layout} layout")
    new = {}
    if wrote_v5:
        suffix = "_tf4"
        for k, v in cfg.items():
            if k == "rope_parameters":
                rp = dict(v)
                new["rope_theta"] = rp.pop("rope_theta")
                new["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
            elif k == "dtype":
                new["torch_dtype"] = v
            else:
                new[k] = v
        new["transformers_version"] = "4.46.0"  # representative 4.x writer
    else:
        suffix = "_tf5"
        for k, v in cfg.items():
            if k == "rope_theta":
                continue
            if k == "rope_scaling":
                continue
            if k == "torch_dtype":
                new["dtype"] = v
            else:
                new[k] = v
        rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        if "type" in rp and "rope_type" not in rp:
            rp["rope_type"] = rp.pop("type")
        rp["rope_theta"] = cfg["rope_theta"]
        new["rope_parameters"] = rp
        new["transformers_version"] = "5.0.0"
    dst = os.path.join(OUT, src_name + suffix)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
        f.write("\n")
    for fn in ("model.safetensors", "reference.json"):
        shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
    summary["_layout_written"] = layout
    summary["_variant"] = src_name + suffix
    print(f"wrote {dst}/config.json (other layout) + copied weights/reference")
    return layout


@torch.no_grad()
def verify_reload(names):
    """Reload every folder with from_pretrained (float32, eager) and compare with reference.json."""
    from transformers import AutoModelForCausalLM

    for name in names:
        folder = os.path.join(OUT, name)
        ref = json.load(open(os.path.join(folder, "reference.json")))
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.tensor(ref["input_ids"])
        d = maxdiff(logits_of(m, ids), torch.tensor(ref["logits"]))
        print(f"[verify] {name:18s} from_pretrained -> reference max|diff| {d:.3e}")
        assert d < 1e-5, (name, d)


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}")
    summary = {}

    # llama: plain RoPE, untied, GQA 4/2
    cfg = make_config(LlamaConfig, 10000.0, tie_word_embeddings=False)
    run_case("llama", LlamaForCausalLM, cfg, seed=1, summary=summary)

    # llama3_tied: tied, llama3 rope scaling, GQA 4/1
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = make_config(
        LlamaConfig, 500000.0, scaling, tie_word_embeddings=True, num_key_value_heads=1, head_dim=16
    )
    run_case("llama3_tied", LlamaForCausalLM, cfg, seed=2, summary=summary)

    # qwen2: qkv bias, rope 1e6, untied
    cfg = make_config(Qwen2Config, 1000000.0, tie_word_embeddings=False, use_sliding_window=False)
    qwen2_model, qwen2_ids, qwen2_logits = run_case("qwen2", Qwen2ForCausalLM, cfg, seed=3, summary=summary)

    # qwen3: head_dim 32 != 64/4, q_norm/k_norm, no bias, untied
    cfg = make_config(
        Qwen3Config, 1000000.0, tie_word_embeddings=False, head_dim=32, attention_bias=False, use_sliding_window=False
    )
    run_case("qwen3", Qwen3ForCausalLM, cfg, seed=4, summary=summary)

    # qwen2_bf16: qwen2 weights rounded to bf16, saved as bf16; reference = bf16 weights upcast, run in f32
    m = copy.deepcopy(qwen2_model).to(torch.bfloat16)
    folder = os.path.join(OUT, "qwen2_bf16")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    m.save_pretrained(folder, safe_serialization=True)
    for extra in os.listdir(folder):
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(folder, extra))
    # Reference model: a *fresh* float32 model (so non-persistent buffers such as the RoPE
    # inv_freq stay float32 -- casting the whole module to bf16 and back would round them too)
    # loaded with the bf16-rounded weights upcast to float32.
    m = build_model(Qwen2ForCausalLM, copy.deepcopy(qwen2_model.config))
    m.load_state_dict({k: v.to(torch.bfloat16).to(torch.float32) for k, v in qwen2_model.state_dict().items()})
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(m.model.rotary_emb.inv_freq, qwen2_model.model.rotary_emb.inv_freq)
    logits = logits_of(m, qwen2_ids)
    write_reference(folder, qwen2_ids, logits)
    # sanity: the file really is bf16 and re-reads to exactly these weights
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values()), {k: t.dtype for k, t in sd.items()}
    for fn in os.listdir(folder):
        os.chmod(os.path.join(folder, fn), 0o644)
    d = maxdiff(logits, qwen2_logits)
    report("qwen2_bf16", logits, {"vs_qwen2_f32_logits": d})
    summary["qwen2_bf16"] = {
        "max_abs_logit": float(logits.abs().max()),
        "logit_std": float(logits.std()),
        "sensitivity": {"vs_qwen2_f32_logits": d},
    }

    tf_other_layout("llama3_tied", summary)
    verify_reload(["llama", "llama3_tied", "qwen2", "qwen3", "qwen2_bf16", summary["_variant"]])

    print("SUMMARY " + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
