"""Golden multiple-choice scores from lm-evaluation-harness, for taper's multiple-choice test.

Writes crates/taper-train/tests/fixtures/mc/tiny.jsonl (a handful of questions that reach the
corners of lm_eval's request construction: a context ending in a space and in a newline, an
empty context, choices with non-ASCII characters, a context longer than the gpt2 fixture's 64
positions, two to five choices) and, for the HF fixture models gpt2 and llama of
scripts/golden/hf_models.py, <model>_lm_eval.json: every choice's log-likelihood as lm_eval's
HFLM computes it, and each question's acc and acc_norm.

    python3 -m venv /work/venvs/lmeval && /work/venvs/lmeval/bin/pip install lm_eval==0.4.9 torch transformers
    /work/venvs/lmeval/bin/python scripts/golden/mc_lm_eval.py
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from check_mc_parity import run_lm_eval  # noqa: E402

OUT = ROOT / "crates/taper-train/tests/fixtures/mc"
MODELS = ROOT / "crates/taper-model/tests/fixtures/hf"

LONG = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: "
        "You are all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, "
        "you know Caius Marcius is chief enemy to the people.")
QUESTIONS = [
    {"id": "space", "context": "The king rode to the ", "choices": ["castle", "sea", "moon and back"], "label": 0},
    {"id": "qa", "context": "Question: Which is a colour?\nAnswer:", "choices": ["red", "seven", "quickly"],
     "label": 0},
    {"id": "newline", "context": "Thou art a villain.\n", "choices": ["Nay, my lord.", "Aye."], "label": 1},
    {"id": "empty", "context": "", "choices": ["To be or not to be", "Be or be not to"], "label": 0},
    {"id": "unicode", "context": "He drank a", "choices": ["café", "coffee", "thé noir", "ale", "naïve"],
     "label": 3},
    {"id": "long", "context": LONG, "choices": ["We know't, we know't.", "No, no."], "label": 0},
    {"id": "tabs", "context": "Speak\t \t", "choices": ["again", "no more"], "label": 1},
    {"id": "numbers", "context": "Two and two make", "choices": ["four", "five", "22"], "label": 0},
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    task = OUT / "tiny.jsonl"
    task.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS))
    for name in ["gpt2", "llama"]:
        per_q, summary = run_lm_eval(MODELS / name, task, batch_size=4)
        golden = {"model": name, "summary": summary,
                  "questions": [dict(id=q["id"], lls=p["lls"], acc=p["acc"], acc_norm=p["acc_norm"])
                                for q, p in zip(QUESTIONS, per_q)]}
        (OUT / f"{name}_lm_eval.json").write_text(json.dumps(golden, indent=1) + "\n")
        print(name, summary)


if __name__ == "__main__":
    main()
