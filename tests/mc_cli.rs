//! `taper eval --task` through the real binary: multiple-choice scores equal to
//! lm-evaluation-harness's (the golden file of scripts/golden/mc_lm_eval.py), bad task files and
//! flags refused with one line, and `eval.tasks` of a training run logged at its evaluations.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    root().join("crates/taper-train/tests/fixtures/mc")
}

fn gpt2() -> PathBuf {
    root().join("crates/taper-model/tests/fixtures/hf/gpt2")
}

#[test]
fn eval_task_prints_and_writes_lm_evals_scores() {
    let d = scratch("mc-eval");
    let out_json = d.join("out.json");
    let out = ok(taper()
        .args(["eval", "--model"])
        .arg(gpt2())
        .arg("--task")
        .arg(fixtures().join("tiny.jsonl"))
        .args(["--batch-size", "5", "--output"])
        .arg(&out_json)
        .output()
        .unwrap());
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gpt2_lm_eval.json")).unwrap()).unwrap();
    let s = &golden["summary"];
    let (acc, acc_norm) = (s["acc"].as_f64().unwrap(), s["acc_norm"].as_f64().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tiny  (8 questions)"), "{stdout}");
    assert!(stdout.contains(&format!("acc       {acc:.4} ± {:.4}", s["acc_stderr"].as_f64().unwrap())), "{stdout}");
    assert!(stdout.contains(&format!("acc_norm  {acc_norm:.4} ± ")), "{stdout}");
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    let t = &written["tasks"][0];
    assert_eq!((t["acc"].as_f64(), t["acc_norm"].as_f64()), (Some(acc), Some(acc_norm)));
    for (got, want) in t["scored"].as_array().unwrap().iter().zip(golden["questions"].as_array().unwrap()) {
        assert_eq!(got["id"], want["id"]);
        for (g, w) in got["lls"].as_array().unwrap().iter().zip(want["lls"].as_array().unwrap()) {
            assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4, "{got} vs {want}");
        }
    }
    // --limit scores the first questions only.
    let out = ok(taper()
        .args(["eval", "--model"])
        .arg(gpt2())
        .arg("--task")
        .arg(fixtures().join("tiny.jsonl"))
        .args(["--limit", "3"])
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("tiny  (3 questions)"));
}

