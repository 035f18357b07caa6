//! Data parallelism through the real binary under `mpirun -np 2` (build with `--features mpi`):
//! two replicas at batch B/2 train as one process at B/2 with twice the accumulation, with
//! the optimizer replicated or sharded; a killed run resumes on two ranks bit for bit and on
//! one within float tolerance; a rank that dies stops the run with its rank named; only rank 0
//! writes into the run dir.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Every process on one thread: CPU matmul is bit-deterministic at a fixed thread count.
fn single_threaded(c: &mut Command) -> &mut Command {
    c.env("RAYON_NUM_THREADS", "1").env("CANDLE_NUM_THREADS", "1").env("OMP_NUM_THREADS", "1")
}

/// `mpirun -np N taper CMD --config CFG --run-dir RUN EXTRA...`
fn mpirun(n: usize, cmd: &str, cfg: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_taper"))
        .arg(cmd)
        .arg("--config")
        .arg(cfg)
        .arg("--run-dir")
        .arg(run)
        .args(extra)
        .env("TAPER_DATA_DIR", data_dir());
    single_threaded(&mut c);
    c
}

fn one(cmd: &str, cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut c = taper();
    c.arg(cmd).arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra);
    single_threaded(&mut c).output().unwrap()
}

/// The f32 values of every tensor of a checkpoint's model, by name.
fn weights(ck: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest relative difference between two runs' losses and final weights.
fn max_rel_diff(a: &Path, b: &Path, step: u64) -> f64 {
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(y.abs()).max(1e-6);
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{} vs {}", a.display(), b.display());
    let mut worst = 0f64;
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        worst = worst.max(rel(f64::from_bits(*x), f64::from_bits(*y)));
    }
    let ck = |r: &Path| r.join(format!("checkpoints/step_{step:08}"));
    for ((na, wa), (nb, wb)) in weights(&ck(a)).iter().zip(&weights(&ck(b))) {
        assert_eq!(na, nb);
        for (x, y) in wa.iter().zip(wb) {
            worst = worst.max(rel(*x as f64, *y as f64));
        }
    }
    worst
}

fn same_bits(a: &Path, b: &Path, step: u64) -> bool {
    let ck = |r: &Path| std::fs::read(r.join(format!("checkpoints/step_{step:08}/model.safetensors"))).unwrap();
    losses(a) == losses(b) && ck(a) == ck(b)
}

/// A tiny Llama-style character model; batch 4 (world 1) or 2 (world 2).
fn base_config(d: &Path, steps: u64) -> PathBuf {
    let cfg = d.join(format!("base-{steps}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "seed = 11\ndevice = \"cpu\"\n[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 64\n\
             pos_emb = \"rope\"\nnorm = \"rms_norm\"\nmlp = \"swiglu\"\ndropout = 0.1\n[data]\n\
             dataset = \"tinyshakespeare\"\nspecial_tokens = [\"<|endoftext|>\", \"<|im_start|>\", \"<|im_end|>\"]\n\
             [train]\nmax_steps = {steps}\nbatch_size = 2\nlog_every = 1\neval_every = 10\neval_batches = 2\n\
             checkpoint_every = 4\nkeep_checkpoints = 10\n[optim]\nlr = 3e-3\nweight_decay = 0.1\n\
             [schedule]\nwarmup_steps = 2\nmin_lr = 3e-4\n"
        ),
    )
    .unwrap();
    cfg
}

