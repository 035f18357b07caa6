//! `taper`: tokenizer training, data preparation, pretraining, generation and inspection.

mod export;

use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use taper_data::{datasets, prepare, tokenizer};
use taper_model::{Decoder, ModelKind, Rng, Sampling, Weights};
use taper_train::config::Objective;
use taper_train::config::RecipeConfig;
use taper_train::device::select_device;
use taper_train::observe::{Observer, RunInfo, StepLog, Summary};
use taper_train::trainer::{Resume, RunSpec};
use taper_train::{checkpoint, multiple_choice, source};

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
    Pretrain(TrainArgs),
    /// Supervised fine-tuning (full or LoRA) from a TOML config.
    Sft(TrainArgs),
    /// Train a reward model (scalar head, Bradley-Terry loss) on preference pairs.
    Rm(TrainArgs),
    /// Direct preference optimisation (sigmoid / cDPO, IPO, hinge, SimPO) on preference pairs.
    Dpo(TrainArgs),
    /// PPO (RLHF) with a value head and a KL penalty, against a reward model or a verifiable reward.
    Ppo(TrainArgs),
    /// GRPO: group-relative policy optimisation against a reward model or a verifiable reward.
    Grpo(TrainArgs),
    /// Loss, perplexity and exact match of a model source on SFT-format data (--data), or
    /// multiple-choice acc and acc_norm as lm-evaluation-harness scores them (--task).
    Eval(EvalArgs),
    /// Generate text from any model source; for an encoder, fill the prompt's mask tokens.
    Generate(GenerateArgs),
    /// Sample responses to prompts (prompt/answer or SFT records), one JSONL line per prompt:
    /// on-policy data for preference pairs or rejection sampling.
    Sample(SampleArgs),
    /// Per-token log-probabilities of each JSONL line's `text` under a model.
    Score(ScoreArgs),
    /// Export a model source to Hugging Face (safetensors + config.json) or GGUF.
    Export(ExportArgs),
    /// Describe a model source.
    Info { path: String },
    /// One chart comparing runs' metrics (from their metrics.jsonl), as PNG or SVG.
    Plot(PlotArgs),
    /// Time training steps of a pretraining config's model on random tokens: tokens/s, forward,
    /// backward and optimizer ms, GFLOP/s, MFU against a measured GEMM peak, peak RSS.
    Bench(BenchArgs),
}

