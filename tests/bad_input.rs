//! Bad input through the real `taper` binary: each command with its own broken inputs ends
//! with exit code 1 and one error line that names the cause, before any work starts.

mod common;

use common::*;
use std::path::Path;

/// A minimal valid config of each training recipe: (command, what it is, TOML). Nothing is
/// trained from them here: config errors stop a run before any model or data file is read.
fn recipe_configs(d: &Path) -> Vec<(&'static str, &'static str, String)> {
    let data = |p: &str| format!("{:?}", root().join("data").join(p));
    let missing = format!("{:?}", d.join("no-such-model"));
    let loop_sections = "[train]\nmax_steps = 4\nbatch_size = 2\nlog_every = 1\neval_every = 2\n\
                         [optim]\nlr = 1e-3\n[schedule]\nmin_lr = 1e-4\n";
    let model = "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n";
    vec![
        (
            "pretrain",
            "causal LM",
            format!("device = \"cpu\"\n{model}[data]\ndataset = \"tinyshakespeare\"\n{loop_sections}"),
        ),
        (
            "pretrain",
            "masked LM",
            format!(
                "device = \"cpu\"\nobjective = \"mlm\"\n{model}kind = \"encoder\"\n[data]\ndataset = \"tinyshakespeare\"\n\
                 special_tokens = [\"<|endoftext|>\", \"[MASK]\"]\n{loop_sections}"
            ),
        ),
        (
            "pretrain",
            "encoder-decoder",
            format!(
                "device = \"cpu\"\n{model}kind = \"encoder-decoder\"\npos_emb = \"sinusoidal\"\n[data]\nfiles = [{}]\n\
                 special_tokens = [\"<pad>\", \"</s>\"]\n{loop_sections}",
                data("seq2seq-dates/train.jsonl")
            ),
        ),
        (
            "sft",
            "SFT",
            format!("device = \"cpu\"\ninit = {missing}\n[data]\ntrain = [{}]\n{loop_sections}", data("sft-words/train.jsonl")),
        ),
        (
            "rm",
            "reward model",
            format!("device = \"cpu\"\ninit = {missing}\n[data]\ntrain = [{}]\n{loop_sections}", data("pref-words/train.jsonl")),
        ),
        (
            "dpo",
            "DPO",
            format!("device = \"cpu\"\ninit = {missing}\n[data]\ntrain = [{}]\n{loop_sections}", data("pref-words/train.jsonl")),
        ),
        (
            "ppo",
            "PPO",
            format!(
                "device = \"cpu\"\ninit = {missing}\n[data]\ntrain = [{}]\n[ppo]\nrollouts_per_step = 4\n{loop_sections}",
                data("sft-words/train.jsonl")
            ),
        ),
        (
            "grpo",
            "GRPO",
            format!(
                "device = \"cpu\"\ninit = {missing}\n[data]\ntrain = [{}]\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\n\
                 {loop_sections}",
                data("sft-words/train.jsonl")
            ),
        ),
    ]
}

/// Every recipe refuses the same bad [train], [optim] and [schedule] values with one line
/// naming the key (and the `--set` that gave it), where some of them used to divide by zero.
#[test]
fn every_recipe_refuses_bad_loop_settings() {
    let d = scratch("bad-loop");
    let cases: [(&str, &str); 7] = [
        ("train.log_every=0", "train.log_every = 0: must be at least 1"),
        ("train.eval_every=0", "train.eval_every = 0: must be at least 1"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps = 0: must be at least 1"),
        ("train.batch_size=0", "train.batch_size = 0: must be at least 1"),
        ("train.max_steps=0", "train.max_steps = 0: must be at least 1"),
        ("optim.lr=-1e-3", "optim.lr = -0.001: must be a finite number > 0"),
        ("schedule.min_lr=0.5", "schedule.min_lr = 0.5: must not exceed optim.lr = 0.001"),
    ];
    for (i, (cmd, what, text)) in recipe_configs(&d).into_iter().enumerate() {
        let cfg = d.join(format!("{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let run = d.join(format!("run-{i}"));
        for (set, needle) in cases {
            let out = train(cmd, &cfg, &run, &["--set", set]);
            let err = fails_once(out, &[needle, &format!("--set {set}")]);
            assert!(!run.join("config.toml").exists(), "{what}, {set}: a run dir was written ({err})");
        }
    }
}

/// A value read from the file is pointed at by its line.
#[test]
fn a_bad_value_in_the_file_names_its_line() {
    let d = scratch("bad-line");
    let (cmd, _, text) = recipe_configs(&d).swap_remove(3);
    let cfg = d.join("sft.toml");
    std::fs::write(&cfg, text.replace("log_every = 1", "log_every = 0")).unwrap();
    let line = std::fs::read_to_string(&cfg).unwrap().lines().position(|l| l == "log_every = 0").unwrap() + 1;
    fails_once(train(cmd, &cfg, &d.join("run"), &[]), &[&format!("sft.toml:{line}: train.log_every = 0")]);
}
