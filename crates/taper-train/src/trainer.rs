//! The training loop, written once for every recipe.
//!
//! A recipe says what it trains and how: its data and model ([`Built`]), the loss of one
//! micro-batch, its held-out evaluation, and any state of its own a checkpoint must carry
//! ([`Recipe`]). The loop owns everything else, in this order:
//!
//! 1. the device, the run dir, and the checkpoint to resume from (its recipe and config
//!    checked against this run's);
//! 2. the recipe built (its data, and its model fresh or from the checkpoint), the optimizer
//!    and the recipe's own state restored, the resolved `config.toml` written;
//! 3. each step: the recipe's plan (RL recipes sample their rollouts here), then for each
//!    optimizer update the micro-batches' gradients accumulated, the gradient seam (where
//!    data parallelism reduces them), the non-finite guard, clipping and the update;
//! 4. the cadence: evaluate, log to every sink, checkpoint (keeping the newest
//!    `keep_checkpoints`), stop at `stop_at_step`;
//! 5. the recipe's end-of-run evaluation and the summary.

use crate::checkpoint::{self, Checkpoint, ConfigChange, Contents, TrainerState, FORMAT_VERSION};
use crate::config::{LogConfig, RecipeConfig};
use crate::data_parallel::{self, Sharded, Updater};
use crate::device::select_device;
use crate::loss_scale::{LossScale, LossScaler};
use crate::observe::{Observer, RunInfo, StepLog, Summary};
use crate::optim::{Optimizer, Param};
use crate::run_dir;
pub use crate::run_dir::Resume;
use crate::sinks::{Jsonl, Sink, TensorBoard};
use crate::steps::{accumulate_scaled, guarded_update, Guard};
use crate::{io_err, Result, TrainError};
use candle_core::{Device, Tensor, Var};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;
use taper_dist::Comm;
use taper_model::{host, Rng};

/// Where a run lives, where it starts from, and the seams its loop runs with.
pub struct RunSpec {
    pub dir: PathBuf,
    pub resume: Resume,
    /// Start afresh in a dir that holds a run, moving the old run aside.
    pub overwrite: bool,
    /// Resume although the config changed what is trained (recorded in the metrics and the
    /// checkpoints); the model's shape can never change.
    pub allow_config_change: bool,
    pub seams: Seams,
}

impl RunSpec {
    pub fn new(dir: impl Into<PathBuf>, resume: Resume) -> Self {
        Self { dir: dir.into(), resume, overwrite: false, allow_config_change: false, seams: Seams::default() }
    }
}

/// The loop's seams, each a no-op by default, filled by the features that need them.
pub struct Seams {
    /// The replicas this run is one of: where an update's gradients become complete (averaged
    /// across ranks, [`data_parallel::reduce`]) before the guard and the optimizer see them.
    pub dist: Rc<dyn Comm>,
    /// Sinks besides `metrics.jsonl`, which every run writes.
    pub sinks: Vec<Box<dyn Sink>>,
}

impl Default for Seams {
    fn default() -> Self {
        Self { dist: Rc::new(taper_dist::Single), sinks: Vec::new() }
    }
}

/// What a recipe's builder is given.
pub struct Env<'a> {
    pub device: Device,
    pub run_dir: &'a Path,
    /// The checkpoint being resumed, already checked against this run's config: the recipe
    /// takes its trainable tensors from it.
    pub checkpoint: Option<&'a Checkpoint>,
    /// `train.precision`, which the loop applies to the fused GEMMs.
    pub precision: taper_kernels::Precision,
    /// The replicas: RL recipes split their prompts by rank and reduce their statistics.
    pub dist: Rc<dyn Comm>,
    pub obs: &'a mut dyn Observer,
}

impl Env<'_> {
    /// Whether this rank may write into the run dir (the others read what it wrote).
    pub fn writes(&self) -> bool {
        self.dist.is_main()
    }
}

