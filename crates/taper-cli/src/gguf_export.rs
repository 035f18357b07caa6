//! GGUF export: writes a taper model, trained or imported, as a GGUF v3 file that llama.cpp
//! loads and runs.
//!
//! The llama.cpp architecture follows from the config:
//! - learned positions, LayerNorm, GELU MLP -> `gpt2` (q, k and v fused into `attn_qkv`; the
//!   biases its graph requires are written as zeros when the model has none);
//! - RoPE, RMSNorm, SwiGLU -> `qwen3` with q/k norm, `qwen2` with q/k/v biases (and no other
//!   biases), otherwise `llama`. `llama` rotates interleaved pairs of each head (ggml's "normal"
//!   rope) where taper and HF rotate halves, so its q and k rows are permuted as llama.cpp's
//!   converter does; `qwen2`/`qwen3` use the rotate-half ("neox") rope and need no permute.
//!
//! The tokenizer becomes llama.cpp's `gpt2` (byte-level BPE) vocabulary. taper's char-level
//! tokenizer is written as a BPE without merges whose tokens are the characters in GPT-2's
//! byte-to-unicode alphabet, so llama.cpp splits text into the same ids (ASCII only).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;
use taper_model::gguf::{GgufWriter, TensorType, Value};
use taper_model::{Mlp, ModelConfig, Norm, PosEmb};

/// The tensor encoding for the file's weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    /// 8-bit blocks of 32 with an f16 scale; matrices whose rows are not a multiple of 32 fall
    /// back to F16.
    Q8_0,
}

impl GgufType {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::BF16 => 32,
        }
    }
}

impl std::str::FromStr for GgufType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::BF16),
            "q8_0" => Ok(GgufType::Q8_0),
            _ => bail!("unknown GGUF type {s:?} (f32, f16, bf16 or q8_0)"),
        }
    }
}

pub struct GgufSource<'a> {
    pub cfg: &'a ModelConfig,
    /// taper tensor names ([`taper_model::param_specs`]), any float dtype.
    pub tensors: &'a HashMap<String, Tensor>,
    pub tokenizer_json: &'a Path,
    /// HF `tokenizer_config.json`, if any: bos/eos/pad tokens, `add_bos_token`, `chat_template`.
    pub tokenizer_config: Option<&'a Json>,
    pub name: &'a str,
}

/// The llama.cpp architecture a config maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Writes `src` to `out_file` as GGUF; warnings (approximations llama.cpp makes) go to stderr.
pub fn write_gguf(out_file: &Path, src: &GgufSource, ty: GgufType) -> Result<()> {
    let (w, notes) = build_gguf(src, ty)?;
    for n in notes {
        eprintln!("warning: {n}");
    }
    w.write_file(out_file).with_context(|| format!("writing {}", out_file.display()))
}

/// The file's contents, and notes on anything llama.cpp will compute differently.
pub fn build_gguf(src: &GgufSource, ty: GgufType) -> Result<(GgufWriter, Vec<String>)> {
    let cfg = src.cfg;
    let mut notes = Vec::new();
    let arch = select_arch(cfg, &mut notes)?;
    let text = std::fs::read_to_string(src.tokenizer_json)
        .with_context(|| format!("reading {}", src.tokenizer_json.display()))?;
    let tok: Json = serde_json::from_str(&text).with_context(|| format!("parsing {}", src.tokenizer_json.display()))?;
    let vocab = vocab_from_tokenizer(&tok, cfg.vocab_size, src.tokenizer_config)
        .with_context(|| format!("tokenizer {}", src.tokenizer_json.display()))?;
    notes.extend(vocab.notes.iter().cloned());

    let mut w = GgufWriter::new();
    let a = arch.name();
    let u32v = |n: usize| -> Result<Value> { Ok(Value::U32(u32::try_from(n).context("value exceeds u32")?)) };
    w.add_kv("general.architecture", Value::string(a))?;
    w.add_kv("general.name", Value::string(src.name))?;
    w.add_kv("general.file_type", Value::U32(ty.file_type()))?;
    w.add_kv("general.quantization_version", Value::U32(2))?;
    w.add_kv("general.alignment", Value::U32(32))?;
    w.add_kv(format!("{a}.vocab_size"), u32v(cfg.vocab_size)?)?;
    w.add_kv(format!("{a}.context_length"), u32v(cfg.block_size)?)?;
    w.add_kv(format!("{a}.embedding_length"), u32v(cfg.n_embd)?)?;
    w.add_kv(format!("{a}.block_count"), u32v(cfg.n_layer)?)?;
    w.add_kv(format!("{a}.feed_forward_length"), u32v(cfg.hidden())?)?;
    w.add_kv(format!("{a}.attention.head_count"), u32v(cfg.n_head)?)?;
    w.add_kv(format!("{a}.attention.head_count_kv"), u32v(cfg.kv_heads())?)?;
    if cfg.head_dim() * cfg.n_head != cfg.n_embd {
        w.add_kv(format!("{a}.attention.key_length"), u32v(cfg.head_dim())?)?;
        w.add_kv(format!("{a}.attention.value_length"), u32v(cfg.head_dim())?)?;
    }
    if arch == Arch::Gpt2 {
        w.add_kv(format!("{a}.attention.layer_norm_epsilon"), Value::F32(cfg.norm_eps as f32))?;
    } else {
        w.add_kv(format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.norm_eps as f32))?;
        w.add_kv(format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta as f32))?;
        w.add_kv(format!("{a}.rope.dimension_count"), u32v(cfg.head_dim())?)?;
    }
    vocab.write(&mut w)?;

    for (name, shape, data) in gguf_tensors(arch, cfg, src.tensors, &mut notes)? {
        let tt = tensor_type(&name, &shape, ty);
        w.add_tensor(name, &shape, tt, &data)?;
    }
    Ok((w, notes))
}

