//! Exports a taper checkpoint to GGUF for llama.cpp, and optionally prints taper's own greedy
//! continuation of a prompt as token ids, for `scripts/check_gguf.py --expect-ids`.
//!
//! ```text
//! cargo run -p taper-cli --example export_gguf -- --model runs/x --out x-f16.gguf --type f16
//! cargo run -p taper-cli --example export_gguf -- --model runs/x --greedy-prompt "ROMEO:" --greedy-tokens 32
//! ```
//!
//! `--model` is a checkpoint dir or a run dir (its newest checkpoint). A `tokenizer_config.json`
//! next to `tokenizer.json` supplies bos/eos/pad tokens and the chat template.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use std::path::PathBuf;
use taper_cli::gguf_export::{write_gguf, GgufSource, GgufType};
use taper_data::tokenizer;
use taper_model::{Decoder, Rng, Sampling, Weights};
use taper_train::checkpoint;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    out: Option<PathBuf>,
    /// f32, f16 or q8_0.
    #[arg(long = "type", default_value = "f16")]
    ty: GgufType,
    /// general.name; default the run directory's name.
    #[arg(long)]
    name: Option<String>,
    /// Print taper's greedy continuation of this prompt as ids (comma-separated).
    #[arg(long)]
    greedy_prompt: Option<String>,
    #[arg(long, default_value_t = 32)]
    greedy_tokens: usize,
    /// With --greedy-prompt: write the logits at every position of prompt + continuation
    /// (one line of V numbers per position) for `check_gguf.py --expect-logits`.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = checkpoint::resolve(&a.model)?;
    let (run, tensors) = checkpoint::load_model(&dir, &Device::Cpu)?;
    let tok_path = dir.join("tokenizer.json");
    if a.out.is_none() && a.greedy_prompt.is_none() {
        bail!("nothing to do: give --out and/or --greedy-prompt");
    }
    if let Some(out) = &a.out {
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg: Option<serde_json::Value> = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).with_context(|| cfg_path.display().to_string())?;
            Some(serde_json::from_str(&text).with_context(|| cfg_path.display().to_string())?)
        } else {
            None
        };
        let default_name = a
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "taper".into());
        let name = a.name.clone().unwrap_or(default_name);
        let src = GgufSource {
            cfg: &run.model,
            tensors: &tensors,
            tokenizer_json: &tok_path,
            tokenizer_config: tcfg.as_ref(),
            name: &name,
        };
        write_gguf(out, &src, a.ty)?;
        eprintln!("wrote {} ({:?})", out.display(), a.ty);
    }
    if let Some(prompt) = &a.greedy_prompt {
        let tok = tokenizer::load(&tok_path)?;
        let model = Decoder::load(&Weights::new(tensors).detached(), &run.model)?;
        let enc = tok.encode(prompt.as_str(), false).map_err(|e| anyhow::anyhow!("prompt: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let stop: Vec<u32> = tokenizer::eos_id(&tok).into_iter().collect();
        let greedy = Sampling { temperature: 0.0, ..Default::default() };
        let out = model.generate(&ids, a.greedy_tokens, &greedy, &stop, &mut Rng::new(0), |_| {})?;
        let out: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        println!("prompt_ids {}", join(&ids));
        println!("ids {}", join(&out));
        if let Some(path) = &a.logits_out {
            // One forward pass over everything but the last token: row i predicts token i + 1.
            let mut seq = ids.clone();
            seq.extend(&out);
            seq.pop();
            let input = Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits: Vec<Vec<f32>> = model.forward(&input, 0, None, None)?.squeeze(0)?.to_vec2()?;
            let text: String = logits
                .iter()
                .map(|row| row.iter().map(|v| format!("{v:e}")).collect::<Vec<_>>().join(" ") + "\n")
                .collect();
            std::fs::write(path, text).with_context(|| path.display().to_string())?;
        }
    }
    Ok(())
}
