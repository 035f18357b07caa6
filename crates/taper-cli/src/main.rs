//! `taper`: tokenizer training, data preparation, pretraining, generation and inspection.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use taper_data::{datasets, prepare, tokenizer};
use taper_model::{Decoder, Rng, Sampling, Weights};
use taper_train::checkpoint;
use taper_train::pretrain::{self, Observer, Resume, RunInfo, StepLog};

#[derive(Parser)]
#[command(name = "taper", version, about = "Train transformer language models in Rust")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenizer commands.
    #[command(subcommand)]
    Tokenizer(TokCmd),
    /// Tokenize text or JSONL files into train/val token shards.
    Prepare(PrepareArgs),
    /// Pretrain a decoder language model from a TOML config.
    Pretrain(PretrainArgs),
    /// Generate text from a checkpoint or run directory.
    Generate(GenerateArgs),
    /// Describe a checkpoint or run directory.
    Info { path: PathBuf },
}

#[derive(Subcommand)]
enum TokCmd {
    /// Train a byte-level BPE or char-level tokenizer and save tokenizer.json.
    Train {
        #[arg(long, value_parser = ["bpe", "char"], default_value = "bpe")]
        kind: String,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Special tokens (repeatable); default <|endoftext|>.
        #[arg(long = "special")]
        special: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// A built-in dataset to train on instead of files.
        #[arg(long)]
        dataset: Option<String>,
        files: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct PrepareArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    #[arg(long)]
    dataset: Option<String>,
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct PretrainArgs {
    /// The run config (TOML). With --resume it defaults to the run dir's config.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, type-checked: --set train.max_steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Where config.toml, metrics.jsonl and checkpoints/ go; default runs/<config name>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Resume from the run dir's newest checkpoint, or from the given checkpoint dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint dir or a run dir (its newest checkpoint).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        let mut msg = format!("{e:#}");
        // Config errors list every problem, one per line; keep that layout.
        if !msg.contains('\n') {
            msg = msg.replace("\n", " ");
        }
        for line in msg.lines() {
            eprintln!("error: {line}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Tokenizer(TokCmd::Train { kind, vocab_size, special, out, dataset, files }) => {
            let files = with_dataset(dataset.as_deref(), files)?;
            let specials = if special.is_empty() { vec![tokenizer::DEFAULT_EOS.to_string()] } else { special };
            let kind = if kind == "char" { tokenizer::TokenizerKind::Char } else { tokenizer::TokenizerKind::Bpe };
            let tok = tokenizer::train(kind, &files, vocab_size, &specials)?;
            tokenizer::save(&tok, &out)?;
            println!("wrote {} ({} tokens)", out.display(), tokenizer::vocab_size(&tok));
        }
        Cmd::Prepare(a) => {
            let files = with_dataset(a.dataset.as_deref(), a.files)?;
            let tok = tokenizer::load(&a.tokenizer)?;
            let docs = prepare::read_documents(&files)?;
            let sources: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            let meta = prepare::prepare(&tok, &docs, &sources, &a.out, a.val_fraction)?;
            println!(
                "wrote {}: {} train tokens, {} val tokens, vocab {}",
                a.out.display(),
                meta.train_tokens,
                meta.val_tokens,
                meta.vocab_size
            );
        }
        Cmd::Pretrain(a) => pretrain_cmd(a)?,
        Cmd::Generate(a) => generate_cmd(a)?,
        Cmd::Info { path } => info_cmd(&path)?,
    }
    Ok(())
}

fn with_dataset(dataset: Option<&str>, mut files: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if let Some(name) = dataset {
        let b = datasets::find(name).with_context(|| format!("unknown dataset {name:?}"))?;
        files.push(datasets::resolve(b, |_, _| {})?);
    }
    if files.is_empty() {
        bail!("no input files (give paths or --dataset)");
    }
    for f in &files {
        if !f.exists() {
            bail!("{}: no such file", f.display());
        }
    }
    Ok(files)
}

fn pretrain_cmd(a: PretrainArgs) -> Result<()> {
    let run_dir = match (&a.run_dir, &a.config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => PathBuf::from("runs").join(c.file_stem().unwrap_or_default()),
        (None, None) => bail!("give --config FILE (or --run-dir DIR --resume)"),
    };
    let config_path = match (&a.config, &a.resume) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => run_dir.join("config.toml"),
        (None, None) => bail!("give --config FILE"),
    };
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("config {}", config_path.display()))?;
    let cfg = taper_train::config::parse(&text, &config_path.display().to_string(), &a.set)?;
    let resume = match a.resume.as_deref() {
        None => Resume::No,
        Some("") => Resume::Latest,
        Some(d) => Resume::Dir(PathBuf::from(d)),
    };
    let mut obs = Progress::new();
    let s = pretrain::pretrain(cfg, &run_dir, resume, &mut obs)?;
    obs.finish();
    println!(
        "done: step {} train loss {:.4} val loss {} in {:.1}s; run dir {}",
        s.step,
        s.train_loss,
        s.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        s.elapsed_s,
        run_dir.display()
    );
    Ok(())
}