/// Picks the llama.cpp architecture, or says why none fits.
pub fn select_arch(cfg: &ModelConfig, notes: &mut Vec<String>) -> Result<Arch> {
    let errs = cfg.validate();
    if !errs.is_empty() {
        bail!("invalid model config: {}", errs.join("; "));
    }
    if cfg.vocab_size == 0 {
        bail!("model.vocab_size is 0");
    }
    let arch = match cfg.pos_emb {
        PosEmb::Learned => {
            if cfg.norm != Norm::LayerNorm {
                bail!(
                    "learned positions map to llama.cpp's gpt2, which needs norm = \"layer_norm\", not {:?}",
                    cfg.norm
                );
            }
            match cfg.mlp {
                Mlp::GeluTanh => {}
                Mlp::Gelu => notes.push(
                    "mlp = \"gelu\" (exact erf): llama.cpp's gpt2 graph computes the tanh approximation of GELU, \
                     so logits differ slightly"
                        .into(),
                ),
                other => bail!("llama.cpp's gpt2 graph has a GELU MLP; mlp = {other:?} has no GGUF equivalent"),
            }
            if cfg.qk_norm {
                bail!("llama.cpp's gpt2 graph has no q/k norm");
            }
            if cfg.head_dim() * cfg.n_head != cfg.n_embd {
                bail!(
                    "llama.cpp's gpt2 graph needs n_head x head_dim = n_embd, found {} x {} != {}",
                    cfg.n_head,
                    cfg.head_dim(),
                    cfg.n_embd
                );
            }
            Arch::Gpt2
        }
        PosEmb::Rope => {
            if cfg.norm != Norm::RmsNorm || cfg.mlp != Mlp::Swiglu {
                bail!(
                    "RoPE models export as llama.cpp's llama/qwen2/qwen3, which need norm = \"rms_norm\" and \
                     mlp = \"swiglu\"; found {:?} and {:?}",
                    cfg.norm,
                    cfg.mlp
                );
            }
            let other_bias = cfg.o_bias() || cfg.mlp_bias();
            if cfg.qk_norm {
                if other_bias {
                    bail!("qk_norm maps to llama.cpp's qwen3, which has no output-projection or MLP biases");
                }
                if cfg.rope_scaling.is_some() {
                    bail!("qk_norm maps to llama.cpp's qwen3, which has no llama3 rope scaling");
                }
                Arch::Qwen3
            } else if cfg.qkv_bias()
                && !other_bias
                && cfg.rope_scaling.is_none()
                && cfg.head_dim() * cfg.n_head == cfg.n_embd
            {
                Arch::Qwen2
            } else {
                // llama.cpp's llama takes optional biases on every projection.
                Arch::Llama
            }
        }
        PosEmb::Sinusoidal => bail!(
            "pos_emb = \"sinusoidal\": no llama.cpp architecture adds fixed sinusoidal position embeddings \
             (GGUF export supports learned positions (gpt2) and RoPE (llama, qwen2, qwen3))"
        ),
        PosEmb::None => bail!(
            "pos_emb = \"none\": no llama.cpp architecture runs a decoder without positions \
             (GGUF export supports learned positions (gpt2) and RoPE (llama, qwen2, qwen3))"
        ),
    };
    if cfg.sliding_window > 0 && cfg.sliding_window < cfg.block_size {
        bail!(
            "sliding_window = {} (< block_size {}): llama.cpp's {} graph attends to the whole context",
            cfg.sliding_window,
            cfg.block_size,
            arch.name()
        );
    }
    Ok(arch)
}

/// The storage type of one tensor, by the rules of llama.cpp's converter: 1-D tensors, norms,
/// biases and position embeddings stay F32; Q8_0 needs rows of 32, else F16.
pub fn tensor_type(name: &str, shape: &[usize], ty: GgufType) -> TensorType {
    if shape.len() <= 1
        || name.ends_with("_norm.weight")
        || !name.ends_with(".weight")
        || name == "position_embd.weight"
    {
        return TensorType::F32;
    }
    match ty {
        GgufType::F32 => TensorType::F32,
        GgufType::F16 => TensorType::F16,
        GgufType::BF16 => TensorType::BF16,
        GgufType::Q8_0 if shape[shape.len() - 1].is_multiple_of(taper_model::gguf::QK8_0) => TensorType::Q8_0,
        GgufType::Q8_0 => TensorType::F16,
    }
}