/// Trainable parameters by name, in a fixed order.
pub type Params = Vec<(String, Var)>;

/// A built recipe: the object the loop drives and what the loop needs to know of it.
pub struct Built<R> {
    pub recipe: R,
    pub params: Params,
    /// What its checkpoints hold besides the trained tensors.
    pub contents: Contents,
    pub vocab_size: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

/// How a step updates: `updates` optimizer updates of `micro_batches` micro-batches each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub updates: usize,
    pub micro_batches: usize,
}

/// Which micro-batch a loss is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Micro {
    /// The 0-based step being trained.
    pub step: u64,
    /// The update within the step (0 unless the recipe plans several).
    pub update: usize,
    /// This rank's micro-batch of the update.
    pub index: usize,
    /// Micro-batches each rank accumulates in this update.
    pub count: usize,
    pub rank: usize,
    pub world: usize,
}

impl Micro {
    /// The micro-batch's place among the step's (one update's) micro-batches of all ranks:
    /// index x world + rank. N ranks at batch B/N then read what one rank at B/N reads with
    /// N times the accumulation.
    pub fn slot(&self) -> usize {
        self.index * self.world + self.rank
    }

    /// The micro-batch's index in the run's sequence of micro-batches, for recipes that make
    /// one update per step: what their batch order is keyed by.
    pub fn global(&self) -> u64 {
        self.step * (self.count * self.world) as u64 + self.slot() as u64
    }

    /// The dropout stream of this micro-batch: a pure function of (seed, step, slot), so a
    /// resumed run draws the same masks, and replicas different ones.
    pub fn dropout_rng(&self, seed: u64) -> Rng {
        Rng::derive(seed, &[self.step, self.slot() as u64])
    }
}

/// What a step trained on and the recipe's own metrics of it.
#[derive(Debug, Default)]
pub struct StepReport {
    pub tokens: u64,
    pub metrics: Map<String, Value>,
    /// Metrics still on the device: their names and an f64 vector of their values, read only
    /// when the step is logged.
    pub device_metrics: Option<(Vec<&'static str>, Tensor)>,
}

/// A held-out evaluation.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The held-out loss: the step line's `val_loss`.
    pub loss: Option<f64>,
    /// What the summary and the checkpoint report: the loss, or an RL recipe's held-out reward.
    pub score: Option<f64>,
    pub metrics: Map<String, Value>,
    /// Text samples (tag, text) for the sinks.
    pub samples: Vec<(String, String)>,
}

impl Evaluation {
    /// An evaluation whose score is its loss.
    pub fn of_loss(loss: f64) -> Self {
        Self { loss: Some(loss), score: Some(loss), ..Default::default() }
    }
}

/// What a recipe does; the loop does the rest.
pub trait Recipe {
    type Error: From<TrainError> + From<candle_core::Error>;

    /// What the summary calls the evaluation's score.
    const SCORE_NAME: &'static str = "val loss";

    /// At the start of each step: how many updates it makes and of how many micro-batches.
    /// Most recipes make one update of `train.grad_accum_steps` micro-batches (`accum`); RL
    /// recipes sample their rollouts here and plan several.
    fn plan(&mut self, _step: u64, accum: usize) -> std::result::Result<Plan, Self::Error> {
        Ok(Plan { updates: 1, micro_batches: accum })
    }

    /// The loss of one micro-batch; the loop backpropagates it divided by `at.count`.
    fn loss(&mut self, at: Micro) -> std::result::Result<Tensor, Self::Error>;

    /// After the step's updates: what it trained on and the recipe's metrics of it.
    fn end_step(&mut self, step: u64) -> std::result::Result<StepReport, Self::Error>;

    /// The held-out evaluation after `step` steps.
    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> std::result::Result<Evaluation, Self::Error>;

    /// Whether a fresh run evaluates before its first step too (RL: the starting policy's reward).
    fn evaluates_at_start(&self) -> bool {
        false
    }

