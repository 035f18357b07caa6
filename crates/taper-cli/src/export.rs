//! `taper export --format hf`: config.json with the family's `model_type` and `architectures`,
//! safetensors with HF names (sharded past a size, with an index), tokenizer files and
//! generation_config.json, so `AutoModelForCausalLM.from_pretrained(dir)` loads it.

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use taper_model::hf::Family;
use taper_train::source::{LoraParts, Source};

pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2 << 30;

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n").with_context(|| path.display().to_string())
}

/// `dtype`: what the weights are written in (F32, BF16 or F16), and config.json's `dtype`.
pub fn export_hf(src: &Source, out: &Path, max_shard_bytes: u64, dtype: candle_core::DType) -> Result<Family> {
    let family = match src.family {
        Some(f) => f,
        None => Family::for_config(&src.config)?,
    };
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let cfg = &src.config;

    // config.json: the source's own keys kept, taper's values on top.
    let mut config = match &src.hf_config {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        _ => json!({}),
    };
    let ours = family.config_to_hf(cfg);
    for (k, v) in ours.as_object().expect("an object") {
        config[k] = v.clone();
    }
    // transformers 5 reads rope settings from `rope_parameters` when present: keep it in step.
    if let Some(p) = config.get_mut("rope_parameters").and_then(Value::as_object_mut) {
        p.insert("rope_theta".into(), cfg.rope_theta.into());
    }
    config["dtype"] = match dtype {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    // Unset ids would take the family's defaults in transformers (GPT-2's 50256): name ours,
    // the end-of-text token standing in for a missing bos as in GPT-2.
    match (src.bos_id, src.eos_ids.first()) {
        (Some(b), _) | (None, Some(&b)) => config["bos_token_id"] = b.into(),
        (None, None) => config["bos_token_id"] = Value::Null,
    }
    if src.eos_ids.is_empty() {
        config["eos_token_id"] = Value::Null;
    }
    if let Some(&e) = src.eos_ids.first() {
        config["eos_token_id"] = if src.eos_ids.len() == 1 { e.into() } else { json!(src.eos_ids) };
    }
    // A reward model (taper rm) becomes HF's sequence classifier: one label, the `score` head
    // read at the last non-pad token, which transformers finds through pad_token_id.
    let score = src.weights.get("score.weight");
    if score.is_some() {
        config["architectures"] = json!([family
            .architecture()
            .replace("LMHeadModel", "ForSequenceClassification")
            .replace("ForCausalLM", "ForSequenceClassification")]);
        config["num_labels"] = 1.into();
        config["id2label"] = json!({"0": "LABEL_0"});
        config["label2id"] = json!({"LABEL_0": 0});
        config["pad_token_id"] = src.eos_ids.first().map_or(Value::Null, |&e| e.into());
    }
    // Marian reads pad, eos and the decoder's start token from config.json; it has no bos.
    let seq2seq = if family == Family::Marian { Some(taper_train::seq2seq::source_ids(src)?) } else { None };
    if let Some(ids) = seq2seq {
        config["pad_token_id"] = ids.pad.into();
        config["eos_token_id"] = ids.eos.into();
        config["decoder_start_token_id"] = ids.start.into();
        config["bos_token_id"] = Value::Null;
    }
    write_json(&out.join("config.json"), &config)?;

    // Weights, sharded past max_shard_bytes.
    let mut tensors = family
        .weights_to_hf(cfg, &src.weights)?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    // transformers ignores the LM head of a classifier (it warns); taper reads it back.
    if let Some(score) = score {
        tensors.retain(|(n, _)| n != "score.weight");
        tensors.push(("score.weight".into(), score.to_dtype(dtype)?));
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let total: u64 = tensors.iter().map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
    for (name, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("non-empty").push((name, t));
    }
    for stale in std::fs::read_dir(out)?.flatten() {
        let n = stale.file_name().to_string_lossy().to_string();
        if n.starts_with("model") && (n.ends_with(".safetensors") || n.ends_with(".index.json")) {
            std::fs::remove_file(stale.path())?;
        }
    }
    if shards.len() == 1 {
        let map: HashMap<String, Tensor> = shards.pop().expect("one").into_iter().collect();
        candle_core::safetensors::save(&map, out.join("model.safetensors"))?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.into_iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            for (name, _) in &shard {
                weight_map.insert(name.clone(), file.clone().into());
            }
            let map: HashMap<String, Tensor> = shard.into_iter().collect();
            candle_core::safetensors::save(&map, out.join(&file))?;
        }
        write_json(
            &out.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }

    // Tokenizer and generation defaults.
    std::fs::copy(&src.tokenizer_path, out.join("tokenizer.json"))?;
    let mut tok_cfg =
        src.tokenizer_config.clone().unwrap_or_else(|| json!({"tokenizer_class": "PreTrainedTokenizerFast"}));
    let name_of = |id: u32| src.tokenizer.id_to_token(id);
    if tok_cfg.get("eos_token").is_none() {
        if let Some(t) = src.eos_ids.first().and_then(|&e| name_of(e)) {
            tok_cfg["eos_token"] = t.into();
        }
    }
    if tok_cfg.get("bos_token").is_none() {
        if let Some(t) = src.bos_id.and_then(name_of) {
            tok_cfg["bos_token"] = t.into();
        }
    }
    // An encoder's tokenizer names its mask and padding tokens for fill-mask pipelines.
    for (key, names) in
        [("mask_token", &taper_data::tokenizer::MASK_TOKENS[..]), ("pad_token", &["[PAD]", "<pad>"][..])]
    {
        if cfg.kind == taper_model::ModelKind::Encoder && tok_cfg.get(key).is_none() {
            if let Some(t) = names.iter().find(|t| src.tokenizer.token_to_id(t).is_some()) {
                tok_cfg[key] = (*t).into();
            }
        }
    }
    if let Some(t) = seq2seq.and_then(|ids| name_of(ids.pad)) {
        if tok_cfg.get("pad_token").is_none() {
            tok_cfg["pad_token"] = t.into();
        }
    }
    if let Some(t) = &src.chat_template {
        if tok_cfg.get("chat_template").is_none() {
            std::fs::write(out.join("chat_template.jinja"), t)?;
        }
    }
    write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;
    let gen_path = src.dir.join("generation_config.json");
    if let Some(ids) = seq2seq {
        let g = json!({"pad_token_id": ids.pad, "eos_token_id": ids.eos, "decoder_start_token_id": ids.start,
            "bos_token_id": null, "forced_eos_token_id": null, "num_beams": 1, "do_sample": false});
        write_json(&out.join("generation_config.json"), &g)?;
    } else if gen_path.exists() {
        std::fs::copy(&gen_path, out.join("generation_config.json"))?;
    } else {
        let mut g = json!({});
        if let Some(b) = src.bos_id {
            g["bos_token_id"] = b.into();
        }
        if !src.eos_ids.is_empty() {
            g["eos_token_id"] = json!(src.eos_ids);
        }
        write_json(&out.join("generation_config.json"), &g)?;
    }
    Ok(family)
}

/// A LoRA checkpoint as a PEFT adapter dir: `adapter_config.json`, `adapter_model.safetensors`
/// and the tokenizer files. PEFT's module names are the Llama family's, so the base must be one.
pub fn export_peft(src: &Source, l: &LoraParts, out: &Path) -> Result<()> {
    let family = Family::for_config(&src.config)?;
    if family == Family::Gpt2 {
        anyhow::bail!(
            "{}: PEFT adapters need a Llama-family base (GPT-2 fuses q, k and v); pass --merge-lora",
            src.dir.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    taper_train::checkpoint::write_peft(out, &l.adapters, &l.config, &l.base)?;
    std::fs::copy(&src.tokenizer_path, out.join("tokenizer.json"))?;
    for f in ["tokenizer_config.json", "chat_template.jinja"] {
        if src.dir.join(f).exists() {
            std::fs::copy(src.dir.join(f), out.join(f))?;
        }
    }
    Ok(())
}
