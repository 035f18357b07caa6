"""PyTorch's side of `taper bench`: the same model (GPT-2 layout read from a taper TOML config),
trained on random tokens in eager mode with SDPA attention and fused AdamW, at a given thread
count; prints the same figures (tokens/s, forward/backward/optimizer ms, GFLOP/s, MFU against
a GEMM peak measured with torch at the model's matmul shapes, peak RSS).

    ~/.venvs/ref/bin/python scripts/bench_torch.py --config configs/bench/reference.toml --threads 2

`--precision bf16` runs the forward and loss under autocast to bf16 (PyTorch's mixed
precision: matmuls in bf16, f32 master weights and optimizer) and also measures the GEMM peak
with bf16 operands. `--device cuda` runs it all on the first GPU (the device synchronised
before each timer is read; peak memory is the CUDA allocator's), `--compile` under
torch.compile (the first warm-up steps compile).
"""
import argparse
import json
import math
import resource
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, h, hidden, bias, eps):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(c, eps=eps, bias=bias)
        self.q = nn.Linear(c, c, bias=bias)
        self.k = nn.Linear(c, c, bias=bias)
        self.v = nn.Linear(c, c, bias=bias)
        self.o = nn.Linear(c, c, bias=bias)
        self.ln2 = nn.LayerNorm(c, eps=eps, bias=bias)
        self.up = nn.Linear(c, hidden, bias=bias)
        self.down = nn.Linear(hidden, c, bias=bias)

    def forward(self, x):
        b, t, c = x.shape
        hx = self.ln1(x)
        split = lambda y: y.view(b, t, self.h, c // self.h).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(split(self.q(hx)), split(self.k(hx)), split(self.v(hx)), is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        c, bias = m["n_embd"], m.get("bias", True)
        hidden = m.get("intermediate_size", 0) or 4 * c
        self.wte = nn.Embedding(m["vocab_size"], c)
        self.wpe = nn.Embedding(m["block_size"], c)
        eps = m.get("norm_eps", 1e-5)
        self.blocks = nn.ModuleList(Block(c, m["n_head"], hidden, bias, eps) for _ in range(m["n_layer"]))
        self.ln_f = nn.LayerNorm(c, eps=eps, bias=bias)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=m.get("init_std", 0.02))

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head, (B, T, V)