    /// State of the recipe's own that a checkpoint must carry for an exact resume.
    fn state(&self) -> Option<Value> {
        None
    }

    fn restore(&mut self, _state: &Value) -> std::result::Result<(), Self::Error> {
        Ok(())
    }

    /// Greedy generations from `prompts` (the config's `log.sample_prompts`; empty: the
    /// recipe's own choice) of up to `max_new` tokens each, as (tag, text) for the sinks. A
    /// recipe that generates nothing (a reward model) returns none.
    fn samples(
        &mut self,
        _step: u64,
        _prompts: &[String],
        _max_new: usize,
    ) -> std::result::Result<Vec<(String, String)>, Self::Error> {
        Ok(Vec::new())
    }

    /// After the last step of a run: an evaluation written as a line of its own.
    fn finish(
        &mut self,
        _step: u64,
        _obs: &mut dyn Observer,
    ) -> std::result::Result<Option<Map<String, Value>>, Self::Error> {
        Ok(None)
    }
}

/// The loop's own keys that may change on `--resume`: how often it logs, evaluates and
/// saves, where it stops and runs. Everything else changes what is trained.
const FREE_ON_RESUME: &[&str] = &[
    "device",
    "train.max_skipped_fraction",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.stop_at_step",
    "train.on_nonfinite",
    // Recomputing blocks gives the same gradients (bit for bit on decoders and encoders).
    "train.activation_checkpointing",
    "log.",
];