#[test]
fn bad_task_files_and_flags_are_refused_with_one_line() {
    let d = scratch("mc-bad");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = r#"{"context": "a", "choices": ["b", "c"], "label": 0}"#;
    let cases: Vec<(PathBuf, String)> = vec![
        (d.join("missing.jsonl"), "missing.jsonl: no such file".into()),
        (write("json.jsonl", &format!("{good}\n\n{{\"context\": \n")), "json.jsonl:3: not valid JSON".into()),
        (
            write("range.jsonl", &format!("{good}\n{}\n", r#"{"context": "a", "choices": ["b"], "label": 1}"#)),
            "range.jsonl:2: label = 1: out of range for 1 choices".into(),
        ),
        (
            write("empty.jsonl", r#"{"context": "a", "choices": [], "label": 0}"#),
            "empty.jsonl:1: choices is empty".into(),
        ),
        (write("nokey.jsonl", r#"{"choices": ["b"], "label": 0}"#), "nokey.jsonl:1: missing key `context`".into()),
        (
            write("blank.jsonl", &format!("{good}\n{}\n", r#"{"context": " \n", "choices": ["b"], "label": 0}"#)),
            "blank.jsonl:2: context \" \\n\": only whitespace".into(),
        ),
    ];
    for (path, needle) in cases {
        fails_once(
            taper().args(["eval", "--model"]).arg(gpt2()).arg("--task").arg(&path).output().unwrap(),
            &[&needle],
        );
    }
    let task = write("ok.jsonl", good);
    fails_once(taper().args(["eval", "--model"]).arg(gpt2()).output().unwrap(), &["give --data", "or --task"]);
    fails_once(
        taper()
            .args(["eval", "--model"])
            .arg(gpt2())
            .arg("--task")
            .arg(&task)
            .arg("--data")
            .arg(&task)
            .output()
            .unwrap(),
        &["give --data or --task, not both"],
    );
}

/// Questions in tinyshakespeare's characters (a char tokenizer knows no others): the true end
/// of a line against the ends of others.
fn shakespeare_task(path: &Path) {
    let lines = [
        ("First Citizen:\nBefore we proceed any further, hear me ", ["speak.", "die.", "run."], 0),
        ("All:\nResolved. ", ["resolved.", "Speak, speak.", "No more."], 0),
        ("First Citizen:\nYou are all resolved rather to die than to", [" famish?", " sing?", " dance?"], 0),
    ];
    let text: String = lines
        .iter()
        .map(|(c, ch, l)| serde_json::json!({"context": c, "choices": ch, "label": l}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn training_logs_task_accuracy_at_its_evaluations() {
    let d = scratch("mc-train");
    let task = d.join("lines.jsonl");
    shakespeare_task(&task);
    let cfg = d.join("tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 7\ndevice = \"cpu\"\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n\
             [data]\ndataset = \"tinyshakespeare\"\n[train]\nmax_steps = 4\nbatch_size = 2\nlog_every = 1\n\
             eval_every = 2\neval_batches = 1\n[optim]\nlr = 3e-3\n[eval]\ntasks = [{task:?}]\n"
        ),
    )
    .unwrap();
    let run = d.join("run");
    ok(train("pretrain", &cfg, &run, &[]));
    let evals: Vec<_> = metrics(&run).into_iter().filter(|m| m.get("val_loss").is_some()).collect();
    assert_eq!(evals.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    for m in &evals {
        for k in ["tasks/lines/acc", "tasks/lines/acc_norm"] {
            let v = m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
            // Three questions: a share in thirds.
            assert!([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0].iter().any(|x| (x - v).abs() < 1e-12), "{k} = {v}");
        }
    }
    // A missing task file stops the run at the config, naming its line.
    std::fs::write(d.join("bad.toml"), std::fs::read_to_string(&cfg).unwrap().replace("lines.jsonl", "gone.jsonl"))
        .unwrap();
    fails_once(
        train("pretrain", &d.join("bad.toml"), &d.join("run2"), &[]),
        &["bad.toml:", "eval.tasks: ", "gone.jsonl: no such file"],
    );
}

/// The first `n` lines of a file of the repository's data, as a file of the test's own.
fn head(d: &Path, rel: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(root().join("data").join(rel)).unwrap();
    let p = d.join(rel.replace('/', "-"));
    std::fs::write(&p, text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    p
}

/// SFT, DPO and GRPO score `eval.tasks` with the model being trained: the last evaluation's
/// figures are those of `taper eval --task` on the run's final checkpoint.
#[test]
fn fine_tuning_recipes_score_tasks_with_the_trained_model() {
    let d = scratch("mc-finetune");
    let task = fixtures().join("tiny.jsonl");
    let grpo = "[grpo]\ngroup_size = 2\nprompts_per_step = 2\n[rollout]\nmax_new_tokens = 4\n";
    let runs = [
        ("sft", head(&d, "sft-words/train.jsonl", 16), ""),
        ("dpo", head(&d, "pref-words/train.jsonl", 16), ""),
        ("grpo", head(&d, "sft-words/train.jsonl", 16), grpo),
    ];
    for (cmd, train_file, extra) in runs {
        let cfg = d.join(format!("{cmd}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "seed = 1\ndevice = \"cpu\"\ninit = {:?}\n[data]\ntrain = [{train_file:?}]\nchat_template = \"chatml\"\n\
                 [train]\nmax_steps = 2\nbatch_size = 2\nlog_every = 1\neval_every = 1\n[optim]\nlr = 1e-2\n\
                 [eval]\ntasks = [{task:?}]\n{extra}",
                root().join("crates/taper-model/tests/fixtures/hf/llama")
            ),
        )
        .unwrap();
        let run = d.join(cmd);
        ok(train(cmd, &cfg, &run, &[]));
        let evals: Vec<_> = metrics(&run).into_iter().filter(|m| m.get("tasks/tiny/acc").is_some()).collect();
        assert_eq!(evals.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2], "{cmd}");
        let out_json = d.join(format!("{cmd}-scores.json"));
        ok(taper()
            .args(["eval", "--model"])
            .arg(&run)
            .arg("--task")
            .arg(&task)
            .arg("--output")
            .arg(&out_json)
            .output()
            .unwrap());
        let t = &serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&out_json).unwrap()).unwrap()
            ["tasks"][0];
        assert_eq!(evals[1]["tasks/tiny/acc"], t["acc"], "{cmd}");
        assert_eq!(evals[1]["tasks/tiny/acc_norm"], t["acc_norm"], "{cmd}");
    }
}
