//! Hugging Face interop through the real `taper` binary: hub sources from an offline cache,
//! score, generate, export round trips, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../taper-model/tests/fixtures/hf").join(arch).canonicalize().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taper-hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn taper(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taper"));
    c.args(args).env_remove("HF_HUB_OFFLINE").env_remove("HF_HOME");
    c
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "taper failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails_with(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn score(model: &str, dir: &Path) -> Vec<serde_json::Value> {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"But soft, what light\"}\n{\"text\": \"Now is the winter\"}\n").unwrap();
    let out = dir.join(format!("scores-{}.jsonl", model.len()));
    ok(taper(&["score", "--model", model, "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap());
    std::fs::read_to_string(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn hub_source_from_an_offline_cache() {
    let d = scratch("hub");
    // The HF cache layout: refs/main names a snapshot folder holding the files.
    let repo = d.join("hf/hub/models--taper-tests--tiny-qwen3");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_dir(&fixture("qwen3"), &repo.join("snapshots").join(commit));
    let hub = |args: &[&str]| {
        let mut c = taper(args);
        c.env("HF_HOME", d.join("hf")).env("HF_HUB_OFFLINE", "1");
        c.output().unwrap()
    };
    let gen = |m: &str| {
        ok(taper(&["generate", "--model", m, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0"])
            .env("HF_HOME", d.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap())
    };
    let local = ok(taper(&[
        "generate",
        "--model",
        fixture("qwen3").to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ])
    .output()
    .unwrap());
    assert_eq!(gen("hf://taper-tests/tiny-qwen3"), local);
    assert_eq!(gen(&format!("hf://taper-tests/tiny-qwen3@{commit}")), local);
    let info = ok(hub(&["info", "hf://taper-tests/tiny-qwen3@main"]));
    assert!(info.contains("qwen3"), "{info}");
    fails_with(
        hub(&["info", "hf://taper-tests/not-there"]),
        &["hf://taper-tests/not-there@main", "not in the HF cache", "HF_HUB_OFFLINE"],
    );
    fails_with(hub(&["info", "hf://taper-tests/tiny-qwen3@v2"]), &["tiny-qwen3@v2"]);

    // A hub dataset for SFT: the data files under a prefix of a cached dataset repo.
    let ds = d.join("hf/hub/datasets--taper-tests--words/snapshots").join(commit);
    std::fs::create_dir_all(ds.join("data")).unwrap();
    std::fs::create_dir_all(d.join("hf/hub/datasets--taper-tests--words/refs")).unwrap();
    std::fs::write(d.join("hf/hub/datasets--taper-tests--words/refs/main"), commit).unwrap();
    let words = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sft-words/train.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(words).unwrap().lines().take(6).map(String::from).collect();
    std::fs::write(ds.join("data/train.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(ds.join("data/test.jsonl"), "not json\n").unwrap();
    std::fs::write(ds.join("README.md"), "# words\n").unwrap();
    let cfg = d.join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 1\ndevice = \"cpu\"\ninit = {:?}\n[data]\ntrain = [\"hf://datasets/taper-tests/words/data/train\"]\n\
             max_length = 64\n[train]\nmax_steps = 1\nbatch_size = 2\n[schedule]\nwarmup_steps = 0\n",
            fixture("qwen3")
        ),
    )
    .unwrap();
    let out = ok(hub(&["sft", "--config", cfg.to_str().unwrap(), "--run-dir", d.join("sft").to_str().unwrap()]));
    assert!(out.contains("done: step 1"), "{out}");
    fails_with(
        hub(&[
            "sft",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "data.train=[\"hf://datasets/taper-tests/words/none\"]",
        ]),
        &["hf://datasets/taper-tests/words@main", "no .jsonl, .json or .parquet files under \"none\""],
    );
}

#[test]
fn export_round_trips() {
    let d = scratch("export");
    // HF -> taper -> HF: the same tensors, bit for bit, for every family (gpt2 re-fuses c_attn).
    for arch in ["gpt2", "llama", "mistral", "qwen2", "qwen3"] {
        let out = d.join(arch);
        ok(taper(&["export", fixture(arch).to_str().unwrap(), "--format", "hf", "--out", out.to_str().unwrap()])
            .output()
            .unwrap());
        let orig = std::fs::read(fixture(arch).join("model.safetensors")).unwrap();
        let back = std::fs::read(out.join("model.safetensors")).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&orig).unwrap(),
            safetensors::SafeTensors::deserialize(&back).unwrap(),
        );
        let mut names = a.names();
        names.sort();
        let mut names_b = b.names();
        names_b.sort();
        assert_eq!(names, names_b, "{arch}");
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{arch}: {n}");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], arch);
        // The export is itself a source that scores the same.
        assert_eq!(score(fixture(arch).to_str().unwrap(), &d), score(out.to_str().unwrap(), &d), "{arch}");
    }
    // Sharding with an index, read back the same.
    let sharded = d.join("sharded");
    ok(taper(&[
        "export",
        fixture("llama").to_str().unwrap(),
        "--format",
        "hf",
        "--out",
        sharded.to_str().unwrap(),
        "--max-shard-bytes",
        "40000",
    ])
    .output()
    .unwrap());
    assert!(
        sharded.join("model.safetensors.index.json").exists()
            && sharded.join("model-00002-of-00004.safetensors").exists()
    );
    assert_eq!(score(fixture("llama").to_str().unwrap(), &d), score(sharded.to_str().unwrap(), &d));
}

#[test]
fn bad_sources_get_one_clear_line() {
    let d = scratch("bad");
    let info = |dir: &Path| taper(&["info", dir.to_str().unwrap()]).output().unwrap();
    let variant = |name: &str| {
        let v = d.join(name);
        copy_dir(&fixture("llama"), &v);
        v
    };
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("config.json");
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
    };
    // An unknown model_type.
    let v = variant("unknown");
    edit_config(&v, &|c| c["model_type"] = "mamba".into());
    fails_with(info(&v), &["model_type \"mamba\" is not supported"]);
    // A mis-shaped tensor: the config says wider than the weights are.
    let v = variant("shape");
    edit_config(&v, &|c| c["intermediate_size"] = 80.into());
    fails_with(info(&v), &["model.layers.0.mlp.gate_proj.weight", "expected shape [80, 32], found [64, 32]"]);
    // A missing tensor: one more layer than the weights hold.
    let v = variant("missing");
    edit_config(&v, &|c| c["num_hidden_layers"] = 3.into());
    fails_with(info(&v), &["model.layers.2.", "is missing"]);
    // A truncated safetensors file.
    let v = variant("truncated");
    let bytes = std::fs::read(v.join("model.safetensors")).unwrap();
    std::fs::write(v.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(info(&v), &["model.safetensors", "not a valid safetensors file"]);
    // Pickle weights only.
    let v = variant("pickle");
    std::fs::rename(v.join("model.safetensors"), v.join("pytorch_model.bin")).unwrap();
    fails_with(info(&v), &["pytorch_model.bin", "refuses", "safetensors"]);
    // A tokenizer larger than the model's vocabulary.
    let v = variant("vocab");
    let p = v.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": 300, "content": "<extra>",
        "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    std::fs::write(&p, t.to_string()).unwrap();
    fails_with(info(&v), &["tokenizer.json", "301 tokens", "vocab_size is 300"]);
    // A source that does not exist.
    fails_with(
        taper(&["export", "/nonexistent/run", "--format", "hf", "--out", d.join("x").to_str().unwrap()])
            .output()
            .unwrap(),
        &["/nonexistent/run"],
    );
}

#[test]
fn gguf_export_writes_a_readable_file_per_type() {
    let d = scratch("gguf");
    for (arch, want) in [("gpt2", "gpt2"), ("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")] {
        for ty in ["f32", "f16", "q8_0"] {
            let out = d.join(format!("{arch}-{ty}"));
            let msg = ok(taper(&[
                "export",
                fixture(arch).to_str().unwrap(),
                "--format",
                "gguf",
                "--gguf-type",
                ty,
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap());
            assert!(msg.contains(".gguf"), "{msg}");
            let file = std::fs::read_dir(&out).unwrap().flatten().next().unwrap().path();
            let g = taper_model::gguf::GgufFile::read(&file).unwrap();
            let kv = |k: &str| g.kvs.iter().find(|(n, _)| n == k).map(|(_, v)| format!("{v:?}"));
            assert!(kv("general.architecture").unwrap().contains(want), "{arch}");
            assert!(kv("tokenizer.ggml.model").unwrap().contains("gpt2"), "{arch}");
            assert!(kv("tokenizer.ggml.tokens").is_some() && kv("tokenizer.ggml.merges").is_some(), "{arch}");
            assert!(g.tensors.iter().any(|t| t.name == "token_embd.weight"), "{arch}");
        }
    }
}
