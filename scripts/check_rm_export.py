"""Checks a taper reward model exported to Hugging Face.

Exports RM (a `taper rm` run or checkpoint) with `taper export --format hf`, loads it with
AutoModelForSequenceClassification, and compares its one logit per text with the `reward` that
`taper score` gives the same text: the max relative difference must be below --tol.

    ~/.venvs/ref/bin/pip install torch transformers
    ~/.venvs/ref/bin/python scripts/check_rm_export.py --rm runs/rm-words --out /tmp/rm-hf
"""
import argparse
import json
import pathlib
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification

TEXTS = [
    "<|im_start|>user\nreverse: lantern<|im_end|>\n<|im_start|>assistant\nnretnal<|im_end|>\n",
    "<|im_start|>user\nreverse: lantern<|im_end|>\n<|im_start|>assistant\nnrtenal<|im_end|>\n",
    "<|im_start|>user\nupper: meadow<|im_end|>\n<|im_start|>assistant\nMEADOW<|im_end|>\n",
    "<|im_start|>user\nupper: meadow<|im_end|>\n<|im_start|>assistant\nMEADOOW<|im_end|>\n",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rm", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--taper", default="target/release/taper")
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run([a.taper, *args], check=True, capture_output=True, text=True)
    print(run("export", a.rm, "--format", "hf", "--out", str(out / "hf")).stdout.strip())
    (out / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run("score", "--model", a.rm, "--input", str(out / "in.jsonl"), "--out", str(out / "scores.jsonl"))
    rows = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(out / "hf", dtype=torch.float32).eval()
    print(f"transformers loaded {type(model).__name__}")
    worst = 0.0
    for r in rows:
        with torch.no_grad():
            theirs = model(torch.tensor([r["tokens"]])).logits[0, 0].item()
        worst = max(worst, abs(theirs - r["reward"]) / max(abs(theirs), 1e-6))
        print(f"  taper {r['reward']:+.6f}  transformers {theirs:+.6f}  {r['text'][-20:]!r}")
    print(f"rewards: max relative difference {worst:.2e} (tol {a.tol:g})")
    ok = worst < a.tol
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