#[derive(Args)]
struct PlotArgs {
    /// Run dirs (each with a metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The chart: a path ending in .png or .svg.
    #[arg(long)]
    out: PathBuf,
    /// Metrics to draw, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "loss")]
    metric: Vec<String>,
    /// Trailing moving average over this many points (the raw curve drawn faintly beneath).
    #[arg(long, default_value_t = 0)]
    smooth: usize,
    /// The x axis: "step" or "tokens" (seen).
    #[arg(long, default_value = "step", value_parser = ["step", "tokens"])]
    x: String,
    /// A logarithmic y axis.
    #[arg(long)]
    log_y: bool,
    #[arg(long)]
    title: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// A pretraining config (TOML); model.vocab_size must be set.
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, type-checked: --set train.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Timed steps.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A model source: checkpoint, run dir, HF model dir or hf://Org/Name[@rev].
    #[arg(long)]
    model: String,
    /// JSONL files in TRL's formats (messages, prompt/completion, text): loss, perplexity
    /// and exact match.
    #[arg(long)]
    data: Vec<String>,
    /// Multiple-choice task files (JSONL: context, choices, label, optional id): acc and
    /// acc_norm as lm-evaluation-harness computes them.
    #[arg(long)]
    task: Vec<PathBuf>,
    /// Continuations scored per padded forward (--task).
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    batch_size: usize,
    /// With --task: per-question log-likelihoods and the summary as JSON.
    #[arg(long)]
    output: Option<PathBuf>,
    /// "chatml" or a template file; default: the model's own.
    #[arg(long)]
    chat_template: Option<String>,
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    max_new_tokens: usize,
    /// Score at most this many examples for exact match, or questions per task (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct SampleArgs {
    /// A model source: checkpoint, run dir, HF model dir or hf://Org/Name[@rev].
    #[arg(long)]
    model: String,
    /// Prompt files (JSONL or Parquet): `prompt` (+ `answer`) or SFT records.
    #[arg(long, required = true)]
    prompts: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    n: usize,
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = temperature, allow_negative_numbers = true)]
    temperature: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    top_p: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// "chatml", a tokenizer_config.json or .jinja file; default the model's own template.
    #[arg(long)]
    chat_template: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ScoreArgs {
    /// A model source: checkpoint, run dir, HF model dir or hf://Org/Name[@rev].
    #[arg(long)]
    model: String,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ExportArgs {
    /// A model source: checkpoint, run dir, HF model dir or hf://Org/Name[@rev].
    src: String,
    #[arg(long, value_parser = ["hf", "gguf"])]
    format: String,
    #[arg(long)]
    out: PathBuf,
    /// GGUF tensor type of the weight matrices [default: f16, or --dtype's].
    #[arg(long, value_parser = ["f32", "f16", "bf16", "q8_0"])]
    gguf_type: Option<String>,
    /// The float type the weights are written in: HF safetensors (and config.json's dtype), or
    /// GGUF's weight matrices. Checkpoints keep f32 master weights whatever a run trained in.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
    /// Shard HF safetensors above this many bytes.
    #[arg(long, default_value_t = export::DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// For a LoRA checkpoint: fold the adapters into the base and write a full model. Without
    /// it, `--format hf` writes the PEFT adapter alone.
    #[arg(long)]
    merge_lora: bool,
}

#[derive(Subcommand)]
enum TokCmd {
    /// Train a byte-level BPE or char-level tokenizer and save tokenizer.json.
    Train {
        #[arg(long, value_parser = ["bpe", "char"], default_value = "bpe")]
        kind: String,
        #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
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
    /// The share of each file's tokens held out, in (0, 1).
    #[arg(long, default_value_t = 0.1, value_parser = fraction, allow_negative_numbers = true)]
    val_fraction: f64,
    #[arg(long)]
    dataset: Option<String>,
    files: Vec<PathBuf>,
}

/// The flags every training command takes.
#[derive(Args)]
struct TrainArgs {
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
    /// Start afresh in a run dir that holds a run: the old run is moved aside, not deleted.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// With --resume: continue although the config changes what is trained (the change is
    /// recorded in metrics.jsonl and the checkpoints); the model's shape can never change.
    #[arg(long, requires = "resume")]
    allow_config_change: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A model source: checkpoint, run dir, HF model dir or hf://Org/Name[@rev].
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Default: the model's generation_config, else 200.
    #[arg(long, value_parser = at_least_one)]
    max_tokens: Option<usize>,
    /// 0 is greedy. Default: the model's generation_config, else 0.8.
    #[arg(long, value_parser = temperature, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Default: the model's generation_config, else 200.
    #[arg(long)]
    top_k: Option<usize>,
    /// Default: the model's generation_config, else 1.0.
    #[arg(long, value_parser = top_p, allow_negative_numbers = true)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Encoder-decoder models: beam size (1 is greedy).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    beams: usize,
    /// Encoder-decoder beam search: HF's length_penalty (score / length^penalty).
    #[arg(long, default_value_t = 1.0, value_parser = finite, allow_negative_numbers = true)]
    length_penalty: f64,
}

fn main() {
    keep_candle_pool_off_the_cores();
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    // Output into a pipe closed early (`taper info RUN | head -1`) ends the process quietly,
    // as other command-line tools do, rather than as a failed write.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    taper_train::bench::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            // clap's message names the flag and the value; the usage and help lines after the
            // first blank line are left out, so it reads as one line.
            let text = e.render().to_string();
            let msg: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            eprintln!("error: {}", msg.join(" ").trim_start_matches("error: "));
            std::process::exit(1);
        }
    };
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

/// Gives candle's element-wise thread pool one thread unless `CANDLE_NUM_THREADS` says otherwise.
///
/// candle runs element-wise ops of 64K elements and more on a pool of its own, beside the rayon
/// pool that carries the GEMMs and taper's kernels; its workers spin about a millisecond after
/// every op before they park, so on a CPU they hold the cores the next GEMM is about to use (30%
/// of the samples of a shakespeare-char step were in that spin and its barrier). taper's heavy
/// element-wise work is in its own kernels on rayon, so candle's few remaining ops lose little
/// by running on the calling thread: the shakespeare-char step went from 63 to 51 ms and the
/// reference bench config from 1416-1470 to 1539-1666 tokens/s, with bit-identical losses.
/// GPU devices do not use the pool.
fn keep_candle_pool_off_the_cores() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread exists (set_var is not safe once other threads read the environment),
        // and before candle builds its pool, which reads the variable once.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
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
        Cmd::Pretrain(a) => {
            let (cfg, run) = run_setup::<taper_train::RunConfig>(&a)?;
            let pretrain = match (cfg.model.kind, cfg.objective) {
                (ModelKind::EncoderDecoder, _) => taper_train::seq2seq::pretrain,
                (_, Objective::Mlm) => taper_train::mlm::pretrain,
                (_, Objective::Clm) => taper_train::pretrain::pretrain,
            };
            train_cmd(cfg, run, pretrain)?
        }
        Cmd::Sft(a) => train_with(&a, taper_train::sft::sft)?,
        Cmd::Rm(a) => train_with(&a, taper_align::rm::rm)?,
        Cmd::Dpo(a) => train_with(&a, taper_align::dpo::dpo)?,
        Cmd::Ppo(a) => train_with(&a, taper_align::ppo::ppo)?,
        Cmd::Grpo(a) => train_with(&a, taper_align::grpo::grpo)?,
        Cmd::Eval(a) => eval_cmd(a)?,
        Cmd::Generate(a) => generate_cmd(a)?,
        Cmd::Score(a) => score_cmd(a)?,
        Cmd::Export(a) => export_cmd(a)?,
        Cmd::Sample(a) => sample_cmd(a)?,
        Cmd::Info { path } => info_cmd(&path)?,
        Cmd::Bench(a) => bench_cmd(a)?,
        Cmd::Plot(a) => plot_cmd(a)?,
    }
    Ok(())
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    use taper_cli::plot::{plot, read_runs, PlotOptions, XAxis};
    let x = if a.x == "tokens" { XAxis::Tokens } else { XAxis::Step };
    let series = read_runs(&a.runs, &a.metric, x)?;
    let opts = PlotOptions { x, log_y: a.log_y, smooth: a.smooth, title: a.title, ..PlotOptions::default() };
    plot(&series, &a.out, &opts)?;
    println!("wrote {} ({} curves)", a.out.display(), series.len());
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