/// Reorders the rows of a q or k projection (weight or bias) from HF's rotate-half layout to
/// the interleaved pairs of ggml's normal rope: within each head, row `j * hd/2 + i` moves to
/// `2 * i + j`.
pub fn permute_rope_rows(data: &[f32], n_head: usize, row_len: usize) -> Vec<f32> {
    let rows = data.len() / row_len;
    let hd = rows / n_head;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * (hd / 2) + i;
                let dst = h * hd + 2 * i + j;
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Every tensor llama.cpp's `arch` reads, named and shaped for GGUF (torch order), as f32.
fn gguf_tensors(
    arch: Arch,
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    notes: &mut Vec<String>,
) -> Result<Vec<NamedTensor>> {
    let specs = taper_model::param_specs(cfg);
    for (name, shape, _) in &specs {
        let t = tensors.get(name).ok_or_else(|| anyhow!("tensor `{name}` is missing"))?;
        if t.dims() != shape.as_slice() {
            bail!("tensor `{name}`: expected shape {shape:?}, found {:?}", t.dims());
        }
    }
    let extra: Vec<&String> = tensors.keys().filter(|k| !specs.iter().any(|(n, _, _)| n == *k)).collect();
    if !extra.is_empty() {
        notes.push(format!("{} tensors the model does not use are left out: {extra:?}", extra.len()));
    }
    let get = |name: &str| -> Result<Vec<f32>> {
        let t = &tensors[name];
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let has = |name: &str| specs.iter().any(|(n, _, _)| n == name);
    let c = cfg.n_embd;
    let mut out: Vec<NamedTensor> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| out.push((name, shape, data));
    // gpt2's graph requires every bias; missing ones are zeros, which change nothing.
    let bias_or_zeros = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
        if has(name) {
            Ok(Some(get(name)?))
        } else if arch == Arch::Gpt2 {
            Ok(Some(vec![0.0; n]))
        } else {
            Ok(None)
        }
    };

    put("token_embd.weight".into(), vec![cfg.vocab_size, c], get("model.embed_tokens.weight")?);
    if cfg.pos_emb == PosEmb::Learned {
        put("position_embd.weight".into(), vec![cfg.block_size, c], get("model.embed_positions.weight")?);
    }
    if let Some(r) = &cfg.rope_scaling {
        // llama.cpp divides each rotary frequency by rope_freqs[i]: the ratio of the plain
        // frequency to taper's scaled one.
        let plain = taper_model::nn::rope_inv_freq(&ModelConfig { rope_scaling: None, ..cfg.clone() });
        let scaled = taper_model::nn::rope_inv_freq(cfg);
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        debug_assert_eq!(r.rope_type, "llama3");
        put("rope_freqs.weight".into(), vec![factors.len()], factors);
    }

    let (hd, nh, nkv) = (cfg.head_dim(), cfg.n_head, cfg.kv_heads());
    let (q_rows, kv_rows, ff) = (nh * hd, nkv * hd, cfg.hidden());
    for i in 0..cfg.n_layer {
        let p = format!("model.layers.{i}");
        let b = format!("blk.{i}");
        put(format!("{b}.attn_norm.weight"), vec![c], get(&format!("{p}.input_layernorm.weight"))?);
        if let Some(v) = bias_or_zeros(&format!("{p}.input_layernorm.bias"), c)? {
            put(format!("{b}.attn_norm.bias"), vec![c], v);
        }
        let proj = |x: &str| format!("{p}.self_attn.{x}_proj");
        if arch == Arch::Gpt2 {
            let mut wqkv = get(&format!("{}.weight", proj("q")))?;
            wqkv.extend(get(&format!("{}.weight", proj("k")))?);
            wqkv.extend(get(&format!("{}.weight", proj("v")))?);
            put(format!("{b}.attn_qkv.weight"), vec![q_rows + 2 * kv_rows, c], wqkv);
            let mut bqkv = Vec::new();
            for (x, n) in [("q", q_rows), ("k", kv_rows), ("v", kv_rows)] {
                bqkv.extend(bias_or_zeros(&format!("{}.bias", proj(x)), n)?.expect("gpt2 gets zeros"));
            }
            put(format!("{b}.attn_qkv.bias"), vec![q_rows + 2 * kv_rows], bqkv);
        } else {
            for (x, rows, heads) in [("q", q_rows, nh), ("k", kv_rows, nkv), ("v", kv_rows, 0)] {
                let permute = arch == Arch::Llama && heads > 0;
                let mut wt = get(&format!("{}.weight", proj(x)))?;
                if permute {
                    wt = permute_rope_rows(&wt, heads, c);
                }
                put(format!("{b}.attn_{x}.weight"), vec![rows, c], wt);
                if let Some(mut bias) = bias_or_zeros(&format!("{}.bias", proj(x)), rows)? {
                    if permute {
                        bias = permute_rope_rows(&bias, heads, 1);
                    }
                    put(format!("{b}.attn_{x}.bias"), vec![rows], bias);
                }
            }
        }
        put(format!("{b}.attn_output.weight"), vec![c, q_rows], get(&format!("{}.weight", proj("o")))?);
        if let Some(v) = bias_or_zeros(&format!("{}.bias", proj("o")), c)? {
            put(format!("{b}.attn_output.bias"), vec![c], v);
        }
        if cfg.qk_norm {
            put(format!("{b}.attn_q_norm.weight"), vec![hd], get(&format!("{p}.self_attn.q_norm.weight"))?);
            put(format!("{b}.attn_k_norm.weight"), vec![hd], get(&format!("{p}.self_attn.k_norm.weight"))?);
        }
        put(format!("{b}.ffn_norm.weight"), vec![c], get(&format!("{p}.post_attention_layernorm.weight"))?);
        if let Some(v) = bias_or_zeros(&format!("{p}.post_attention_layernorm.bias"), c)? {
            put(format!("{b}.ffn_norm.bias"), vec![c], v);
        }
        let mlp = |x: &str| format!("{p}.mlp.{x}_proj");
        let mut ffn = vec![("up", ff, c)];
        if cfg.mlp == Mlp::Swiglu {
            ffn.insert(0, ("gate", ff, c));
        }
        ffn.push(("down", c, ff));
        for (x, rows, cols) in ffn {
            put(format!("{b}.ffn_{x}.weight"), vec![rows, cols], get(&format!("{}.weight", mlp(x)))?);
            if let Some(v) = bias_or_zeros(&format!("{}.bias", mlp(x)), rows)? {
                put(format!("{b}.ffn_{x}.bias"), vec![rows], v);
            }
        }
    }
    put("output_norm.weight".into(), vec![c], get("model.norm.weight")?);
    if let Some(v) = bias_or_zeros("model.norm.bias", c)? {
        put("output_norm.bias".into(), vec![c], v);
    }
    if !cfg.tie_embeddings {
        put("output.weight".into(), vec![cfg.vocab_size, c], get("lm_head.weight")?);
    }
    Ok(out)
}

// llama.cpp's token types (gguf-py `TokenType`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

/// The `tokenizer.ggml.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgmlVocab {
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: Option<bool>,
    pub chat_template: Option<String>,
    /// What was guessed or approximated.
    pub notes: Vec<String>,
}

