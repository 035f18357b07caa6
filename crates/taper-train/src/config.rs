//! One TOML file per run: plain serde structs with defaults, unknown keys rejected,
//! `--set a.b=v` overrides type-checked, and every problem reported at once.

use crate::optim::OptimConfig;
use crate::rules::Rules;
use crate::schedule::ScheduleConfig;
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use taper_kernels::Precision;
use taper_model::{ActivationCheckpointing, ModelConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub seed: u64,
    /// "auto", "cpu", "cuda:N" or "metal".
    pub device: String,
    /// "clm" (next token, decoders) or "mlm" (masked tokens, encoders).
    pub objective: Objective,
    /// MLM: the share of tokens selected for prediction (of which 80% masked, 10% random,
    /// 10% kept).
    pub mlm_probability: f64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub log: LogConfig,
    /// Encoder-decoder data and evaluation (`model.kind = "encoder-decoder"`).
    pub seq2seq: Seq2SeqConfig,
    pub eval: TasksConfig,
}

/// `[eval]` of pretraining: multiple-choice tasks scored at every evaluation (decoders).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Task files (JSONL: context, choices, label), logged as `tasks/<file stem>/acc` and
    /// `tasks/<file stem>/acc_norm`.
    pub tasks: Vec<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            objective: Objective::Clm,
            mlm_probability: 0.15,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            log: LogConfig::default(),
            seq2seq: Default::default(),
            eval: TasksConfig::default(),
        }
    }
}

/// What pretraining predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Causal LM: each next token (a decoder).
    Clm,
    /// Masked LM: the selected tokens, seeing both sides (an encoder).
    Mlm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A built-in dataset ("tinyshakespeare").
    pub dataset: Option<String>,
    /// Text or JSONL files (used when `dataset` is not set).
    pub files: Vec<String>,
    /// A directory written by `taper prepare` (train.bin, val.bin, tokenizer.json); when set,
    /// `dataset`, `files` and `tokenizer` are not used.
    pub shards: Option<String>,
    /// "char", "bpe" (trained on the data) or the path of a tokenizer.json.
    pub tokenizer: String,
    /// Target vocabulary for a trained BPE tokenizer.
    pub tokenizer_vocab_size: usize,
    pub special_tokens: Vec<String>,
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: None,
            files: Vec::new(),
            shards: None,
            tokenizer: "char".into(),
            tokenizer_vocab_size: 4096,
            special_tokens: vec![taper_data::tokenizer::DEFAULT_EOS.to_string()],
            val_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub max_steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum_steps: usize,
    /// 0 disables clipping.
    pub grad_clip: f64,
    pub log_every: u64,
    /// Evaluate every this many steps; the last step always evaluates.
    pub eval_every: u64,
    /// Held-out batches per evaluation: pretraining draws this many windows; the other
    /// recipes evaluate at most this many batches of their held-out data (0 = all of it).
    pub eval_batches: usize,
    /// 0 checkpoints only at the end.
    pub checkpoint_every: u64,
    /// How many checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: the largest share of a run's updates that may be skipped;
    /// a run that skips more ends with an error (its checkpoints kept).
    pub max_skipped_fraction: f64,
    /// Stop (with a checkpoint) after this step without changing the schedule, for runs split
    /// across jobs; 0 runs to max_steps.
    pub stop_at_step: u64,
    /// Under data parallelism, each rank keeps and updates only its share of the optimizer's
    /// state (ZeRO stage 1); one process ignores it.
    pub shard_optimizer: bool,
    /// Which transformer blocks recompute their forward in the backward instead of keeping
    /// their activations: `"none"`, `"blocks"` (all), or N (every N-th).
    pub activation_checkpointing: ActivationCheckpointing,
    /// What the matrix products round their operands to (f32 accumulation; weights, optimizer
    /// state, norms, softmax and the loss stay f32): "f32", "bf16" or "f16" (with dynamic loss
    /// scaling).
    pub precision: Precision,
    /// f16: the loss scale the run starts at; it halves on each overflowing update (skipped)
    /// and doubles after `loss_scale_growth_interval` good ones (PyTorch's GradScaler defaults).
    pub initial_loss_scale: f64,
    pub loss_scale_growth_interval: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            batch_size: 12,
            grad_accum_steps: 1,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: 250,
            eval_batches: 50,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            on_nonfinite: OnNonFinite::Stop,
            max_skipped_fraction: 0.1,
            stop_at_step: 0,
            shard_optimizer: false,
            activation_checkpointing: ActivationCheckpointing::None,
            precision: Precision::F32,
            initial_loss_scale: 65536.0,
            loss_scale_growth_interval: 2000,
        }
    }
}

