"""Checks `taper export --format hf` of an encoder-decoder run with transformers.

Exports SRC (a taper encoder-decoder run or checkpoint) to OUT, loads OUT with
AutoModelForSeq2SeqLM and AutoTokenizer, and checks on the run's held-out pairs:
  - the token ids: AutoTokenizer(OUT) encodes every source and target as taper does (char ids
    plus eos);
  - the logits, through the held-out loss: transformers' teacher-forced logits give, under
    CrossEntropyLoss(label_smoothing) over all target tokens, the `val_loss` taper recorded in
    the checkpoint (relative difference below --tol, default 1e-5);
  - decoding: `taper generate` and transformers' generate() give the same text for the first
    --n sources, greedy and with --beams beams (early_stopping=False, the same length_penalty).
Exit status 0 when all hold.

    cargo build --release -p taper-cli
    ~/.venvs/ref/bin/python scripts/check_seq2seq_export.py --src runs/seq2seq-dates --out /tmp/dates-hf
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tomllib

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--taper", default="target/release/taper")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--beams", type=int, default=4)
    a = ap.parse_args()
    run = lambda *args: subprocess.run([a.taper, *args], check=True, capture_output=True, text=True)
    print(run("export", a.src, "--format", "hf", "--out", a.out).stdout.strip())

    src = pathlib.Path(a.src)
    if not (src / "trainer_state.json").exists():
        cks = sorted((src / "checkpoints").glob("step_*"))
        src = cks[-1]
    state = json.loads((src / "trainer_state.json").read_text())
    cfg = tomllib.loads(state["config"])
    s2s = cfg["seq2seq"]
    eps = s2s.get("label_smoothing", 0.0)
    lp = s2s.get("length_penalty", 1.0)
    pairs = [json.loads(l) for f in s2s["val_files"] for l in open(f) if l.strip()]

    model = AutoModelForSeq2SeqLM.from_pretrained(a.out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.out)
    c = model.config
    print(f"transformers loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters)")
    ok = True

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [c.eos_token_id]

    # Held-out loss from transformers' logits, all pairs, padded batches of 64.
    total, count = 0.0, 0
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=eps, reduction="sum")
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        srcs = [ids(p["source"]) for p in chunk]
        tgts = [ids(p["target"]) for p in chunk]
        S, T = max(map(len, srcs)), max(map(len, tgts))
        x = torch.tensor([s + [c.pad_token_id] * (S - len(s)) for s in srcs])
        mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in srcs])
        labels = torch.tensor([t + [-100] * (T - len(t)) for t in tgts])
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=mask, labels=labels).logits
        total += loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
        count += int((labels != -100).sum())
    hf_loss, taper_loss = total / count, state["val_loss"]
    rel = abs(hf_loss - taper_loss) / abs(taper_loss)
    print(f"held-out loss over {len(pairs)} pairs: transformers {hf_loss:.7f}, taper {taper_loss:.7f} (relative {rel:.1e})")
    ok &= rel < a.tol

    # Decoding, greedy and beam search.
    for beams in [1, a.beams]:
        same = 0
        for p in pairs[:a.n]:
            ours = run("generate", "--model", str(src), "--prompt", p["source"], "--beams", str(beams),
                       "--length-penalty", str(lp)).stdout.rstrip("\n")
            x = torch.tensor([ids(p["source"])])
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), num_beams=beams,
                                     do_sample=False, length_penalty=lp, early_stopping=False,
                                     max_new_tokens=c.max_position_embeddings)
            theirs = tok.decode(out[0], skip_special_tokens=True)
            same += ours == theirs
            if ours != theirs:
                print(f"  {beams} beam(s) differ on {p['source']!r}: taper {ours!r}, transformers {theirs!r}")
        print(f"{beams} beam(s): {same}/{a.n} identical outputs")
        ok &= same == a.n
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
