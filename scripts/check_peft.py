"""Checks taper's LoRA adapters with PEFT.

For a taper LoRA checkpoint (or the run dir holding it):
  1. `taper export ADAPTER --format hf --out OUT/adapter` writes the PEFT adapter dir;
  2. `taper export BASE --format hf --out OUT/base` writes its base (BASE read from the
     adapter's `base_model_name_or_path`, relative to the directory the run was started in);
  3. `PeftModel.from_pretrained(AutoModelForCausalLM(OUT/base), OUT/adapter)` must give the
     per-token log-probs that `taper score --model ADAPTER` gives (max relative difference
     below --tol), and differ from the base model's (the adapters do something);
  4. `taper export ADAPTER --merge-lora` must hold the tensors of PEFT's `merge_and_unload()`.
Exit status 0 when all hold.

    ~/.venvs/ref/bin/pip install torch transformers peft
    cargo build --release -p taper-cli
    ~/.venvs/ref/bin/python scripts/check_peft.py --adapter runs/sft-words-lora --out /tmp/peft-check
"""
import argparse
import json
import pathlib
import subprocess
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TEXTS = [
    "<|im_start|>user\nReverse the word: lantern<|im_end|>\n<|im_start|>assistant\nnretnal<|im_end|>\n",
    "<|im_start|>user\nUppercase the word: meadow<|im_end|>\n<|im_start|>assistant\nMEADOW<|im_end|>\n",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
]


def logprobs(model, tokens):
    x = torch.tensor([tokens])
    with torch.no_grad():
        lp = F.log_softmax(model(x).logits[0].double(), -1)
    return lp[:-1].gather(1, x[0, 1:, None])[:, 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True, help="a taper LoRA checkpoint or run dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--taper", default="target/release/taper")
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run([a.taper, *args], check=True, capture_output=True, text=True)

    print(run("export", a.adapter, "--format", "hf", "--out", str(out / "adapter")).stdout.strip())
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = cfg["base_model_name_or_path"]
    print(run("export", base, "--format", "hf", "--out", str(out / "base")).stdout.strip())
    print(run("export", a.adapter, "--format", "hf", "--merge-lora", "--out", str(out / "merged")).stdout.strip())

    (out / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run("score", "--model", a.adapter, "--input", str(out / "in.jsonl"), "--out", str(out / "scores.jsonl"))
    rows = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]

    base_model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    base_lps = [logprobs(base_model, r["tokens"]) for r in rows]
    model = PeftModel.from_pretrained(base_model, out / "adapter").eval()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(f"PEFT loaded r={cfg['r']} alpha={cfg['lora_alpha']} on {cfg['target_modules']}: {n_lora} adapter parameters")
    ok = True
    worst, moved = 0.0, 0.0
    for r, b in zip(rows, base_lps):
        theirs = logprobs(model, r["tokens"])
        ours = torch.tensor(r["logprobs"], dtype=torch.float64)
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
        moved = max(moved, (theirs - b).abs().max().item())
    print(f"per-token log-probs, taper vs PEFT: max relative difference {worst:.2e} (tol {a.tol:g})")
    print(f"largest log-prob change the adapters make over the base: {moved:.3f}")
    ok &= worst < a.tol and moved > 1e-3

    merged = model.merge_and_unload().state_dict()
    ours = load_file(str(out / "merged" / "model.safetensors"))
    diff = max((merged[k].float() - v.float()).abs().max().item() for k, v in ours.items())
    tied = json.loads((out / "base" / "config.json").read_text()).get("tie_word_embeddings", False)
    missing = sorted(set(merged) - set(ours) - ({"lm_head.weight"} if tied else set()))
    print(f"--merge-lora vs PEFT merge_and_unload: {len(ours)} tensors, max abs difference {diff:.2e}, missing {missing}")
    ok &= diff < 1e-5 and not missing
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
