"""Golden values for taper's optimizers, from PyTorch.

Runs torch.optim.AdamW and torch.optim.SGD (momentum, Nesterov) for a few steps on fixed
parameters and gradients, and Lion as written in the paper's Algorithm 2 (Chen et al. 2023,
"Symbolic Discovery of Optimization Algorithms"; torch has no Lion), and writes the parameter
trajectory to crates/taper-train/tests/fixtures/optim_golden.json.

    python3 -m venv ~/.venvs/ref && ~/.venvs/ref/bin/pip install torch
    ~/.venvs/ref/bin/python scripts/golden/optim.py
"""
import json
import math
import pathlib

import torch

torch.manual_seed(0)
OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/taper-train/tests/fixtures/optim_golden.json"
STEPS = 5
p0 = torch.randn(2, 3)
grads = [torch.randn(2, 3) for _ in range(STEPS)]
# A per-step LR, as a schedule would give.
lrs = [0.01 * (1 + s) / STEPS for s in range(STEPS)]


def run(make_opt):
    p = torch.nn.Parameter(p0.clone())
    opt = make_opt([p])
    traj = []
    for s in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lrs[s]
        p.grad = grads[s].clone()
        opt.step()
        traj.append(p.detach().flatten().tolist())
    return traj


def lion(beta1, beta2, wd):
    p = p0.clone()
    m = torch.zeros_like(p)
    traj = []
    for s in range(STEPS):
        g = grads[s]
        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lrs[s] * wd) - lrs[s] * torch.sign(c)
        m = beta2 * m + (1 - beta2) * g
        traj.append(p.flatten().tolist())
    return traj


cases = {
    "adamw": dict(cfg=dict(name="adamw", beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
                  traj=run(lambda ps: torch.optim.AdamW(ps, lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False))),
    "sgd": dict(cfg=dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.01),
                traj=run(lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9, weight_decay=0.01, foreach=False))),
    "sgd_nesterov": dict(cfg=dict(name="sgd", momentum=0.8, nesterov=True, weight_decay=0.0),
                         traj=run(lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.8, nesterov=True, foreach=False))),
    "lion": dict(cfg=dict(name="lion", beta1=0.9, beta2=0.99, weight_decay=0.1), traj=lion(0.9, 0.99, 0.1)),
}
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps({
    "torch": torch.__version__,
    "shape": [2, 3],
    "p0": p0.flatten().tolist(),
    "grads": [g.flatten().tolist() for g in grads],
    "lrs": lrs,
    "cases": cases,
}, indent=1))
print("wrote", OUT)
