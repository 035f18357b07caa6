//! An encoder-decoder through the real `taper` binary: a tiny seq2seq pretrain on the dates
//! task, bit-exact resume, generation (greedy and beam search), info, export to Marian, and
//! bad data that stops with one line naming file, line and field.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A small slice of the dates task keeps the run to seconds.
fn fixture(d: &Path) -> (PathBuf, PathBuf) {
    let take = |name: &str, n: usize| {
        let text = std::fs::read_to_string(root().join("data/seq2seq-dates").join(name)).unwrap();
        let p = d.join(name);
        std::fs::write(&p, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        p
    };
    (take("train.jsonl", 200), take("test.jsonl", 12))
}

fn config(train: &Path, test: &Path) -> String {
    format!(
        r#"
seed = 3
device = "cpu"
[model]
kind = "encoder-decoder"
n_layer = 1
n_decoder_layer = 2
n_head = 2
n_embd = 16
intermediate_size = 32
block_size = 24
pos_emb = "sinusoidal"
scale_embedding = true
dropout = 0.1
[data]
files = [{train:?}]
tokenizer = "char"
special_tokens = ["<pad>", "</s>"]
[seq2seq]
val_files = [{test:?}]
max_source_len = 12
overflow = "truncate"
label_smoothing = 0.1
beams = 3
[train]
max_steps = 6
batch_size = 8
grad_accum_steps = 2
log_every = 1
eval_every = 3
checkpoint_every = 2
keep_checkpoints = 10
[optim]
lr = 3e-3
[schedule]
warmup_steps = 2
min_lr = 3e-4
"#
    )
}

fn pretrain(cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    taper().arg("pretrain").arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
}

#[test]
fn seq2seq_pretrain_resume_generate_export() {
    let d = scratch("run");
    let (train, test) = fixture(&d);
    let cfg = d.join("run.toml");
    std::fs::write(&cfg, config(&train, &test)).unwrap();
    let run = d.join("run");
    let out = ok(pretrain(&cfg, &run, &[]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Sources of more than 11 characters (plus eos) are cut to the limit and counted.
    let long = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["source"].as_str().unwrap().len() > 11)
        .count();
    assert!(long > 0);
    assert!(
        stdout.contains(&format!("training data: 200 pairs kept; over the length limit: {long} sources")),
        "{stdout}"
    );
    assert!(stdout.contains("greedy exact match") && stdout.contains("beam search (3 beams"), "{stdout}");
    let lines = metrics(&run);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 6);
    assert!(steps[2]["val_loss"].as_f64().is_some() && steps[2]["val_exact_match"].as_f64().is_some());
    assert!(steps[5]["loss"].as_f64().unwrap() < steps[0]["loss"].as_f64().unwrap());
    assert!(lines.last().unwrap()["beam_exact_match"].as_f64().is_some());

    // Resume from step 2 reproduces the uninterrupted run bit for bit (dropout is on).
    let run2 = d.join("run2");
    ok(pretrain(&cfg, &run2, &["--set", "train.stop_at_step=2"]));
    ok(pretrain(&cfg, &run2, &["--resume"]));
    let ck = |r: &Path| std::fs::read(r.join("checkpoints/step_00000006/model.safetensors")).unwrap();
    assert!(ck(&run) == ck(&run2), "resumed weights differ");
    let losses = |r: &Path| -> Vec<u64> {
        metrics(r).iter().filter_map(|l| l.get("loss").map(|v| v.as_f64().unwrap().to_bits())).collect()
    };
    assert_eq!(losses(&run), losses(&run2));

    // Generation: greedy is deterministic, and 1 beam is greedy.
    let gen = |beams: &str| {
        let out = ok(taper()
            .args(["generate", "--model"])
            .arg(&run)
            .args(["--prompt", "3 Mar 1997", "--max-tokens", "12", "--beams", beams])
            .output()
            .unwrap());
        String::from_utf8(out.stdout).unwrap()
    };
    let greedy = gen("1");
    assert!(greedy.ends_with('\n'));
    assert_eq!(greedy, gen("1"));
    let beam = gen("3");
    assert!(beam.ends_with('\n'), "{beam:?}");

    let info = ok(taper().arg("info").arg(&run).output().unwrap());
    assert!(String::from_utf8_lossy(&info.stdout).contains("step            6"));

    // Export as a Marian model: config.json names the family and the special ids.
    let exp = d.join("hf");
    ok(taper().arg("export").arg(&run).args(["--format", "hf", "--out"]).arg(&exp).output().unwrap());
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("config.json")).unwrap()).unwrap();
    assert_eq!(j["model_type"], "marian");
    assert_eq!(j["decoder_layers"], 2);
    assert_eq!(j["decoder_start_token_id"], j["pad_token_id"]);
    // The export loads back (as an HF source) and decodes as the checkpoint does.
    let out = ok(taper()
        .args(["generate", "--model"])
        .arg(&exp)
        .args(["--prompt", "3 Mar 1997", "--max-tokens", "12"])
        .output()
        .unwrap());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), greedy);
}

#[test]
fn seq2seq_bad_data_is_one_line() {
    let d = scratch("bad");
    let (train, test) = fixture(&d);
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str("{\"source\": \"1 May 2001\"}\n");
    std::fs::write(&train, text).unwrap();
    let cfg = d.join("run.toml");
    std::fs::write(&cfg, config(&train, &test)).unwrap();
    let out = pretrain(&cfg, &d.join("run"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:201: missing field `target`", train.display());
    assert!(err.contains(&want) && err.trim().lines().count() == 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Dropping over-long pairs instead counts them.
    std::fs::write(&cfg, config(&train, &test).replace("overflow = \"truncate\"", "overflow = \"drop\"")).unwrap();
    let text = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, text.lines().take(200).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let out = ok(pretrain(&cfg, &d.join("run2"), &["--set", "train.max_steps=2", "--set", "seq2seq.beams=0"]));
    let all = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        all.contains("sources and 0 targets dropped") && !all.contains(" 0 sources and 0 targets dropped"),
        "{all}"
    );
}
