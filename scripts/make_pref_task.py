"""Preference pairs for the word-transform task (scripts/make_sft_task.py), for the reward model
and DPO: the chosen answer is the correct transform, the rejected one a near miss of the kind
an imperfect policy makes (two letters swapped, one letter changed, dropped or doubled, or the
wrong transform). Words come from the same disjoint train / test vocabularies as the SFT task,
so held-out pairs and prompts use unseen words. Written in TRL's explicit-prompt conversational
format:

    {"prompt": [{"role": "user", "content": "reverse: romeo"}],
     "chosen": [{"role": "assistant", "content": "oemor"}],
     "rejected": [{"role": "assistant", "content": "oeomr"}]}

    python3 scripts/make_pref_task.py [--data ../shared/data/tinyshakespeare.txt] [--out data/pref-words]
"""
import argparse
import json
import pathlib
import random
import string

from make_sft_task import TASKS, word_split


def near_miss(rng, task, word, answer):
    letters = string.ascii_uppercase if answer.isupper() else string.ascii_lowercase
    for _ in range(100):
        kind = rng.choice(["swap", "change", "drop", "double", "task"])
        a = list(answer)
        i = rng.randrange(len(a))
        if kind == "swap" and len(a) > 1:
            i = rng.randrange(len(a) - 1)
            a[i], a[i + 1] = a[i + 1], a[i]
        elif kind == "change":
            a[i] = rng.choice(letters)
        elif kind == "drop" and len(a) > 1:
            del a[i]
        elif kind == "double":
            a.insert(i, a[i])
        elif kind == "task":
            a = list(TASKS[rng.choice([t for t in sorted(TASKS) if t != task])](word))
        wrong = "".join(a)
        if wrong != answer and wrong:
            return wrong
    raise ValueError(f"no near miss for {task} {word}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--out", default="data/pref-words")
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    # The same word split as make_sft_task.py (its seed 0), so test words stay unseen.
    split = word_split(random.Random(0), a.data)
    rng = random.Random(a.seed)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in [("train", a.train), ("test", a.test)]:
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                task = rng.choice(sorted(TASKS))
                w = rng.choice(split[name])
                answer = TASKS[task](w)
                rec = {
                    "prompt": [{"role": "user", "content": f"{task}: {w}"}],
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": near_miss(rng, task, w, answer)}],
                }
                f.write(json.dumps(rec) + "\n")
    print(f"{a.train} train and {a.test} test pairs -> {out}")


if __name__ == "__main__":
    main()
