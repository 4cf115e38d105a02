#!/usr/bin/env python3
"""Independent PyTorch reference for DMS (Dynamic Memory Sparsification) training.

What it computes
----------------
For each tiny base model in tests/fixtures/<model>/ this script re-implements
the decoder forward in plain torch (embedding, RMSNorm, rotate-half RoPE with
the model's own cos/sin incl. llama3 scaling, GQA, SwiGLU, q/k/v bias, Qwen3
q_norm/k_norm) and inserts DMS (docs/dms-spec.md, shared/docs/dms-spec.md):

  * decision logits (spec 1.2): adapter variant
        s * dms_proj_alpha(dms_proj_alpha_norm(h_pre)) - o      (h_pre = layer input,
                                                                  before input_layernorm)
    or q-neuron variant  s * q[b, j*G, t, head_dim-1] - o  (after q_norm, before
    RoPE; that channel of query head j*G is zeroed before AND after RoPE);
    granularity "layer" broadcasts KV head 0 (of the noisy z / decisions, as the
    official prepare_attention_input does).
  * Gumbel-sigmoid relaxation (1.3): z=(logit+noise)/tau, p=sigmoid(z),
    alpha_ST = 1[z>0] - p.detach() + p.
  * one-token shift (2.1): z_key[k]=z[k+1], z_key[T-1]=0.
  * training attention (2.2): causal; q-k<=W unchanged; else S+logsigmoid(-z_key[k]);
    per KV head, shared by its query heads; softmax in f32.
  * teacher = same weights, eviction disabled, no q-channel zeroing (= original model).
  * loss (3.1, 3.2): KL(student||teacher) at T=1 over the vocab, averaged over
    tokens with attention_mask==1 and id != eos; frac_closed[b] = mean over layers,
    KV heads and all T positions of alpha_ST; compression = mean_b relu(target-frac),
    target = 1-1/CR; loss = KL + 1.0*compression.
  * hard inference (2.3, 5): d[k]=1[logit[k+1]>0] (last key never evicted); key k
    visible to q iff k<=q and (d[k]==0 or q-k<=W); logits with that mask and the
    retained fraction at the last query (#visible keys / T) per (layer, batch, KV head).
  * gradients of the loss w.r.t. the trainable DMS parameters (adapter weights, or
    q_proj.weight for the q-neuron variant), teacher under no_grad.

Outputs tests/fixtures/dms/<case>/{case.json, inputs.safetensors,
expected.safetensors}; format and semantics choices: tests/fixtures/dms/README.md.

Self-checks (asserted): own forward with eviction disabled == transformers eager
logits; train-mode forward with all-open decisions (noise -1e4) == teacher;
W >= T case: student == teacher and KL ~ 0; finite-difference check (float64)
of gradient entries against autograd.

How to run (from the repo root)
-------------------------------
    /work/venv-ref/bin/python scripts/dms_reference.py

Deterministic (fixed seeds, CPU, float32). Written with python 3.11.7,
torch 2.15.0 (CPU), transformers 5.24.0, safetensors 0.8.0, numpy 2.4.6.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "dms")
T = 24
B = 2

# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------
CASES = [
    dict(name="llama_adapter_head", model="llama", variant="adapter", granularity="head",
         window=4, tau=0.1, alpha_scale=10.0, offset=0.5, target_cr=2.0,
         adapter_std=0.02, seed=101, pad_row1=5, eos_row0_pos=10),
    dict(name="qwen3_qneuron_head", model="qwen3", variant="q_neuron", granularity="head",
         window=3, tau=0.5, alpha_scale=2.0, offset=0.5, target_cr=3.0,
         seed=202, pad_row1=0, eos_row0_pos=None),
    dict(name="llama3_tied_adapter_layer", model="llama3_tied", variant="adapter",
         granularity="layer", window=6, tau=1.0, alpha_scale=10.0, offset=0.5,
         target_cr=4.0, adapter_std=0.05, seed=303, pad_row1=0, eos_row0_pos=None),
    dict(name="qwen2_adapter_head_w0", model="qwen2", variant="adapter", granularity="head",
         window=0, tau=0.3, alpha_scale=10.0, offset=0.5, target_cr=2.0,
         adapter_std=0.05, seed=404, pad_row1=0, eos_row0_pos=None),
    dict(name="llama_adapter_head_wbig", model="llama", variant="adapter", granularity="head",
         window=30, tau=0.1, alpha_scale=10.0, offset=0.5, target_cr=2.0,
         adapter_std=0.02, seed=505, pad_row1=0, eos_row0_pos=None),
]


# --------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------
def load_model(name):
    path = os.path.join(FIX, name)
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                             dtype=torch.float32)
    m.eval()
    cfg = m.config
    P = {k: v.detach().clone() for k, v in m.named_parameters()}
    P["lm_head.weight"] = m.get_output_embeddings().weight.detach().clone()
    pos = torch.arange(T).unsqueeze(0)
    with torch.no_grad():
        cos, sin = m.model.rotary_emb(torch.zeros(1, T, cfg.hidden_size), pos)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = dict(L=cfg.num_hidden_layers, H=cfg.num_attention_heads,
                Hkv=cfg.num_key_value_heads, d=head_dim, eps=cfg.rms_norm_eps,
                V=cfg.vocab_size, eos=cfg.eos_token_id, hidden=cfg.hidden_size)
    return m, P, cos[0].clone(), sin[0].clone(), dims


# --------------------------------------------------------------------------
# plain-torch decoder with DMS hooks
# --------------------------------------------------------------------------
def rms_norm(x, w, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def linear(P, name, x):
    y = x @ P[name + ".weight"].T
    if name + ".bias" in P:
        y = y + P[name + ".bias"]
    return y


def forward(P, D, cos, sin, ids, mode, dms=None, noise=None):
    """mode: 'teacher' (plain causal, no zeroing), 'teacher_zeroed' (plain causal,
    q-neuron channel zeroed), 'train' (soft DMS mask, noise), 'infer' (hard mask)."""
    L, H, Hkv, d, eps = D["L"], D["H"], D["Hkv"], D["d"], D["eps"]
    G = H // Hkv
    Bn, Tn = ids.shape
    dt = P["model.embed_tokens.weight"].dtype
    cos = cos.to(dt)[None, None]
    sin = sin.to(dt)[None, None]
    x = P["model.embed_tokens.weight"][ids]
    qi = torch.arange(Tn)[:, None]
    ki = torch.arange(Tn)[None, :]
    causal = ki <= qi  # [Tq, Tk]
    aux = dict(dlogits=[], z=[], p=[], alpha=[], dhard=[])
    zero_channel = dms is not None and dms["variant"] == "q_neuron" and mode != "teacher"
    chmask = torch.ones(1, H, 1, d, dtype=dt)
    chmask[0, ::G, 0, d - 1] = 0.0
    for l in range(L):
        pre = f"model.layers.{l}."
        h_pre = x
        hn = rms_norm(x, P[pre + "input_layernorm.weight"], eps)
        q = linear(P, pre + "self_attn.q_proj", hn).view(Bn, Tn, H, d).transpose(1, 2)
        k = linear(P, pre + "self_attn.k_proj", hn).view(Bn, Tn, Hkv, d).transpose(1, 2)
        v = linear(P, pre + "self_attn.v_proj", hn).view(Bn, Tn, Hkv, d).transpose(1, 2)
        if pre + "self_attn.q_norm.weight" in P:
            q = rms_norm(q, P[pre + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, P[pre + "self_attn.k_norm.weight"], eps)
        # ---- DMS decision logits [B, Hkv, T] (noise-free, unshifted)
        dl = None
        if dms is not None:
            s, o = dms["alpha_scale"], dms["offset"]
            if dms["variant"] == "adapter":
                a = rms_norm(h_pre, P[pre + "self_attn.dms_proj_alpha_norm.weight"], eps)
                dl = (s * linear(P, pre + "self_attn.dms_proj_alpha", a) - o).transpose(1, 2)
            else:
                dl = s * q[:, ::G, :, d - 1] - o
        if zero_channel:
            q = q * chmask
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if zero_channel:
            q = q * chmask
        # ---- attention bias per KV head [B, Hkv, Tq, Tk]
        bias = torch.zeros(Bn, Hkv, Tn, Tn, dtype=dt)
        if mode == "train":
            z = (dl + noise[l].to(dt)) / dms["tau"]
            p = torch.sigmoid(z)
            hard = (z > 0).to(dt)
            alpha = hard - p.detach() + p
            if dms["granularity"] == "layer":
                z, p, alpha = (t[:, :1].expand(Bn, Hkv, Tn) for t in (z, p, alpha))
                dl = dl[:, :1].expand(Bn, Hkv, Tn)
            z_key = torch.cat([z[..., 1:], torch.zeros_like(z[..., :1])], dim=-1)
            out_win = (qi - ki) > dms["window"]  # [Tq, Tk]
            pen = F.logsigmoid(-z_key)[:, :, None, :]  # [B,Hkv,1,Tk]
            bias = torch.where(out_win, pen, bias)
            aux["z"].append(z); aux["p"].append(p); aux["alpha"].append(alpha)
        elif mode == "infer":
            if dms["granularity"] == "layer":
                dl = dl[:, :1].expand(Bn, Hkv, Tn)
            dh = dl > 0
            d_key = torch.cat([dh[..., 1:], torch.zeros_like(dh[..., :1])], dim=-1)
            visible = causal & (~d_key[:, :, None, :] | ((qi - ki) <= dms["window"]))
            bias = torch.where(visible, bias, torch.full_like(bias, -math.inf))
            aux["dhard"].append(visible)
        elif dl is not None and dms["granularity"] == "layer":
            dl = dl[:, :1].expand(Bn, Hkv, Tn)
        if dl is not None:
            aux["dlogits"].append(dl)
        bias = torch.where(causal, bias, torch.full_like(bias, -math.inf))
        kk = k.repeat_interleave(G, dim=1)
        vv = v.repeat_interleave(G, dim=1)
        S = (q @ kk.transpose(-1, -2)) * (d ** -0.5) + bias.repeat_interleave(G, dim=1)
        A = torch.softmax(S if dt == torch.float64 else S.float(), dim=-1).to(dt)
        att = (A @ vv).transpose(1, 2).reshape(Bn, Tn, H * d)
        x = x + linear(P, pre + "self_attn.o_proj", att)
        hn = rms_norm(x, P[pre + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(linear(P, pre + "mlp.gate_proj", hn)) * linear(P, pre + "mlp.up_proj", hn)
        x = x + linear(P, pre + "mlp.down_proj", mlp)
    x = rms_norm(x, P["model.norm.weight"], eps)
    logits = x @ P["lm_head.weight"].T
    return logits, aux


def kl_loss(s_logits, t_logits, mask):
    ls = F.log_softmax(s_logits.float() if s_logits.dtype != torch.float64 else s_logits, -1)
    lt = F.log_softmax(t_logits.float() if t_logits.dtype != torch.float64 else t_logits, -1)
    kl_tok = (ls.exp() * (ls - lt)).sum(-1)
    m = mask.to(kl_tok.dtype)
    return (kl_tok * m).sum() / m.sum()


def dms_loss(P, D, cos, sin, ids, am, dms, noise, t_logits, active=None):
    """Returns loss, pieces. If `active` (per-row hinge activity) is given, the
    compression term is replaced by the smooth surrogate sum_b active_b*(target-mean p_b)/B
    (same autograd gradient as the ST loss; used for finite differences)."""
    s_logits, aux = forward(P, D, cos, sin, ids, "train", dms, noise)
    mask = (am == 1) & (ids != D["eos"])
    kl = kl_loss(s_logits, t_logits, mask)
    alpha = torch.stack(aux["alpha"])  # [L,B,Hkv,T]
    frac = alpha.mean(dim=(0, 2, 3))
    target = 1.0 - 1.0 / dms["target_cr"]
    if active is None:
        comp = torch.clamp(target - frac, min=0).mean()
    else:
        pf = torch.stack(aux["p"]).mean(dim=(0, 2, 3))
        comp = (active.to(pf.dtype) * (target - pf)).mean()
    return kl + dms["compression_weight"] * comp, dict(
        kl=kl, comp=comp, frac=frac, s_logits=s_logits, aux=aux)


# --------------------------------------------------------------------------
def make_inputs(c, D):
    g = torch.Generator().manual_seed(c["seed"])
    ids = torch.randint(3, D["V"], (B, T), generator=g, dtype=torch.int64)
    am = torch.ones(B, T, dtype=torch.int64)
    if c["pad_row1"]:
        ids[1, T - c["pad_row1"]:] = 0
        am[1, T - c["pad_row1"]:] = 0
    if c["eos_row0_pos"] is not None:
        ids[0, c["eos_row0_pos"]] = D["eos"]
    u = torch.rand(D["L"], B, D["Hkv"], T, generator=g, dtype=torch.float64)
    u = u.clamp(1e-7, 1 - 1e-7)
    noise = (torch.log(u) - torch.log1p(-u)).to(torch.float32)
    adapters = {}
    if c["variant"] == "adapter":
        for l in range(D["L"]):
            pre = f"model.layers.{l}.self_attn."
            adapters[pre + "dms_proj_alpha.weight"] = (
                torch.randn(D["Hkv"], D["hidden"], generator=g) * c["adapter_std"])
            adapters[pre + "dms_proj_alpha_norm.weight"] = (
                0.5 + torch.rand(D["hidden"], generator=g))
    return ids, am, noise, adapters


def trainable_names(c, D):
    names = []
    for l in range(D["L"]):
        pre = f"model.layers.{l}.self_attn."
        if c["variant"] == "adapter":
            names += [pre + "dms_proj_alpha.weight", pre + "dms_proj_alpha_norm.weight"]
        else:
            names += [pre + "q_proj.weight"]
    return names


def fd_check(c, P, D, cos, sin, ids, am, noise, entries, eps=1e-6):
    """float64 finite differences of the smooth surrogate vs float64 autograd of the ST loss."""
    dms = dict(c, compression_weight=1.0)
    P64 = {k: v.double() for k, v in P.items()}
    names = trainable_names(c, D)
    with torch.no_grad():
        t_logits, _ = forward(P64, D, cos.double(), sin.double(), ids, "teacher", dms)
    for n in names:
        P64[n].requires_grad_(True)
    loss, pc = dms_loss(P64, D, cos.double(), sin.double(), ids, am, dms, noise.double(), t_logits)
    grads = torch.autograd.grad(loss, [P64[n] for n in names])
    g64 = dict(zip(names, grads))
    target = 1.0 - 1.0 / c["target_cr"]
    active = (target - pc["frac"].detach()) > 0
    res = []
    for name, idx in entries:
        def f(delta):
            Q = dict(P64)
            w = P64[name].detach().clone()
            w[idx] += delta
            Q[name] = w
            with torch.no_grad():
                val, _ = dms_loss(Q, D, cos.double(), sin.double(), ids, am, dms,
                                  noise.double(), t_logits, active=active)
            return val.item()
        fd = (f(eps) - f(-eps)) / (2 * eps)
        ag = g64[name][idx].item()
        res.append(dict(param=name, index=list(idx), fd=fd, autograd_f64=ag,
                        rel_err=abs(fd - ag) / max(abs(ag), 1e-12)))
    return res, g64


def run_case(c):
    m, P, cos, sin, D = load_model(c["model"])
    ids, am, noise, adapters = make_inputs(c, D)
    P.update({k: v.clone() for k, v in adapters.items()})
    dms = dict(c, compression_weight=1.0)

    # ---- self-check 1: own forward (eviction disabled) == transformers
    with torch.no_grad():
        hf = m(input_ids=ids, attention_mask=torch.ones_like(am)).logits
        own, _ = forward(P, D, cos, sin, ids, "teacher", dms)
    diff_hf = (hf - own).abs().max().item()
    assert diff_hf < 5e-5, diff_hf

    # ---- teacher
    with torch.no_grad():
        t_logits, t_aux = forward(P, D, cos, sin, ids, "teacher", dms)
    # ---- self-check 2: train mode with everything open (noise -1e4) == teacher
    #      (adapter only: the q-neuron student also zeroes the channel)
    if c["variant"] == "adapter":
        with torch.no_grad():
            open_logits, _ = forward(P, D, cos, sin, ids, "train", dms,
                                     torch.full_like(noise, -1e4))
        d_open = (open_logits - t_logits).abs().max().item()
        assert d_open < 1e-5, d_open
    else:
        with torch.no_grad():
            tz, _ = forward(P, D, cos, sin, ids, "teacher_zeroed", dms)
            open_logits, _ = forward(P, D, cos, sin, ids, "train", dms,
                                     torch.full_like(noise, -1e4))
        d_open = (open_logits - tz).abs().max().item()
        assert d_open < 1e-5, d_open

    # ---- student (train) + grads
    names = trainable_names(c, D)
    for n in names:
        P[n].requires_grad_(True)
    loss, pc = dms_loss(P, D, cos, sin, ids, am, dms, noise, t_logits)
    grads = torch.autograd.grad(loss, [P[n] for n in names])
    for n in names:
        P[n].requires_grad_(False)
    aux = pc["aux"]
    z = torch.stack(aux["z"]).detach()
    probs = torch.stack(aux["p"]).detach()
    alpha = torch.stack(aux["alpha"]).detach()
    dlog = torch.stack(aux["dlogits"]).detach()

    # ---- inference (hard, no noise)
    with torch.no_grad():
        i_logits, i_aux = forward(P, D, cos, sin, ids, "infer", dms)
    vis = torch.stack(i_aux["dhard"])  # [L,B,Hkv,Tq,Tk]
    retained = vis[:, :, :, T - 1, :].sum(-1).float() / T

    if c["window"] >= T - 1:
        dkl = (pc["s_logits"] - t_logits).abs().max().item()
        di = (i_logits - t_logits).abs().max().item()
        assert dkl < 1e-5 and pc["kl"].item() < 1e-9 and di < 1e-5, (dkl, pc["kl"].item(), di)

    hard = (z > 0).float()
    soft = ((probs > 0.01) & (probs < 0.99)).float()
    stats = {
        "frac_hard_closed": round(hard.mean().item(), 6),
        "frac_soft_p_in_0.01_0.99": round(soft.mean().item(), 6),
        "frac_closed_per_row": [round(v, 6) for v in pc["frac"].tolist()],
        "inference_frac_positive_logits": round((torch.stack(i_aux["dlogits"]) > 0).float().mean().item(), 6),
        "inference_retained_mean": round(retained.mean().item(), 6),
        "kl": pc["kl"].item(),
        "compression_loss": pc["comp"].item(),
        "loss": loss.item(),
        "grad_norms": {n: g.norm().item() for n, g in zip(names, grads)},
        "max_abs_diff_own_vs_transformers": diff_hf,
        "max_abs_diff_all_open_vs_teacher": d_open,
        "max_abs_diff_student_vs_teacher_logits": (pc["s_logits"] - t_logits).abs().max().item(),
        "max_abs_diff_inference_vs_teacher_logits": (i_logits - t_logits).abs().max().item(),
    }

    expected = {
        "decision_logits": dlog,
        "probs": probs,
        "decisions": alpha,
        "student_logits": pc["s_logits"].detach(),
        "teacher_logits": t_logits,
        "frac_closed": pc["frac"].detach(),
        "kl": pc["kl"].detach().reshape(1),
        "compression_loss": pc["comp"].detach().reshape(1),
        "loss": loss.detach().reshape(1),
        "inference_logits": i_logits,
        "inference_retained": retained,
        "inference_decision_logits": torch.stack(i_aux["dlogits"]),
    }
    for n, g in zip(names, grads):
        expected["grad." + n] = g
    if c["variant"] == "q_neuron":
        with torch.no_grad():
            tz, _ = forward(P, D, cos, sin, ids, "teacher_zeroed", dms)
        expected["teacher_logits_zeroed"] = tz
        s_logits = pc["s_logits"].detach()
        mask = (am == 1) & (ids != D["eos"])
        stats["kl_vs_teacher_zeroed"] = kl_loss(s_logits, tz, mask).item()
        stats["max_abs_diff_teacher_zeroed_vs_teacher"] = (tz - t_logits).abs().max().item()
    expected = {k: v.contiguous().to(torch.float32) for k, v in expected.items()}

    # ---- finite differences (float64)
    fd = None
    if c["name"] in ("llama_adapter_head", "qwen3_qneuron_head"):
        if c["variant"] == "adapter":
            g0 = dict(zip(names, grads))
            n0 = "model.layers.0.self_attn.dms_proj_alpha.weight"
            n1 = "model.layers.1.self_attn.dms_proj_alpha_norm.weight"
            entries = [(n0, tuple(int(i) for i in torch.nonzero(g0[n0].abs() == g0[n0].abs().max())[0])),
                       (n1, (int(g0[n1].abs().argmax()),))]
        else:
            g0 = dict(zip(names, grads))
            n0 = "model.layers.0.self_attn.q_proj.weight"
            row = D["d"] - 1  # decision neuron row of head 0
            entries = [(n0, (row, int(g0[n0][row].abs().argmax()))),
                       (n0, (5, 7))]
        fd, g64 = fd_check(c, {k: v.detach() for k, v in P.items()}, D, cos, sin, ids, am,
                           noise, entries)
        rel32 = max(((g64[n].float() - g).norm() / g64[n].norm()).item()
                    for n, g in zip(names, grads))
        stats["fd_check"] = fd
        stats["grad_f32_vs_f64_max_rel_norm_err"] = rel32
        for e in fd:
            assert e["rel_err"] < 1e-4, e

    inputs = {"input_ids": ids, "attention_mask": am, "noise": noise}
    inputs.update({k: v.contiguous().float() for k, v in adapters.items()})

    case_json = {
        "model": c["model"],
        "variant": c["variant"],
        "granularity": c["granularity"],
        "window": c["window"],
        "tau": c["tau"],
        "alpha_scale": c["alpha_scale"],
        "offset": c["offset"],
        "target_cr": c["target_cr"],
        "compression_weight": 1.0,
        "eos_token_id": D["eos"],
        "seq_len": T,
        "batch": B,
        "notes": NOTES_COMMON + CASE_NOTES.get(c["name"], []),
        "stats": stats,
    }
    d = os.path.join(OUT, c["name"])
    os.makedirs(d, exist_ok=True)
    save_file(inputs, os.path.join(d, "inputs.safetensors"))
    save_file(expected, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(case_json, f, indent=2)
        f.write("\n")
    return stats


NOTES_COMMON = [
    "Spec: shared/docs/dms-spec.md sections 1.2, 1.3, 2.1-2.3, 3.1-3.2, 5.",
    "decision_logits = s*raw - o, noise-free, unshifted (index t = produced at token t, "
    "decides about key t-1), after granularity broadcast. probs = sigmoid((logit+noise)/tau); "
    "decisions = alpha_ST = 1[z>0] - p.detach() + p (value == hard 0/1).",
    "Training mask: key k uses z_key[k] = z[k+1] (k<T-1), z_key[T-1]=0; q<k masked (-inf; the "
    "official -50000 gives identical f32 softmax); q-k<=W unchanged; else + logsigmoid(-z_key[k]).",
    "attention_mask is NOT applied inside attention (spec 2.2 has no padding term; rows are "
    "right-padded so valid queries never see pad keys anyway). It only masks the KL. Logits at "
    "pad positions are therefore plain causal(+DMS) outputs of the pad tokens.",
    "frac_closed follows spec 3.2 literally: mean of alpha_ST over layers, KV heads and ALL T "
    "positions incl. right padding (the official modeling code trims a batch-wide scalar "
    "right_padding_size; the spec omits that).",
    "Inference: d[k] = 1[logit[k+1] > 0] (noise-free), d[T-1]=0; key k visible to query q iff "
    "k<=q and (d[k]==0 or q-k<=W). inference_retained[l,b,j] = #keys visible to query T-1 / T "
    "(window counted as retained; no padding mask, so pad keys count for a padded row).",
    "Layers >= 1 see different hidden states in the train (noisy soft mask) and inference (hard "
    "mask) forwards, so inference decisions come from inference_decision_logits (extra tensor, "
    "noise-free logits of the inference forward), not from decision_logits (train forward); "
    "layer 0 is identical in both.",
    "Teacher = same weights, eviction disabled (plain causal attention) and no q-channel "
    "zeroing, i.e. exactly the original model (spec 3.1 'frozen original model').",
    "KL(student||teacher) at temperature 1 over the full vocab, log_softmax in f32, averaged over "
    "tokens with attention_mask==1 and input_id != eos_token_id.",
    "Gradients: of loss = KL + 1.0*compression w.r.t. the trainable DMS params only; teacher "
    "computed under no_grad. The ST estimator passes d alpha/d theta = d p/d theta; the KL "
    "depends on theta only through the soft mask logsigmoid(-z_key).",
    "Noise: logistic, log(u) - log1p(-u), u ~ U(0,1) float64 (clamped to [1e-7, 1-1e-7]) from "
    "torch.Generator(seed), cast to f32; shape [L,B,Hkv,T]; indexed like the unshifted logits.",
]
CASE_NOTES = {
    "llama_adapter_head": [
        "alpha_scale 10 / offset 0.5 (not the spec's 100/5) and random adapter weights "
        "(dms_proj_alpha ~ N(0,0.02), norm ~ U[0.5,1.5]) so that decisions are mixed: with tau 0.1 "
        "p is soft only where |logit+noise| < 0.46, so at most ~23% of p can be soft.",
        "Row 1 right-padded: last 5 positions id 0 (pad) with attention_mask 0; row 0 has "
        "eos_token_id at position 10 (excluded from KL only).",
    ],
    "qwen3_qneuron_head": [
        "q-neuron: logit = s*q[b, j*G, t, head_dim-1] - o read after q_norm, before RoPE; "
        "channel head_dim-1 of query heads j*G (0 and 2 here) zeroed before and after RoPE in "
        "student train/inference modes.",
        "alpha_scale 2.0 / offset 0.5 instead of 100/5: the random q_norm'd neuron is O(1), so "
        "s=100,o=5 gives |logit| ~ 100: 52.6% closed but only 2.6% of p in (0.01,0.99) "
        "(near-hard decisions, uninformative gradients).",
        "Teacher mode reading: spec 1.3 says teacher mode sets decisions=0 and logits=-1000 "
        "(full attention) but says nothing about the channel; spec 1.2(a) describes the zeroing "
        "unconditionally, and the official prepare_attention_input indeed zeroes it also in "
        "teacher mode. Spec 3.1 however defines the teacher as the frozen ORIGINAL model, and "
        "the q-neuron variant trains q_proj, so a student-as-teacher would drift. Chosen: "
        "teacher_logits = original model WITHOUT zeroing (this is what kl/loss/grads use). "
        "teacher_logits_zeroed (extra tensor) = eviction disabled WITH zeroing (official "
        "dms_teacher_mode behaviour), for reference; see stats.kl_vs_teacher_zeroed.",
        "Gradient w.r.t. the whole q_proj.weight of each layer (decision row via the logits, "
        "all rows via the attention/KL).",
    ],
    "llama3_tied_adapter_layer": [
        "Adapter dms_proj_alpha ~ N(0,0.05), norm ~ U[0.5,1.5]; s 10, o 0.5.",
        "Granularity 'layer' with a single KV head is numerically identical to 'head' (nothing "
        "to broadcast); it only checks the code path. Broadcast happens on z/p/alpha of KV head "
        "0 (official: noise added per head, then head 0 broadcast).",
        "Tied embeddings: lm_head = embed_tokens. llama3 RoPE scaling via the model's rotary_emb.",
    ],
    "qwen2_adapter_head_w0": [
        "Adapter dms_proj_alpha ~ N(0,0.05), norm ~ U[0.5,1.5]; s 10, o 0.5.",
        "W=0: an evicted key is visible only to its own query (q-k<=0).",
        "q/k/v bias; adapter Linear without bias (brief), although the official code uses "
        "bias=config.attention_bias.",
    ],
    "llama_adapter_head_wbig": [
        "Same adapter recipe as llama_adapter_head (N(0,0.02), s 10, o 0.5), other seed.",
        "W=30 >= T: no key is ever outside the window, so student == teacher == inference "
        "logits and KL == 0 (asserted); grads come from the compression term only.",
    ],
}


def crosscheck(name):
    """Re-read a written case and re-derive the cheap quantities with plain loops."""
    from safetensors.torch import load_file
    d = os.path.join(OUT, name)
    c = json.load(open(os.path.join(d, "case.json")))
    I = load_file(os.path.join(d, "inputs.safetensors"))
    E = load_file(os.path.join(d, "expected.safetensors"))
    dl, noise = E["decision_logits"], I["noise"]
    L_, B_, H_, T_ = dl.shape
    if c["granularity"] == "layer":
        noise = noise[:, :, :1].expand_as(noise)
    z = (dl + noise) / c["tau"]
    assert torch.allclose(E["probs"], torch.sigmoid(z), atol=1e-6)
    assert torch.equal(E["decisions"], (z > 0).float())
    assert torch.equal(E["decision_logits"][0], E["inference_decision_logits"][0])
    fc = E["decisions"].mean(dim=(0, 2, 3))
    assert torch.allclose(fc, E["frac_closed"])
    comp = (1 - 1 / c["target_cr"] - fc).clamp(min=0).mean()
    assert abs(comp - E["compression_loss"][0]) < 1e-6
    idl = E["inference_decision_logits"]
    for l in range(L_):
        for b in range(B_):
            for j in range(H_):
                n = 0
                for k in range(T_):
                    dk = bool(idl[l, b, j, k + 1] > 0) if k < T_ - 1 else False
                    if not dk or (T_ - 1) - k <= c["window"]:
                        n += 1
                assert abs(n / T_ - E["inference_retained"][l, b, j].item()) < 1e-7
    ids, am = I["input_ids"], I["attention_mask"]
    ls = torch.log_softmax(E["student_logits"], -1)
    lt = torch.log_softmax(E["teacher_logits"], -1)
    m = (am == 1) & (ids != c["eos_token_id"])
    kl = (ls.exp() * (ls - lt)).sum(-1)[m].mean()
    assert abs(kl - E["kl"][0]) < 1e-5
    assert abs(E["loss"][0] - E["kl"][0] - E["compression_loss"][0]) < 1e-6


def main():
    torch.set_grad_enabled(True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    only = set(sys.argv[1:])
    for c in CASES:
        if only and c["name"] not in only:
            continue
        st = run_case(c)
        crosscheck(c["name"])
        print(f"== {c['name']}")
        for k, v in st.items():
            print(f"   {k}: {v}")
        d = os.path.join(OUT, c["name"])
        for f in sorted(os.listdir(d)):
            print(f"   {f}: {os.path.getsize(os.path.join(d, f))} bytes")


if __name__ == "__main__":
    main()
