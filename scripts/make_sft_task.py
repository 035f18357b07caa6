"""A synthetic instruction task with exact answers, for SFT (and later alignment) tests.

Each example asks for one of three string transforms of a lower-case word taken from
tinyshakespeare: `upper` (ROMEO), `reverse` (oemor), `first-last` (the first and last letters,
"rm"). Words are split into disjoint train / test vocabularies, so test prompts are held out
(unseen words), and written in TRL's conversational `messages` format:

    {"messages": [{"role": "user", "content": "reverse: romeo"}, {"role": "assistant", "content": "oemor"}]}

    python3 scripts/make_sft_task.py [--data ../shared/data/tinyshakespeare.txt] [--out data/sft-words]
"""
import argparse
import json
import pathlib
import random
import re

TASKS = {
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "first-last": lambda w: w[0] + w[-1],
}


def word_split(rng, data):
    """Lower-case words of 3-6 letters from `data`, shuffled by `rng`, split 90 / 10 into
    disjoint train and test vocabularies."""
    words = sorted({w for w in re.findall(r"[a-z]+", pathlib.Path(data).read_text()) if 3 <= len(w) <= 6})
    rng.shuffle(words)
    n_test = len(words) // 10
    return {"test": words[:n_test], "train": words[n_test:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--out", default="data/sft-words")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    split = word_split(rng, a.data)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in [("train", a.train), ("test", a.test)]:
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                task = rng.choice(sorted(TASKS))
                w = rng.choice(split[name])
                msgs = [{"role": "user", "content": f"{task}: {w}"},
                        {"role": "assistant", "content": TASKS[task](w)}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    print(f"{len(split['train'])} train words, {len(split['test'])} test words -> {out}")


if __name__ == "__main__":
    main()
