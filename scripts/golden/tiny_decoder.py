"""Golden values for taper's decoder, from an independent PyTorch implementation.

For a tiny GPT-2-style and a tiny Llama-style config, builds the model in PyTorch (SDPA
attention, torch's LayerNorm / GELU / SiLU, HF-style rotate-half RoPE) with random weights
under taper's tensor names, runs fixed token ids through it, and writes the weights, inputs,
logits, loss and the gradient of the loss for every parameter to
crates/taper-model/tests/fixtures/tiny_<style>.safetensors (config in the metadata).

    ~/.venvs/ref/bin/python scripts/golden/tiny_decoder.py
"""
import json
import math
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/taper-model/tests/fixtures"

CONFIGS = {
    "gpt2": dict(vocab_size=37, n_layer=2, n_head=4, n_kv_head=0, n_embd=32, intermediate_size=0,
                 block_size=16, pos_emb="learned", rope_theta=10000.0, norm="layer_norm", norm_eps=1e-5,
                 mlp="gelu", bias=True, tie_embeddings=True, dropout=0.0, init_std=0.02),
    "llama": dict(vocab_size=37, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                  block_size=16, pos_emb="rope", rope_theta=500.0, norm="rms_norm", norm_eps=1e-6,
                  mlp="swiglu", bias=False, tie_embeddings=False, dropout=0.0, init_std=0.02),
}


def param_shapes(c):
    C, V = c["n_embd"], c["vocab_size"]
    hd = C // c["n_head"]
    kv = (c["n_kv_head"] or c["n_head"]) * hd
    H = c["intermediate_size"] or 4 * C
    shapes = {"model.embed_tokens.weight": (V, C)}
    if c["pos_emb"] == "learned":
        shapes["model.embed_positions.weight"] = (c["block_size"], C)

    def norm(n):
        shapes[f"{n}.weight"] = (C,)
        if c["bias"] and c["norm"] == "layer_norm":
            shapes[f"{n}.bias"] = (C,)

    def lin(n, o, i):
        shapes[f"{n}.weight"] = (o, i)
        if c["bias"]:
            shapes[f"{n}.bias"] = (o,)

    for l in range(c["n_layer"]):
        p = f"model.layers.{l}"
        norm(f"{p}.input_layernorm")
        lin(f"{p}.self_attn.q_proj", C, C)
        lin(f"{p}.self_attn.k_proj", kv, C)
        lin(f"{p}.self_attn.v_proj", kv, C)
        lin(f"{p}.self_attn.o_proj", C, C)
        norm(f"{p}.post_attention_layernorm")
        if c["mlp"] == "swiglu":
            lin(f"{p}.mlp.gate_proj", H, C)
        lin(f"{p}.mlp.up_proj", H, C)
        lin(f"{p}.mlp.down_proj", C, H)
    norm("model.norm")
    if not c["tie_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def forward(c, w, ids):
    B, T = ids.shape
    C, nh = c["n_embd"], c["n_head"]
    nkv = c["n_kv_head"] or nh
    hd = C // nh

    def norm(x, n):
        if c["norm"] == "layer_norm":
            return F.layer_norm(x, (C,), w[f"{n}.weight"], w.get(f"{n}.bias"), c["norm_eps"])
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["norm_eps"]) * w[f"{n}.weight"]

    def lin(x, n):
        return F.linear(x, w[f"{n}.weight"], w.get(f"{n}.bias"))

    x = w["model.embed_tokens.weight"][ids]
    if c["pos_emb"] == "learned":
        x = x + w["model.embed_positions.weight"][:T]
    if c["pos_emb"] == "rope":
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().float(), emb.sin().float()

        def rope(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin
    for l in range(c["n_layer"]):
        p = f"model.layers.{l}"
        h = norm(x, f"{p}.input_layernorm")
        q = lin(h, f"{p}.self_attn.q_proj").view(B, T, nh, hd).transpose(1, 2)
        k = lin(h, f"{p}.self_attn.k_proj").view(B, T, nkv, hd).transpose(1, 2)
        v = lin(h, f"{p}.self_attn.v_proj").view(B, T, nkv, hd).transpose(1, 2)
        if c["pos_emb"] == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + lin(y.transpose(1, 2).reshape(B, T, C), f"{p}.self_attn.o_proj")
        h = norm(x, f"{p}.post_attention_layernorm")
        if c["mlp"] == "swiglu":
            a = F.silu(lin(h, f"{p}.mlp.gate_proj")) * lin(h, f"{p}.mlp.up_proj")
        else:
            a = F.gelu(lin(h, f"{p}.mlp.up_proj"))
        x = x + lin(a, f"{p}.mlp.down_proj")
    x = norm(x, "model.norm")
    head = w["model.embed_tokens.weight"] if c["tie_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for style, c in CONFIGS.items():
        g = torch.Generator().manual_seed(1234)
        w = {}
        for n, s in param_shapes(c).items():
            if n.endswith("norm.weight") or "layernorm.weight" in n:
                w[n] = (1.0 + 0.1 * torch.randn(s, generator=g)).requires_grad_()
            else:
                w[n] = (0.2 * torch.randn(s, generator=g)).requires_grad_()
        ids = torch.randint(0, c["vocab_size"], (2, 11), generator=g)
        targets = torch.randint(0, c["vocab_size"], (2, 11), generator=g)
        targets[0, 3] = -100  # an ignored position
        logits = forward(c, w, ids)
        loss = F.cross_entropy(logits.reshape(-1, c["vocab_size"]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        out = {f"param.{n}": t.detach().contiguous() for n, t in w.items()}
        out.update({f"grad.{n}": t.grad.contiguous() for n, t in w.items()})
        out["ids"] = ids.to(torch.int64)
        out["targets"] = targets.to(torch.int64)
        out["logits"] = logits.detach().contiguous()
        out["loss"] = loss.detach().reshape(1)
        path = OUT / f"tiny_{style}.safetensors"
        save_file(out, str(path), metadata={"config": json.dumps(c), "torch": torch.__version__})
        print("wrote", path, "loss", loss.item())


if __name__ == "__main__":
    main()
