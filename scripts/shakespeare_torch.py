"""The shakespeare-char run in plain PyTorch: the reference that taper's wall time is compared with.

Same model (GPT-2 layout: learned positions, LayerNorm without bias, exact GELU, tied
embeddings, no dropout), data split (tinyshakespeare as characters, the first 90% for training),
AdamW (decay on matrices only, as taper's defaults), warmup + cosine schedule, clipping and
evaluation cadence (the same fixed validation batches every `eval_every` steps and at the end) as
configs/shakespeare-char.toml, read from that file. Eager PyTorch on `--threads` threads, f32.
Prints one JSON line: wall time (data preparation included, as taper's), final val loss.

    python scripts/shakespeare_torch.py --config configs/shakespeare-char.toml --threads 2
"""

import argparse
import json
import math
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c, bias=False)
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.ln_2 = nn.LayerNorm(c, bias=False)
        self.c_fc = nn.Linear(c, 4 * c, bias=False)
        self.mlp_proj = nn.Linear(4 * c, c, bias=False)
        self.n_head = n_head

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block_size, n_layer, n_head, c):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(block_size, c)
        self.h = nn.ModuleList(Block(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # (B, T, V), tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def lr_at(it, s, lr, max_steps):
    """taper's schedule: warmup lr * (it + 1) / w, then cosine to min_lr at max_steps."""
    w = s.get("warmup_steps", 0)
    if it < w:
        return lr * (it + 1) / w
    p = min((it - w) / max(max_steps - w, 1), 1.0)
    return s["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - s["min_lr"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shakespeare-char.toml")
    ap.add_argument("--data", default="data/tinyshakespeare.txt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as taper's --set")
    args = ap.parse_args()
    try:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"error: {args.config}: {e}")
    for kv in args.set:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --set {kv}: expected KEY=VALUE, e.g. train.max_steps=300")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"error: --set {kv}: the value is not TOML ({e})")
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node.setdefault(k, {})
        node[last] = parsed
    m, tr, op, sc = cfg["model"], cfg["train"], cfg["optim"], cfg["schedule"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.get("seed", 1337))
    start = time.perf_counter()

    try:
        text = open(args.data, encoding="utf-8").read()
    except OSError as e:
        raise SystemExit(f"error: {args.data}: {e}")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n_val = round(len(data) * cfg["data"].get("val_fraction", 0.1))
    train, val = data[: len(data) - n_val], data[len(data) - n_val :]
    t, b = m["block_size"], tr["batch_size"]

    def windows(split, gen):
        ix = torch.randint(len(split) - t, (b,), generator=gen)
        return torch.stack([split[i : i + t] for i in ix]), torch.stack([split[i + 1 : i + 1 + t] for i in ix])

    val_gen = torch.Generator().manual_seed(0)
    val_batches = [windows(val, val_gen) for _ in range(tr["eval_batches"])]
    model = GPT(len(chars), t, m["n_layer"], m["n_head"], m["n_embd"])
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": op["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=op["lr"], betas=(op["beta1"], op["beta2"]), eps=op.get("eps", 1e-8),
    )

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss = sum(model(x, y).item() for x, y in val_batches) / len(val_batches)
        model.train()
        return loss

    gen = torch.Generator().manual_seed(cfg.get("seed", 1337))
    max_steps, val_loss = tr["max_steps"], None
    for it in range(max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, sc, op["lr"], max_steps)
        x, y = windows(train, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        step = it + 1
        if step % tr["eval_every"] == 0 or step == max_steps:
            val_loss = evaluate()
            print(f"step {step}: loss {loss.item():.4f} val loss {val_loss:.4f}", flush=True)
    wall = time.perf_counter() - start
    print(json.dumps({"impl": "pytorch", "wall_s": round(wall, 2), "val_loss": round(val_loss, 4),
                      "torch": torch.__version__, "threads": args.threads}))


if __name__ == "__main__":
    main()
