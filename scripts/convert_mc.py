"""Converts multiple-choice benchmarks into the JSONL `taper eval --task` reads.

Each output line is {"context": str, "choices": [str, ...], "label": int, "id": str}, with the
context and choices as lm-evaluation-harness 0.4.9 renders them for its tasks (so `taper eval
--task` scores what `lm_eval --tasks <name>` scores):

  hellaswag      validation split; lm_eval's process_docs: query = preprocess(activity_label
                 + ": " + ctx_a + " " + ctx_b.capitalize()), choices = preprocess(ending), with
                 preprocess stripping, " [title]" -> ". ", dropping [...] tags, "  " -> " "
  piqa           validation split; "Question: {goal}\\nAnswer:", choices [sol1, sol2]
  arc_easy       test split; "Question: {question}\\nAnswer:", choices.text,
  arc_challenge  label = choices.label.index(answerKey)

Input is a local copy, nothing is downloaded: a `datasets.save_to_disk` dir (needs the
`datasets` package), or the HF dataset repo's files (a dir or file of .parquet (needs pyarrow),
.jsonl or .json). For a dir, files whose name contains the split are used when there are such.

    python3 scripts/convert_mc.py arc_easy ~/data/ai2_arc/ARC-Easy --out arc_easy.jsonl [--limit 200]

`shakespeare` makes a task where there is none: from a text file (tinyshakespeare), questions
whose context is a few lines of a speech and whose choices are the line that follows and lines
from elsewhere (seeded, so the same file gives the same task):

    python3 scripts/convert_mc.py shakespeare data/tinyshakespeare.txt --out lines.jsonl --limit 200
"""
import argparse
import json
import pathlib
import random
import re
import sys

SPLITS = {"hellaswag": "validation", "piqa": "validation", "arc_easy": "test", "arc_challenge": "test"}
# The HF repo allenai/ai2_arc holds both ARC sets, each in a folder of this name.
SUBSETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


def hellaswag_preprocess(text):
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag (lm_eval's own comment).
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def capitalize(s):
    # Python's str.capitalize, as lm_eval applies it: first character upper, the rest lower.
    return s.capitalize()


def hellaswag(doc):
    ctx = doc["ctx_a"] + " " + capitalize(doc["ctx_b"])
    return dict(context=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                choices=[hellaswag_preprocess(e) for e in doc["endings"]], label=int(doc["label"]),
                id=str(doc.get("ind", "")))


def piqa(doc):
    return dict(context=f"Question: {doc['goal']}\nAnswer:", choices=[doc["sol1"], doc["sol2"]],
                label=int(doc["label"]), id=None)


def arc(doc):
    ch = doc["choices"]
    return dict(context=f"Question: {doc['question']}\nAnswer:", choices=list(ch["text"]),
                label=list(ch["label"]).index(doc["answerKey"]), id=doc.get("id"))


CONVERT = {"hellaswag": hellaswag, "piqa": piqa, "arc_easy": arc, "arc_challenge": arc}


def read_rows(src, split, subset=None):
    """Rows of the split from a save_to_disk dir, or from parquet / jsonl / json files (of the
    `subset` folder when the dir has one)."""
    src = pathlib.Path(src)
    if src.is_dir() and ((src / "dataset_dict.json").exists() or (src / "dataset_info.json").exists()):
        import datasets
        d = datasets.load_from_disk(str(src))
        if isinstance(d, datasets.DatasetDict):
            if split not in d:
                sys.exit(f"{src}: no {split!r} split (has {', '.join(d)})")
            d = d[split]
        return [dict(r) for r in d]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
        if subset and any(subset in p.parts for p in files):
            files = [p for p in files if subset in p.parts]
        named = [p for p in files if split in p.name or (split == "validation" and "val" in p.name)]
        files = named or files
    elif src.exists():
        files = [src]
    else:
        sys.exit(f"{src}: no such file or directory")
    if not files:
        sys.exit(f"{src}: no .parquet, .jsonl or .json files")
    rows = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            rows += pq.read_table(f).to_pylist()
        elif f.suffix == ".jsonl":
            rows += [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        else:
            data = json.loads(f.read_text())
            rows += data if isinstance(data, list) else data.get("data", [])
    return rows


def shakespeare(path, n, seed):
    """Questions from a play's text: a speech's opening lines, then its next line against three
    lines from other speeches."""
    text = pathlib.Path(path).read_text()
    speeches = [s.strip("\n").split("\n") for s in text.split("\n\n")]
    # A speaker line, at least two lines of context, and one to find.
    speeches = [s for s in speeches if len(s) >= 4]
    lines = [l for s in speeches for l in s[1:]]
    rng = random.Random(seed)
    out = []
    for i, s in enumerate(rng.sample(speeches, min(n, len(speeches)))):
        k = rng.randint(2, len(s) - 2)
        context, answer = "\n".join(s[:k]) + "\n", s[k]
        others = []
        while len(others) < 3:
            o = rng.choice(lines)
            if o != answer and o not in others:
                others.append(o)
        label = rng.randint(0, 3)
        out.append(dict(context=context, choices=others[:label] + [answer] + others[label:], label=label,
                        id=f"shakespeare-{i}"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(CONVERT) + ["shakespeare"])
    p.add_argument("src", help="save_to_disk dir, a dir or file of parquet/jsonl/json, or (shakespeare) a text file")
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="default: the split lm_eval evaluates")
    p.add_argument("--limit", type=int, default=0, help="first N questions (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="shakespeare: the draw")
    a = p.parse_args()
    if a.task == "shakespeare":
        docs = shakespeare(a.src, a.limit or 1000, a.seed)
    else:
        split = a.split or SPLITS[a.task]
        rows = read_rows(a.src, split, SUBSETS.get(a.task))
        if a.limit:
            rows = rows[: a.limit]
        docs = []
        for i, r in enumerate(rows):
            d = CONVERT[a.task](r)
            d["id"] = d["id"] or f"{a.task}-{i}"
            docs.append(d)
    with open(a.out, "w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{a.out}: {len(docs)} questions")


if __name__ == "__main__":
    main()