/// Runs the recipe `build` makes under the config `cfg` in `run`, from the checkpoint it
/// names or from scratch, to `train.max_steps` (or `train.stop_at_step`).
pub fn train<C, R>(
    mut cfg: C,
    run: RunSpec,
    obs: &mut dyn Observer,
    build: impl FnOnce(&mut C, &mut Env) -> std::result::Result<Built<R>, R::Error>,
) -> std::result::Result<Summary, R::Error>
where
    C: RecipeConfig,
    R: Recipe,
{
    let started = Instant::now();
    let RunSpec { dir: run_dir, resume, overwrite, allow_config_change, seams } = run;
    let Seams { dist: comm, sinks: extra_sinks } = seams;
    // The precision seam: every fused GEMM of this run (its recipe's build, training and
    // evaluation) rounds its operands to `train.precision`; f16 adds the loss scaler below.
    let precision = cfg.common().train.precision;
    let _matmuls = taper_kernels::set_matmul_precision(precision);
    let (main, rank, world) = (comm.is_main(), comm.rank(), comm.world());
    let device = replica_device(cfg.common().device, &*comm)?;
    let ck_root = run_dir.join("checkpoints");
    let resume = match resume.dir(&ck_root) {
        Ok(Some(d)) => Resume::Dir(d),
        Ok(None) => Resume::No,
        Err(e) => return Err(e.into()),
    };
    // Held to the end of the run: no second run writes into this dir meanwhile. Only the main
    // rank writes into it.
    let claim = if main { Some(run_dir::claim(&run_dir, &resume, overwrite)?) } else { None };
    if let Some(moved) = claim.as_ref().and_then(|c| c.moved.as_ref()) {
        let what =
            if overwrite { "the old run" } else { "the checkpoints newer than the resumed one, and the metrics" };
        obs.message(&format!("moved {what} to {}", moved.display()));
    }
    let (ck, changes) = match &resume {
        Resume::Dir(d) => {
            let ck = checkpoint::load(d, &device)?;
            let changes = check_resume(&mut cfg, &ck, allow_config_change, world)?;
            (Some(ck), changes)
        }
        _ => (None, Vec::new()),
    };

    // The main rank builds first (preparing data and caches); the others then read them.
    let mut build = Some(build);
    let mut built = None;
    for turn in [true, false] {
        if turn == main {
            let mut env = Env {
                device: device.clone(),
                run_dir: &run_dir,
                checkpoint: ck.as_ref(),
                precision,
                dist: comm.clone(),
                obs: &mut *obs,
            };
            built = Some((build.take().expect("built once"))(&mut cfg, &mut env)?);
        }
        if turn {
            comm.rendezvous().map_err(dist_err)?;
        }
    }
    let Built { mut recipe, params, contents, vocab_size, train_tokens, val_tokens } = built.expect("built");
    let tok_sha = taper_data::tokenizer::sha256_file(&contents.tokenizer).map_err(TrainError::from)?;
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let c = cfg.common();
    let (seed, tc, schedule, peak_lr) = (c.seed, c.train.clone(), c.schedule.clone(), c.optim.lr);
    let log = c.log.clone();
    let mut opt = match tc.shard_optimizer && world > 1 {
        true => Updater::Sharded(Box::new(Sharded::new(c.optim.clone(), params, comm.clone())?)),
        false => Updater::Plain(Optimizer::new(c.optim.clone(), params)?),
    };
    let (mut step, mut tokens, mut skipped) = (0u64, 0u64, 0u64);
    let mut last_score = None;
    let mut saved_scale = None;
    let mut history: Vec<ConfigChange> = ck.as_ref().map(|c| c.state.config_changes.clone()).unwrap_or_default();
    if let Some(ck) = ck {
        if ck.state.tokenizer_sha256 != tok_sha {
            return Err(TrainError::Checkpoint {
                path: ck.dir.display().to_string(),
                reason: format!("trained with another tokenizer than {}", contents.tokenizer.display()),
            }
            .into());
        }
        let st = &ck.state;
        (step, tokens, skipped, last_score) = (st.step, st.tokens_seen, st.skipped_steps, st.val_loss);
        saved_scale = st.loss_scale;
        let origin = ck.dir.display().to_string();
        let state_file = ck.dir.join("recipe_state.json");
        if state_file.exists() {
            let text = std::fs::read_to_string(&state_file).map_err(io_err(&state_file))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                path: origin.clone(),
                reason: format!("recipe_state.json is corrupt: {e}"),
            })?;
            recipe.restore(&v)?;
        }
        opt.load_state(ck.optimizer, step - skipped, &origin)?;
        obs.message(&format!("resumed from {origin} at step {step}"));
        if !changes.is_empty() {
            obs.message(&format!("config changed on resume (recorded): {}", changes.join(", ")));
            history.push(ConfigChange { step, changes: changes.clone() });
        }
    }
    // Every replica starts from the main rank's weights.
    opt.broadcast_params(&*comm)?;

    // The run dir: the resolved config, and the sinks (metrics cut back to the resumed step).
    let cfg_toml = cfg.to_toml();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if main {
        let cfg_path = run_dir.join("config.toml");
        std::fs::write(&cfg_path, &cfg_toml).map_err(io_err(&cfg_path))?;
        sinks.push(Box::new(Jsonl::open(&run_dir, step)?));
        if log.tensorboard {
            sinks.push(Box::new(TensorBoard::open(&run_dir, step, &cfg_toml)?));
        }
        sinks.extend(extra_sinks);
    }
    if !changes.is_empty() {
        let record = Map::from_iter([("config_change".to_string(), Value::from(changes.clone()))]);
        for s in &mut sinks {
            s.record(step, &record)?;
        }
    }

    let end = tc.end_step();
    let replicas = if world > 1 { format!(" x {world} replicas ({})", comm.backend()) } else { String::new() };
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_params,
        vocab_size,
        train_tokens,
        val_tokens,
        device: format!("{device:?}{replicas}"),
    });
    let saver = Saver {
        ck_root: &ck_root,
        contents: &contents,
        seed,
        tok_sha: &tok_sha,
        config: &cfg_toml,
        recipe: C::RECIPE,
        history: &history,
        world,
    };
    let samples_due = |step: u64| match log.samples_every {
        0 => tc.eval_due(step),
        every => step.is_multiple_of(every) || step == tc.end_step(),
    };
    if main && step == 0 && !sinks.is_empty() {
        // What the model makes of the prompts before training: the baseline of the samples.
        for (tag, text) in recipe.samples(0, &log.sample_prompts, log.sample_tokens)? {
            for s in &mut sinks {
                s.text(0, &tag, &text)?;
            }
        }
    }
    if step == 0 && recipe.evaluates_at_start() {
        if main {
            let e = recipe.evaluate(0, obs)?;
            for s in &mut sinks {
                s.record(0, &e.metrics)?;
                for (tag, text) in &e.samples {
                    s.text(0, tag, text)?;
                }
            }
        }
        comm.rendezvous().map_err(dist_err)?;
    }

    let first = step;
    let (mut window, mut window_tokens) = (Instant::now(), 0u64);
    let (mut last_loss, mut last_ck) = (None, None);
    let mut guard = Guard::default();
    let mut scaler = LossScaler::new(&tc, saved_scale);
    while step < end {
        let lr = schedule.lr(step, peak_lr, tc.max_steps);
        let plan = recipe.plan(step, tc.grad_accum_steps)?;
        // Summed over the step's updates, on the device: read only when logged.
        let (mut loss_sum, mut norm_sum): (Option<Tensor>, Option<Tensor>) = (None, None);
        for update in 0..plan.updates {
            let count = plan.micro_batches;
            let scale = scaler.scale();
            // Ops that form gradients in their forward form them at the loss's scale.
            let _scaled = taper_kernels::set_loss_scale(scale);
            let (mut loss, grads) = accumulate_scaled(opt.params(), count, scale, |index| {
                recipe.loss(Micro { step, update, index, count, rank, world })
            })?;
            // The gradient seam: the update's gradients, complete across the replicas.
            let grads = data_parallel::reduce(&*comm, opt.plan(), &mut loss, grads)?;
            // A sharded optimizer's rank holds a slice of the gradients: weights only then.
            if let (true, data_parallel::Gradients::Full(g)) =
                (main && histograms_due(&log, step + 1) && update + 1 == plan.updates, &grads)
            {
                histograms(&mut sinks, step + 1, "grads", opt.params(), g)?;
            }
            let norm =
                guarded_update(&mut opt, grads, &loss, lr, &tc, step, &mut skipped, &mut guard, &mut scaler, obs)?;
            loss_sum = Some(add(loss_sum, loss)?);
            norm_sum = Some(add(norm_sum, norm)?);
        }
        if step == first {
            data_parallel::check_replicas(&*comm, opt.params(), step + 1)?;
        }
        let report = reduce_report(&*comm, recipe.end_step(step)?)?;
        step += 1;
        tokens += report.tokens;
        window_tokens += report.tokens;
        let updates = plan.updates.max(1) as f64;
        last_loss = Some((loss_sum.expect("a step makes an update") / updates)?);

        let eval = match main && tc.eval_due(step) {
            true => Some(recipe.evaluate(step, obs)?),
            false => None,
        };
        let mut report = report;
        if main && (tc.log_due(step) || eval.is_some()) {
            read_device_metrics(&mut report)?;
        }
        let mut metrics = report.metrics;
        if let Some(e) = &eval {
            if let Some(v) = e.loss {
                obs.eval(step, v);
            }
            last_score = e.score.or(last_score);
            metrics.extend(e.metrics.clone());
        }
        if main && (tc.log_due(step) || eval.is_some()) {
            guard.check()?;
            let norm = (norm_sum.expect("a step makes an update") / updates)?;
            let read = host::values(&Tensor::stack(&[last_loss.clone().expect("set above"), norm], 0)?)
                .map_err(TrainError::from)?;
            let log = StepLog {
                step,
                loss: read[0],
                lr,
                grad_norm: read[1],
                tokens_per_sec: window_tokens as f64 / window.elapsed().as_secs_f64().max(1e-9),
                tokens,
                elapsed_s: started.elapsed().as_secs_f64(),
                skipped_steps: skipped,
                loss_scale: scaler.state().map(|s| s.scale),
                val_loss: eval.as_ref().and_then(|e| e.loss),
            };
            for s in &mut sinks {
                s.step(&log, &metrics)?;
                for (tag, text) in eval.iter().flat_map(|e| &e.samples) {
                    s.text(step, tag, text)?;
                }
            }
            obs.step(&log);
            (window, window_tokens) = (Instant::now(), 0);
        }
        if main && histograms_due(&log, step) {
            let weights: Vec<Tensor> = opt.params().iter().map(|p| p.var.as_tensor().clone()).collect();
            histograms(&mut sinks, step, "weights", opt.params(), &weights)?;
        }
        if main && samples_due(step) && !sinks.is_empty() {
            for (tag, text) in recipe.samples(step, &log.sample_prompts, log.sample_tokens)? {
                for s in &mut sinks {
                    s.text(step, &tag, &text)?;
                }
            }
        }
        if tc.checkpoint_due(step) {
            // Nothing non-finite is saved.
            guard.check()?;
            // Gathered on every rank (a sharded optimizer's moments live across them).
            let state = opt.state_tensors()?;
            if main {
                let at = Progress { step, tokens, skipped, score: last_score, loss_scale: scaler.state() };
                let dir = saver.save(opt.params(), state, at, recipe.state(), tc.keep_checkpoints)?;
                obs.checkpoint(&dir);
                last_ck = Some(dir);
            }
        }
        if world > 1 && (tc.eval_due(step) || tc.checkpoint_due(step)) {
            // The main rank evaluated or saved alone: the replicas start the next step together.
            comm.rendezvous().map_err(dist_err)?;
        }
    }
    guard.check()?;
    let updates = opt.step_count() + skipped;
    if skipped > 0 && skipped as f64 > tc.max_skipped_fraction * updates as f64 {
        return Err(TrainError::TooManySkipped { skipped, updates, limit: tc.max_skipped_fraction }.into());
    }
    if main && step == tc.max_steps {
        if let Some(line) = recipe.finish(step, obs)? {
            for s in &mut sinks {
                s.record(step, &line)?;
            }
        }
    }
    let last_loss = match last_loss {
        Some(l) => host::scalar(&l).map_err(TrainError::from)?,
        None => f64::NAN,
    };
    Ok(Summary {
        step,
        train_loss: last_loss,
        eval_name: R::SCORE_NAME,
        eval: last_score,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: last_ck,
    })
}