/// Draws the training progress bar; without a terminal, prints plain lines instead.
struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        Self { bar: None, tty: std::io::stderr().is_terminal() }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) if self.tty => b.println(s),
            _ => eprintln!("{s}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn started(&mut self, i: &RunInfo) {
        self.line(&format!(
            "model: {:.2}M parameters, vocab {}; data: {} train / {} val tokens; device {}",
            i.params as f64 / 1e6,
            i.vocab_size,
            i.train_tokens,
            i.val_tokens,
            i.device
        ));
        let bar = ProgressBar::new(i.end_step);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}").expect("valid template"),
        );
        bar.set_position(i.start_step);
        if !self.tty {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        self.bar = Some(bar);
    }

    fn step(&mut self, l: &StepLog) {
        let msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", l.loss, l.lr, l.tokens_per_sec);
        if let Some(b) = &self.bar {
            b.set_position(l.step);
            b.set_message(msg.clone());
        }
        if !self.tty {
            eprintln!("step {} {msg}", l.step);
        }
    }

    fn eval(&mut self, step: u64, v: f64) {
        self.line(&format!("step {step}: val loss {v:.4}"));
    }

    fn checkpoint(&mut self, dir: &Path) {
        self.line(&format!("saved {}", dir.display()));
    }

    fn message(&mut self, m: &str) {
        self.line(m);
    }

    fn download(&mut self, done: u64, total: u64) {
        if self.bar.is_none() {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("downloading {bar:30} {bytes}/{total_bytes}").expect("valid template"),
            );
            self.bar = Some(b);
        }
        let b = self.bar.as_ref().expect("set above");
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
            self.bar = None;
        }
    }
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let device = pretrain::select_device(&a.device)?;
    let dir = checkpoint::resolve(&a.model)?;
    let (cfg, tensors) = checkpoint::load_model(&dir, &device)?;
    let tok = tokenizer::load(&dir.join("tokenizer.json"))?;
    let model = Decoder::load(&Weights::new(tensors).detached(), &cfg.model)?;
    let enc = tok.encode(a.prompt.as_str(), false).map_err(|e| anyhow::anyhow!("prompt: {e}"))?;
    let prompt = enc.get_ids().to_vec();
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let stop: Vec<u32> = tokenizer::eos_id(&tok).into_iter().collect();
    let mut rng = Rng::new(a.seed);
    let mut out = std::io::stdout();
    write!(out, "{}", a.prompt)?;
    let mut ids = Vec::new();
    let mut printed = 0;
    // Decode the growing sequence and print the new suffix: tokens can end mid-character.
    let result = model.generate(&prompt, a.max_tokens, &sampling, &stop, &mut rng, |t| {
        if stop.contains(&t) {
            return;
        }
        ids.push(t);
        if let Ok(s) = tokenizer::decode(&tok, &ids) {
            if s.len() > printed && s.is_char_boundary(printed) && !s.ends_with('\u{FFFD}') {
                let _ = write!(out, "{}", &s[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
    });
    result?;
    writeln!(out)?;
    Ok(())
}

fn info_cmd(path: &Path) -> Result<()> {
    let dir = checkpoint::resolve(path)?;
    let state = checkpoint::read_state(&dir)?;
    let cfg: taper_train::RunConfig = toml::from_str(&state.config).context("saved config")?;
    let (_, tensors) = checkpoint::load_model(&dir, &candle_core::Device::Cpu)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let m = &cfg.model;
    println!("checkpoint      {}", dir.display());
    println!("step            {} ({} tokens seen, {} skipped)", state.step, state.tokens_seen, state.skipped_steps);
    println!("val loss        {}", state.val_loss.map_or("-".into(), |v| format!("{v:.4}")));
    println!("parameters      {params} ({:.2}M) in {} tensors", params as f64 / 1e6, tensors.len());
    println!(
        "model           {} layers, {} heads ({} kv), width {}, mlp {}, context {}, vocab {}",
        m.n_layer,
        m.n_head,
        m.kv_heads(),
        m.n_embd,
        m.hidden(),
        m.block_size,
        m.vocab_size
    );
    println!(
        "                pos {:?}, norm {:?}, mlp {:?}, bias {}, tied {}",
        m.pos_emb, m.norm, m.mlp, m.bias, m.tie_embeddings
    );
    println!("optimizer       {:?} lr {} wd {}", cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay);
    println!("tokenizer       sha256 {}", state.tokenizer_sha256);
    for (f, h) in &state.files {
        let size = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        println!("file            {f} {size} bytes sha256 {}", &h[..16]);
    }
    Ok(())
}
