"""Checks `taper export --format hf` with transformers.

Exports SRC (a taper checkpoint or run dir, an HF model dir, or hf://Org/Name) to OUT, loads
OUT with AutoModelForCausalLM / AutoTokenizer, and compares with taper on the same texts:
  - token ids: AutoTokenizer(OUT) encodes each text exactly as taper does;
  - per-token log-probs from `taper score` against log_softmax(transformers logits): the max
    relative difference must be below --tol (default 1e-5);
  - greedy continuation: `taper generate --temperature 0` and transformers' generate(do_sample=False)
    give the same text.
Exit status 0 when all hold.

    ~/.venvs/ref/bin/pip install torch transformers
    cargo build --release -p taper-cli
    ~/.venvs/ref/bin/python scripts/check_hf_export.py --src runs/shakespeare-char --out /tmp/sc-hf
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "To be, or not to be, that is the question.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--taper", default="target/release/taper")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--gen-tokens", type=int, default=24)
    a = ap.parse_args()
    run = lambda *args: subprocess.run([a.taper, *args], check=True, capture_output=True, text=True)
    print(run("export", a.src, "--format", "hf", "--out", a.out).stdout.strip())
    tmp = pathlib.Path(tempfile.mkdtemp())
    (tmp / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run("score", "--model", a.src, "--input", str(tmp / "in.jsonl"), "--out", str(tmp / "out.jsonl"))
    rows = [json.loads(l) for l in (tmp / "out.jsonl").read_text().splitlines()]

    model = AutoModelForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.out)
    print(f"transformers loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters)")
    ok = True
    worst = 0.0
    for row in rows:
        ids = tok(row["text"])["input_ids"]
        if ids[: len(row["tokens"])] != row["tokens"]:
            print("token ids differ:", ids, row["tokens"])
            ok = False
        x = torch.tensor([row["tokens"]])
        with torch.no_grad():
            lp = F.log_softmax(model(x).logits[0].double(), -1)
        theirs = lp[:-1].gather(1, x[0, 1:, None])[:, 0]
        ours = torch.tensor(row["logprobs"], dtype=torch.float64)
        # Relative to the text's largest log-prob magnitude, as the Rust parity tests measure.
        rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        worst = max(worst, rel)
    print(f"per-token log-probs: max relative difference {worst:.2e} over {sum(len(r['logprobs']) for r in rows)} tokens (tol {a.tol:g})")
    ok &= worst < a.tol

    prompt = TEXTS[0][:20]
    ours = run("generate", "--model", a.src, "--prompt", prompt, "--temperature", "0",
               "--max-tokens", str(a.gen_tokens)).stdout.rstrip("\n")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=a.gen_tokens, do_sample=False, pad_token_id=tok.eos_token_id or 0)
    theirs = prompt + tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    same = ours == theirs
    print(f"greedy continuation ({a.gen_tokens} tokens) identical: {same}")
    if not same:
        print("  taper:       ", repr(ours))
        print("  transformers:", repr(theirs))
    ok &= same
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
