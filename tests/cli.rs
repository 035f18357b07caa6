//! End-to-end tests through the real `taper` binary: a tiny pretraining run, bit-exact resume
//! (clean stop, SIGKILL mid-run, SIGKILL mid-checkpoint), generation, and bad input.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TINY: &str = r#"
seed = 7
device = "cpu"
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
dropout = 0.1
[data]
dataset = "tinyshakespeare"
tokenizer = "char"
[train]
max_steps = 8
batch_size = 4
grad_accum_steps = 2
log_every = 1
eval_every = 4
eval_batches = 2
checkpoint_every = 2
keep_checkpoints = 10
[optim]
lr = 3e-3
weight_decay = 0.1
[schedule]
warmup_steps = 2
min_lr = 3e-4
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn pretrain(cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    taper().arg("pretrain").arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
}

fn final_weights(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step_{step:08}/model.safetensors"))).unwrap()
}

fn optimizer_state(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step_{step:08}/optimizer.safetensors"))).unwrap()
}

#[test]
fn tiny_run_then_info_and_generate() {
    let d = scratch("e2e");
    let cfg = write_config(&d, TINY);
    let run = d.join("run");
    let out = ok(pretrain(&cfg, &run, &[]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: step 8"));
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("vocab_size = 66"), "vocab resolved from the tokenizer: {resolved}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8);
    for k in ["step", "loss", "lr", "tokens_per_sec"] {
        assert!(lines.iter().all(|l| l.get(k).is_some()), "{k} missing");
    }
    assert!(lines[3]["val_loss"].as_f64().is_some() && lines[7]["val_loss"].as_f64().is_some());
    assert!(lines[7]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap());

    let info = ok(taper().arg("info").arg(&run).output().unwrap());
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("step            8") && info.contains("vocab 66"), "{info}");

    let gen = |seed: &str| {
        let out = ok(taper()
            .args(["generate", "--model"])
            .arg(&run)
            .args(["--prompt", "ROMEO:", "--max-tokens", "40", "--seed", seed])
            .output()
            .unwrap());
        String::from_utf8(out.stdout).unwrap()
    };
    let a = gen("1");
    // An 8-step model may well sample the end-of-text token early, which ends generation.
    assert!(a.starts_with("ROMEO:") && a.ends_with('\n'), "{a:?}");
    assert_eq!(a, gen("1"), "generation is seeded");
}

#[test]
fn resume_is_bit_exact_after_a_clean_stop() {
    let d = scratch("resume");
    let cfg = write_config(&d, TINY);
    let straight = d.join("straight");
    ok(pretrain(&cfg, &straight, &[]));
    let split = d.join("split");
    ok(pretrain(&cfg, &split, &["--set", "train.stop_at_step=4"]));
    assert!(split.join("checkpoints/step_00000004").exists());
    assert!(!split.join("checkpoints/step_00000006").exists());
    ok(pretrain(&cfg, &split, &["--resume"]));
    assert_eq!(losses(&straight), losses(&split), "loss at every step");
    assert_eq!(final_weights(&straight, 8), final_weights(&split, 8), "final weights, bit for bit");
    assert_eq!(optimizer_state(&straight, 8), optimizer_state(&split, 8));
}

/// Activation checkpointing trades memory for compute and nothing else: every block or every
/// other one recomputed, the losses and final weights are those of the plain run, bit for bit
/// (dropout on); and it may be switched on at a resume, which still ends where the plain run
/// does.
#[test]
fn activation_checkpointing_changes_nothing_trained() {
    let d = scratch("ac");
    let cfg = write_config(&d, TINY);
    let plain = d.join("plain");
    ok(pretrain(&cfg, &plain, &[]));
    for which in ["\"blocks\"", "2"] {
        let run = d.join(format!("ac-{}", which.trim_matches('"')));
        ok(pretrain(&cfg, &run, &["--set", &format!("train.activation_checkpointing={which}")]));
        assert_eq!(losses(&plain), losses(&run), "{which}: loss at every step");
        assert_eq!(final_weights(&plain, 8), final_weights(&run, 8), "{which}: final weights");
    }
    let split = d.join("split");
    ok(pretrain(&cfg, &split, &["--set", "train.stop_at_step=4"]));
    let out = ok(pretrain(&cfg, &split, &["--resume", "--set", "train.activation_checkpointing=\"blocks\""]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("allow-config-change"), "{said}");
    assert_eq!(losses(&plain), losses(&split));
    assert_eq!(final_weights(&plain, 8), final_weights(&split, 8));
}

/// `taper bench` splits a step's memory into weights, gradients, optimizer state and the rest
/// (activations); checkpointing every block keeps fewer activations, at a size where they
/// dominate (8 layers of (8, 256, 128) activations, about 15 MB each, against a 2 MB model).
#[test]
fn bench_splits_memory_and_checkpointing_shrinks_activations() {
    let d = scratch("bench-mem");
    let cfg = write_config(
        &d,
        r#"
seed = 1
device = "cpu"
[model]
vocab_size = 256
n_layer = 8
n_head = 4
n_embd = 128
block_size = 256
[data]
dataset = "tinyshakespeare"
[train]
batch_size = 8
"#,
    );
    let bench = |ac: &str| -> serde_json::Value {
        let set = format!("train.activation_checkpointing={ac}");
        let out = ok(taper()
            .args(["bench", "--steps", "1", "--warmup", "1", "--json", "--set", &set, "--config"])
            .arg(&cfg)
            .output()
            .unwrap());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (plain, blocks) = (bench("\"none\""), bench("\"blocks\""));
    let mb = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    let params = plain["params"].as_f64().unwrap();
    assert_eq!(mb(&plain, "weights_mb"), 4.0 * params / 1e6);
    assert_eq!(mb(&plain, "gradients_mb"), mb(&plain, "weights_mb"));
    // AdamW: two moments per parameter.
    assert_eq!(mb(&plain, "optimizer_state_mb"), 8.0 * params / 1e6);
    let (a, b) = (mb(&plain, "activations_mb"), mb(&blocks, "activations_mb"));
    assert!(a > 80.0, "activations {a} MB: eight layers' worth, at least");
    assert!(b < 0.6 * a, "checkpointed activations {b} MB against {a} MB");
}

/// bf16 and f16 runs (f32 master weights, low-precision GEMM operands) resume bit for bit, the
/// f16 loss scaler included, and train to within 0.01 of the f32 run's losses at this size.
#[test]
fn mixed_precision_resumes_bit_exact_and_tracks_f32() {
    let d = scratch("precision");
    let cfg = write_config(&d, TINY);
    let f32_run = d.join("f32");
    ok(pretrain(&cfg, &f32_run, &[]));
    for p in ["bf16", "f16"] {
        let set = format!("train.precision=\"{p}\"");
        // A loss scale under which no update overflows, on the fused and the composed paths
        // (the composed f16 products overflow sooner): every step updates, as in f32.
        let sets = ["--set", &set, "--set", "train.initial_loss_scale=256"];
        let straight = d.join(format!("{p}-straight"));
        ok(pretrain(&cfg, &straight, &sets));
        let split = d.join(format!("{p}-split"));
        let mut first = sets.to_vec();
        first.extend(["--set", "train.stop_at_step=4"]);
        ok(pretrain(&cfg, &split, &first));
        let mut second = sets.to_vec();
        second.push("--resume");
        ok(pretrain(&cfg, &split, &second));
        assert_eq!(losses(&straight), losses(&split), "{p}: loss at every step");
        assert_eq!(final_weights(&straight, 8), final_weights(&split, 8), "{p}: final weights");
        let (low, full) = (losses(&straight), losses(&f32_run));
        assert_ne!(low, full, "{p}: the low precision changed nothing");
        for ((s, a), (_, b)) in low.iter().zip(&full) {
            let (a, b) = (f64::from_bits(*a), f64::from_bits(*b));
            assert!((a - b).abs() < 0.01, "{p}: step {s}: loss {a} vs f32's {b}");
        }
    }
    // Precision changes what is trained: refused on resume without --allow-config-change.
    let err =
        fails_with(pretrain(&cfg, &f32_run, &["--resume", "--set", "train.precision=\"bf16\""]), &["train.precision"]);
    assert!(err.contains("allow-config-change"), "{err}");
}

/// f16 loss scaling: a scale too big for f16 overflows the gradients; those updates are
/// skipped (the weights stay: the same batch losses as no update), the scale halves until the
/// gradients fit, doubles after `loss_scale_growth_interval` good updates, and training goes
/// on. A resume in the middle carries the scaler's state: the same scales and losses after.
#[test]
fn f16_loss_scaling_skips_overflowing_updates_and_recovers() {
    let d = scratch("loss-scale");
    // 20 steps: the composed path (the device-generic pass) rounds the products too and needs
    // more halvings than the fused one before its gradients fit.
    let text = TINY.replace("max_steps = 8", "max_steps = 20");
    let cfg = write_config(&d, &text);
    let sets = [
        "--set",
        "train.precision=\"f16\"",
        "--set",
        "train.initial_loss_scale=16777216",
        "--set",
        "train.loss_scale_growth_interval=2",
    ];
    let run = d.join("run");
    let out = ok(pretrain(&cfg, &run, &sets));
    let said = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(
            "step 1: gradients overflowed f16 at loss scale 16777216; update skipped, loss scale now 8388608"
        ),
        "{said}"
    );
    let m = metrics(&run);
    let scale: Vec<f64> = m.iter().filter_map(|l| l["loss_scale"].as_f64()).collect();
    assert_eq!(scale.len(), 20, "a loss scale logged at every step");
    assert_eq!(scale[0], 8388608.0);
    // It came down to where updates go through, then grew again after two good ones.
    let low = scale.iter().cloned().fold(f64::MAX, f64::min);
    let after = scale.iter().position(|&s| s == low).unwrap();
    assert!(scale[after..].contains(&(2.0 * low)), "{scale:?}");
    let skipped = said.matches("update skipped").count();
    assert!((1..20).contains(&skipped), "{skipped} updates skipped of 20");
    let loss: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert!(loss.iter().all(|l| l.is_finite()) && loss[19] < loss[0] - 0.1, "{loss:?}");
    // Resumed at step 6: the scaler continues from its saved state.
    let split = d.join("split");
    let mut first = sets.to_vec();
    first.extend(["--set", "train.stop_at_step=6"]);
    ok(pretrain(&cfg, &split, &first));
    let mut second = sets.to_vec();
    second.push("--resume");
    ok(pretrain(&cfg, &split, &second));
    assert_eq!(losses(&run), losses(&split));
    let resumed: Vec<f64> = metrics(&split).iter().filter_map(|l| l["loss_scale"].as_f64()).collect();
    assert_eq!(resumed, scale);
    assert_eq!(final_weights(&run, 20), final_weights(&split, 20));
}

#[test]
fn resume_after_sigkill_mid_run_and_mid_checkpoint() {
    let d = scratch("kill");
    let text = TINY.replace("max_steps = 8", "max_steps = 40");
    let cfg = write_config(&d, &text);
    let straight = d.join("straight");
    ok(pretrain(&cfg, &straight, &[]));

    // SIGKILL at an arbitrary point of the run, once a checkpoint exists.
    let killed = d.join("killed");
    let mut child = taper()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&killed)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoints/step_00000006").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    ok(pretrain(&cfg, &killed, &["--resume"]));
    assert_eq!(losses(&straight), losses(&killed));
    assert_eq!(final_weights(&straight, 40), final_weights(&killed, 40));

    // SIGKILL half-way through writing the step-10 checkpoint: the half-written one is never
    // taken for complete, and the resume starts from step 8.
    let torn = d.join("torn");
    let out = taper()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&torn)
        .env("TAPER_FAULT_KILL_IN_CHECKPOINT", "10")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!torn.join("checkpoints/step_00000010").exists());
    let leftovers: Vec<_> = std::fs::read_dir(torn.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(leftovers.iter().any(|n| n.starts_with(".tmp-step_00000010")), "{leftovers:?}");
    let out = ok(pretrain(&cfg, &torn, &["--resume"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("step_00000008"));
    assert_eq!(losses(&straight), losses(&torn));
    assert_eq!(final_weights(&straight, 40), final_weights(&torn, 40));
}

#[test]
fn bad_input_gets_one_clear_line() {
    let d = scratch("bad");
    // A config typo, and a wrong type, reported together with their lines.
    let cfg = write_config(&d, &TINY.replace("max_steps = 8", "max_step = 8").replace("lr = 3e-3", "lr = \"fast\""));
    let err = fails_with(
        pretrain(&cfg, &d.join("r1"), &[]),
        &["run.toml:14: train.max_step: unknown field `max_step`", "optim.lr"],
    );
    assert_eq!(err.lines().count(), 2, "{err}");
    // A bad override.
    let cfg = write_config(&d, TINY);
    fails_with(pretrain(&cfg, &d.join("r1"), &["--set", "train.max_steps=-3"]), &["--set", "train.max_steps"]);
    // A missing data file.
    let missing = TINY.replace("dataset = \"tinyshakespeare\"", "files = [\"/nonexistent/corpus.txt\"]");
    fails_with(pretrain(&write_config(&d, &missing), &d.join("r2"), &[]), &["/nonexistent/corpus.txt"]);
    // A dataset shorter than one window.
    let short = d.join("short.txt");
    std::fs::write(&short, "To be, or not to be, that is the question.\n".repeat(3)).unwrap();
    let cfg = write_config(&d, &TINY.replace("dataset = \"tinyshakespeare\"", &format!("files = [{:?}]", short)));
    fails_with(pretrain(&cfg, &d.join("r3"), &[]), &["val.bin", "fewer than one window of 17"]);
    // A tokenizer/model vocabulary mismatch.
    let cfg = write_config(&d, &TINY.replace("n_layer = 2", "n_layer = 2\nvocab_size = 50"));
    fails_with(pretrain(&cfg, &d.join("r4"), &[]), &["tokenizer", "66 tokens", "model.vocab_size = 50"]);
    // A corrupt checkpoint.
    let run = d.join("r5");
    let cfg = write_config(&d, &TINY.replace("max_steps = 8", "max_steps = 2"));
    ok(pretrain(&cfg, &run, &[]));
    let model = run.join("checkpoints/step_00000002/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xFF;
    std::fs::write(&model, &bytes).unwrap();
    fails_with(
        pretrain(&cfg, &run, &["--resume", "--set", "train.max_steps=4"]),
        &["step_00000002", "model.safetensors is corrupt"],
    );
    fails_with(taper().args(["generate", "--model"]).arg(&run).output().unwrap(), &["model.safetensors is corrupt"]);
    std::fs::write(&model, &bytes[..100]).unwrap();
    fails_with(taper().arg("info").arg(&run).output().unwrap(), &["step_00000002"]);
    // Resume with nothing to resume from; a missing config file.
    fails_with(pretrain(&cfg, &d.join("empty"), &["--resume"]), &["no complete checkpoint"]);
    fails_with(taper().args(["pretrain", "--config", "/nonexistent.toml"]).output().unwrap(), &["/nonexistent.toml"]);
}

#[test]
fn tokenizer_and_prepare_commands() {
    let d = scratch("prep");
    let jsonl = d.join("docs.jsonl");
    let docs: String = (0..60)
        .map(|i| format!("{{\"text\": \"hello there, number {i}\"}}\n{{\"text\": \"general kenobi\"}}\n"))
        .collect();
    std::fs::write(&jsonl, docs).unwrap();
    let tok = d.join("tok.json");
    ok(taper()
        .args(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--dataset", "tinyshakespeare", "--out"])
        .arg(&tok)
        .output()
        .unwrap());
    let out = ok(taper()
        .args(["prepare", "--tokenizer"])
        .arg(&tok)
        .arg("--out")
        .arg(d.join("shards"))
        .arg(&jsonl)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("vocab 300"));
    assert!(d.join("shards/train.bin").exists() && d.join("shards/val.bin").exists());
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{not json}\n").unwrap();
    fails_with(
        taper().args(["prepare", "--tokenizer"]).arg(&tok).arg("--out").arg(d.join("s2")).arg(&jsonl).output().unwrap(),
        &["docs.jsonl:2: not valid JSON"],
    );
    // Pretraining from prepared shards.
    let cfg = TINY
        .replace("dataset = \"tinyshakespeare\"\ntokenizer = \"char\"", &format!("shards = {:?}", d.join("shards")));
    let cfg = cfg
        .replace("block_size = 16", "block_size = 2")
        .replace("max_steps = 8", "max_steps = 2")
        .replace("eval_every = 4", "eval_every = 2");
    ok(pretrain(&write_config(&d, &cfg), &d.join("run"), &[]));
}

#[test]
fn nonfinite_loss_stops_or_is_skipped() {
    let d = scratch("nan");
    // An absurd learning rate blows the weights up after the first update.
    let text = TINY.replace("lr = 3e-3", "lr = 1e30").replace("max_steps = 8", "max_steps = 4");
    let cfg = write_config(&d, &text);
    fails_with(pretrain(&cfg, &d.join("stop"), &[]), &["step 2: loss is not finite", "on_nonfinite"]);
    // Skipping 3 of 4 updates is more than the default share: the run fails, saying so.
    fails_with(
        pretrain(&cfg, &d.join("too-many"), &["--set", "train.on_nonfinite=\"skip\""]),
        &["3 of 4 updates were skipped", "train.max_skipped_fraction = 0.1"],
    );
    let skip = ["--set", "train.on_nonfinite=\"skip\"", "--set", "train.max_skipped_fraction=1"];
    let out = ok(pretrain(&cfg, &d.join("skip"), &skip));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped"));
    let last = std::fs::read_to_string(d.join("skip/metrics.jsonl")).unwrap().lines().last().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["skipped_steps"].as_u64(), Some(3), "{last}");
}

/// Serves `body` once per connection on 127.0.0.1, `n` times; returns the URL.
fn serve(body: Vec<u8>, n: usize) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/input.txt", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    url
}

#[test]
fn builtin_dataset_downloads_with_checksum_into_the_cache() {
    let d = scratch("download");
    let tok = d.join("tok.json");
    let train = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_taper"))
            .current_dir(&d)
            .env_remove("TAPER_DATA_DIR")
            .env("XDG_CACHE_HOME", d.join("cache"))
            .env("TAPER_TINYSHAKESPEARE_URL", url)
            .args(["tokenizer", "train", "--kind", "char", "--dataset", "tinyshakespeare", "--out"])
            .arg(&tok)
            .output()
            .unwrap()
    };
    // Wrong bytes: refused, nothing cached.
    fails_with(train(&serve(b"not shakespeare".to_vec(), 1)), &["md5", "6fb458f1232090904fb40fe944165e91"]);
    assert!(!d.join("cache/taper/datasets/tinyshakespeare.txt").exists());
    // The right bytes: verified, cached, and the cache serves the next call without a server.
    let real = std::fs::read(data_dir().join("tinyshakespeare.txt")).unwrap();
    ok(train(&serve(real.clone(), 1)));
    assert_eq!(std::fs::read(d.join("cache/taper/datasets/tinyshakespeare.txt")).unwrap(), real);
    ok(train("http://127.0.0.1:9/unreachable"));
}

#[test]
fn taper_runs_export_to_hf() {
    let d = scratch("export");
    let run = d.join("run");
    ok(pretrain(&write_config(&d, TINY), &run, &[]));
    let out = d.join("hf");
    let s = ok(taper().args(["export"]).arg(&run).args(["--format", "hf", "--out"]).arg(&out).output().unwrap());
    assert!(String::from_utf8_lossy(&s.stdout).contains("gpt2 model"));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The export, read back as an HF source, scores exactly like the checkpoint.
    let input = d.join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"ROMEO: What light\"}\n").unwrap();
    let score = |m: &Path, o: &str| {
        ok(taper()
            .args(["score", "--model"])
            .arg(m)
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(d.join(o))
            .output()
            .unwrap());
        std::fs::read_to_string(d.join(o)).unwrap()
    };
    assert_eq!(score(&run, "a.jsonl"), score(&out, "b.jsonl"));
    // bf16 and f16 exports: the weights in that type, config.json says so, and the export
    // scores within the type's rounding of the f32 one.
    let sum = |text: String| -> f64 {
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        v["sum_logprob"].as_f64().unwrap()
    };
    let exact = sum(score(&run, "a.jsonl"));
    for (dtype, name, st, tol) in [("bf16", "bfloat16", "BF16", 0.05), ("f16", "float16", "F16", 0.005)] {
        let low = d.join(format!("hf-{dtype}"));
        ok(taper()
            .args(["export"])
            .arg(&run)
            .args(["--format", "hf", "--dtype", dtype, "--out"])
            .arg(&low)
            .output()
            .unwrap());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(low.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["dtype"], name);
        let st_bytes = std::fs::read(low.join("model.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(st_bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&st_bytes[8..8 + header_len]).unwrap();
        for (k, v) in header.as_object().unwrap().iter().filter(|(k, _)| *k != "__metadata__") {
            assert_eq!(v["dtype"], st, "{dtype}: {k}");
        }
        let got = sum(score(&low, &format!("{dtype}.jsonl")));
        assert!(got != exact && (got - exact).abs() < tol, "{dtype}: sum logprob {got} vs f32's {exact}");
    }
    // Sinusoidal positions have no HF family: a clear refusal.
    let sin = d.join("sin");
    ok(pretrain(
        &write_config(
            &d,
            &TINY.replace("dropout = 0.1", "pos_emb = \"sinusoidal\"").replace("max_steps = 8", "max_steps = 2"),
        ),
        &sin,
        &[],
    ));
    fails_with(
        taper().args(["export"]).arg(&sin).args(["--format", "hf", "--out"]).arg(d.join("x")).output().unwrap(),
        &["no Hugging Face equivalent", "Sinusoidal"],
    );
}

/// A tiny base model with ChatML specials and a few word-task examples, for the SFT tests:
/// (base run dir, train file, test file).
fn sft_fixture(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = d.join("base");
    let text = TINY
        .replace(
            "tokenizer = \"char\"",
            "tokenizer = \"char\"\nspecial_tokens = [\"<|endoftext|>\", \"<|im_start|>\", \"<|im_end|>\"]",
        )
        .replace("block_size = 16", "block_size = 64\npos_emb = \"rope\"\nnorm = \"rms_norm\"\nmlp = \"swiglu\"")
        .replace("max_steps = 8", "max_steps = 2");
    ok(pretrain(&write_config(d, &text), &base, &[]));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sft-words");
    let head = |name: &str, n: usize| {
        let lines: Vec<String> =
            std::fs::read_to_string(data.join(name)).unwrap().lines().take(n).map(String::from).collect();
        let p = d.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    (base, head("train.jsonl", 40), head("test.jsonl", 5))
}

fn sft(cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    taper().arg("sft").arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
}

#[test]
fn sft_full_and_lora_then_eval() {
    let d = scratch("sft");
    let (base, train, test) = sft_fixture(&d);
    let cfg = format!(
        "seed = 1\ndevice = \"cpu\"\ninit = {:?}\n[data]\ntrain = [{:?}]\neval = [{:?}]\nchat_template = \"chatml\"\n\
         [train]\nmax_steps = 4\nbatch_size = 2\nlog_every = 1\neval_every = 2\ncheckpoint_every = 2\n[eval]\nmax_new_tokens = 8\n",
        base, train, test
    );
    let full = d.join("sft.toml");
    std::fs::write(&full, &cfg).unwrap();
    let out = ok(taper().arg("sft").arg("--config").arg(&full).arg("--run-dir").arg(d.join("full")).output().unwrap());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exact match on held-out prompts: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lora = d.join("lora.toml");
    std::fs::write(&lora, cfg.replace("[train]", "[lora]\nr = 4\nalpha = 8.0\n\n[train]")).unwrap();
    ok(taper().arg("sft").arg("--config").arg(&lora).arg("--run-dir").arg(d.join("lora")).output().unwrap());
    let ck = d.join("lora/checkpoints/step_00000004");
    assert!(ck.join("adapter_model.safetensors").exists() && ck.join("adapter_config.json").exists());
    // The LoRA checkpoint is a model source: its adapters merged over the base.
    let ev = ok(taper()
        .args(["eval", "--model"])
        .arg(d.join("lora"))
        .arg("--data")
        .arg(d.join("test.jsonl"))
        .args(["--chat-template", "chatml"])
        .output()
        .unwrap());
    let ev = String::from_utf8_lossy(&ev.stdout);
    assert!(ev.contains("perplexity") && ev.contains("exact match     "), "{ev}");
    // A conversation with an unknown role is a clear error.
    std::fs::write(d.join("bad.jsonl"), "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n").unwrap();
    fails_with(
        taper().args(["eval", "--model"]).arg(d.join("lora")).arg("--data").arg(d.join("bad.jsonl")).output().unwrap(),
        &["bad.jsonl", "wizard"],
    );
}

#[test]
fn sft_lora_resume_export_and_bad_data() {
    let d = scratch("sft-lora");
    let (base, train, _) = sft_fixture(&d);
    let cfg = d.join("lora.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 3\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{train:?}]\nchat_template = \"chatml\"\n\
             [lora]\nr = 4\nalpha = 8.0\ndropout = 0.1\ntarget_modules = [\"q\", \"v\", \"down\"]\n\
             [train]\nmax_steps = 4\nbatch_size = 2\ngrad_accum_steps = 2\nlog_every = 1\ncheckpoint_every = 2\n"
        ),
    )
    .unwrap();

    // Resume: stopped at step 2 and resumed, the run matches an uninterrupted one bit for bit.
    let (whole, split) = (d.join("whole"), d.join("split"));
    ok(sft(&cfg, &whole, &[]));
    ok(sft(&cfg, &split, &["--set", "train.stop_at_step=2"]));
    ok(sft(&cfg, &split, &["--resume"]));
    assert_eq!(losses(&whole), losses(&split));
    assert_eq!(losses(&whole).len(), 4);
    for f in ["model.safetensors", "optimizer.safetensors", "adapter_model.safetensors"] {
        let read = |run: &Path| std::fs::read(run.join("checkpoints/step_00000004").join(f)).unwrap();
        assert!(read(&whole) == read(&split), "{f} differs after resume");
    }

    // Export: the PEFT adapter alone, or merged into a full model that scores as the checkpoint does.
    let export = |src: &Path, args: &[&str], out: &str| {
        taper().arg("export").arg(src).args(["--format", "hf", "--out"]).arg(d.join(out)).args(args).output().unwrap()
    };
    ok(export(&whole, &[], "peft"));
    let acfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("peft/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((acfg["peft_type"].as_str(), acfg["r"].as_u64()), (Some("LORA"), Some(4)));
    assert_eq!(acfg["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    let keys = std::fs::read(d.join("peft/adapter_model.safetensors")).unwrap();
    let keys = safetensors::SafeTensors::deserialize(&keys).unwrap();
    let mut names: Vec<String> = keys.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names.len(), 2 * 3 * 2);
    assert_eq!(names[0], "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
    ok(export(&whole, &["--merge-lora"], "merged"));
    std::fs::write(d.join("texts.jsonl"), "{\"text\": \"ROMEO:\\nWhat light?\"}\n").unwrap();
    let score = |model: &Path, out: &str| {
        ok(taper()
            .args(["score", "--model"])
            .arg(model)
            .arg("--input")
            .arg(d.join("texts.jsonl"))
            .arg("--out")
            .arg(d.join(out))
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(out)).unwrap()).unwrap();
        v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let (ours, merged, plain) =
        (score(&whole, "a.jsonl"), score(&d.join("merged"), "b.jsonl"), score(&base, "c.jsonl"));
    assert!(ours.iter().zip(&merged).all(|(a, b)| (a - b).abs() < 1e-5), "{ours:?} vs {merged:?}");
    assert!(ours.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-4), "the adapters change nothing");
    fails_with(
        taper().arg("export").arg(&whole).args(["--format", "gguf", "--out"]).arg(d.join("g")).output().unwrap(),
        &["LoRA checkpoint", "--merge-lora"],
    );
    fails_with(export(&base, &["--merge-lora"], "x"), &["no LoRA adapters"]);

    // Bad records: file and line named; skipped and counted on request. Over-long examples
    // are truncated or dropped, and counted.
    let long = "x".repeat(300);
    let lines = [
        std::fs::read_to_string(&train).unwrap().lines().take(6).collect::<Vec<_>>().join("\n"),
        "{not json".into(),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}".into(),
        format!("{{\"prompt\": \"upper: x\", \"completion\": \"{}\"}}", long.to_uppercase()),
    ];
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let bad_cfg = d.join("bad.toml");
    std::fs::write(
        &bad_cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(&format!("{train:?}"), &format!("{bad:?}")),
    )
    .unwrap();
    fails_with(sft(&bad_cfg, &d.join("b1"), &[]), &["bad.jsonl:7", "not valid JSON"]);
    // A missing training file: its io error once, not again as the error chain's next link.
    let gone_cfg = d.join("gone.toml");
    let gone = d.join("gone.jsonl");
    std::fs::write(
        &gone_cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(&format!("{train:?}"), &format!("{gone:?}")),
    )
    .unwrap();
    let err = fails_with(sft(&gone_cfg, &d.join("b0"), &[]), &["gone.jsonl: no such file or directory"]);
    assert_eq!(err.matches("no such file").count(), 1, "{err}");
    let stderr = |o: Output| String::from_utf8_lossy(&ok(o).stderr).to_string();
    let skip = ["--set", "data.on_bad_record=\"skip\"", "--set", "train.max_steps=1"];
    let e = stderr(sft(&bad_cfg, &d.join("b2"), &skip));
    assert!(e.contains("7 examples (2 skipped as bad records, 1 truncated, 0 dropped as too long"), "{e}");
    assert!(e.contains("bad.jsonl:8") && e.contains("assistant"), "{e}");
    let e = stderr(sft(&bad_cfg, &d.join("b3"), &[&skip[..], &["--set", "data.overflow=\"drop\""]].concat()));
    assert!(e.contains("6 examples (2 skipped as bad records, 0 truncated, 1 dropped as too long"), "{e}");
}

#[test]
fn reward_model_and_dpo_tiny_runs_resume_and_bad_pairs() {
    let d = scratch("align");
    let (base, _, test) = sft_fixture(&d);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pref-words");
    let pairs: Vec<String> =
        std::fs::read_to_string(data.join("train.jsonl")).unwrap().lines().take(24).map(String::from).collect();
    let train = d.join("pairs.jsonl");
    std::fs::write(&train, pairs[..20].join("\n") + "\n").unwrap();
    let held = d.join("held.jsonl");
    std::fs::write(&held, pairs[20..].join("\n") + "\n").unwrap();
    let common = format!(
        "seed = 5\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{train:?}]\neval = [{held:?}]\n\
         prompts = [{test:?}]\nchat_template = \"chatml\"\n"
    );
    let steps = "[train]\nmax_steps = 4\nbatch_size = 2\ngrad_accum_steps = 2\nlog_every = 1\neval_every = 2\ncheckpoint_every = 2\n[optim]\nlr = 1e-3\n";

    // Reward model: the head trains, accuracy and margin are logged, the checkpoint holds the head.
    let rm_cfg = d.join("rm.toml");
    std::fs::write(&rm_cfg, common.replace("prompts = [", "#prompts = [") + "[rm]\ncenter_coef = 0.01\n" + steps)
        .unwrap();
    let rm = d.join("rm");
    ok(taper().arg("rm").arg("--config").arg(&rm_cfg).arg("--run-dir").arg(&rm).output().unwrap());
    let log = std::fs::read_to_string(rm.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"eval/accuracy\"") && log.contains("\"margin\""), "{log}");
    let ck = std::fs::read(rm.join("checkpoints/step_00000004/model.safetensors")).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&ck).unwrap().names().contains(&"score.weight"));
    // Stopped at step 2 and resumed, it is the uninterrupted run, bit for bit.
    let rm_split = d.join("rm-split");
    let rm_run = |extra: &[&str]| {
        taper().arg("rm").arg("--config").arg(&rm_cfg).arg("--run-dir").arg(&rm_split).args(extra).output().unwrap()
    };
    ok(rm_run(&["--set", "train.stop_at_step=2"]));
    ok(rm_run(&["--resume"]));
    assert_eq!(losses(&rm), losses(&rm_split));
    assert!(std::fs::read(rm_split.join("checkpoints/step_00000004/model.safetensors")).unwrap() == ck);

    // Another round from that reward model goes on with its head: one Adam step moves no
    // element by more than the learning rate (a fresh normal(0, 0.02) head would).
    let head = |ck: &Path| {
        let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("score.weight").unwrap();
        t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<f32>>()
    };
    let round2 = d.join("rm2.toml");
    let text =
        std::fs::read_to_string(&rm_cfg).unwrap().replace(&format!("init = {base:?}"), &format!("init = {rm:?}"));
    std::fs::write(&round2, text.replace("max_steps = 4", "max_steps = 1")).unwrap();
    ok(taper().arg("rm").arg("--config").arg(&round2).arg("--run-dir").arg(d.join("rm2")).output().unwrap());
    let (before, after) = (head(&rm.join("checkpoints/step_00000004")), head(&d.join("rm2/checkpoints/step_00000001")));
    let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 0.0 && moved <= 1.01e-3, "the head moved by {moved}");

    // DPO with precomputed reference log-probs: resumed equals uninterrupted, bit for bit.
    let dpo_cfg = d.join("dpo.toml");
    std::fs::write(
        &dpo_cfg,
        common.clone() + "[dpo]\nbeta = 0.1\nprecompute_ref = true\n" + steps + "[eval]\nmax_new_tokens = 8\n",
    )
    .unwrap();
    let dpo = |run: &Path, extra: &[&str]| {
        taper().arg("dpo").arg("--config").arg(&dpo_cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
    };
    let (whole, split) = (d.join("dpo"), d.join("dpo-split"));
    let out = ok(dpo(&whole, &[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exact match on held-out prompts: "));
    assert!(whole.join("ref_logps.safetensors").exists());
    let log = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"rewards/chosen\"") && log.contains("\"eval/rewards/accuracies\""), "{log}");
    ok(dpo(&split, &["--set", "train.stop_at_step=2"]));
    ok(dpo(&split, &["--resume"]));
    assert_eq!(losses(&whole), losses(&split));
    let read = |run: &Path| std::fs::read(run.join("checkpoints/step_00000004/model.safetensors")).unwrap();
    assert!(read(&whole) == read(&split), "weights differ after resume");

    // Bad pairs: named by file and line.
    let p = "{\"prompt\": \"upper: ab\", \"chosen\": \"AB\", \"rejected\": \"AB\"}";
    std::fs::write(&train, format!("{}\n{p}\n", pairs[0])).unwrap();
    fails_with(dpo(&d.join("b1"), &[]), &["pairs.jsonl:2", "identical"]);
    let long = format!("{{\"prompt\": \"upper: {}\", \"chosen\": \"A\", \"rejected\": \"B\"}}", "x".repeat(80));
    std::fs::write(&train, format!("{}\n{long}\n", pairs[0])).unwrap();
    fails_with(dpo(&d.join("b2"), &[]), &["pairs.jsonl:2", "prompt is", "context of 64"]);
    let empty = "{\"prompt\": \"upper: ab\", \"chosen\": \"AB\", \"rejected\": \"\"}";
    std::fs::write(&train, format!("{}\n{empty}\n", pairs[0])).unwrap();
    fails_with(dpo(&d.join("b3"), &[]), &["pairs.jsonl:2", "rejected completion is empty"]);

    // GRPO (verifiable reward) and PPO (the reward model above): tiny runs whose resume is exact.
    let rl = |kind: &str, reward: &str, section: &str, batch: usize| {
        let cfg = d.join(format!("{kind}.toml"));
        let text = format!(
            "seed = 9\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{test:?}]\neval = [{test:?}]\n\
             chat_template = \"chatml\"\n[rollout]\nmax_new_tokens = 6\n[reward]\n{reward}\n{section}\n\
             [train]\nmax_steps = 2\nbatch_size = {batch}\nlog_every = 1\neval_every = 2\ncheckpoint_every = 1\n\
             [optim]\nlr = 1e-3\n"
        );
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let run = |cmd: &str, cfg: &Path, dir: &Path, extra: &[&str]| {
        taper().arg(cmd).arg("--config").arg(cfg).arg("--run-dir").arg(dir).args(extra).output().unwrap()
    };
    let grpo = rl("grpo", "kind = \"exact_match\"", "[grpo]\ngroup_size = 2\nprompts_per_step = 2\nbeta = 0.04", 4);
    let rm_reward = format!("kind = \"model\"\npath = {rm:?}");
    let ppo = rl(
        "ppo",
        &rm_reward,
        "[ppo]\nrollouts_per_step = 4\nepochs = 2\nadaptive_kl = { target = 1.0, horizon = 100.0 }",
        2,
    );
    for (cmd, cfg, keys) in
        [("grpo", &grpo, ["\"kl\"", "\"reward_std\""]), ("ppo", &ppo, ["\"loss/value_avg\"", "\"objective/kl_coef\""])]
    {
        let (whole, split) = (d.join(format!("{cmd}-whole")), d.join(format!("{cmd}-split")));
        let out = ok(run(cmd, cfg, &whole, &[]));
        assert!(String::from_utf8_lossy(&out.stderr).contains("held-out mean reward"), "{cmd}");
        let log = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
        assert!(keys.iter().all(|k| log.contains(k)) && log.contains("\"eval/reward\""), "{cmd}: {log}");
        ok(run(cmd, cfg, &split, &["--set", "train.stop_at_step=1"]));
        ok(run(cmd, cfg, &split, &["--resume"]));
        assert_eq!(losses(&whole), losses(&split), "{cmd}");
        let w = |r: &Path| std::fs::read(r.join("checkpoints/step_00000002/model.safetensors")).unwrap();
        assert!(w(&whole) == w(&split), "{cmd}: weights differ after resume");
    }

    // A reward model must read the policy's token ids: one exported to HF with another
    // tokenizer is refused, naming both vocabularies.
    ok(taper().arg("export").arg(&rm).args(["--format", "hf", "--out"]).arg(d.join("rm-hf")).output().unwrap());
    let other = d.join("other");
    ok(pretrain(&write_config(&d, &TINY.replace("max_steps = 8", "max_steps = 2")), &other, &[]));
    std::fs::copy(other.join("data/tokenizer.json"), d.join("rm-hf/tokenizer.json")).unwrap();
    let bad = rl("ppo-bad", &format!("kind = \"model\"\npath = {:?}", d.join("rm-hf")), "", 8);
    fails_with(run("ppo", &bad, &d.join("p1"), &[]), &["reward model", "tokenizer", "differs from the policy"]);
    let not_rm = rl("ppo-not-rm", &format!("kind = \"model\"\npath = {base:?}"), "", 8);
    fails_with(run("ppo", &not_rm, &d.join("p2"), &[]), &["not a reward model"]);
}

/// Every alignment recipe trains LoRA adapters on a frozen base: the checkpoint carries PEFT
/// adapter files and no base tensor, the adapters moved, a LoRA PPO
/// run resumes exactly, and a LoRA reward model merges and exports.
#[test]
fn alignment_recipes_train_lora_adapters() {
    let d = scratch("align-lora");
    let (base, _, test) = sft_fixture(&d);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pref-words");
    let pairs: Vec<String> =
        std::fs::read_to_string(data.join("train.jsonl")).unwrap().lines().take(8).map(String::from).collect();
    let train = d.join("pairs.jsonl");
    std::fs::write(&train, pairs.join("\n") + "\n").unwrap();
    let lora = "[lora]\nr = 4\nalpha = 8.0\ntarget_modules = [\"q\", \"v\", \"up\"]\n";
    let steps = "[train]\nmax_steps = 2\nbatch_size = 2\nlog_every = 1\ncheckpoint_every = 1\n[optim]\nlr = 1e-2\n";
    let pair_cfg = |extra: &str| {
        format!(
            "seed = 5\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{train:?}]\nchat_template = \"chatml\"\n\
             {extra}{lora}{steps}"
        )
    };
    let rl_cfg = |reward: &str, section: &str| {
        format!(
            "seed = 9\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{test:?}]\nchat_template = \"chatml\"\n\
             [rollout]\nmax_new_tokens = 6\n[reward]\n{reward}\n{section}\n{lora}{steps}"
        )
    };
    let tensors = |path: &Path| -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> =
            st.tensors().into_iter().map(|(n, t)| (n.to_string(), t.data().to_vec())).collect();
        v.sort();
        v
    };
    let base_tensors = tensors(&base.join("checkpoints/step_00000002/model.safetensors"));
    let rm = d.join("rm");
    let recipes = [
        ("rm", pair_cfg(""), rm.clone()),
        ("dpo", pair_cfg("[dpo]\nbeta = 0.1\n"), d.join("dpo")),
        ("grpo", rl_cfg("kind = \"exact_match\"", "[grpo]\ngroup_size = 2\nprompts_per_step = 2"), d.join("grpo")),
        ("ppo", rl_cfg(&format!("kind = \"model\"\npath = {rm:?}"), "[ppo]\nrollouts_per_step = 4"), d.join("ppo")),
    ];
    for (cmd, text, run) in &recipes {
        let cfg = d.join(format!("{cmd}.toml"));
        std::fs::write(&cfg, text).unwrap();
        ok(taper().arg(cmd).arg("--config").arg(&cfg).arg("--run-dir").arg(run).output().unwrap());
        let ck = run.join("checkpoints/step_00000002");
        // The frozen base stays with the init; the checkpoint holds adapters and heads only.
        let model = tensors(&ck.join("model.safetensors"));
        let heads = ["score.weight", "v_head.weight", "v_head.bias"];
        for (name, _) in &model {
            assert!(name.contains(".lora_") || heads.contains(&name.as_str()), "{cmd}: {name} saved under LoRA");
        }
        assert!(base_tensors.iter().all(|(n, _)| !model.iter().any(|(m, _)| m == n)), "{cmd}");
        let adapters = tensors(&ck.join("adapter_model.safetensors"));
        assert_eq!(adapters.iter().filter(|(n, _)| n.contains("lora_B")).count(), 2 * 3, "{cmd}");
        assert!(
            adapters.iter().filter(|(n, _)| n.contains("lora_B")).any(|(_, b)| b.iter().any(|&x| x != 0)),
            "{cmd}: the adapters did not train"
        );
        if *cmd == "ppo" {
            let split = d.join("ppo-split");
            let run_split = |extra: &[&str]| {
                ok(taper()
                    .arg(cmd)
                    .arg("--config")
                    .arg(&cfg)
                    .arg("--run-dir")
                    .arg(&split)
                    .args(extra)
                    .output()
                    .unwrap())
            };
            run_split(&["--set", "train.stop_at_step=1"]);
            run_split(&["--resume"]);
            assert_eq!(losses(run), losses(&split));
            let a = |r: &Path| std::fs::read(r.join("checkpoints/step_00000002/adapter_model.safetensors")).unwrap();
            assert!(a(run) == a(&split), "LoRA PPO adapters differ after resume");
        }
    }
    // The LoRA reward model, merged, exports as a sequence classifier and still scores.
    let out = d.join("rm-merged");
    ok(taper().arg("export").arg(&rm).args(["--format", "hf", "--merge-lora", "--out"]).arg(&out).output().unwrap());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg["architectures"][0].as_str().unwrap().ends_with("ForSequenceClassification"), "{cfg}");
}

