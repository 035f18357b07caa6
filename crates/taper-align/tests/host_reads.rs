//! On the device-generic path (the one CUDA and Metal take, forced on the CPU here) a training
//! step reads nothing back to the host unless it logs, evaluates or saves: runs of 3 and of 6
//! steps, logging only at their end, make the same number of reads, for pretraining, SFT and
//! DPO. Every read in the training path goes through `taper_model::host`, which counts them.

use std::path::{Path, PathBuf};
use taper_model::host;
use taper_train::config::parse_as;
use taper_train::observe::Quiet;
use taper_train::trainer::{Resume, RunSpec};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taper-reads-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data").join(name)
}

/// The reads a run of `steps` steps makes, logging, evaluating and saving only at its end.
fn reads_of(steps: u64, run: impl FnOnce(&[String], &Path)) -> u64 {
    let dir = scratch(&format!("run-{steps}-{}", host::reads()));
    let set = vec![
        format!("train.max_steps={steps}"),
        "train.log_every=1000".into(),
        "train.eval_every=1000".into(),
        "train.checkpoint_every=1000".into(),
    ];
    let before = host::reads();
    run(&set, &dir);
    host::reads() - before
}

#[test]
fn a_training_step_reads_nothing_back_unless_it_logs() {
    // SAFETY: set before anything reads it (taper_kernels reads it once), in the only test of
    // this binary.
    std::env::set_var("TAPER_DEVICE_GENERIC", "1");
    let d = scratch("base");
    let corpus = d.join("corpus.txt");
    let text = std::fs::read_to_string(data("tinyshakespeare.txt")).unwrap();
    std::fs::write(&corpus, &text).unwrap();
    let pre = format!(
        "seed = 3\ndevice = \"cpu\"\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 64\npos_emb = \"rope\"\n\
         norm = \"rms_norm\"\nmlp = \"swiglu\"\ndropout = 0.1\n[data]\nfiles = [{corpus:?}]\n\
         special_tokens = [\"<|endoftext|>\", \"<|im_start|>\", \"<|im_end|>\"]\n[train]\nbatch_size = 2\n\
         grad_accum_steps = 2\neval_batches = 1\n"
    );
    let pretrain = |set: &[String], dir: &Path| {
        let cfg = parse_as(&pre, "pre.toml", set).unwrap();
        taper_train::pretrain::pretrain(cfg, RunSpec::new(dir, Resume::No), &mut Quiet).unwrap();
    };
    let (three, six) = (reads_of(3, pretrain), reads_of(6, pretrain));
    eprintln!("pretraining: {three} reads in 3 steps, {six} in 6");
    assert_eq!(three, six, "pretraining steps read back");

    let base = d.join("base");
    pretrain(&["train.max_steps=2".into()], &base);
    let sft = format!(
        "seed = 3\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{:?}]\nchat_template = \"chatml\"\n\
         [train]\nbatch_size = 2\ngrad_accum_steps = 2\n",
        data("sft-words/train.jsonl")
    );
    let run_sft = |set: &[String], dir: &Path| {
        let cfg = parse_as(&sft, "sft.toml", set).unwrap();
        taper_train::sft::sft(cfg, RunSpec::new(dir, Resume::No), &mut Quiet).unwrap();
    };
    let (three, six) = (reads_of(3, run_sft), reads_of(6, run_sft));
    eprintln!("SFT: {three} reads in 3 steps, {six} in 6");
    assert_eq!(three, six, "SFT steps read back");

    let pairs = d.join("pairs.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(data("pref-words/train.jsonl")).unwrap().lines().take(32).map(String::from).collect();
    std::fs::write(&pairs, lines.join("\n") + "\n").unwrap();
    for precompute in [false, true] {
        let dpo = format!(
            "seed = 3\ndevice = \"cpu\"\ninit = {base:?}\n[data]\ntrain = [{pairs:?}]\nchat_template = \"chatml\"\n\
             [dpo]\nprecompute_ref = {precompute}\nrpo_alpha = 0.5\n[train]\nbatch_size = 2\ngrad_accum_steps = 2\n"
        );
        let run_dpo = |set: &[String], dir: &Path| {
            let cfg = parse_as(&dpo, "dpo.toml", set).unwrap();
            taper_align::dpo::dpo(cfg, RunSpec::new(dir, Resume::No), &mut Quiet).unwrap();
        };
        let (three, six) = (reads_of(3, run_dpo), reads_of(6, run_dpo));
        eprintln!("DPO (precomputed reference: {precompute}): {three} reads in 3 steps, {six} in 6");
        assert_eq!(three, six, "DPO steps read back");
    }
}