fn histograms_due(log: &LogConfig, step: u64) -> bool {
    log.histograms_every > 0 && step.is_multiple_of(log.histograms_every)
}

/// One histogram per parameter, `<kind>/<name>`: read back, at the steps asked for only.
fn histograms(sinks: &mut [Box<dyn Sink>], step: u64, kind: &str, params: &[Param], values: &[Tensor]) -> Result<()> {
    for (p, t) in params.iter().zip(values) {
        let v = host::values(t)?;
        let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        for s in sinks.iter_mut() {
            s.histogram(step, &format!("{kind}/{}", p.name), &v)?;
        }
    }
    Ok(())
}

/// Moves a report's device metrics into its metrics, reading them.
fn read_device_metrics(r: &mut StepReport) -> Result<()> {
    if let Some((names, t)) = r.device_metrics.take() {
        for (k, v) in names.iter().zip(host::values(&t)?) {
            r.metrics.insert(k.to_string(), v.into());
        }
    }
    Ok(())
}

/// `sum` + `t`, starting from nothing.
fn add(sum: Option<Tensor>, t: Tensor) -> Result<Tensor> {
    Ok(match sum {
        Some(s) => (s + t)?,
        None => t,
    })
}

fn dist_err(e: taper_dist::DistError) -> TrainError {
    TrainError::Invalid(e.to_string())
}