/// `[log]`: what a run reports besides `metrics.jsonl`. Changes nothing that is trained, so it
/// may change on `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// TensorBoard event files in the run dir's `tb/`: every scalar of `metrics.jsonl`, the
    /// resolved config and the samples as text, histograms when asked.
    pub tensorboard: bool,
    /// Generate from `sample_prompts` every this many steps; 0: at the evaluation steps.
    pub samples_every: u64,
    /// Prompts the samples continue (or, for chat recipes, answer); empty: the recipe's own
    /// choice (the first held-out prompts, or the start of held-out text).
    pub sample_prompts: Vec<String>,
    /// New tokens per sample (greedy).
    pub sample_tokens: usize,
    /// Histograms of every weight and its gradient every this many steps; 0: never.
    pub histograms_every: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { tensorboard: true, samples_every: 0, sample_prompts: Vec::new(), sample_tokens: 64, histograms_every: 0 }
    }
}

impl TrainConfig {
    /// The last step this invocation runs (`stop_at_step` cuts a run short, schedule unchanged).
    pub fn end_step(&self) -> u64 {
        if self.stop_at_step > 0 {
            self.stop_at_step.min(self.max_steps)
        } else {
            self.max_steps
        }
    }

    fn due(&self, step: u64, every: u64) -> bool {
        (every > 0 && step.is_multiple_of(every)) || step == self.end_step()
    }

    pub fn eval_due(&self, step: u64) -> bool {
        self.due(step, self.eval_every)
    }

    pub fn checkpoint_due(&self, step: u64) -> bool {
        self.due(step, self.checkpoint_every)
    }

    pub fn log_due(&self, step: u64) -> bool {
        self.due(step, self.log_every)
    }
}

/// The settings the training loop reads, which every recipe's config has.
pub struct Common<'a> {
    pub seed: u64,
    pub device: &'a str,
    pub train: &'a TrainConfig,
    pub optim: &'a OptimConfig,
    pub schedule: &'a ScheduleConfig,
    pub log: &'a LogConfig,
}

/// A recipe's config: every section has defaults (so each key can be checked alone), the
/// loop's sections ([train], [optim], [schedule], `seed`, `device`) are checked the same way
/// for every recipe, and the recipe adds its own rules.
pub trait RecipeConfig: serde::de::DeserializeOwned + Serialize + Default {
    /// The recipe this config runs, recorded in its checkpoints.
    const RECIPE: &'static str;
    fn common(&self) -> Common<'_>;
    /// The recipe's own rules.
    fn validate(&self) -> Vec<String>;
    /// Keys (or key prefixes ending in `.`) besides the loop's that may change on `--resume`
    /// without changing what is trained: evaluation settings.
    fn free_on_resume(&self) -> &'static [&'static str] {
        &[]
    }
    /// Takes the values this config leaves to be derived (`model.vocab_size = 0`) from the
    /// config a checkpoint was saved with, so that the two compare equal when nothing changed.
    fn adopt_derived(&mut self, _saved: &Self) {}
    fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config serialises to TOML")
    }
}

/// [`RecipeConfig::common`] for a config with the loop's fields under the names it reads:
/// `seed`, `device`, `train`, `optim`, `schedule`.
#[macro_export]
macro_rules! loop_fields {
    () => {
        fn common(&self) -> $crate::config::Common<'_> {
            $crate::config::Common {
                seed: self.seed,
                device: &self.device,
                train: &self.train,
                optim: &self.optim,
                schedule: &self.schedule,
                log: &self.log,
            }
        }
    };
}