/// PPO and GRPO train on their rollouts in optimizer updates of `train.batch_size` rollouts per
/// forward and `train.grad_accum_steps` forwards: the number of updates a step makes follows
/// them, and a minibatch that does not divide the step's rollouts is refused.
#[test]
fn rl_recipes_honour_batch_size_and_accumulation() {
    let d = scratch("rl-batch");
    let (base, _, test) = sft_fixture(&d);
    let updates = |run: &Path| {
        let bytes = std::fs::read(run.join("checkpoints/step_00000001/optimizer.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        i64::from_le_bytes(st.tensor("updates").unwrap().data().try_into().unwrap())
    };
    let weights = |run: &Path| std::fs::read(run.join("checkpoints/step_00000001/model.safetensors")).unwrap();
    for (cmd, section) in [
        ("grpo", "[grpo]\ngroup_size = 2\nprompts_per_step = 2\n"),
        ("ppo", "[ppo]\nrollouts_per_step = 4\nepochs = 1\n"),
    ] {
        let cfg = d.join(format!("{cmd}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "seed = 9\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{test:?}]\nchat_template = \"chatml\"\n\
                 [rollout]\nmax_new_tokens = 6\n{section}[train]\nmax_steps = 1\n[optim]\nlr = 1e-3\n"
            ),
        )
        .unwrap();
        let run = |batch: usize, accum: usize| {
            let dir = d.join(format!("{cmd}-{batch}x{accum}"));
            let (b, a) = (format!("train.batch_size={batch}"), format!("train.grad_accum_steps={accum}"));
            ok(train(cmd, &cfg, &dir, &["--set", &b, "--set", &a]));
            dir
        };
        let (whole, halves, accumulated) = (run(4, 1), run(2, 1), run(2, 2));
        assert_eq!((updates(&whole), updates(&halves), updates(&accumulated)), (1, 2, 1), "{cmd}");
        assert!(weights(&whole) != weights(&halves), "{cmd}: two updates trained like one");
        assert!(weights(&halves) != weights(&accumulated), "{cmd}: accumulation made no difference");
        fails_once(
            train(cmd, &cfg, &d.join(format!("{cmd}-bad")), &["--set", "train.batch_size=3"]),
            &["train.batch_size = 3", "4 rollouts per step", "whole optimizer updates"],
        );
    }
}

/// The scalars of TensorBoard's view of `run`'s event files: read back with every record's CRC
/// checked, in the order TensorBoard reads them, a `SessionLog START` at step s dropping the
/// points read so far at steps >= s (as its EventAccumulator purges a restarted run's tail).
/// Values by (tag, step).
type ByStep<T> = BTreeMap<(String, u64), T>;

fn tensorboard_view(run: &Path) -> (ByStep<f32>, ByStep<String>) {
    use taper_train::tensorboard::{event_files, read_events};
    let (mut scalars, mut texts) = (BTreeMap::new(), BTreeMap::new());
    for file in event_files(&run.join("tb")).unwrap() {
        for e in read_events(&file).unwrap() {
            let step = e.step as u64;
            if e.session_start {
                scalars.retain(|(_, s), _| *s < step);
                texts.retain(|(_, s): &(String, u64), _| *s < step);
            }
            for (tag, v) in e.scalars {
                assert!(scalars.insert((tag.clone(), step), v).is_none(), "{tag} twice at step {step}");
            }
            for (tag, t) in e.texts {
                texts.insert((tag, step), t);
            }
        }
    }
    (scalars, texts)
}

/// Every number of every metrics.jsonl line, by (name, step).
fn jsonl_scalars(run: &Path) -> ByStep<f32> {
    let mut out = BTreeMap::new();
    for line in metrics(run) {
        let step = line["step"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            if let (Some(x), true) = (v.as_f64(), k != "step") {
                assert!(
                    out.insert((k.clone(), step), x as f32).is_none(),
                    "metrics.jsonl has {k} twice at step {step}"
                );
            }
        }
    }
    out
}

/// TensorBoard's files hold exactly the scalars of metrics.jsonl, step for step, the config and
/// the samples as text; after a resume from an older checkpoint with another learning rate,
/// neither holds a stale or duplicate step of the abandoned tail.
#[test]
fn tensorboard_holds_the_metrics_and_a_resume_drops_the_abandoned_tail() {
    let d = scratch("tb");
    let cfg = write_config(&d, &format!("{TINY}\n[log]\nhistograms_every = 4\nsample_tokens = 6\n"));
    let run = d.join("run");
    ok(pretrain(&cfg, &run, &[]));
    let (scalars, texts) = tensorboard_view(&run);
    assert_eq!(scalars, jsonl_scalars(&run));
    assert!(scalars.contains_key(&("val_loss".to_string(), 4)) && scalars.contains_key(&("grad_norm".to_string(), 8)));
    assert!(texts[&("config".to_string(), 0)].contains("n_embd = 32"));
    for step in [0, 4, 8] {
        let s = &texts[&("samples/0".to_string(), step)];
        assert!(s.starts_with("**prompt**") && s.contains("**sample**"), "{s}");
    }

    // Back to step 4 with another learning rate: steps 5-8 are trained again, differently.
    let before = jsonl_scalars(&run);
    let older = run.join("checkpoints/step_00000004");
    ok(pretrain(&cfg, &run, &["--resume", older.to_str().unwrap(), "--allow-config-change", "--set", "optim.lr=1e-3"]));
    let after = jsonl_scalars(&run);
    let (scalars, texts) = tensorboard_view(&run);
    assert_eq!(scalars, after, "TensorBoard's view is metrics.jsonl, resumed");
    let key = ("loss".to_string(), 8);
    assert_ne!(before[&key], after[&key], "step 8 was trained again");
    assert_eq!(before[&("loss".to_string(), 4)], after[&("loss".to_string(), 4)], "the kept steps are kept");
    assert!(texts.contains_key(&("samples/0".to_string(), 8)));
    assert_eq!(event_file_count(&run), 2, "one event file per session");
}

fn event_file_count(run: &Path) -> usize {
    taper_train::tensorboard::event_files(&run.join("tb")).unwrap().len()
}