/// The device of this replica: with several replicas on CUDA, the local rank picks the GPU.
fn replica_device(spec: &str, comm: &dyn Comm) -> Result<Device> {
    if comm.world() > 1 && (spec == "auto" || spec == "cuda") && candle_core::utils::cuda_is_available() {
        return Ok(Device::new_cuda(comm.local_rank())?);
    }
    select_device(spec)
}

/// A step's report over all replicas: tokens summed, the recipe's numeric metrics averaged
/// (the ranks train equal shares).
fn reduce_report(comm: &dyn Comm, mut r: StepReport) -> Result<StepReport> {
    if comm.world() == 1 {
        return Ok(r);
    }
    // MPI reduces host values: the device metrics are read now.
    read_device_metrics(&mut r)?;
    let keys: Vec<String> = r.metrics.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect();
    let mut vals: Vec<f64> =
        std::iter::once(r.tokens as f64).chain(keys.iter().map(|k| r.metrics[k].as_f64().unwrap_or(0.0))).collect();
    comm.all_reduce_sum_f64(&mut vals).map_err(dist_err)?;
    r.tokens = vals[0] as u64;
    for (k, v) in keys.iter().zip(&vals[1..]) {
        r.metrics.insert(k.clone(), (v / comm.world() as f64).into());
    }
    Ok(r)
}