impl GgmlVocab {
    fn write(&self, w: &mut GgufWriter) -> Result<()> {
        w.add_kv("tokenizer.ggml.model", Value::string("gpt2"))?;
        w.add_kv("tokenizer.ggml.pre", Value::string(&self.pre))?;
        w.add_kv("tokenizer.ggml.tokens", Value::strings(self.tokens.iter().cloned()))?;
        w.add_kv("tokenizer.ggml.token_type", Value::i32s(self.token_types.iter().copied()))?;
        w.add_kv("tokenizer.ggml.merges", Value::strings(self.merges.iter().cloned()))?;
        for (key, id) in [
            ("bos_token_id", self.bos),
            ("eos_token_id", self.eos),
            ("padding_token_id", self.pad),
            ("unknown_token_id", self.unk),
        ] {
            if let Some(id) = id {
                w.add_kv(format!("tokenizer.ggml.{key}"), Value::U32(id))?;
            }
        }
        w.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(self.add_bos))?;
        if let Some(e) = self.add_eos {
            w.add_kv("tokenizer.ggml.add_eos_token", Value::Bool(e))?;
        }
        if let Some(t) = &self.chat_template {
            w.add_kv("tokenizer.chat_template", Value::string(t))?;
        }
        Ok(())
    }
}

/// GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others for
/// code points from U+0100 up, in byte order.
pub fn gpt2_byte_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    table
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The components of a pre-tokenizer (a `Sequence` flattened).
fn pre_parts(pre: &Json) -> Vec<&Json> {
    match pre.get("type").and_then(Json::as_str) {
        Some("Sequence") => pre["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        Some(_) => vec![pre],
        None => vec![],
    }
}

fn split_regex(p: &Json) -> Option<&str> {
    (p["type"] == "Split").then(|| p["pattern"]["Regex"].as_str()).flatten()
}

/// llama.cpp's name for a byte-level BPE's pre-tokenizer (`tokenizer.ggml.pre`), read from the
/// tokenizer.json `pre_tokenizer`; `None` when it matches none llama.cpp implements.
pub fn detect_pre(tok: &Json) -> Option<&'static str> {
    let parts = pre_parts(&tok["pre_tokenizer"]);
    let kind = |p: &Json| p["type"].as_str().unwrap_or_default().to_string();
    let byte_level_regex = |p: &Json| kind(p) == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true);
    let prefix_space = parts.iter().any(|p| kind(p) == "ByteLevel" && p["add_prefix_space"].as_bool() == Some(true));
    if prefix_space {
        return None;
    }
    match parts.as_slice() {
        [p] if byte_level_regex(p) => Some("gpt-2"),
        [d, p] if kind(d) == "Digits" && d["individual_digits"].as_bool() == Some(true) && byte_level_regex(p) => {
            Some("smollm")
        }
        [s, p] if kind(p) == "ByteLevel" && !byte_level_regex(p) => match split_regex(s)? {
            GPT2_REGEX => Some("gpt-2"),
            LLAMA3_REGEX => Some("llama-bpe"),
            QWEN2_REGEX => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

fn is_byte_level(tok: &Json) -> bool {
    pre_parts(&tok["pre_tokenizer"]).iter().any(|p| p["type"] == "ByteLevel") || tok["decoder"]["type"] == "ByteLevel"
}

/// A special token named in tokenizer_config.json: a string or `{"content": ...}`.
fn config_token(cfg: Option<&Json>, key: &str) -> Option<String> {
    let v = cfg?.get(key)?;
    v.as_str().or_else(|| v.get("content").and_then(Json::as_str)).map(str::to_string)
}

/// Builds llama.cpp's vocabulary from a tokenizer.json; `vocab_size` is the model's (the
/// embedding rows), which may exceed the tokenizer's: the gap is filled with unused tokens.
pub fn vocab_from_tokenizer(tok: &Json, vocab_size: usize, tcfg: Option<&Json>) -> Result<GgmlVocab> {
    let model = &tok["model"];
    let kind = model["type"].as_str().unwrap_or("BPE"); // old files omit it for BPE
    let vocab = model["vocab"].as_object().ok_or_else(|| anyhow!("model.vocab is missing or not a map"))?;
    let mut notes = Vec::new();

    // Added tokens first: they override the model's entries and carry the special flag.
    let mut added: HashMap<u32, (String, bool)> = HashMap::new();
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"].as_u64().ok_or_else(|| anyhow!("an added token has no id: {a}"))? as u32;
        let content = a["content"].as_str().ok_or_else(|| anyhow!("added token {id} has no content"))?;
        added.insert(id, (content.to_string(), a["special"].as_bool().unwrap_or(false)));
    }
    let mut by_id: HashMap<u32, String> = HashMap::new();
    for (t, id) in vocab {
        let id = id.as_u64().ok_or_else(|| anyhow!("vocab entry {t:?} has no integer id"))? as u32;
        by_id.insert(id, t.clone());
    }

    let (pre, merges) = match kind {
        "BPE" => {
            if !is_byte_level(tok) {
                bail!(
                    "a BPE without a ByteLevel pre-tokenizer or decoder (SentencePiece-style) is not supported; \
                     GGUF export writes byte-level BPE (llama.cpp's \"gpt2\" tokenizer model)"
                );
            }
            let merges = model["merges"]
                .as_array()
                .ok_or_else(|| anyhow!("model.merges is missing"))?
                .iter()
                .map(|m| match m {
                    Json::String(s) => Ok(s.clone()),
                    Json::Array(pair) if pair.len() == 2 && pair.iter().all(Json::is_string) => {
                        Ok(format!("{} {}", pair[0].as_str().unwrap_or_default(), pair[1].as_str().unwrap_or_default()))
                    }
                    other => Err(anyhow!("unreadable merge {other}")),
                })
                .collect::<Result<Vec<_>>>()?;
            let pre = match detect_pre(tok) {
                Some(p) => p.to_string(),
                None => {
                    notes.push(format!(
                        "pre-tokenizer {} matches none llama.cpp knows; wrote tokenizer.ggml.pre = \"default\" \
                         (llama.cpp may split text differently)",
                        tok["pre_tokenizer"]
                    ));
                    "default".to_string()
                }
            };
            if !tok["normalizer"].is_null() {
                notes.push(format!("the tokenizer's normalizer is not applied by llama.cpp: {}", tok["normalizer"]));
            }
            (pre, merges)
        }
        "WordLevel" => {
            check_char_level(tok)?;
            let table = gpt2_byte_to_unicode();
            for (id, t) in by_id.iter_mut() {
                if added.contains_key(id) {
                    continue;
                }
                let mut chars = t.chars();
                let (Some(ch), None) = (chars.next(), chars.next()) else {
                    bail!("WordLevel token {t:?} (id {id}) is not a single character: only char-level is supported");
                };
                if !ch.is_ascii() {
                    bail!(
                        "char-level token {ch:?} (id {id}) is not ASCII: a char-level vocabulary exports as a \
                         byte-level BPE without merges, where each token must be one byte"
                    );
                }
                *t = table[ch as usize].to_string();
            }
            // The split is per character, so any byte-level pre-tokenizer regex gives the same ids.
            ("gpt-2".to_string(), Vec::new())
        }
        other => bail!("tokenizer model {other:?} is not supported (byte-level BPE and taper's char-level are)"),
    };

    let max_id = by_id.keys().chain(added.keys()).copied().max().map_or(0, |m| m as usize + 1);
    if max_id > vocab_size {
        bail!("the tokenizer has ids up to {} but the model's vocab_size is {vocab_size}", max_id - 1);
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut token_types = Vec::with_capacity(vocab_size);
    let mut ids: HashMap<String, u32> = HashMap::new();
    for id in 0..vocab_size as u32 {
        let (t, ty) = match (added.get(&id), by_id.get(&id)) {
            (Some((c, true)), _) => (c.clone(), TOKEN_CONTROL),
            (Some((c, false)), _) => (c.clone(), TOKEN_USER_DEFINED),
            (None, Some(t)) if is_byte_token(t) => (t.clone(), TOKEN_BYTE),
            (None, Some(t)) => (t.clone(), TOKEN_NORMAL),
            (None, None) => (format!("[PAD{id}]"), TOKEN_UNUSED),
        };
        ids.entry(t.clone()).or_insert(id);
        tokens.push(t);
        token_types.push(ty);
    }

    let lookup = |key: &str, notes: &mut Vec<String>| -> Option<u32> {
        let t = config_token(tcfg, key)?;
        let id = ids.get(&t).copied();
        if id.is_none() {
            notes.push(format!("tokenizer_config {key} {t:?} is not in the vocabulary"));
        }
        id
    };
    let eos = lookup("eos_token", &mut notes)
        .or_else(|| ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"].iter().find_map(|t| ids.get(*t).copied()));
    let mut bos = lookup("bos_token", &mut notes);
    if bos.is_none() && eos.is_some() {
        // llama.cpp's gpt2 vocabulary otherwise defaults bos to id 11; GPT-2 itself uses its
        // end-of-text token for both.
        bos = eos;
    }
    let pad = lookup("pad_token", &mut notes);
    let unk = lookup("unk_token", &mut notes);
    let add_bos = match tcfg.and_then(|c| c.get("add_bos_token")).and_then(Json::as_bool) {
        Some(b) => b,
        None => post_processor_adds_bos(tok),
    };
    let add_eos = tcfg.and_then(|c| c.get("add_eos_token")).and_then(Json::as_bool);
    let chat_template = match tcfg.and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => {
            let pick = list.iter().find(|t| t["name"] == "default").or(list.first());
            if list.len() > 1 {
                notes.push("tokenizer_config has several chat templates; wrote the default one".into());
            }
            pick.and_then(|t| t["template"].as_str()).map(str::to_string)
        }
        _ => None,
    };
    Ok(GgmlVocab { pre, tokens, token_types, merges, bos, eos, pad, unk, add_bos, add_eos, chat_template, notes })
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// taper's char-level tokenizer: a WordLevel model behind a pre-tokenizer that isolates every
/// character, no normalizer.
fn check_char_level(tok: &Json) -> Result<()> {
    let pre = &tok["pre_tokenizer"];
    let per_char = pre["type"] == "Split"
        && pre["behavior"] == "Isolated"
        && pre["invert"].as_bool() != Some(true)
        && matches!(split_regex(pre), Some(r"[\s\S]" | r"(?s)." | r"[\S\s]"));
    if !per_char {
        bail!("a WordLevel tokenizer exports only when it is char-level (a Split pre-tokenizer isolating each character); found {pre}");
    }
    if !tok["normalizer"].is_null() {
        bail!("a char-level tokenizer with a normalizer is not supported: {}", tok["normalizer"]);
    }
    Ok(())
}

/// Whether the post-processor puts a special token before a single sequence (a BOS).
fn post_processor_adds_bos(tok: &Json) -> bool {
    let pp = &tok["post_processor"];
    let template =
        |p: &Json| p["single"].as_array().and_then(|s| s.first()).is_some_and(|f| f.get("SpecialToken").is_some());
    match pp["type"].as_str() {
        Some("TemplateProcessing") => template(pp),
        Some("Sequence") => pp["processors"].as_array().into_iter().flatten().any(template),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use serde_json::json;
    use taper_model::gguf::GgufFile;

    fn gpt2_cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 12,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            bias: false,
            ..Default::default()
        }
    }

    fn llama_cfg() -> ModelConfig {
        ModelConfig {
            pos_emb: PosEmb::Rope,
            norm: Norm::RmsNorm,
            mlp: Mlp::Swiglu,
            n_kv_head: 1,
            tie_embeddings: false,
            ..gpt2_cfg()
        }
    }

    fn char_tokenizer(dir: &Path) -> std::path::PathBuf {
        // taper's char tokenizer for the text "\n !ab", plus <|endoftext|>; vocab_size 12 pads 6.
        let chars = ["\n", " ", "!", "a", "b"];
        let mut vocab = serde_json::Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        vocab.insert("<|endoftext|>".into(), json!(5));
        let tok = json!({
            "version": "1.0", "added_tokens": [{"id": 5, "content": "<|endoftext|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let p = dir.join("char.json");
        std::fs::write(&p, tok.to_string()).unwrap();
        p
    }

    fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("taper-gguf-export-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn weights(cfg: &ModelConfig) -> HashMap<String, Tensor> {
        taper_model::init_weights(cfg, 3, &Device::Cpu).unwrap().into_iter().collect()
    }

    #[test]
    fn arch_selection_and_errors() {
        let mut notes = Vec::new();
        assert_eq!(select_arch(&gpt2_cfg(), &mut notes).unwrap(), Arch::Gpt2);
        assert!(notes[0].contains("tanh"), "{notes:?}");
        let mut notes = Vec::new();
        let tanh = ModelConfig { mlp: Mlp::GeluTanh, ..gpt2_cfg() };
        assert_eq!(select_arch(&tanh, &mut notes).unwrap(), Arch::Gpt2);
        assert!(notes.is_empty());
        assert_eq!(select_arch(&llama_cfg(), &mut notes).unwrap(), Arch::Llama);
        let qwen2 = ModelConfig { qkv_bias: Some(true), ..llama_cfg() };
        assert_eq!(select_arch(&qwen2, &mut notes).unwrap(), Arch::Qwen2);
        // qkv biases with an output bias: only llama.cpp's llama takes that.
        let biased = ModelConfig { qkv_bias: Some(true), o_bias: Some(true), ..llama_cfg() };
        assert_eq!(select_arch(&biased, &mut notes).unwrap(), Arch::Llama);
        let qwen3 = ModelConfig { qk_norm: true, head_dim: 8, ..llama_cfg() };
        assert_eq!(select_arch(&qwen3, &mut notes).unwrap(), Arch::Qwen3);

        let err = |cfg: ModelConfig| select_arch(&cfg, &mut Vec::new()).unwrap_err().to_string();
        assert!(err(ModelConfig { pos_emb: PosEmb::Sinusoidal, ..gpt2_cfg() }).contains("sinusoidal"));
        assert!(err(ModelConfig { pos_emb: PosEmb::None, ..gpt2_cfg() }).contains("none"));
        assert!(err(ModelConfig { mlp: Mlp::Relu, ..gpt2_cfg() }).contains("Relu"));
        assert!(err(ModelConfig { norm: Norm::RmsNorm, ..gpt2_cfg() }).contains("layer_norm"));
        assert!(err(ModelConfig { mlp: Mlp::Gelu, ..llama_cfg() }).contains("swiglu"));
        assert!(err(ModelConfig { sliding_window: 4, ..llama_cfg() }).contains("sliding_window"));
        assert!(err(ModelConfig { qk_norm: true, mlp_bias: Some(true), ..llama_cfg() }).contains("qwen3"));
        assert!(err(ModelConfig { n_head: 3, ..gpt2_cfg() }).contains("divisible"));
    }

    #[test]
    fn tensor_types_follow_the_converter() {
        use TensorType::*;
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 32], GgufType::Q8_0), Q8_0);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 40], GgufType::Q8_0), F16);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 40], GgufType::F16), F16);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 32], GgufType::F32), F32);
        assert_eq!(tensor_type("blk.0.attn_q.bias", &[64], GgufType::Q8_0), F32);
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[64], GgufType::F16), F32);
        assert_eq!(tensor_type("position_embd.weight", &[16, 32], GgufType::Q8_0), F32);
        assert_eq!(tensor_type("token_embd.weight", &[16, 32], GgufType::Q8_0), Q8_0);
    }

    #[test]
    fn byte_to_unicode_matches_gpt2() {
        let t = gpt2_byte_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'\t' as usize], 'ĉ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[127], 'ġ');
        assert_eq!(t[173], 'Ń');
        let mut all: Vec<char> = t.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn char_level_vocab_maps_to_byte_level_tokens() {
        let dir = tmp_dir("char");
        let p = char_tokenizer(&dir);
        let tok: Json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let v = vocab_from_tokenizer(&tok, 12, None).unwrap();
        assert_eq!(v.pre, "gpt-2");
        assert_eq!(&v.tokens[..6], &["Ċ", "Ġ", "!", "a", "b", "<|endoftext|>"]);
        assert_eq!(v.tokens[11], "[PAD11]");
        assert_eq!(&v.token_types[4..7], &[TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED]);
        assert!(v.merges.is_empty());
        assert_eq!((v.bos, v.eos, v.pad, v.add_bos), (Some(5), Some(5), None, false));
        assert!(vocab_from_tokenizer(&tok, 5, None).unwrap_err().to_string().contains("vocab_size is 5"));

        let mut bad = tok.clone();
        bad["model"]["vocab"]["é"] = json!(6);
        let err = vocab_from_tokenizer(&bad, 12, None).unwrap_err().to_string();
        assert!(err.contains("not ASCII"), "{err}");
        let mut words = tok.clone();
        words["pre_tokenizer"] = json!({"type": "Whitespace"});
        let err = vocab_from_tokenizer(&words, 12, None).unwrap_err().to_string();
        assert!(err.contains("char-level"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn bpe_json(pre: Json) -> Json {
        json!({
            "added_tokens": [{"id": 4, "content": "<s>", "special": true},
                             {"id": 5, "content": "</s>", "special": true},
                             {"id": 6, "content": "<tool>", "special": false}],
            "normalizer": null, "pre_tokenizer": pre,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġab": 3, "<s>": 4, "</s>": 5},
                      "merges": [["a", "b"], "Ġ ab"]}
        })
    }

    #[test]
    fn bpe_vocab_with_config_and_pre_detection() {
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false});
        let split = |re: &str| {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}, bl.clone()]})
        };
        let tcfg = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "</s>",
                          "chat_template": "{{ messages }}"});
        let v = vocab_from_tokenizer(&bpe_json(split(LLAMA3_REGEX)), 8, Some(&tcfg)).unwrap();
        assert_eq!(v.pre, "llama-bpe");
        assert_eq!(v.merges, vec!["a b", "Ġ ab"]);
        assert_eq!(v.tokens[..7], ["a", "b", "ab", "Ġab", "<s>", "</s>", "<tool>"]);
        assert_eq!(v.token_types[3..8], [TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED]);
        assert_eq!((v.bos, v.eos, v.pad), (Some(4), Some(5), Some(5)));
        assert!(v.add_bos, "from the post-processor template");
        assert_eq!(v.chat_template.as_deref(), Some("{{ messages }}"));
        let no_bos = json!({"add_bos_token": false});
        assert!(!vocab_from_tokenizer(&bpe_json(split(LLAMA3_REGEX)), 8, Some(&no_bos)).unwrap().add_bos);

        let pre = |p: Json| vocab_from_tokenizer(&bpe_json(p), 8, None).unwrap().pre;
        assert_eq!(pre(split(QWEN2_REGEX)), "qwen2");
        assert_eq!(pre(split(GPT2_REGEX)), "gpt-2");
        assert_eq!(pre(json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})), "gpt-2");
        assert_eq!(
            pre(json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]})),
            "smollm"
        );
        let v = vocab_from_tokenizer(&bpe_json(split("\\p{L}+")), 8, None).unwrap();
        assert_eq!(v.pre, "default");
        assert!(v.notes[0].contains("default"), "{:?}", v.notes);

        let mut spm = bpe_json(json!({"type": "Metaspace"}));
        spm["decoder"] = json!({"type": "Metaspace"});
        assert!(vocab_from_tokenizer(&spm, 8, None).unwrap_err().to_string().contains("SentencePiece"));
        let mut uni = bpe_json(bl);
        uni["model"]["type"] = json!("Unigram");
        assert!(vocab_from_tokenizer(&uni, 8, None).unwrap_err().to_string().contains("Unigram"));
    }

    /// ggml's normal rope on interleaved pairs (x[2i], x[2i+1]) of one head.
    fn rope_interleaved(x: &[f32], pos: f32, theta: f64) -> Vec<f32> {
        let d = x.len();
        let mut out = x.to_vec();
        for i in 0..d / 2 {
            let f = (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32;
            let (s, c) = (pos * f).sin_cos();
            out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
            out[2 * i + 1] = x[2 * i + 1] * c + x[2 * i] * s;
        }
        out
    }

    #[test]
    fn permuted_rows_make_interleaved_rope_equal_rotate_half() {
        // q = W x for one position; HF's rotate-half rope on q, then the permutation, must equal
        // ggml's interleaved rope on (permuted W) x.
        let cfg = ModelConfig { n_embd: 16, n_head: 2, pos_emb: PosEmb::Rope, ..Default::default() };
        let (nh, hd, c) = (2, 8, 16);
        let w: Vec<f32> = (0..nh * hd * c).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0).collect();
        let x: Vec<f32> = (0..c).map(|i| (i as f32 - 5.0) / 3.0).collect();
        let matvec =
            |w: &[f32]| -> Vec<f32> { w.chunks(c).map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum()).collect() };
        let pos = 5;
        let (cos, sin) =
            taper_model::nn::rope_tables(&taper_model::nn::rope_inv_freq(&cfg), pos, 1, &Device::Cpu).unwrap();
        let q = Tensor::from_vec(matvec(&w), (1, nh, 1, hd), &Device::Cpu).unwrap();
        let hf = taper_model::nn::rope(&q, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hf_permuted = permute_rope_rows(&hf, nh, 1);
        let qp = matvec(&permute_rope_rows(&w, nh, c));
        let ggml: Vec<f32> = qp.chunks(hd).flat_map(|h| rope_interleaved(h, pos as f32, cfg.rope_theta)).collect();
        for (a, b) in hf_permuted.iter().zip(&ggml) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn gpt2_and_llama_files_have_what_llama_cpp_reads() {
        let dir = tmp_dir("files");
        let tok = char_tokenizer(&dir);
        for (cfg, arch) in [(gpt2_cfg(), "gpt2"), (llama_cfg(), "llama")] {
            let tensors = weights(&cfg);
            let src =
                GgufSource { cfg: &cfg, tensors: &tensors, tokenizer_json: &tok, tokenizer_config: None, name: "t" };
            for ty in [GgufType::F32, GgufType::F16, GgufType::BF16, GgufType::Q8_0] {
                let p = dir.join(format!("{arch}-{ty:?}.gguf"));
                write_gguf(&p, &src, ty).unwrap();
                let f = GgufFile::read(&p).unwrap();
                let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or_else(|| panic!("{k}")).to_string();
                let u = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or_else(|| panic!("{k}"));
                assert_eq!(s("general.architecture"), arch);
                assert_eq!(u("general.file_type"), ty.file_type() as u64);
                assert_eq!(u(&format!("{arch}.context_length")), 16);
                assert_eq!(u(&format!("{arch}.embedding_length")), 32);
                assert_eq!(u(&format!("{arch}.block_count")), 2);
                assert_eq!(u(&format!("{arch}.feed_forward_length")), cfg.hidden() as u64);
                assert_eq!(u(&format!("{arch}.attention.head_count_kv")), cfg.kv_heads() as u64);
                assert_eq!(s("tokenizer.ggml.model"), "gpt2");
                assert_eq!(f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().items().len(), 12);
                let emb = f.tensor("token_embd.weight").unwrap();
                assert_eq!(emb.dims, vec![32, 12], "ggml order: row length first");
                let want = match ty {
                    GgufType::F32 => TensorType::F32,
                    GgufType::F16 => TensorType::F16,
                    GgufType::BF16 => TensorType::BF16,
                    GgufType::Q8_0 => TensorType::Q8_0,
                };
                assert_eq!(emb.ty, want);
                assert_eq!(f.tensor("output_norm.weight").unwrap().ty, TensorType::F32);
                let orig = tensors["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let back = f.tensor_f32("token_embd.weight").unwrap();
                let tol = match ty {
                    GgufType::F32 => 0.0,
                    GgufType::F16 => 1e-3,
                    // 8 bits of mantissa: half a step of 2^-8 relative, these weights below 1.
                    GgufType::BF16 => 2e-3,
                    GgufType::Q8_0 => 2e-3,
                };
                let diff = orig.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= tol, "{arch} {ty:?}: {diff}");
                if arch == "gpt2" {
                    let n = |i: usize| format!("blk.{i}.attn_qkv.weight");
                    assert_eq!(f.tensor(&n(1)).unwrap().dims, vec![32, 96]);
                    // Zero biases where the model has none, as gpt2's graph requires them.
                    assert_eq!(f.tensor_f32("blk.0.attn_qkv.bias").unwrap(), vec![0.0; 96]);
                    assert_eq!(f.tensor_f32("output_norm.bias").unwrap(), vec![0.0; 32]);
                    assert!(f.tensor("position_embd.weight").is_some());
                    assert!(f.tensor("output.weight").is_none(), "tied");
                } else {
                    assert_eq!(f.tensor("blk.0.attn_k.weight").unwrap().dims, vec![32, 16]);
                    assert!(f.tensor("blk.0.ffn_gate.weight").is_some());
                    assert!(f.tensor("output.weight").is_some(), "untied");
                    assert!(f.tensor("blk.0.attn_q.bias").is_none());
                    if ty == GgufType::F32 {
                        let q = tensors["model.layers.0.self_attn.q_proj.weight"].flatten_all().unwrap();
                        let q = permute_rope_rows(&q.to_vec1::<f32>().unwrap(), 2, 32);
                        assert_eq!(f.tensor_f32("blk.0.attn_q.weight").unwrap(), q);
                        let v = tensors["model.layers.0.self_attn.v_proj.weight"].flatten_all().unwrap();
                        assert_eq!(f.tensor_f32("blk.0.attn_v.weight").unwrap(), v.to_vec1::<f32>().unwrap());
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn llama3_rope_scaling_writes_rope_freqs() {
        let dir = tmp_dir("rope");
        let tok = char_tokenizer(&dir);
        let cfg = ModelConfig {
            rope_scaling: Some(taper_model::config::RopeScaling {
                rope_type: "llama3".into(),
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            n_head: 1,
            n_kv_head: 1,
            ..llama_cfg()
        };
        let tensors = weights(&cfg);
        let src = GgufSource { cfg: &cfg, tensors: &tensors, tokenizer_json: &tok, tokenizer_config: None, name: "t" };
        let (w, _) = build_gguf(&src, GgufType::F32).unwrap();
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let f = GgufFile::parse(bytes).unwrap();
        let r = f.tensor_f32("rope_freqs.weight").unwrap();
        assert_eq!(r.len(), 16);
        assert_eq!(r[0], 1.0, "high frequencies are unscaled");
        assert!((r[15] - 8.0).abs() < 1e-5, "low frequencies divide by the factor: {}", r[15]);
        assert!(r.windows(2).all(|p| p[0] <= p[1] + 1e-6));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_misshapen_tensors_are_named() {
        let dir = tmp_dir("missing");
        let tok = char_tokenizer(&dir);
        let cfg = llama_cfg();
        let mut tensors = weights(&cfg);
        tensors.remove("model.layers.1.mlp.gate_proj.weight");
        let src = GgufSource { cfg: &cfg, tensors: &tensors, tokenizer_json: &tok, tokenizer_config: None, name: "t" };
        let err = build_gguf(&src, GgufType::F16).err().unwrap().to_string();
        assert!(err.contains("model.layers.1.mlp.gate_proj.weight"), "{err}");
        let mut tensors = weights(&cfg);
        tensors.insert("model.norm.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        let src = GgufSource { cfg: &cfg, tensors: &tensors, tokenizer_json: &tok, tokenizer_config: None, name: "t" };
        let err = build_gguf(&src, GgufType::F16).err().unwrap().to_string();
        assert!(err.contains("model.norm.weight") && err.contains("[3]"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
