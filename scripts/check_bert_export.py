"""Checks `taper export --format hf` of an encoder (masked-LM) run with transformers.

Exports SRC (a taper run or checkpoint of `objective = "mlm"`) to OUT, loads OUT with
BertForMaskedLM / AutoTokenizer, and for each prompt holding [MASK] compares with
`taper generate` (fill-mask) on SRC:
  - the masks sit at the same token positions (same tokenization);
  - the filled text (each mask's most likely ordinary token) is identical;
  - every top-k token is the same, with probabilities within --tol (taper prints 4 decimals).
It also checks that the exported tensors equal the checkpoint's, bit for bit.
Exit status 0 when all hold.

    cargo build --release -p taper-cli
    ~/.venvs/ref/bin/python scripts/check_bert_export.py --src runs/mlm-shakespeare --out /tmp/mlm-hf
"""
import argparse
import pathlib
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForMaskedLM

PROMPTS = [
    "ROMEO:\nBut soft, what li[MASK]ht through yonder window breaks?",
    "First Citizen:\nBefore we pro[MASK]eed any further, hear me [MASK]peak.",
    "To be, or not to be, [MASK]hat is the question.",
]
LINE = re.compile(r"^\[MASK\] (\d+) \(token (\d+)\): (.*)$")
ITEM = re.compile(r'"((?:[^"\\]|\\.)*)" ([0-9.]+)')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--taper", default="target/release/taper")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1.5e-4)
    a = ap.parse_args()
    subprocess.run([a.taper, "export", a.src, "--format", "hf", "--out", a.out], check=True)
    tok = AutoTokenizer.from_pretrained(a.out)
    model = BertForMaskedLM.from_pretrained(a.out).eval()

    # Exported tensors against the checkpoint's (taper names are BertForMaskedLM's).
    src = pathlib.Path(a.src)
    ck = src if (src / "trainer_state.json").exists() else sorted((src / "checkpoints").glob("step_*"))[-1]
    ours, theirs = load_file(str(ck / "model.safetensors")), load_file(str(pathlib.Path(a.out) / "model.safetensors"))
    bad = [k for k, t in ours.items() if k not in theirs or not torch.equal(t, theirs[k])]
    print(f"tensors: {len(ours)} in the checkpoint, {len(bad)} differ in the export")
    failures = len(bad)

    specials = set(tok.all_special_ids)
    for prompt in PROMPTS:
        out = subprocess.run([a.taper, "generate", "--model", a.src, "--prompt", prompt, "--top-k", str(a.top_k)],
                             check=True, capture_output=True, text=True).stdout.splitlines()
        filled, rows = "\n".join(l for l in out if not LINE.match(l)), [LINE.match(l) for l in out if LINE.match(l)]
        enc = tok(prompt, return_tensors="pt", add_special_tokens=True)
        ids = enc["input_ids"][0]
        with torch.no_grad():
            probs = model(**enc).logits[0].softmax(-1)  # (T, V)
        at = (ids == tok.mask_token_id).nonzero().flatten().tolist()
        if [int(r.group(2)) for r in rows] != at:
            print(f"FAIL mask positions: taper {[int(r.group(2)) for r in rows]}, transformers {at}")
            failures += 1
            continue
        fill_ids = ids.clone()
        worst = 0.0
        for r, i in zip(rows, at):
            order = [t for t in probs[i].argsort(descending=True).tolist() if t not in specials]
            fill_ids[i] = order[0]
            theirs_top = [(tok.decode([t]), probs[i, t].item()) for t in order[: a.top_k]]
            ours_top = [(bytes(s, "utf-8").decode("unicode_escape"), float(p)) for s, p in ITEM.findall(r.group(3))]
            if [s for s, _ in ours_top] != [s for s, _ in theirs_top]:
                print(f"FAIL top-{a.top_k} at token {i}: taper {ours_top} transformers {theirs_top}")
                failures += 1
            worst = max(worst, max(abs(p - q) for (_, p), (_, q) in zip(ours_top, theirs_top)))
        hf_filled = tok.decode(fill_ids, skip_special_tokens=True)
        same = hf_filled == filled
        failures += (not same) + (worst > a.tol)
        print(f"{'ok  ' if same and worst <= a.tol else 'FAIL'} {len(at)} mask(s), max |dp| {worst:.1e}: {filled!r}"
              + ("" if same else f" vs transformers {hf_filled!r}"))
    print("PASS" if failures == 0 else f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
