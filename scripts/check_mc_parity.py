"""Multiple-choice parity: lm-evaluation-harness against `taper eval --task`.

Runs lm_eval's `hf` model (HFLM, float32, CPU) and `taper eval --task` on the same JSONL task
(context, choices, label; as scripts/convert_mc.py writes it) and the same Hugging Face model
dir, and compares: acc and acc_norm must be exactly equal, every per-choice log-likelihood
within --tol (1e-4). lm_eval reads the JSONL through a task YAML written to a temporary dir
(dataset_path: json, doc_to_text: context, doc_to_choice: choices, doc_to_target: label, the
default target_delimiter " "), and its logged requests are checked to be the task's context and
" " + choice, so both sides scored the same strings.

    ~/.venvs/lmeval/bin/python scripts/check_mc_parity.py --model DIR --task FILE.jsonl \\
        [--limit 200] [--taper target/release/taper]

Exit status 0 when everything matches, 1 otherwise.
"""
import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(model_dir, task_path, limit=None, batch_size=8):
    """lm_eval's per-question results on a JSONL task: a list of dicts (context, choices,
    label, lls, acc, acc_norm) in file order, and its aggregated acc/acc_norm with stderrs."""
    import transformers

    # lm_eval 0.4.9 names a class that transformers 5 renamed (in a module it imports at
    # start-up, for vision models only). Set on the lazy module's class: the module object
    # itself is replaced while lm_eval's dependencies import.
    if not hasattr(transformers, "AutoModelForVision2Seq"):
        type(transformers).AutoModelForVision2Seq = transformers.AutoModelForImageTextToText
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_path = pathlib.Path(task_path).resolve()
    questions = [json.loads(l) for l in task_path.read_text().splitlines() if l.strip()]
    if limit:
        questions = questions[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        # lm_eval reads the rows it scores; a cut copy keeps --limit out of its sampling logic.
        data = pathlib.Path(tmp) / "data.jsonl"
        # Only the fields the task uses: `datasets` would refuse ids of mixed types.
        rows = [{"context": q["context"], "choices": q["choices"], "label": q["label"]} for q in questions]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        name = "taper_mc_parity"
        (pathlib.Path(tmp) / f"{name}.yaml").write_text(YAML.format(name=name, path=json.dumps(str(data))))
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=[name],
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            device="cpu",
            batch_size=batch_size,
            log_samples=True,
            num_fewshot=0,
        )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    if len(samples) != len(questions):
        raise SystemExit(f"lm_eval scored {len(samples)} questions, the task has {len(questions)}")
    per_q = []
    for q, s in zip(questions, samples):
        args = [tuple(a) for a in s["arguments"]]
        want = [(q["context"], " " + c) for c in q["choices"]]
        if args != want:
            raise SystemExit(f"question {s['doc_id']}: lm_eval's requests {args!r} are not the task's {want!r}")
        lls = [float(r[0][0]) for r in s["resps"]]
        per_q.append(dict(context=q["context"], choices=q["choices"], label=q["label"], lls=lls,
                          acc=float(s["acc"]), acc_norm=float(s["acc_norm"])))
    res = out["results"][name]
    summary = {k: res[f"{k},none"] for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
    return per_q, summary


def run_taper(taper, model_dir, task_path, limit=None):
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "out.json"
        cmd = [taper, "eval", "--model", str(model_dir), "--task", str(task_path), "--output", str(out)]
        if limit:
            cmd += ["--limit", str(limit)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())["tasks"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model dir")
    p.add_argument("--task", required=True, help="a JSONL task (context, choices, label)")
    p.add_argument("--limit", type=int, default=200, help="first N questions (0 = all)")
    p.add_argument("--taper", default="target/release/taper")
    p.add_argument("--batch-size", type=int, default=8, help="lm_eval's batch size")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()

    ours = run_taper(a.taper, a.model, a.task, a.limit)
    theirs, summary = run_lm_eval(a.model, a.task, a.limit, a.batch_size)
    n = len(theirs)
    if ours["questions"] != n:
        raise SystemExit(f"taper scored {ours['questions']} questions, lm_eval {n}")
    worst, n_choices, flips = 0.0, 0, []
    for i, (t, o) in enumerate(zip(theirs, ours["scored"])):
        for a_, b_ in zip(t["lls"], o["lls"]):
            worst = max(worst, abs(a_ - b_))
            n_choices += 1
        if (t["acc"], t["acc_norm"]) != (o["acc"], o["acc_norm"]):
            flips.append(i)
    their_acc = sum(t["acc"] for t in theirs) / n
    their_norm = sum(t["acc_norm"] for t in theirs) / n
    print(f"questions            {n} ({n_choices} choices)")
    print(f"lm_eval  acc         {summary['acc']:.4f} ± {summary['acc_stderr']:.4f}   "
          f"acc_norm {summary['acc_norm']:.4f} ± {summary['acc_norm_stderr']:.4f}")
    print(f"taper    acc         {ours['acc']:.4f} ± {ours['acc_stderr']:.4f}   "
          f"acc_norm {ours['acc_norm']:.4f} ± {ours['acc_norm_stderr']:.4f}")
    print(f"max |ll difference|  {worst:.3e} (tolerance {a.tol:g})")
    print(f"questions judged differently: {len(flips)} {flips[:10]}")
    ok = (worst <= a.tol and not flips and ours["acc"] == their_acc == summary["acc"]
          and ours["acc_norm"] == their_norm == summary["acc_norm"]
          and math.isclose(ours["acc_stderr"], summary["acc_stderr"], rel_tol=1e-9)
          and math.isclose(ours["acc_norm_stderr"], summary["acc_norm_stderr"], rel_tol=1e-9))
    print("OK: acc and acc_norm equal, log-likelihoods within tolerance" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
