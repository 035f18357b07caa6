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
    let cases: [(&str, &str); 12] = [
        ("train.log_every=0", "train.log_every = 0: must be at least 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints = 0: must be at least 1"),
        ("train.eval_every=0", "train.eval_every = 0: must be at least 1"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps = 0: must be at least 1"),
        ("train.batch_size=0", "train.batch_size = 0: must be at least 1"),
        ("train.max_steps=0", "train.max_steps = 0: must be at least 1"),
        ("optim.lr=-1e-3", "optim.lr = -0.001: must be a finite number > 0"),
        ("schedule.min_lr=0.5", "schedule.min_lr = 0.5: must not exceed optim.lr = 0.001"),
        (
            "train.activation_checkpointing=0",
            "train.activation_checkpointing: expected \"none\", \"blocks\" or a number of blocks N >= 1, found 0",
        ),
        ("train.activation_checkpointing=\"all\"", "found \"all\""),
        ("train.precision=\"fp8\"", "train.precision: unknown variant `fp8`, expected one of `f32`, `bf16`, `f16`"),
        ("train.initial_loss_scale=0", "train.initial_loss_scale = 0: must be a finite number > 0"),
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

/// One `taper CMD --config CFG --set ...` case: the `--set` values and what the error must say.
type SetCase = (&'static str, &'static [&'static str]);

/// Runs each case of a recipe's config (index into [`recipe_configs`]); every one must end with
/// one error line holding its needles, before a run dir is written. Returns how many ran.
fn config_cases(tag: &str, recipe: usize, cases: &[SetCase]) -> usize {
    let d = scratch(tag);
    let (cmd, what, text) = recipe_configs(&d).swap_remove(recipe);
    let cfg = d.join("run.toml");
    std::fs::write(&cfg, text).unwrap();
    for (set, needles) in cases {
        let mut args = Vec::new();
        for s in set.split(' ') {
            args.extend(["--set", s]);
        }
        let run = d.join("run");
        let err = fails_once(train(cmd, &cfg, &run, &args), needles);
        assert!(!run.join("config.toml").exists(), "{what} {set}: a run dir was written ({err})");
    }
    cases.len()
}

/// Numbers out of range, NaN and infinities, wrong types and unknown keys in the loop's own
/// sections, refused the same way for a from-scratch and a fine-tuning recipe.
#[test]
fn loop_settings_out_of_range_nan_or_mistyped() {
    let cases: &[SetCase] = &[
        ("optim.lr=nan", &["optim.lr = NaN: must be a finite number > 0"]),
        ("optim.lr=inf", &["optim.lr = inf: must be a finite number > 0"]),
        ("optim.eps=0", &["optim.eps = 0: must be a finite number > 0"]),
        ("optim.beta1=1", &["optim.beta1 = 1: must be in [0, 1)"]),
        ("optim.beta2=-0.1", &["optim.beta2 = -0.1: must be in [0, 1)"]),
        ("optim.weight_decay=-1", &["optim.weight_decay = -1: must be a finite number >= 0"]),
        ("optim.name=\"adam\"", &["optim.name", "unknown variant `adam`"]),
        ("train.grad_clip=-1", &["train.grad_clip = -1: must be a finite number >= 0"]),
        ("train.keep_checkpoints=0", &["train.keep_checkpoints = 0: must be at least 1"]),
        ("train.max_skipped_fraction=1.5", &["train.max_skipped_fraction = 1.5: must be in [0, 1]"]),
        ("train.on_nonfinite=\"ignore\"", &["train.on_nonfinite", "unknown variant `ignore`"]),
        ("train.max_steps=-3", &["--set train.max_steps=-3", "train.max_steps"]),
        ("train.batch_size=\"big\"", &["train.batch_size", "invalid type"]),
        ("train.max_step=10", &["unknown field `max_step`"]),
        ("schedule.warmup_steps=10", &["schedule.warmup_steps = 10: must be within the run"]),
        ("schedule.decay=\"cos\"", &["schedule.decay", "unknown variant `cos`"]),
        ("schedule.wsd_decay_fraction=2", &["schedule.wsd_decay_fraction = 2: must be in [0, 1]"]),
        ("schedule.min_lr=-1e-4", &["schedule.min_lr = -0.0001: must be a finite number >= 0"]),
        ("device=\"gpu\"", &["device = \"gpu\": expected \"auto\", \"cpu\", \"cuda:N\" or \"metal\""]),
        ("seed=-1", &["seed"]),
        ("log.sample_tokens=0", &["log.sample_tokens = 0: must be at least 1"]),
        ("log.tensorboard=\"yes\"", &["log.tensorboard", "invalid type"]),
        ("log.histogram_every=5", &["unknown field `histogram_every`"]),
    ];
    let n = config_cases("loop-clm", 0, cases) + config_cases("loop-sft", 3, cases);
    assert_eq!(n, 46);
}

/// Each recipe's own keys.
#[test]
fn recipe_settings_out_of_range() {
    let mut n = 0;
    n += config_cases(
        "clm",
        0,
        &[
            ("model.n_head=3", &["model.n_embd = 16 is not divisible by model.n_head = 3"]),
            ("model.dropout=1", &["model.dropout = 1 must be in [0, 1)"]),
            ("model.init_std=nan", &["model.init_std = NaN: must be a finite number > 0"]),
            ("model.n_layer=0", &["model.n_layer must be > 0"]),
            ("data.val_fraction=0", &["data.val_fraction = 0: must be in (0, 1)"]),
            ("data.dataset=\"shakespeare\"", &["not a built-in dataset (known: tinyshakespeare)"]),
            ("train.eval_batches=0", &["train.eval_batches = 0: must be at least 1"]),
            ("objective=\"mlm\"", &["objective = \"mlm\" needs model.kind = \"encoder\""]),
        ],
    );
    n += config_cases(
        "mlm",
        1,
        &[
            ("mlm_probability=1.5", &["mlm_probability = 1.5: must be in (0, 1)"]),
            ("data.special_tokens=[\"<|endoftext|>\"]", &["needs a mask token", "[MASK]"]),
            ("model.mlp=\"swiglu\"", &["an encoder takes \"gelu\", \"gelu_tanh\" or \"relu\""]),
        ],
    );
    n += config_cases(
        "s2s",
        2,
        &[
            ("seq2seq.label_smoothing=1", &["seq2seq.label_smoothing = 1: must be in [0, 1)"]),
            ("seq2seq.overflow=\"cut\"", &["seq2seq.overflow = \"cut\": expected \"truncate\" or \"drop\""]),
            ("seq2seq.max_source_len=99", &["seq2seq.max_source_len = 99: exceeds model.block_size = 16"]),
        ],
    );
    n += config_cases(
        "sft",
        3,
        &[
            ("init=\"\"", &["init: name the model to fine-tune"]),
            ("data.train=[]", &["data.train: give one or more JSONL files"]),
            ("data.on_bad_record=\"warn\"", &["data.on_bad_record = \"warn\": expected \"stop\" or \"skip\""]),
            ("lora.r=0", &["lora.r must be > 0"]),
            ("lora.alpha=nan lora.r=4", &["lora.alpha = NaN: must be a finite number > 0"]),
            ("lora.target_modules=[\"zz\"] lora.r=4", &["lora", "zz"]),
        ],
    );
    n += config_cases(
        "rm",
        4,
        &[
            ("rm.center_coef=-1", &["rm.center_coef = -1: must be a finite number >= 0"]),
            ("data.overflow=\"cut\"", &["data.overflow = \"cut\": expected \"truncate\" or \"drop\""]),
        ],
    );
    n += config_cases(
        "dpo",
        5,
        &[
            ("dpo.beta=0", &["dpo.beta = 0: must be a finite number > 0"]),
            ("dpo.rpo_alpha=-1", &["dpo.rpo_alpha = -1: must be a finite number >= 0"]),
            ("dpo.loss={kind=\"sigmoid\",label_smoothing=1.0}", &["dpo.loss.label_smoothing = 1: must be in [0, 1)"]),
            ("dpo.loss={kind=\"simpo\"} dpo.precompute_ref=true", &["dpo.precompute_ref: SimPO uses no reference"]),
        ],
    );
    n += config_cases(
        "ppo",
        6,
        &[
            ("ppo.gamma=2", &["ppo.gamma = 2: must be in [0, 1]"]),
            ("ppo.clip_eps=0", &["ppo.clip_eps = 0: must be a finite number > 0"]),
            ("ppo.minibatches=2", &["ppo.minibatches = 2: replaced by train.batch_size", "train.batch_size = 2"]),
            ("train.batch_size=3", &["train.batch_size = 3", "4 rollouts per step"]),
            ("train.eval_batches=5", &["train.eval_batches = 5: ppo evaluates every prompt of data.eval"]),
            ("rollout.temperature=0", &["rollout.temperature = 0: must be a finite number > 0"]),
            ("rollout.top_p=0", &["rollout.top_p = 0: must be in (0, 1]"]),
            ("reward={kind=\"regex\",pattern=\"(\"}", &["reward.pattern = \"(\": not a regular expression"]),
            ("reward={kind=\"length\",target=0}", &["reward.target = 0: must be at least 1"]),
        ],
    );
    n += config_cases(
        "grpo",
        7,
        &[
            ("grpo.group_size=1", &["grpo.group_size = 1: must be at least 2"]),
            ("grpo.normalize=\"batch\"", &["grpo.normalize = \"batch\": expected \"token\" or \"sequence\""]),
            ("grpo.beta=-0.1", &["grpo.beta = -0.1: must be a finite number >= 0"]),
            ("rollout.max_new_tokens=0", &["rollout.max_new_tokens = 0: must be at least 1"]),
        ],
    );
    assert_eq!(n, 39);
}

/// Command-line flags out of range: one line naming the flag, exit code 1, nothing run.
#[test]
fn flags_out_of_range() {
    let d = scratch("flags");
    let m = d.join("no-model");
    let m = m.to_str().unwrap();
    for (run, text) in [("run1", "{\"step\": 1, \"loss\": 2.5}\n"), ("run2", "{\"step\": 1}\n{\"step\": 2,\n")] {
        std::fs::create_dir_all(d.join(run)).unwrap();
        std::fs::write(d.join(run).join("metrics.jsonl"), text).unwrap();
    }
    let cases: &[(&[&str], &[&str])] = &[
        (&["generate", "--model", m, "--temperature", "-1"], &["--temperature", "must be >= 0"]),
        (&["generate", "--model", m, "--temperature", "nan"], &["--temperature", "must be a finite number"]),
        (&["generate", "--model", m, "--top-p", "0"], &["--top-p", "must be in (0, 1]"]),
        (&["generate", "--model", m, "--top-p", "1.5"], &["--top-p", "must be in (0, 1]"]),
        (&["generate", "--model", m, "--beams", "0"], &["--beams", "must be at least 1"]),
        (&["generate", "--model", m, "--max-tokens", "0"], &["--max-tokens", "must be at least 1"]),
        (&["generate", "--model", m, "--length-penalty", "inf"], &["--length-penalty", "must be a finite number"]),
        (&["sample", "--model", m, "--prompts", "p.jsonl", "--out", "o.jsonl", "--n", "0"], &["--n", "at least 1"]),
        (&["sample", "--model", m, "--prompts", "p.jsonl", "--out", "o", "--temperature", "nan"], &["--temperature"]),
        (&["sample", "--model", m, "--prompts", "p.jsonl", "--out", "o", "--top-p", "2"], &["--top-p", "(0, 1]"]),
        (&["sample", "--model", m, "--prompts", "p", "--out", "o", "--max-new-tokens", "0"], &["--max-new-tokens"]),
        (
            &["prepare", "--tokenizer", "t.json", "--out", "o", "--val-fraction", "1.5", "x.txt"],
            &["--val-fraction", "(0, 1)"],
        ),
        (
            &["prepare", "--tokenizer", "t.json", "--out", "o", "--val-fraction", "0", "x.txt"],
            &["--val-fraction", "(0, 1)"],
        ),
        (&["tokenizer", "train", "--vocab-size", "0", "--out", "t.json", "x.txt"], &["--vocab-size", "at least 1"]),
        (&["eval", "--model", m, "--data", "x.jsonl", "--max-new-tokens", "0"], &["--max-new-tokens", "at least 1"]),
        (&["bench", "--config", "x.toml", "--steps", "0"], &["--steps", "at least 1"]),
        (&["pretrain", "--config", "x.toml", "--resume", "--overwrite"], &["--overwrite", "--resume"]),
        (
            &["sft", "--config", "x.toml", "--allow-config-change"],
            &["required arguments were not provided", "--resume"],
        ),
        (&["export", m, "--format", "onnx", "--out", "o"], &["--format", "onnx"]),
        (&["plot", "nowhere", "--out", "x.png"], &["nowhere/metrics.jsonl"]),
        (&["plot", "run1", "--out", "x.png", "--metric", "lost"], &["no run logged the metric \"lost\""]),
        (&["plot", "run1", "--out", "x.jpg"], &["'.jpg'", ".png or .svg"]),
        (&["plot", "run1", "--out", "x.png", "--x", "time"], &["--x", "time"]),
        (&["plot", "run2", "--out", "x.png"], &["run2/metrics.jsonl:2: not JSON"]),
        (&["generate"], &["--model"]),
    ];
    for (args, needles) in cases {
        let out = taper().current_dir(&d).args(*args).output().unwrap();
        fails_once(out, needles);
    }
}

/// A tiny character-level pretraining config with the chat tokens, checkpoints every 2 steps.
fn tiny_config(d: &Path, max_steps: u64) -> std::path::PathBuf {
    let cfg = d.join(format!("tiny-{max_steps}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "seed = 7\ndevice = \"cpu\"\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n\
             pos_emb = \"rope\"\nnorm = \"rms_norm\"\nmlp = \"swiglu\"\n[data]\ndataset = \"tinyshakespeare\"\n\
             special_tokens = [\"<|endoftext|>\", \"<|im_start|>\", \"<|im_end|>\"]\n[train]\nmax_steps = {max_steps}\n\
             batch_size = 2\nlog_every = 1\neval_every = 2\neval_batches = 1\ncheckpoint_every = 2\n\
             keep_checkpoints = 10\n[optim]\nlr = 3e-3\n"
        ),
    )
    .unwrap();
    cfg
}

/// A config `name` for a recipe that starts from `init` and trains on `train` through the ChatML
/// template, with `rest` (more TOML sections) after it.
fn chat_config(d: &Path, name: &str, init: &Path, train: &Path, rest: &str) -> std::path::PathBuf {
    let cfg = d.join(name);
    std::fs::write(
        &cfg,
        format!("device = \"cpu\"\ninit = {init:?}\n[data]\ntrain = [{train:?}]\nchat_template = \"chatml\"\n{rest}"),
    )
    .unwrap();
    cfg
}

/// Every file under `dir` (but the lock) and its bytes, by relative path.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if e.file_name() != ".lock" {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = Default::default();
    walk(dir, dir, &mut out);
    out
}

/// The one folder under `parent` whose name starts with `prefix`.
fn only_dir(parent: &Path, prefix: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "{prefix} under {}: {found:?}", parent.display());
    found[0].clone()
}

/// A run dir that holds a run is not started over by accident; `--overwrite` moves the old run
/// aside, byte for byte, before the new one starts.
#[test]
fn a_new_run_over_an_old_one_needs_overwrite_and_moves_it_aside() {
    let d = scratch("over");
    let (cfg, run) = (tiny_config(&d, 4), d.join("run"));
    ok(train("pretrain", &cfg, &run, &[]));
    let before = snapshot(&run);
    fails_once(train("pretrain", &cfg, &run, &[]), &["already holds a run (checkpoints up to step 4)", "--overwrite"]);
    fails_once(train("pretrain", &cfg, &run, &["--set", "train.max_steps=2"]), &["already holds a run", "--resume"]);
    assert!(snapshot(&run) == before, "a refused run changed the run dir");
    let out = ok(train("pretrain", &cfg, &run, &["--overwrite", "--set", "train.max_steps=2"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("moved the old run to"));
    assert!(snapshot(&only_dir(&d, "run.overwritten-")) == before, "the old run was not kept as it was");
    let now: Vec<String> = snapshot(&run).into_keys().filter(|k| k.starts_with("checkpoints/")).collect();
    assert!(now.iter().all(|k| k.starts_with("checkpoints/step_00000002/")), "{now:?}");
    // A dir that is a file is named as such.
    std::fs::write(d.join("file"), "x").unwrap();
    fails_once(train("pretrain", &cfg, &d.join("file"), &[]), &["is a file, not a directory"]);
}

/// Two runs on one run dir at once: the second stops at once, naming the first's pid; the first
/// goes on and can be resumed once it has ended.
#[test]
fn a_second_run_on_a_busy_run_dir_is_locked_out() {
    let d = scratch("lock");
    let (cfg, run) = (tiny_config(&d, 100_000), d.join("run"));
    let mut first = taper().arg("pretrain").arg("--config").arg(&cfg).arg("--run-dir").arg(&run).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !run.join("checkpoints/step_00000002/trainer_state.json").exists() {
        assert!(t0.elapsed().as_secs() < 120, "the first run wrote no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = first.id().to_string();
    let err = fails_once(train("pretrain", &cfg, &run, &["--resume"]), &["is in use by another taper run", &pid]);
    fails_once(train("pretrain", &cfg, &run, &["--overwrite"]), &["is in use by another taper run", &pid]);
    assert!(first.try_wait().unwrap().is_none(), "the first run stopped ({err})");
    first.kill().unwrap();
    first.wait().unwrap();
    let moved =
        std::fs::read_dir(&d).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains("overwritten"));
    assert!(!moved, "a refused --overwrite moved the running run");
    ok(train("pretrain", &cfg, &run, &["--resume", "--set", "train.stop_at_step=4"]));
}

/// Resuming from a checkpoint older than the run's newest keeps the newer ones (and the metrics
/// as they were) in a branch folder; rotation then deletes only the resumed run's own.
#[test]
fn resuming_an_older_checkpoint_keeps_the_newer_ones() {
    let d = scratch("branch");
    let (cfg, run) = (tiny_config(&d, 6), d.join("run"));
    ok(train("pretrain", &cfg, &run, &["--set", "train.keep_checkpoints=3"]));
    let before = snapshot(&run);
    let older = run.join("checkpoints/step_00000002");
    let out =
        ok(train("pretrain", &cfg, &run, &["--resume", older.to_str().unwrap(), "--set", "train.keep_checkpoints=2"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("moved the checkpoints newer than the resumed one"));
    let branch = only_dir(&run.join("branches"), "20");
    let kept = snapshot(&branch);
    for step in ["step_00000004", "step_00000006"] {
        for (k, v) in before.iter().filter(|(k, _)| k.contains(step)) {
            assert!(kept.get(k) == Some(v), "{k} not kept as it was");
        }
    }
    assert!(kept.get("metrics.jsonl") == before.get("metrics.jsonl"), "the metrics were not kept");
    // Rotation kept the resumed run's newest two and left the branch alone.
    let steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step_")?.parse().ok())
        .collect();
    let mut steps = steps;
    steps.sort();
    assert_eq!(steps, [4, 6]);
    assert!(snapshot(&branch) == kept);
}

/// What `--resume` refuses: a changed batch or data (listing the keys, old and new), another
/// recipe's checkpoint, an incomplete newest checkpoint; `--allow-config-change` lets a change
/// through and records it, never a change of the model.
#[test]
fn resume_says_what_changed() {
    let d = scratch("resume");
    let (cfg, run) = (tiny_config(&d, 4), d.join("run"));
    ok(train("pretrain", &cfg, &run, &["--set", "train.stop_at_step=2"]));
    let before = snapshot(&run);
    fails_once(
        train("pretrain", &cfg, &run, &["--resume", "--set", "train.batch_size=3"]),
        &["differs from the checkpoint's in what it trains: train.batch_size: 2 -> 3", "--allow-config-change"],
    );
    fails_once(
        train("pretrain", &cfg, &run, &["--resume", "--set", "seed=8", "--set", "data.val_fraction=0.2"]),
        &["data.val_fraction: 0.1 -> 0.2", "seed: 7 -> 8"],
    );
    fails_once(
        train("pretrain", &cfg, &run, &["--resume", "--allow-config-change", "--set", "model.n_embd=32"]),
        &["cannot change the model", "model.n_embd: 16 -> 32"],
    );
    let sft = d.join("sft.toml");
    let data = root().join("data/sft-words/train.jsonl");
    std::fs::write(&sft, format!("device = \"cpu\"\ninit = {:?}\n[data]\ntrain = [{data:?}]\n", d.join("base")))
        .unwrap();
    fails_once(
        train("sft", &sft, &run, &["--resume"]),
        &["saved by `taper pretrain`, and this is `taper sft`", "init"],
    );
    // A bad value given on resume is refused before config.toml is rewritten, so the next plain
    // --resume still reads the good one.
    fails_once(
        train("pretrain", &cfg, &run, &["--resume", "--set", "train.log_every=0"]),
        &["train.log_every = 0: must be at least 1"],
    );
    assert!(snapshot(&run) == before, "a refused resume changed the run dir");
    let out = ok(train("pretrain", &cfg, &run, &["--resume", "--allow-config-change", "--set", "train.batch_size=3"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config changed on resume (recorded): train.batch_size: 2 -> 3")
    );
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"config_change\":[\"train.batch_size: 2 -> 3\"]"), "{log}");
    let state = std::fs::read_to_string(run.join("checkpoints/step_00000004/trainer_state.json")).unwrap();
    assert!(state.contains("\"config_changes\"") && state.contains("train.batch_size: 2 -> 3"), "{state}");
    // An incomplete newest checkpoint is named, with the one to go on from.
    std::fs::remove_file(run.join("checkpoints/step_00000004/trainer_state.json")).unwrap();
    fails_once(
        train("pretrain", &cfg, &run, &["--resume", "--set", "train.batch_size=3"]),
        &["step_00000004: has no trainer_state.json", "--resume", "step_00000002"],
    );
    fails_once(taper().arg("info").arg(&run).output().unwrap(), &["step_00000004: has no trainer_state.json"]);
}

/// Missing, empty, malformed or wrong-kind inputs of every command: one line naming the file
/// (and line) or the source, and what is wrong with it.
#[test]
fn missing_empty_or_malformed_inputs() {
    let d = scratch("inputs");
    let base = d.join("base");
    ok(train("pretrain", &tiny_config(&d, 2), &base, &[]));
    let (empty, bad_json, cfg_dir) = (d.join("empty.txt"), d.join("bad.jsonl"), d.join("cfg-dir"));
    std::fs::write(&empty, "").unwrap();
    std::fs::write(&bad_json, "{\"text\": \"fine\"}\n{not json}\n").unwrap();
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let broken_toml = d.join("broken.toml");
    std::fs::write(&broken_toml, "[train]\nmax_steps = 4\nbatch_size = \n").unwrap();
    let tok = base.join("data/tokenizer.json");
    let bert = root().join("crates/taper-model/tests/fixtures/hf/bert");
    let sft_data = root().join("data/sft-words/train.jsonl");
    let sft_on = |init: &Path| {
        let p = d.join(format!("sft-{}.toml", init.file_name().unwrap().to_string_lossy()));
        std::fs::write(&p, format!("device = \"cpu\"\ninit = {init:?}\n[data]\ntrain = [{sft_data:?}]\n")).unwrap();
        p
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (base_s, empty_s, bad_s, tok_s) = (s(&base), s(&empty), s(&bad_json), s(&tok));
    let missing = s(&d.join("missing.jsonl"));
    let missing_model = s(&d.join("no-model"));
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (vec!["pretrain".into(), "--config".into(), s(&d.join("none.toml"))], vec!["none.toml".into()]),
        (vec!["pretrain".into(), "--config".into(), s(&cfg_dir)], vec!["cfg-dir".into()]),
        (vec!["pretrain".into(), "--config".into(), s(&broken_toml)], vec!["broken.toml:3".into()]),
        (
            vec![
                "tokenizer".into(),
                "train".into(),
                "--kind".into(),
                "char".into(),
                "--out".into(),
                s(&d.join("t.json")),
                empty_s.clone(),
            ],
            vec!["empty.txt: empty, nothing to train a tokenizer on".into()],
        ),
        (
            vec!["tokenizer".into(), "train".into(), "--out".into(), s(&d.join("t.json")), missing.clone()],
            vec!["missing.jsonl: no such file".into()],
        ),
        (
            vec![
                "prepare".into(),
                "--tokenizer".into(),
                tok_s.clone(),
                "--out".into(),
                s(&d.join("p")),
                empty_s.clone(),
            ],
            vec!["empty.txt: no text to prepare".into()],
        ),
        (
            vec!["prepare".into(), "--tokenizer".into(), tok_s.clone(), "--out".into(), s(&d.join("p")), bad_s.clone()],
            vec!["bad.jsonl:2: not valid JSON".into()],
        ),
        (
            vec![
                "prepare".into(),
                "--tokenizer".into(),
                s(&d.join("no-tok.json")),
                "--out".into(),
                s(&d.join("p")),
                bad_s.clone(),
            ],
            vec!["no-tok.json".into(), "file not found".into()],
        ),
        (
            vec!["eval".into(), "--model".into(), base_s.clone(), "--data".into(), s(&d.join("none.jsonl"))],
            vec!["none.jsonl".into()],
        ),
        (
            vec![
                "score".into(),
                "--model".into(),
                base_s.clone(),
                "--input".into(),
                bad_s.clone(),
                "--out".into(),
                s(&d.join("o")),
            ],
            vec!["bad.jsonl:2: not valid JSON".into()],
        ),
        (
            vec![
                "score".into(),
                "--model".into(),
                base_s.clone(),
                "--input".into(),
                missing.clone(),
                "--out".into(),
                s(&d.join("o")),
            ],
            vec!["missing.jsonl".into()],
        ),
        (
            vec![
                "sample".into(),
                "--model".into(),
                base_s.clone(),
                "--prompts".into(),
                missing.clone(),
                "--out".into(),
                s(&d.join("o")),
            ],
            vec!["missing.jsonl".into()],
        ),
        (vec!["info".into(), missing_model.clone()], vec!["no-model".into(), "no such directory".into()]),
        (vec!["generate".into(), "--model".into(), missing_model.clone()], vec!["no-model".into()]),
        (
            vec![
                "export".into(),
                missing_model.clone(),
                "--format".into(),
                "hf".into(),
                "--out".into(),
                s(&d.join("e")),
            ],
            vec!["no-model".into()],
        ),
        (
            vec!["generate".into(), "--model".into(), base_s.clone(), "--prompt".into(), "ROMEO€".into()],
            vec!["--prompt".into(), "does not know: '€' (U+20AC)".into()],
        ),
        (
            vec!["generate".into(), "--model".into(), base_s.clone(), "--prompt".into(), "".into()],
            vec!["the prompt is empty".into()],
        ),
        (
            vec!["sft".into(), "--config".into(), s(&sft_on(&d.join("no-base"))), "--run-dir".into(), s(&d.join("r1"))],
            vec!["no-base".into(), "no such directory".into()],
        ),
        (
            vec!["sft".into(), "--config".into(), s(&sft_on(&bert)), "--run-dir".into(), s(&d.join("r2"))],
            vec!["the model is an encoder (BERT-style masked LM), but this needs a decoder".into()],
        ),
        (
            vec!["export".into(), s(&bert), "--format".into(), "gguf".into(), "--out".into(), s(&d.join("g"))],
            vec!["GGUF export is for decoder LMs".into()],
        ),
    ];
    for (args, needles) in &cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        fails_once(taper().current_dir(&d).args(args).output().unwrap(), &needles);
    }
    // A hub model that cannot be had is called a model, with the reason.
    let hub = taper()
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", d.join("hf-home"))
        .args(["info", "hf://someorg/no-such-model"])
        .output()
        .unwrap();
    let err = fails_once(hub, &["model hf://someorg/no-such-model@main", "not in the HF cache"]);
    assert!(!err.contains("dataset"), "{err}");
    // An empty evaluation set and an empty text to score are named, not reported as loss 0.
    let blank = d.join("blank.jsonl");
    std::fs::write(&blank, "\n\n").unwrap();
    fails_once(
        taper().args(["eval", "--model", &base_s, "--data", blank.to_str().unwrap()]).output().unwrap(),
        &["blank.jsonl: no examples to evaluate"],
    );
    let texts = d.join("texts.jsonl");
    std::fs::write(&texts, "{\"text\": \"To be\"}\n{\"text\": \"\"}\n").unwrap();
    fails_once(
        taper()
            .args(["score", "--model", &base_s, "--input", texts.to_str().unwrap(), "--out"])
            .arg(d.join("o"))
            .output()
            .unwrap(),
        &["texts.jsonl:2: the text is empty"],
    );
    // Output into a pipe closed early ends quietly.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{:?} info {:?} | head -1", env!("CARGO_BIN_EXE_taper"), base))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// A cache computed from other inputs is recomputed, not reused: DPO's reference log-probs
/// copied in from a run on other pairs give way, and the first loss is ln 2 (policy = reference).
#[test]
fn a_stale_reference_cache_is_recomputed() {
    let d = scratch("dpo-cache");
    let base = d.join("base");
    // Pairs need a longer context than the tiny model's.
    ok(train("pretrain", &tiny_config(&d, 2), &base, &["--set", "model.block_size=96"]));
    let pairs: Vec<String> = std::fs::read_to_string(root().join("data/pref-words/train.jsonl"))
        .unwrap()
        .lines()
        .take(8)
        .map(String::from)
        .collect();
    let (a, b) = (d.join("a.jsonl"), d.join("b.jsonl"));
    std::fs::write(&a, pairs[..4].join("\n") + "\n").unwrap();
    std::fs::write(&b, pairs[4..].join("\n") + "\n").unwrap();
    let cfg = |train: &Path| {
        let p = d.join(format!("dpo-{}.toml", train.file_stem().unwrap().to_string_lossy()));
        std::fs::write(
            &p,
            format!(
                "seed = 3\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{train:?}]\nchat_template = \"chatml\"\n\
                 [dpo]\nprecompute_ref = true\n[train]\nmax_steps = 1\nbatch_size = 4\n[optim]\nlr = 1e-3\n"
            ),
        )
        .unwrap();
        p
    };
    let first_loss = |run: &Path| metrics(run).iter().find_map(|m| m["loss"].as_f64()).unwrap();
    let (run_a, run_b) = (d.join("run-a"), d.join("run-b"));
    ok(train("dpo", &cfg(&a), &run_a, &[]));
    assert!((first_loss(&run_a) - std::f64::consts::LN_2).abs() < 1e-5, "{}", first_loss(&run_a));
    std::fs::create_dir_all(&run_b).unwrap();
    for f in ["ref_logps.safetensors", "ref_logps.key"] {
        std::fs::copy(run_a.join(f), run_b.join(f)).unwrap();
    }
    let out = ok(train("dpo", &cfg(&b), &run_b, &[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("computed from other pairs"), "the stale cache was reused");
    assert!((first_loss(&run_b) - std::f64::consts::LN_2).abs() < 1e-5, "{}", first_loss(&run_b));
}

/// A chat-tuned checkpoint ends its turns where its template does: the end-of-turn token is its
/// end of sequence for taper, in the HF export's configs and in the GGUF export's metadata.
#[test]
fn chat_tuned_runs_stop_at_the_end_of_turn() {
    let d = scratch("eot");
    let base = d.join("base");
    ok(train("pretrain", &tiny_config(&d, 2), &base, &[]));
    let data = root().join("data/sft-words/train.jsonl");
    let cfg = chat_config(&d, "sft.toml", &base, &data, "[train]\nmax_steps = 1\nbatch_size = 2\n");
    let run = d.join("sft");
    ok(train("sft", &cfg, &run, &[]));
    let json = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let tok = json(&base.join("data/tokenizer.json"));
    let eot = tok["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<|im_end|>").unwrap()["id"]
        .as_u64()
        .unwrap();
    let ck = run.join("checkpoints/step_00000001");
    let tc = json(&ck.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(json(&ck.join("generation_config.json"))["eos_token_id"][0], eot);
    let hf = d.join("hf");
    ok(taper().arg("export").arg(&run).args(["--format", "hf", "--out"]).arg(&hf).output().unwrap());
    assert_eq!(json(&hf.join("generation_config.json"))["eos_token_id"][0], eot);
    assert_eq!(json(&hf.join("tokenizer_config.json"))["eos_token"], "<|im_end|>");
    let gg = d.join("gguf");
    ok(taper()
        .arg("export")
        .arg(&run)
        .args(["--format", "gguf", "--gguf-type", "f32", "--out"])
        .arg(&gg)
        .output()
        .unwrap());
    let file = taper_model::gguf::GgufFile::read(&gg.join("sft-f32.gguf")).unwrap();
    let eos = file.kvs.iter().find(|(k, _)| k == "tokenizer.ggml.eos_token_id").unwrap().1.as_u64();
    assert_eq!(eos, Some(eot));
}

/// `eval.tasks` names task files that exist, for every recipe that evaluates a decoder on
/// them; an encoder has no such evaluation.
#[test]
fn eval_tasks_must_exist_and_need_a_decoder() {
    let d = scratch("eval-tasks");
    let task = root().join("crates/taper-train/tests/fixtures/mc/tiny.jsonl");
    let gone = d.join("gone.jsonl");
    let configs = recipe_configs(&d);
    let run = d.join("run");
    for i in [0, 3, 5, 6, 7] {
        let (cmd, what, text) = &configs[i];
        let cfg = d.join(format!("{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let set = format!("eval.tasks=[{gone:?}]");
        let err = fails_once(
            train(cmd, &cfg, &run, &["--set", &set]),
            &[&format!("eval.tasks: {}: no such file", gone.display())],
        );
        assert!(!run.join("config.toml").exists(), "{what}: a run dir was written ({err})");
        // Two files of one stem would log under the same metric names.
        let other = d.join(format!("copy-{i}")).join("tiny.jsonl");
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::fs::copy(&task, &other).unwrap();
        let set = format!("eval.tasks=[{task:?}, {other:?}]");
        fails_once(train(cmd, &cfg, &run, &["--set", &set]), &["another task file has the stem \"tiny\""]);
    }
    let (cmd, _, text) = &configs[1];
    let cfg = d.join("mlm.toml");
    std::fs::write(&cfg, text).unwrap();
    let set = format!("eval.tasks=[{task:?}]");
    fails_once(
        train(cmd, &cfg, &run, &["--set", &set]),
        &["eval.tasks: multiple-choice tasks are scored by a decoder"],
    );
}

/// A LoRA run resumes only with its own adapter shape and data, and says which key differs; a
/// reward model names an empty text by its line instead of failing inside a tensor op.
#[test]
fn lora_resume_and_reward_model_inputs() {
    let d = scratch("lora-rm");
    let base = d.join("base");
    // Pairs need a longer context than the tiny model's.
    ok(train("pretrain", &tiny_config(&d, 2), &base, &["--set", "model.block_size=96"]));
    let (sft_data, pairs) = (root().join("data/sft-words/train.jsonl"), root().join("data/pref-words/train.jsonl"));
    let lora = "[lora]\nr = 4\n[train]\nmax_steps = 4\nstop_at_step = 2\nbatch_size = 2\n";
    let sft = chat_config(&d, "lora.toml", &base, &sft_data, lora);
    let run = d.join("lora");
    ok(train("sft", &sft, &run, &[]));
    let before = snapshot(&run);
    fails_once(
        train("sft", &sft, &run, &["--resume", "--set", "lora.r=8"]),
        &["lora.r: 4 -> 8", "--allow-config-change"],
    );
    fails_once(
        train("sft", &sft, &run, &["--resume", "--allow-config-change", "--set", "lora.r=8"]),
        &["cannot change the model or what it starts from", "lora.r: 4 -> 8"],
    );
    let set = format!("data.train=[{sft_data:?}, {sft_data:?}]");
    fails_once(train("sft", &sft, &run, &["--resume", "--set", &set]), &["data.train: [", "--allow-config-change"]);
    assert!(snapshot(&run) == before, "a refused resume changed the run dir");
    ok(train("sft", &sft, &run, &["--resume"]));

    let rm_cfg = chat_config(&d, "rm.toml", &base, &pairs, "[train]\nmax_steps = 1\nbatch_size = 2\n");
    let rm = d.join("rm");
    ok(train("rm", &rm_cfg, &rm, &[]));
    let texts = d.join("texts.jsonl");
    std::fs::write(&texts, "{\"text\": \"a b c\"}\n{\"text\": \"\"}\n").unwrap();
    let out = taper()
        .arg("score")
        .arg("--model")
        .arg(&rm)
        .arg("--input")
        .arg(&texts)
        .arg("--out")
        .arg(d.join("o"))
        .output()
        .unwrap();
    let err = fails_once(out, &["texts.jsonl:2: the text is empty"]);
    assert!(!err.contains("narrow"), "{err}");
}