/// Keys that no resume may change, even with `--allow-config-change`: the trained tensors'
/// shapes and what they start from.
const FIXED_ON_RESUME: &[&str] = &["model.", "lora.", "init", "data.tokenizer", "data.special_tokens"];

/// Refuses a checkpoint of another recipe, or one whose config differs from this run's in
/// anything but the loop's cadence and the recipe's evaluation settings, unless `allow` (and
/// then never the model's shape). Returns the changes allowed.
fn check_resume<C: RecipeConfig>(cfg: &mut C, ck: &Checkpoint, allow: bool, world: usize) -> Result<Vec<String>> {
    let bad = |reason: String| TrainError::Checkpoint { path: ck.dir.display().to_string(), reason };
    let this = C::RECIPE;
    if let Some(r) = ck.state.recipe.as_deref().filter(|&r| r != this) {
        return Err(bad(format!(
            "it was saved by `taper {r}`, and this is `taper {this}`: resume it with `taper {r}`, or start a new \
             run with it as `init`"
        )));
    }
    let saved: C = toml::from_str(&ck.state.config)
        .map_err(|e| bad(format!("its config is not a `taper {this}` config ({}): use it as `init`", e.message())))?;
    cfg.adopt_derived(&saved);
    let free: Vec<&str> = FREE_ON_RESUME.iter().chain(cfg.free_on_resume()).copied().collect();
    // A step's micro-batches are spread over the replicas: what must match is world x
    // accumulation (the global batch), so a run moves between world sizes.
    let per_step = |toml: String, w: usize| -> String {
        let Ok(mut t) = toml.parse::<toml::Table>() else { return toml };
        if let Some(toml::Value::Integer(a)) = t.get_mut("train").and_then(|t| t.get_mut("grad_accum_steps")) {
            *a *= w as i64;
        }
        t.to_string()
    };
    let changed =
        config_changes(&per_step(saved.to_toml(), ck.state.world_size), &per_step(cfg.to_toml(), world), &free);
    if changed.is_empty() {
        return Ok(changed);
    }
    if !allow {
        return Err(bad(format!(
            "this run's config differs from the checkpoint's in what it trains: {}; pass --allow-config-change \
             to continue with the change recorded",
            changed.join(", ")
        )));
    }
    let fixed = |c: &String| FIXED_ON_RESUME.iter().any(|f| c.starts_with(f));
    let shape: Vec<&String> = changed.iter().filter(|c| fixed(c)).collect();
    if !shape.is_empty() {
        let list: Vec<&str> = shape.iter().map(|c| c.as_str()).collect();
        return Err(bad(format!(
            "a resumed run cannot change the model or what it starts from, even with --allow-config-change: {}",
            list.join(", ")
        )));
    }
    Ok(changed)
}