/// 20 steps of pretraining, SFT and DPO at world 2 (batch B/2) match world 1 (batch B/2,
/// accumulation 2): replicated and sharded optimizer alike.
#[test]
fn two_replicas_train_as_one_process_with_twice_the_accumulation() {
    let d = scratch("dist-equal");
    let cfg = base_config(&d, 20);
    let accum2 = ["--set", "train.grad_accum_steps=2"];
    let shard = ["--set", "train.shard_optimizer=true"];
    let (w1, w2, w2s) = (d.join("pre-w1"), d.join("pre-w2"), d.join("pre-w2-shard"));
    ok(one("pretrain", &cfg, &w1, &accum2));
    ok(mpirun(2, "pretrain", &cfg, &w2, &[]).output().unwrap());
    ok(mpirun(2, "pretrain", &cfg, &w2s, &shard).output().unwrap());
    let (d2, d2s) = (max_rel_diff(&w1, &w2, 20), max_rel_diff(&w1, &w2s, 20));
    eprintln!(
        "pretrain: world 2 vs world 1 x2 accumulation: max relative difference {d2:e} (bit-identical: {}), \
         sharded {d2s:e} (bit-identical: {})",
        same_bits(&w1, &w2, 20),
        same_bits(&w1, &w2s, 20)
    );
    assert!(d2 <= 1e-6 && d2s <= 1e-6, "{d2} {d2s}");

    // Fine-tuning recipes from the world-1 run's weights.
    let sft_data = d.join("sft.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(root().join("data/sft-words/train.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(String::from)
        .collect();
    std::fs::write(&sft_data, lines.join("\n") + "\n").unwrap();
    let pairs = d.join("pairs.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(root().join("data/pref-words/train.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(String::from)
        .collect();
    std::fs::write(&pairs, lines.join("\n") + "\n").unwrap();
    let steps = "[train]\nmax_steps = 20\nbatch_size = 2\nlog_every = 1\neval_every = 20\ncheckpoint_every = 20\n\
                 [optim]\nlr = 1e-3\n";
    for (cmd, data) in [("sft", &sft_data), ("dpo", &pairs)] {
        let cfg = d.join(format!("{cmd}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "seed = 3\ndevice = \"cpu\"\ninit = {w1:?}\n[data]\ntrain = [{data:?}]\nchat_template = \"chatml\"\n{steps}"
            ),
        )
        .unwrap();
        let (a, b, c) = (d.join(format!("{cmd}-w1")), d.join(format!("{cmd}-w2")), d.join(format!("{cmd}-w2s")));
        ok(one(cmd, &cfg, &a, &accum2));
        ok(mpirun(2, cmd, &cfg, &b, &[]).output().unwrap());
        ok(mpirun(2, cmd, &cfg, &c, &shard).output().unwrap());
        let (x, y) = (max_rel_diff(&a, &b, 20), max_rel_diff(&a, &c, 20));
        eprintln!(
            "{cmd}: world 2 vs world 1 x2: {x:e} (bit-identical: {}), sharded {y:e} (bit-identical: {})",
            same_bits(&a, &b, 20),
            same_bits(&a, &c, 20)
        );
        assert!(x <= 1e-6 && y <= 1e-6, "{cmd}: {x} {y}");
    }
}

/// The pids of `parent`'s child processes.
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: u32 = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

fn wait_for(p: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(t0.elapsed() < limit, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLed after a checkpoint, a world-2 run resumes at world 2 bit for bit, and at world 1
/// (accumulation 2) within 1e-5; and only rank 0 wrote into the run dir.
#[test]
fn a_killed_two_replica_run_resumes_on_two_or_one() {
    let d = scratch("dist-resume");
    let cfg = base_config(&d, 12);
    let (whole, killed, moved) = (d.join("whole"), d.join("killed"), d.join("to-one"));
    ok(mpirun(2, "pretrain", &cfg, &whole, &[]).output().unwrap());
    let mut run = mpirun(2, "pretrain", &cfg, &killed, &[]);
    std::os::unix::process::CommandExt::process_group(&mut run, 0);
    let mut child = run.spawn().unwrap();
    wait_for(&killed.join("checkpoints/step_00000008/trainer_state.json"), Duration::from_secs(300));
    // SAFETY: kill(2) on the process group this test started.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();
    let cut = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.join("checkpoints")).unwrap();
        copy_dir(&from.join("checkpoints/step_00000004"), &to.join("checkpoints/step_00000004"));
        std::fs::copy(from.join("metrics.jsonl"), to.join("metrics.jsonl")).unwrap();
        std::fs::copy(from.join("config.toml"), to.join("config.toml")).unwrap();
    };
    cut(&killed, &moved);
    // Drop what followed step 8's checkpoint, and resume there at world 2.
    let _ = std::fs::remove_file(killed.join(".lock"));
    ok(mpirun(2, "pretrain", &cfg, &killed, &["--resume"]).output().unwrap());
    assert!(same_bits(&whole, &killed, 12), "the resumed world-2 run differs from the uninterrupted one");
    // From step 4 on one process, twice the accumulation: the same global batch.
    ok(one("pretrain", &cfg, &moved, &["--resume", "--set", "train.grad_accum_steps=2"]));
    let diff = max_rel_diff(&whole, &moved, 12);
    eprintln!("world 2 -> world 1 resume: max relative difference {diff:e}");
    assert!(diff <= 1e-5, "{diff}");

    // Only rank 0 writes: the run dir holds what one process would write, nothing of rank 1's.
    let mut files: Vec<String> = walk(&whole).into_iter().filter(|f| !f.starts_with("data/")).collect();
    files.sort();
    // One TensorBoard file, rank 0's: its name carries the host and pid, so it is matched by shape.
    let tb: Vec<String> = files.iter().filter(|f| f.starts_with("tb/")).cloned().collect();
    assert!(tb.len() == 1 && tb[0].starts_with("tb/events.out.tfevents."), "one event file, from rank 0: {tb:?}");
    files.retain(|f| !f.starts_with("tb/"));
    let mut want = vec![".lock".to_string(), "config.toml".into(), "metrics.jsonl".into()];
    for s in [4, 8, 12] {
        for f in ["model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json"] {
            want.push(format!("checkpoints/step_{s:08}/{f}"));
        }
    }
    want.sort();
    assert_eq!(files, want);
    let lock = std::fs::read_to_string(whole.join(".lock")).unwrap();
    assert!(!lock.trim().is_empty(), "the lock names the main rank's pid");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

/// One rank killed mid-run: the run stops within a minute, naming the lost rank, and the
/// newest complete checkpoint still loads.
#[test]
fn a_dead_rank_stops_the_run_and_names_it() {
    let d = scratch("dist-fault");
    let cfg = base_config(&d, 100_000);
    let run = d.join("run");
    let mut c = mpirun(2, "pretrain", &cfg, &run, &[]);
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for(&run.join("checkpoints/step_00000004/trainer_state.json"), Duration::from_secs(300));
    let main_pid: u32 = std::fs::read_to_string(run.join(".lock")).unwrap().trim().parse().unwrap();
    let ranks: Vec<u32> = children(child.id());
    let other = *ranks.iter().find(|&&p| p != main_pid).expect("the second rank's process");
    let t0 = Instant::now();
    // SAFETY: kill(2) on a process this test started (through mpirun).
    unsafe { libc::kill(other as i32, libc::SIGKILL) };
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not stop within 60 s of losing a rank");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("rank 1"), "the lost rank is not named: {text}");
    eprintln!("stopped {:.1} s after rank 1 was killed", t0.elapsed().as_secs_f64());
    ok(taper().arg("info").arg(&run).output().unwrap());
}