/// The rules of the loop's own sections, the same for every recipe.
pub fn common_rules(c: &Common) -> Vec<String> {
    let mut r = Rules::new();
    let t = c.train;
    for (k, v) in [
        ("train.max_steps", t.max_steps),
        ("train.batch_size", t.batch_size as u64),
        ("train.grad_accum_steps", t.grad_accum_steps as u64),
        ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every),
        ("train.keep_checkpoints", t.keep_checkpoints as u64),
        ("train.loss_scale_growth_interval", t.loss_scale_growth_interval),
    ] {
        r.at_least_one(k, v);
    }
    r.non_negative("train.grad_clip", t.grad_clip);
    r.positive("train.initial_loss_scale", t.initial_loss_scale);
    r.at_least_one("log.sample_tokens", c.log.sample_tokens as u64);
    r.unit("train.max_skipped_fraction", t.max_skipped_fraction, true);
    r.extend(c.optim.validate());
    r.extend(c.schedule.validate(t.max_steps));
    // Compared only when the learning rate itself is legal (its own message says what is wrong).
    if c.optim.lr.is_finite() && c.optim.lr > 0.0 && c.schedule.min_lr > c.optim.lr {
        r.push(format!("schedule.min_lr = {}: must not exceed optim.lr = {}", c.schedule.min_lr, c.optim.lr));
    }
    let d = c.device;
    let cuda_ok = d
        .strip_prefix("cuda")
        .is_some_and(|n| n.is_empty() || n.strip_prefix(':').is_some_and(|n| n.parse::<usize>().is_ok()));
    if !(d == "auto" || d == "cpu" || d == "metal" || cuda_ok) {
        r.push(format!("device = {d:?}: expected \"auto\", \"cpu\", \"cuda:N\" or \"metal\""));
    }
    r.into_vec()
}

impl RecipeConfig for RunConfig {
    const RECIPE: &'static str = "pretrain";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.extend(self.model.validate());
        e.at_least_one("train.eval_batches", self.train.eval_batches as u64);
        if self.model.kind == taper_model::ModelKind::EncoderDecoder {
            e.extend(self.seq2seq.validate(&self.model));
        }
        let d = &self.data;
        let encoder = self.model.kind == taper_model::ModelKind::Encoder;
        match (self.objective, encoder) {
            (Objective::Mlm, false) => e.push("objective = \"mlm\" needs model.kind = \"encoder\""),
            (Objective::Clm, true) => e.push("model.kind = \"encoder\" trains with objective = \"mlm\""),
            _ => {}
        }
        if self.objective == Objective::Mlm && encoder {
            e.open_unit("mlm_probability", self.mlm_probability, false);
            let trained = matches!(d.tokenizer.as_str(), "char" | "bpe") && d.shards.is_none();
            if trained && !d.special_tokens.iter().any(|t| taper_data::tokenizer::MASK_TOKENS.contains(&t.as_str())) {
                e.push("data.special_tokens: objective = \"mlm\" needs a mask token; add \"[MASK]\"");
            }
        }
        if d.shards.is_none() && d.dataset.is_none() && d.files.is_empty() {
            e.push("data: set one of `dataset`, `files` or `shards`");
        }
        if let Some(name) = &d.dataset {
            if taper_data::datasets::find(name).is_none() {
                let known: Vec<_> = taper_data::datasets::BUILTINS.iter().map(|b| b.name).collect();
                e.push(format!("data.dataset = {name:?}: not a built-in dataset (known: {})", known.join(", ")));
            }
        }
        e.open_unit("data.val_fraction", d.val_fraction, false);
        if !self.eval.tasks.is_empty() && self.model.kind != taper_model::ModelKind::Decoder {
            e.push("eval.tasks: multiple-choice tasks are scored by a decoder (model.kind = \"decoder\")");
        }
        e.extend(crate::multiple_choice::validate_paths("eval.tasks", &self.eval.tasks));
        if d.tokenizer == "bpe" {
            e.at_least_one("data.tokenizer_vocab_size", d.tokenizer_vocab_size as u64);
        }
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["seq2seq.eval_examples", "seq2seq.beams", "seq2seq.length_penalty", "eval."]
    }

    fn adopt_derived(&mut self, saved: &Self) {
        if self.model.vocab_size == 0 {
            self.model.vocab_size = saved.model.vocab_size;
        }
    }
}

impl RunConfig {
    pub fn to_toml(&self) -> String {
        RecipeConfig::to_toml(self)
    }
}