/// The dotted keys whose values differ between two TOML configs, as `key: old -> new`,
/// leaving out the `free` keys (or prefixes ending in `.`).
pub fn config_changes(old: &str, new: &str, free: &[&str]) -> Vec<String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let read = |text: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(t) = text.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(t), &mut out);
        }
        out
    };
    let (old, new) = (read(old), read(new));
    let is_free = |k: &str| free.iter().any(|f| k == *f || (f.ends_with('.') && k.starts_with(f)));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| !is_free(k) && old.get(*k) != new.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            format!("{k}: {} -> {}", show(old.get(k)), show(new.get(k)))
        })
        .collect()
}

/// Where a run stands, for its checkpoint.
struct Progress {
    step: u64,
    tokens: u64,
    skipped: u64,
    score: Option<f64>,
    loss_scale: Option<LossScale>,
}

/// Writes a run's checkpoints: the trained tensors and the frozen ones beside them, the
/// optimizer, the state, and what [`Contents`] adds.
struct Saver<'a> {
    ck_root: &'a Path,
    contents: &'a Contents,
    seed: u64,
    tok_sha: &'a str,
    config: &'a str,
    recipe: &'static str,
    history: &'a [ConfigChange],
    world: usize,
}

impl Saver<'_> {
    fn save(
        &self,
        params: &[crate::optim::Param],
        optimizer: std::collections::HashMap<String, Tensor>,
        at: Progress,
        recipe_state: Option<Value>,
        keep: usize,
    ) -> Result<PathBuf> {
        let c = self.contents;
        let state = TrainerState {
            format_version: FORMAT_VERSION,
            step: at.step,
            tokens_seen: at.tokens,
            data_cursor: at.step,
            rng_seed: self.seed,
            skipped_steps: at.skipped,
            val_loss: at.score,
            tokenizer_sha256: self.tok_sha.to_string(),
            config: self.config.to_string(),
            files: Default::default(),
            model: c.model.clone(),
            lora: c.lora.as_ref().map(|(l, _)| l.clone()),
            base: c.lora.as_ref().map(|(_, b)| b.clone()),
            recipe: Some(self.recipe.to_string()),
            config_changes: self.history.to_vec(),
            world_size: self.world,
            loss_scale: at.loss_scale,
        };
        let trained: std::collections::HashMap<String, Tensor> =
            params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
        let mut model = trained.clone();
        model.extend(c.frozen.iter().cloned());
        let dir = checkpoint::save(self.ck_root, &model, &optimizer, &c.tokenizer, state, |tmp| {
            c.write_extras(tmp, &trained)?;
            if let Some(v) = &recipe_state {
                let p = tmp.join("recipe_state.json");
                std::fs::write(&p, v.to_string()).map_err(io_err(&p))?;
            }
            Ok(())
        })?;
        checkpoint::prune(self.ck_root, keep)?;
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_changes_name_each_key_with_old_and_new_values() {
        let old = "seed = 1\n[train]\nbatch_size = 4\nlog_every = 1\n[data]\nfiles = [\"a\"]\n";
        let new = "seed = 2\n[train]\nbatch_size = 4\nlog_every = 5\n[data]\nfiles = [\"b\"]\nnew_key = 1\n";
        let got = config_changes(old, new, &["train.log_every"]);
        assert_eq!(got, ["data.files: [\"a\"] -> [\"b\"]", "data.new_key: (unset) -> 1", "seed: 1 -> 2"]);
        assert!(config_changes(old, old, &[]).is_empty());
        assert_eq!(config_changes(old, new, &["data.", "seed", "train.log_every"]), Vec::<String>::new());
    }
}