def check_layout(m):
    want = {"pos_emb": "learned", "norm": "layer_norm", "mlp": "gelu", "tie_embeddings": True}
    for k, v in want.items():
        if m.get(k, v) != v:
            raise SystemExit(f"bench_torch.py builds the GPT-2 layout only: model.{k} = {m[k]!r}, expected {v!r}")
    if m.get("n_kv_head", 0) not in (0, m["n_head"]) or m.get("head_dim", 0) not in (0, m["n_embd"] // m["n_head"]):
        raise SystemExit("bench_torch.py: grouped-query attention and a separate head_dim are not built")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def best_of(reps, f, dev):
    f()
    best = math.inf
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        f()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peak(m, rows, dev, dtype=torch.float32):
    c, v = m["n_embd"], m["vocab_size"]
    h = m.get("intermediate_size", 0) or 4 * c
    L = m["n_layer"]
    shapes = [(rows, c, c, 4 * L), (rows, c, h, L), (rows, h, c, L), (rows, c, v, 1)]
    flops = secs = 0.0
    with torch.no_grad():
        for mm, k, n, count in shapes:
            x, w = torch.randn(mm, k, dtype=dtype, device=dev), torch.randn(n, k, dtype=dtype, device=dev)
            dy = torch.randn(mm, n, dtype=dtype, device=dev)
            s = best_of(3, lambda: x @ w.T, dev) + best_of(3, lambda: dy @ w, dev) + best_of(3, lambda: dy.T @ x, dev)
            flops += 3 * 2 * mm * k * n * count
            secs += s * count
    return flops / secs / 1e9


def resident_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


def resident_before_steps():
    """What is resident now, the high-water mark reset to it (Linux: 5 to clear_refs), or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return resident_mb("VmRSS")
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch-size", type=int, default=0, help="instead of the config's train.batch_size")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    cfg = tomllib.load(open(a.config, "rb"))
    m, o = cfg["model"], cfg.get("optim", {})
    check_layout(m)
    torch.manual_seed(cfg.get("seed", 1))
    model = GPT(m).to(dev)
    # taper's default decay groups: matmul weights decay; embeddings, biases and norms do not.
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.get("weight_decay", 0.0)}, {"params": rest, "weight_decay": 0.0}],
        lr=o.get("lr", 1e-3),
        betas=(o.get("beta1", 0.9), o.get("beta2", 0.999)),
        eps=o.get("eps", 1e-8),
        fused=True,
    )
    b, t, v = a.batch_size or cfg["train"]["batch_size"], m["block_size"], m["vocab_size"]
    step_model = torch.compile(model) if a.compile else model
    fwd = bwd = upd = 0.0
    before = resident_before_steps() if a.device == "cpu" else None
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(a.warmup + a.steps):
        x, y = torch.randint(0, v, (b, t), device=dev), torch.randint(0, v, (b * t,), device=dev)
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = F.cross_entropy(step_model(x).view(-1, v), y)
        lv = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync(dev)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        t3 = time.perf_counter()
        assert math.isfinite(lv)
        if i >= a.warmup:
            fwd, bwd, upd = fwd + t1 - t0, bwd + t2 - t1, upd + t3 - t2
    n = max(a.steps, 1)
    step_s = (fwd + bwd + upd) / n
    c, L = m["n_embd"], m["n_layer"]
    hidden = m.get("intermediate_size", 0) or 4 * c
    fpt = 6 * (L * (4 * c * c + 2 * c * hidden) + v * c) + 12 * L * c * t
    tps = b * t / step_s
    peak = gemm_peak(m, b * t, dev)
    low_peak = gemm_peak(m, b * t, dev, torch.bfloat16) if a.precision == "bf16" else peak
    params = sum(p.numel() for p in model.parameters())
    # As taper bench splits it: f32 weights and gradients, AdamW's two moments (allocated by the
    # first step, so inside the peak), and the rest of the steps' resident high-water mark.
    weights_mb = 4 * params / 1e6
    activations_mb = float("nan")
    if before is not None:
        activations_mb = max(resident_mb("VmHWM") - before - 3 * weights_mb, 0.0)
    elif a.device == "cuda":
        # The allocator's peak holds the weights, gradients and moments too.
        activations_mb = max(torch.cuda.max_memory_allocated(dev) / 1e6 - 4 * weights_mb, 0.0)
    r = {
        "implementation": f"pytorch {torch.__version__}" + (" compile" if a.compile else ""),
        "device": a.device,
        "threads": torch.get_num_threads(),
        "params": params,
        "flops_per_token": fpt,
        "tokens_per_step": b * t,
        "steps": a.steps,
        "tokens_per_sec": tps,
        "step_ms": step_s * 1e3,
        "forward_ms": fwd / n * 1e3,
        "backward_ms": bwd / n * 1e3,
        "optimizer_ms": upd / n * 1e3,
        "gflops": fpt * tps / 1e9,
        "gemm_peak_gflops": peak,
        "mfu": fpt * tps / 1e9 / peak,
        "precision": a.precision,
        "precision_gemm_peak_gflops": low_peak,
        "precision_mfu": fpt * tps / 1e9 / low_peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated(dev) / 1e6 if a.device == "cuda" else float("nan"),
        "weights_mb": weights_mb,
        "gradients_mb": weights_mb,
        "optimizer_state_mb": 2 * weights_mb,
        "activations_mb": activations_mb,
    }
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['implementation']} ({r['threads']} threads): {r['params'] / 1e6:.2f}M params, {b * t} tokens/step")
    print(f"tokens/s      {tps:.0f}")
    print(f"ms/step       {r['step_ms']:.1f} (forward {r['forward_ms']:.1f}, backward {r['backward_ms']:.1f}, optimizer {r['optimizer_ms']:.1f})")
    print(f"GFLOP/s       {r['gflops']:.1f} ({fpt / 1e9:.3f} GFLOP/token)")
    print(f"GEMM peak     {peak:.1f} GFLOP/s at the model's matmul shapes")
    print(f"MFU           {100 * r['mfu']:.1f}%")
    if a.precision != "f32":
        print(f"{a.precision:<13} GEMM peak {low_peak:.1f} GFLOP/s, MFU {100 * r['precision_mfu']:.1f}% against it")
    print(f"peak RSS      {r['peak_rss_mb']:.0f} MB")
    print(f"memory        {weights_mb:.0f} MB weights, {weights_mb:.0f} MB gradients, {2 * weights_mb:.0f} MB optimizer state, "
          f"{activations_mb:.0f} MB activations and scratch")


if __name__ == "__main__":
    main()