/// `[seq2seq]`: the encoder-decoder's data and evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seq2SeqConfig {
    /// Held-out pairs (JSONL / Parquet); empty takes the last `data.val_fraction` of `data.files`.
    pub val_files: Vec<String>,
    /// Most source tokens, eos included (0 = model.block_size).
    pub max_source_len: usize,
    /// Most target tokens, eos included (0 = model.block_size).
    pub max_target_len: usize,
    /// "truncate" or "drop" a pair with a side over its limit.
    pub overflow: String,
    /// PyTorch's `CrossEntropyLoss(label_smoothing)`.
    pub label_smoothing: f64,
    /// Held-out pairs decoded greedily for exact match at each eval (0 = all).
    pub eval_examples: usize,
    /// Beam size for a beam-search exact match at the end of the run (0 or 1 = none).
    pub beams: usize,
    /// HF's `length_penalty` for that beam search.
    pub length_penalty: f64,
    /// The padding token, also the decoder's start token (Marian's convention).
    pub pad_token: String,
}

impl Default for Seq2SeqConfig {
    fn default() -> Self {
        Self {
            val_files: Vec::new(),
            max_source_len: 0,
            max_target_len: 0,
            overflow: "truncate".into(),
            label_smoothing: 0.0,
            eval_examples: 0,
            beams: 0,
            length_penalty: 1.0,
            pad_token: "<pad>".into(),
        }
    }
}

impl Seq2SeqConfig {
    pub fn validate(&self, model: &ModelConfig) -> Vec<String> {
        let mut e = Rules::new();
        e.one_of("seq2seq.overflow", &self.overflow, &["truncate", "drop"]);
        e.unit("seq2seq.label_smoothing", self.label_smoothing, false);
        if !self.length_penalty.is_finite() {
            e.push(format!("seq2seq.length_penalty = {}: must be a finite number", self.length_penalty));
        }
        for (k, v) in [("max_source_len", self.max_source_len), ("max_target_len", self.max_target_len)] {
            if v > model.block_size {
                e.push(format!("seq2seq.{k} = {v}: exceeds model.block_size = {}", model.block_size));
            }
        }
        e.into_vec()
    }
}

/// [`parse_as`] for the pretraining config.
pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<RunConfig> {
    parse_as(text, origin, overrides)
}

