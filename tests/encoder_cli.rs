//! Encoders through the real `taper` binary: a tiny masked-LM pretraining run (loss falls,
//! accuracy reported beside the unigram baseline, bit-exact resume), info, fill-mask, HF export
//! read back, and bad input: a BERT checkpoint where a decoder is expected, an MLM config
//! without a mask token.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;

/// stdout and stderr of a command that succeeded.
fn ok_text(out: Output) -> String {
    let out = ok(out);
    String::from_utf8(out.stdout).unwrap() + &String::from_utf8_lossy(&out.stderr)
}

const TINY_MLM: &str = r#"
seed = 5
device = "cpu"
objective = "mlm"
mlm_probability = 0.3
[model]
kind = "encoder"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
dropout = 0.1
[data]
dataset = "tinyshakespeare"
tokenizer = "char"
special_tokens = ["<|endoftext|>", "[MASK]"]
[train]
max_steps = 30
batch_size = 8
grad_accum_steps = 2
log_every = 1
eval_every = 15
eval_batches = 4
checkpoint_every = 15
keep_checkpoints = 5
[optim]
lr = 3e-3
[schedule]
warmup_steps = 3
min_lr = 3e-4
"#;

fn pretrain(cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    taper().arg("pretrain").arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
}

#[test]
fn tiny_mlm_run_resume_info_fill_mask_and_export() {
    let d = scratch("mlm");
    let cfg = d.join("mlm.toml");
    std::fs::write(&cfg, TINY_MLM).unwrap();
    let run = d.join("run");
    let out = ok_text(pretrain(&cfg, &run, &[]));
    assert!(out.contains("done: step 30"), "{out}");
    assert!(out.contains("masked-token accuracy") && out.contains("unigram baseline"), "{out}");
    let m = metrics(&run);
    assert_eq!(m.len(), 30);
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!(m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    // Uniform over 67 characters is ln 67 = 4.2; the mean of the last steps is well below it.
    let (first, last) = ((0..3).map(loss).sum::<f64>() / 3.0, (27..30).map(loss).sum::<f64>() / 3.0);
    assert!(last < first - 0.5, "loss {first} -> {last}");
    let acc = m[29]["val_mlm_accuracy"].as_f64().unwrap();
    let base = m[29]["val_unigram_accuracy"].as_f64().unwrap();
    assert!(acc > 0.0 && base > 0.0 && m[29]["val_masked_tokens"].as_u64().unwrap() > 50, "{}", m[29]);

    // Resuming from step 15 replays masks and dropout exactly.
    let resumed = d.join("resumed");
    copy_dir(&run, &resumed);
    std::fs::remove_dir_all(resumed.join("checkpoints/step_00000030")).unwrap();
    ok_text(pretrain(&cfg, &resumed, &["--resume"]));
    let weights = |r: &Path| std::fs::read(r.join("checkpoints/step_00000030/model.safetensors")).unwrap();
    assert!(weights(&run) == weights(&resumed), "resumed run differs");

    let info = ok_text(taper().arg("info").arg(&run).output().unwrap());
    assert!(info.contains("encoder (BERT-style masked LM)") && info.contains("post-LN"), "{info}");

    let fill = ok_text(
        taper().args(["generate", "--model"]).arg(&run).args(["--prompt", "ROMEO: Go[MASK] night"]).output().unwrap(),
    );
    // The filled text (the predicted character may be a newline), then one line per mask.
    let (filled, tops) = fill.split_once("\n[MASK] 1 (token 9): ").unwrap_or_else(|| panic!("{fill}"));
    assert!(filled.starts_with("ROMEO: Go") && filled.ends_with(" night"), "{fill}");
    assert_eq!(filled.chars().count(), "ROMEO: Go? night".chars().count(), "{fill}");
    assert_eq!(tops.lines().next().unwrap().matches(", ").count(), 4, "top 5 by default: {fill}");
    fails_with(
        taper().args(["generate", "--model"]).arg(&run).args(["--prompt", "ROMEO:"]).output().unwrap(),
        &["the prompt has no [MASK] token"],
    );

    // HF export: a bert model that taper reads back with the same predictions.
    let hf = d.join("hf");
    let out = ok_text(taper().arg("export").arg(&run).args(["--format", "hf", "--out"]).arg(&hf).output().unwrap());
    assert!(out.contains("bert model"), "{out}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    let tok_cfg = std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap();
    assert!(tok_cfg.contains("\"mask_token\": \"[MASK]\""), "{tok_cfg}");
    let fill_hf = ok_text(
        taper().args(["generate", "--model"]).arg(&hf).args(["--prompt", "ROMEO: Go[MASK] night"]).output().unwrap(),
    );
    assert_eq!(fill, fill_hf);
    fails_with(
        taper().arg("export").arg(&run).args(["--format", "gguf", "--out"]).arg(d.join("g")).output().unwrap(),
        &["GGUF export is for decoder LMs", "encoder"],
    );

    // The encoder where a decoder is expected: one clear line, from both kinds of source.
    let input = d.join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"ROMEO: What light\"}\n").unwrap();
    for src in [&run, &hf] {
        fails_with(
            taper()
                .args(["score", "--model"])
                .arg(src)
                .arg("--input")
                .arg(&input)
                .arg("--out")
                .arg(d.join("s.jsonl"))
                .output()
                .unwrap(),
            &["the model is an encoder (BERT-style masked LM), but this needs a decoder (causal LM)"],
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn bad_encoder_input_gets_one_clear_line() {
    let d = scratch("bad");
    let write = |text: &str| {
        let p = d.join("run.toml");
        std::fs::write(&p, text).unwrap();
        p
    };
    // An MLM config whose trained tokenizer would have no mask token.
    let cfg = write(&TINY_MLM.replace(", \"[MASK]\"", ""));
    fails_with(pretrain(&cfg, &d.join("r1"), &[]), &["needs a mask token", "[MASK]"]);
    // A tokenizer file without one.
    let tok = d.join("tok.json");
    ok_text(
        taper()
            .args(["tokenizer", "train", "--kind", "char", "--dataset", "tinyshakespeare", "--out"])
            .arg(&tok)
            .output()
            .unwrap(),
    );
    let cfg = write(&TINY_MLM.replace("tokenizer = \"char\"", &format!("tokenizer = {:?}", tok.display().to_string())));
    fails_with(pretrain(&cfg, &d.join("r2"), &[]), &["needs a mask token", "tokenizer.json"]);
    // Objective and kind that do not go together.
    let cfg = write(&TINY_MLM.replace("kind = \"encoder\"", "kind = \"decoder\""));
    fails_with(pretrain(&cfg, &d.join("r3"), &[]), &["objective = \"mlm\" needs model.kind = \"encoder\""]);
    // A transformers BERT checkpoint as the base of a decoder fine-tune.
    let bert =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../taper-model/tests/fixtures/hf/bert").canonicalize().unwrap();
    let train = d.join("train.jsonl");
    std::fs::write(&train, "{\"prompt\": \"a\", \"completion\": \"b\"}\n".repeat(8)).unwrap();
    let sft = write(&format!(
        "device = \"cpu\"\ninit = {:?}\n[data]\ntrain = [{:?}]\n[train]\nmax_steps = 2\nbatch_size = 2\n",
        bert.display().to_string(),
        train.display().to_string()
    ));
    fails_with(
        taper().arg("sft").arg("--config").arg(&sft).arg("--run-dir").arg(d.join("sft")).output().unwrap(),
        &["the model is an encoder (BERT-style masked LM), but this needs a decoder (causal LM)"],
    );
    fails_with(
        taper().args(["generate", "--model"]).arg(&bert).args(["--prompt", "to be"]).output().unwrap(),
        &["the prompt has no [MASK] token"],
    );
}