/// A training run's config (parsed and checked, overrides applied), its directory and where
/// to resume from: shared by every recipe.
fn run_setup<C: RecipeConfig>(a: &TrainArgs) -> Result<(C, RunSpec)> {
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
    let cfg = taper_train::config::parse_as(&text, &config_path.display().to_string(), &a.set)?;
    let resume = match a.resume.as_deref() {
        None => Resume::No,
        Some("") => Resume::Latest,
        Some(d) => Resume::Dir(PathBuf::from(d)),
    };
    let mut run = RunSpec::new(run_dir, resume);
    (run.overwrite, run.allow_config_change) = (a.overwrite, a.allow_config_change);
    Ok((cfg, run))
}

/// Runs one recipe under the progress bar and prints its summary. Launched as several
/// processes (mpirun, srun), they train as data-parallel replicas: the main rank alone draws,
/// prints and writes; a rank that fails stops them all.
fn train_cmd<C, E>(
    cfg: C,
    mut run: RunSpec,
    recipe: fn(C, RunSpec, &mut dyn Observer) -> Result<Summary, E>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let comm = taper_dist::from_env()?;
    run.seams.dist = comm.clone();
    let dir = run.dir.clone();
    let result = if comm.is_main() {
        let mut obs = Progress::new();
        let r = recipe(cfg, run, &mut obs);
        obs.finish();
        r
    } else {
        recipe(cfg, run, &mut taper_train::observe::Quiet)
    };
    match result {
        Ok(s) if comm.is_main() => println!("{}", s.line(&dir)),
        Ok(_) => {}
        Err(e) if comm.world() > 1 => {
            eprintln!("error: rank {}: {}", comm.rank(), format!("{e}").replace('\n', " "));
            comm.abort(1)
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// [`train_cmd`] for a recipe whose config is read from the command's flags.
fn train_with<C, E>(a: &TrainArgs, recipe: fn(C, RunSpec, &mut dyn Observer) -> Result<Summary, E>) -> Result<()>
where
    C: RecipeConfig,
    E: std::error::Error + Send + Sync + 'static,
{
    let (cfg, run) = run_setup::<C>(a)?;
    train_cmd(cfg, run, recipe)
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("config {}", a.config.display()))?;
    let cfg: taper_train::RunConfig = taper_train::config::parse_as(&text, &a.config.display().to_string(), &a.set)?;
    let comm = taper_dist::from_env()?;
    let r = taper_train::bench::bench(&cfg, a.steps, a.warmup, &comm)?;
    if !comm.is_main() {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} ({} threads): {:.2}M params, {} tokens/step",
        r.implementation,
        r.threads,
        r.params as f64 / 1e6,
        r.tokens_per_step
    );
    println!("tokens/s      {:.0}", r.tokens_per_sec);
    println!(
        "ms/step       {:.1} (forward {:.1}, backward {:.1}, optimizer {:.1})",
        r.step_ms, r.forward_ms, r.backward_ms, r.optimizer_ms
    );
    println!("GFLOP/s       {:.1} ({:.3} GFLOP/token)", r.gflops, r.flops_per_token / 1e9);
    println!("GEMM peak     {:.1} GFLOP/s at the model's matmul shapes", r.gemm_peak_gflops);
    println!("MFU           {:.1}%", 100.0 * r.mfu);
    if r.precision != "f32" {
        println!(
            "{:<13} GEMM peak {:.1} GFLOP/s, MFU {:.1}% against it (f32 figures above)",
            r.precision,
            r.precision_gemm_peak_gflops,
            100.0 * r.precision_mfu
        );
    }
    println!("peak RSS      {:.0} MB", r.peak_rss_mb);
    if r.world > 1 {
        println!(
            "replicas      {} (all-reduce {:.1} ms/step, {:.1}% of the step)",
            r.world,
            r.allreduce_ms,
            100.0 * r.allreduce_share
        );
    }
    println!("optimizer     {:.1} MB of state per replica", r.optimizer_state_mb);
    let activations = match r.activations_mb.is_finite() {
        true => format!("{:.0} MB activations and scratch", r.activations_mb),
        false => "activations not measured on this device".into(),
    };
    println!(
        "memory        {:.0} MB weights, {:.0} MB gradients, {:.0} MB optimizer state, {activations}",
        r.weights_mb, r.gradients_mb, r.optimizer_state_mb
    );
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    match (a.data.is_empty(), a.task.is_empty()) {
        (true, true) => bail!("taper eval: give --data (loss and exact match) or --task (multiple choice)"),
        (false, false) => bail!("taper eval: give --data or --task, not both"),
        _ => {}
    }
    if a.output.is_some() && a.task.is_empty() {
        bail!("taper eval: --output is for --task");
    }
    let tasks = a.task.iter().map(|p| multiple_choice::load_task(p)).collect::<Result<Vec<_>, _>>()?;
    let device = select_device(&a.device)?;
    let src = source::load(&a.model, &device)?;
    if !tasks.is_empty() {
        return eval_tasks(&a, &src, &tasks);
    }
    let mut obs = Progress::new();
    let r = taper_train::sft::evaluate_source(
        &src,
        &a.data,
        a.chat_template.as_deref(),
        a.max_new_tokens,
        a.limit,
        &mut obs,
    )?;
    println!("examples        {} ({} loss tokens)", r.examples, r.loss_tokens);
    println!("loss            {:.4}", r.loss);
    println!("perplexity      {:.3}", r.perplexity);
    if let Some((hits, n)) = r.exact_match {
        println!("exact match     {hits}/{n} = {:.1}%", 100.0 * hits as f64 / n.max(1) as f64);
    }
    Ok(())
}

/// `taper eval --task`: each task's acc and acc_norm, and with --output every question's scores.
fn eval_tasks(a: &EvalArgs, src: &source::Source, tasks: &[multiple_choice::Task]) -> Result<()> {
    src.expect_kind(ModelKind::Decoder)?;
    let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let m = multiple_choice::McModel {
        model: &model,
        tokenizer: &src.tokenizer,
        prefix_id: multiple_choice::prefix_id(src)?,
    };
    let mut results = Vec::new();
    for t in tasks {
        let r = multiple_choice::score_task(&m, t, a.batch_size, a.limit)?;
        let pm = |e: Option<f64>| e.map(|e| format!(" ± {e:.4}")).unwrap_or_default();
        println!("{}  ({} questions)", r.task, r.questions);
        println!("  acc       {:.4}{}", r.acc, pm(r.acc_stderr));
        println!("  acc_norm  {:.4}{}", r.acc_norm, pm(r.acc_norm_stderr));
        results.push(r);
    }
    if let Some(out) = &a.output {
        let json = serde_json::json!({ "model": a.model, "tasks": results });
        std::fs::write(out, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
    }
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
    let device = select_device(&a.device)?;
    let src = source::load(&a.model, &device)?;
    if src.config.kind == ModelKind::Encoder {
        let f = taper_train::fill_mask::fill_mask(&src, &a.prompt, a.top_k.unwrap_or(5))?;
        println!("{}", f.text);
        for (n, m) in f.masks.iter().enumerate() {
            let top: Vec<String> = m.top.iter().map(|(t, p)| format!("{t:?} {p:.4}")).collect();
            println!("{} {} (token {}): {}", f.mask_token, n + 1, m.position, top.join(", "));
        }
        return Ok(());
    }
    if src.config.kind == ModelKind::EncoderDecoder {
        let max = a.max_tokens.or(src.generation.max_new_tokens).unwrap_or(src.config.block_size);
        println!("{}", taper_train::seq2seq::translate(&src, &a.prompt, a.beams, a.length_penalty, max)?);
        return Ok(());
    }
    let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let tok = &src.tokenizer;
    let enc = tokenizer::encode(tok, a.prompt.as_str(), true).context("--prompt")?;
    let prompt = enc.get_ids().to_vec();
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    // Defaults: the model's generation_config (greedy unless it samples), else nanoGPT's.
    let gen = &src.generation;
    let greedy_default = gen.do_sample == Some(false);
    let sampling = Sampling {
        temperature: a.temperature.unwrap_or(if greedy_default { 0.0 } else { gen.temperature.unwrap_or(0.8) }),
        top_k: a.top_k.or(gen.top_k).unwrap_or(200),
        top_p: a.top_p.or(gen.top_p).unwrap_or(1.0),
    };
    let max_tokens = a.max_tokens.or(gen.max_new_tokens).unwrap_or(200);
    // The model's end of sequence, and a chat model's end of turn.
    let stop = taper_train::chat::stop_ids(&src);
    let mut rng = Rng::new(a.seed);
    let mut out = std::io::stdout();
    write!(out, "{}", a.prompt)?;
    let mut ids = Vec::new();
    let mut printed = 0;
    // Decode the growing sequence and print the new suffix: tokens can end mid-character.
    let result = model.generate(&prompt, max_tokens, &sampling, &stop, &mut rng, |t| {
        if stop.contains(&t) {
            return;
        }
        ids.push(t);
        if let Ok(s) = tokenizer::decode(tok, &ids) {
            if s.len() > printed && s.is_char_boundary(printed) && !s.ends_with('\u{FFFD}') {
                let _ = write!(out, "{}", &s[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
    });
    result?;
    // Whatever is left, such as a trailing partial character, as a decoder shows it.
    let s = tokenizer::decode(tok, &ids)?;
    if s.len() > printed && s.is_char_boundary(printed) {
        write!(out, "{}", &s[printed..])?;
    }
    writeln!(out)?;
    Ok(())
}

fn score_cmd(a: ScoreArgs) -> Result<()> {
    let device = select_device(&a.device)?;
    let src = source::load(&a.model, &device)?;
    let scored = taper_align::score::score_file(&src, &a.input)?;
    let mut out = String::new();
    for s in &scored {
        out.push_str(&serde_json::to_string(s)?);
        out.push('\n');
    }
    std::fs::write(&a.out, out).with_context(|| a.out.display().to_string())?;
    eprintln!("scored {} texts into {}", scored.len(), a.out.display());
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> Result<()> {
    let device = select_device(&a.device)?;
    let src = source::load(&a.model, &device)?;
    let o = taper_align::sample::SampleOptions {
        n: a.n,
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        seed: a.seed,
        chat_template: a.chat_template.clone(),
    };
    let lines = taper_align::sample::sample_prompts(&src, &a.prompts, &o)?;
    let mut out = String::new();
    for l in &lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    std::fs::write(&a.out, out).with_context(|| a.out.display().to_string())?;
    eprintln!("sampled {} x {} responses into {}", lines.len(), a.n, a.out.display());
    Ok(())
}

fn export_cmd(a: ExportArgs) -> Result<()> {
    let src = source::load(&a.src, &candle_core::Device::Cpu)?;
    match (&src.lora, a.merge_lora, a.format.as_str()) {
        (None, true, _) => bail!("--merge-lora: {} has no LoRA adapters (it is a full model)", a.src),
        (Some(_), false, "gguf") => {
            bail!("{} is a LoRA checkpoint: pass --merge-lora to fold its adapters into the base for GGUF", a.src)
        }
        (Some(l), false, _) => {
            export::export_peft(&src, l, &a.out)?;
            println!(
                "wrote {} (PEFT LoRA adapter, r {}, over base {}; --merge-lora writes a full model)",
                a.out.display(),
                l.config.r,
                l.base
            );
            return Ok(());
        }
        _ => {}
    }
    match a.format.as_str() {
        "hf" => {
            if a.gguf_type.is_some() {
                bail!("--gguf-type is for --format gguf; --dtype sets the HF weights' type");
            }
            let dtype = match a.dtype.as_deref() {
                Some("bf16") => candle_core::DType::BF16,
                Some("f16") => candle_core::DType::F16,
                _ => candle_core::DType::F32,
            };
            let family = export::export_hf(&src, &a.out, a.max_shard_bytes, dtype)?;
            println!("wrote {} ({} model, {})", a.out.display(), family.model_type(), dtype.as_str());
        }
        _ => {
            if src.config.kind != ModelKind::Decoder {
                bail!("{}: GGUF export is for decoder LMs, and this is {}", a.src, src.config.kind.describe());
            }
            let gguf_type = match (&a.gguf_type, &a.dtype) {
                (Some(t), Some(d)) if t != d => bail!("--gguf-type {t} and --dtype {d} disagree: give one"),
                (Some(t), _) | (None, Some(t)) => t.clone(),
                (None, None) => "f16".to_string(),
            };
            let ty: taper_cli::gguf_export::GgufType = gguf_type.parse()?;
            std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
            // Named after what the user gave (a run dir, an HF dir, a hub id), not the checkpoint.
            let name =
                a.src.trim_end_matches('/').rsplit(['/', '@']).find(|p| !p.is_empty()).unwrap_or("model").to_string();
            let file = a.out.join(format!("{name}-{gguf_type}.gguf"));
            let gsrc = taper_cli::gguf_export::GgufSource {
                cfg: &src.config,
                tensors: &src.weights,
                tokenizer_json: &src.tokenizer_path,
                tokenizer_config: src.tokenizer_config.as_ref(),
                name: &name,
            };
            taper_cli::gguf_export::write_gguf(&file, &gsrc, ty)?;
            println!("wrote {}", file.display());
        }
    }
    Ok(())
}

fn info_cmd(spec: &str) -> Result<()> {
    let src = source::load(spec, &candle_core::Device::Cpu)?;
    let params: usize = src.weights.values().map(|t| t.elem_count()).sum();
    let m = &src.config;
    let state = match &src.run_config {
        Some(_) => Some(checkpoint::read_state(&src.dir)?),
        None => None,
    };
    println!("source          {}", src.dir.display());
    match (&state, src.family) {
        (Some(s), _) => {
            println!("step            {} ({} tokens seen, {} skipped)", s.step, s.tokens_seen, s.skipped_steps);
            println!("val loss        {}", s.val_loss.map_or("-".into(), |v| format!("{v:.4}")));
        }
        (None, Some(f)) => println!("format          Hugging Face {} ({})", f.model_type(), f.architecture()),
        _ => {}
    }
    println!("parameters      {params} ({:.2}M) in {} tensors", params as f64 / 1e6, src.weights.len());
    println!(
        "model           {} layers, {} heads ({} kv, size {}), width {}, mlp {}, context {}, vocab {}",
        m.n_layer,
        m.n_head,
        m.kv_heads(),
        m.head_dim(),
        m.n_embd,
        m.hidden(),
        m.block_size,
        m.vocab_size
    );
    println!(
        "                pos {:?}, norm {:?}, mlp {:?}, bias {}, tied {}",
        m.pos_emb, m.norm, m.mlp, m.bias, m.tie_embeddings
    );
    if m.kind != ModelKind::Decoder {
        let ln = if m.post_norm { "post-LN" } else { "pre-LN" };
        println!("kind            {}: bidirectional, {ln}, {} token types", m.kind.describe(), m.type_vocab_size);
    }
    println!(
        "tokenizer       {} tokens; eos {:?}; bos {:?}; chat template {}",
        tokenizer::vocab_size(&src.tokenizer),
        src.eos_ids,
        src.bos_id,
        if src.chat_template.is_some() { "yes" } else { "no" }
    );
    if let (Some(cfg), Some(s)) = (&src.run_config, &state) {
        println!("optimizer       {:?} lr {} wd {}", cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay);
        for (f, h) in &s.files {
            let size = std::fs::metadata(src.dir.join(f)).map(|m| m.len()).unwrap_or(0);
            println!("file            {f} {size} bytes sha256 {}", &h[..16]);
        }
    }
    Ok(())
}

/// A count of at least 1.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err("must be a finite number".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A sampling temperature: 0 (greedy) or more.
fn temperature(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| if v >= 0.0 { Ok(v) } else { Err("must be >= 0 (0 is greedy)".into()) })
}

/// A nucleus: in (0, 1].
fn top_p(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| if v > 0.0 && v <= 1.0 { Ok(v) } else { Err("must be in (0, 1]".into()) })
}

/// A share strictly between 0 and 1.
fn fraction(s: &str) -> std::result::Result<f64, String> {
    finite(s).and_then(|v| if v > 0.0 && v < 1.0 { Ok(v) } else { Err("must be in (0, 1)".into()) })
}