/// Parses TOML text, applies `key=value` overrides, and checks everything: unknown keys and
/// wrong types (each key on its own, so all are found), then cross-field rules.
/// `origin` names the file in messages.
pub fn parse_as<T: RecipeConfig>(text: &str, origin: &str, overrides: &[String]) -> Result<T> {
    let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let msg = e.message().to_string();
        let line = e.span().map(|s| text[..s.start].lines().count().max(1));
        TrainError::Config(vec![match line {
            Some(l) => format!("{origin}:{l}: {msg}"),
            None => format!("{origin}: {msg}"),
        }])
    })?;
    let mut errs = Vec::new();
    // Where each key was set, for messages: the file and line, or the --set that replaced it.
    let place = |path: &str, section: &str, key: &str| -> String {
        match overrides.iter().rev().find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == path)) {
            Some(o) => format!("--set {o}"),
            None => format!("{origin}{}", line_of(text, section, key)),
        }
    };
    for o in overrides {
        if let Err(e) = apply_override(&mut root, o) {
            errs.push(format!("--set {o}: {e}"));
        }
    }
    for (key, value) in &root {
        match value {
            toml::Value::Table(section) if !section.is_empty() => {
                let mut whole = toml::Table::new();
                whole.insert(key.clone(), value.clone());
                let Err(whole_err) = toml::Value::Table(whole).try_into::<T>() else { continue };
                // Each key on its own finds every bad one; a section read as a whole (a tagged
                // enum such as [reward]) fails that way only for its missing fields.
                let before = errs.len();
                for (sub, v) in section {
                    let mut inner = toml::Table::new();
                    inner.insert(sub.clone(), v.clone());
                    let mut one = toml::Table::new();
                    one.insert(key.clone(), toml::Value::Table(inner));
                    if let Err(e) = toml::Value::Table(one).try_into::<T>() {
                        let msg = first_line(&e.to_string());
                        if !msg.contains("missing field") {
                            errs.push(format!("{}: {key}.{sub}: {msg}", place(&format!("{key}.{sub}"), key, sub)));
                        }
                    }
                }
                if errs.len() == before {
                    errs.push(format!("{}: [{key}]: {}", place(key, "", key), first_line(&whole_err.to_string())));
                }
            }
            _ => {
                let mut one = toml::Table::new();
                one.insert(key.clone(), value.clone());
                if let Err(e) = toml::Value::Table(one).try_into::<T>() {
                    errs.push(format!("{}: {key}: {}", place(key, "", key), first_line(&e.to_string())));
                }
            }
        }
    }
    if !errs.is_empty() {
        return Err(TrainError::Config(errs));
    }
    // A section given in part takes its other keys from the recipe's defaults (an RM's
    // learning rate), not from the section type's own, which serde would otherwise use.
    let defaults: toml::Table = T::default().to_toml().parse().expect("a default config reads back");
    for section in ["train", "optim", "schedule"] {
        if let (Some(toml::Value::Table(d)), Some(toml::Value::Table(given))) =
            (defaults.get(section), root.get_mut(section))
        {
            for (k, v) in d {
                given.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    let cfg: T = toml::Value::Table(root.clone())
        .try_into()
        .map_err(|e: toml::de::Error| TrainError::Config(vec![format!("{origin}: {}", first_line(&e.to_string()))]))?;
    let mut broken = common_rules(&cfg.common());
    broken.extend(cfg.validate());
    // Each rule's message starts with its key: point at the line or --set that gave the value.
    let errs: Vec<String> = broken
        .into_iter()
        .map(|e| {
            let key = e.split([' ', ':']).next().unwrap_or_default();
            match key.split_once('.') {
                Some((section, k)) if !k.contains('.') => format!("{}: {e}", place(key, section, k)),
                _ if !key.is_empty() && !key.contains('.') && root.contains_key(key) => {
                    format!("{}: {e}", place(key, "", key))
                }
                _ => format!("{origin}: {e}"),
            }
        })
        .collect();
    if errs.is_empty() {
        Ok(cfg)
    } else {
        Err(TrainError::Config(errs))
    }
}

fn first_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// ":N" for the line where `key` is set inside `[section]` (or at top level), if found.
fn line_of(text: &str, section: &str, key: &str) -> String {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == section && l.split('=').next().map(str::trim) == Some(key) {
            return format!(":{}", i + 1);
        }
    }
    String::new()
}

/// Sets `a.b.c = value` in the table; the value is TOML (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`)
/// or, failing that, a bare string.
pub fn apply_override(root: &mut toml::Table, spec: &str) -> std::result::Result<(), String> {
    let (path, raw) = spec.split_once('=').ok_or("expected key=value")?;
    let path: Vec<&str> = path.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err("empty key".into());
    }
    let value = match format!("v = {}", raw.trim()).parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed v"),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let (last, parents) = path.split_last().expect("non-empty");
    let mut t = root;
    for p in parents {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "seed = 1\n[train]\nmax_step = 10\nbatch_size = \"big\"\n[modle]\nn_layer = 2\n[data]\ndataset = \"tinyshakespeare\"\n";
        let err = parse(text, "x.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("x.toml:3: train.max_step: unknown field `max_step`"), "{err}");
        assert!(err.contains("x.toml:4: train.batch_size"), "{err}");
        assert!(err.contains("modle"), "{err}");
        assert_eq!(err.lines().count(), 3, "{err}");
    }

    #[test]
    fn overrides_are_type_checked() {
        let text = "[data]\ndataset = \"tinyshakespeare\"\n";
        let cfg = parse(text, "x", &["train.max_steps=7".into(), "optim.lr=3e-4".into(), "model.pos_emb=rope".into()])
            .unwrap();
        assert_eq!(cfg.train.max_steps, 7);
        assert_eq!(cfg.optim.lr, 3e-4);
        assert_eq!(cfg.model.pos_emb, taper_model::PosEmb::Rope);
        let err = parse(text, "x", &["train.max_steps=lots".into()]).unwrap_err().to_string();
        assert!(err.contains("train.max_steps"), "{err}");
        let err = parse(text, "x", &["train.nope=1".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown field `nope`"), "{err}");
    }

    #[test]
    fn cross_field_rules() {
        let text = "[model]\nn_embd = 130\nn_head = 4\n[data]\ndataset = \"nope\"\n[schedule]\nwarmup_steps = 5000\n";
        let err = parse(text, "x", &[]).unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
        assert!(err.contains("not a built-in dataset"), "{err}");
        assert!(err.contains("warmup_steps"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let cfg = RunConfig {
            data: DataConfig { dataset: Some("tinyshakespeare".into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(parse(&cfg.to_toml(), "x", &[]).unwrap(), cfg);
    }
}
