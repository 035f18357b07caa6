"""On-policy preference pairs from `taper sample` output: for each prompt with a reference
answer, the answer is chosen and each distinct wrong sample of the policy (up to --per-prompt)
is rejected. Prompts the policy always gets right give no pair. Writes TRL's explicit-prompt
format (conversational when the prompt is a message list).

    taper sample --model runs/sft-words-brief --prompts data/sft-words/train.jsonl --n 4 \
        --max-new-tokens 12 --chat-template chatml --out runs/sft-words-brief/samples.jsonl
    python3 scripts/make_onpolicy_pairs.py runs/sft-words-brief/samples.jsonl runs/sft-words-brief/pairs.jsonl
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("out")
    ap.add_argument("--per-prompt", type=int, default=2)
    a = ap.parse_args()
    n_prompts = n_pairs = n_right = n_samples = 0
    with open(a.samples) as f, open(a.out, "w") as out:
        for line in f:
            rec = json.loads(line)
            answer = rec.get("answer")
            if answer is None:
                continue
            n_prompts += 1
            wrong = []
            for s in rec["samples"]:
                n_samples += 1
                if s.strip() == answer.strip():
                    n_right += 1
                elif s.strip() and s.strip() not in wrong:
                    wrong.append(s.strip())
            for w in wrong[: a.per_prompt]:
                chat = isinstance(rec["prompt"], list)
                side = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
                out.write(json.dumps({"prompt": rec["prompt"], "chosen": side(answer), "rejected": side(w)}) + "\n")
                n_pairs += 1
    print(f"{n_prompts} prompts, {n_right}/{n_samples} samples right; {n_pairs} pairs -> {a.out}")


if __name__ == "__main__":
    main()
