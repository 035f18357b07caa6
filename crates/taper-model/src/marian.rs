//! An encoder-decoder transformer in the shape of HF's Marian (`modeling_marian.py`), itself the
//! base model of "Attention Is All You Need": post-LN blocks, sinusoidal positions (Marian's
//! layout: sines in the first half of each vector, cosines in the second), embeddings scaled
//! by sqrt(d) as an option, source and target embeddings shared as an option, an output head
//! tied to the target embeddings plus `final_logits_bias`.
//!
//! The encoder attends bidirectionally under a source padding mask; the decoder has causal
//! self-attention and cross-attention whose keys and values come from the encoder output
//! (source padding masked). Tensor names are HF Marian's (`model.encoder.layers.0.fc1.weight`).
//! Generation caches the decoder's self-attention keys/values and computes each layer's
//! cross-attention keys/values once per source.

use crate::checkpointing::{self, ActivationCheckpointing};
use crate::config::{Mlp, ModelConfig, ModelKind, PosEmb};
use crate::init::{check, Init};
use crate::nn;
use crate::rng::Rng;
use crate::weights::Weights;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use taper_kernels::AttnOpts;

/// Decoder layers of an encoder-decoder config.
pub fn decoder_layers(cfg: &ModelConfig) -> usize {
    if cfg.n_decoder_layer == 0 {
        cfg.n_layer
    } else {
        cfg.n_decoder_layer
    }
}

/// The token embedding tables: (encoder's, decoder's) names.
fn embed_names(cfg: &ModelConfig) -> (&'static str, &'static str) {
    if cfg.share_embeddings {
        ("model.shared.weight", "model.shared.weight")
    } else {
        ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    }
}

/// Every parameter: (name, shape, init), in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (v, c, h) = (cfg.vocab_size, cfg.n_embd, cfg.hidden());
    let std = cfg.init_std;
    let mut specs = Vec::new();
    let (enc_embed, dec_embed) = embed_names(cfg);
    specs.push((enc_embed.to_string(), vec![v, c], Init::Normal(std)));
    if dec_embed != enc_embed {
        specs.push((dec_embed.to_string(), vec![v, c], Init::Normal(std)));
    }
    if cfg.pos_emb == PosEmb::Learned {
        for side in ["encoder", "decoder"] {
            specs.push((format!("model.{side}.embed_positions.weight"), vec![cfg.block_size, c], Init::Normal(std)));
        }
    }
    let linear = |specs: &mut Vec<_>, name: String, out: usize, inp: usize| {
        specs.push((format!("{name}.weight"), vec![out, inp], Init::Normal(std)));
        if cfg.bias {
            specs.push((format!("{name}.bias"), vec![out], Init::Zeros));
        }
    };
    let norm = |specs: &mut Vec<_>, name: String| {
        specs.push((format!("{name}.weight"), vec![c], Init::Ones));
        if cfg.bias {
            specs.push((format!("{name}.bias"), vec![c], Init::Zeros));
        }
    };
    let attention = |specs: &mut Vec<_>, p: String| {
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            linear(specs, format!("{p}.{proj}"), c, c);
        }
    };
    for i in 0..cfg.n_layer {
        let p = format!("model.encoder.layers.{i}");
        attention(&mut specs, format!("{p}.self_attn"));
        norm(&mut specs, format!("{p}.self_attn_layer_norm"));
        linear(&mut specs, format!("{p}.fc1"), h, c);
        linear(&mut specs, format!("{p}.fc2"), c, h);
        norm(&mut specs, format!("{p}.final_layer_norm"));
    }
    for i in 0..decoder_layers(cfg) {
        let p = format!("model.decoder.layers.{i}");
        attention(&mut specs, format!("{p}.self_attn"));
        norm(&mut specs, format!("{p}.self_attn_layer_norm"));
        attention(&mut specs, format!("{p}.encoder_attn"));
        norm(&mut specs, format!("{p}.encoder_attn_layer_norm"));
        linear(&mut specs, format!("{p}.fc1"), h, c);
        linear(&mut specs, format!("{p}.fc2"), c, h);
        norm(&mut specs, format!("{p}.final_layer_norm"));
    }
    if !cfg.tie_embeddings {
        specs.push(("lm_head.weight".into(), vec![v, c], Init::Normal(std)));
    }
    specs.push(("final_logits_bias".into(), vec![1, v], Init::Zeros));
    specs
}

/// Marian's sinusoidal table (max_pos, d): sin(p / 10000^(2i/d)) for i < d/2 in the first
/// half of each row, the matching cosines in the second (not interleaved as in the paper).
pub fn sinusoidal_table(d: usize, max_pos: usize, dev: &Device) -> Result<Tensor> {
    let half = d.div_ceil(2);
    let mut v = vec![0f32; max_pos * d];
    for p in 0..max_pos {
        for j in 0..d {
            let a = p as f64 / 10_000f64.powf((2 * (j / 2)) as f64 / d as f64);
            // Even j feed the sine half, odd j the cosine half, in order.
            let col = if j % 2 == 0 { j / 2 } else { half + j / 2 };
            v[p * d + col] = if j % 2 == 0 { a.sin() } else { a.cos() } as f32;
        }
    }
    Ok(Tensor::from_vec(v, (max_pos, d), dev)?)
}

#[derive(Clone)]
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    /// `model.kernels`: the fused linear.
    kernels: bool,
}

impl Linear {
    fn load(w: &Weights, name: &str, out: usize, inp: usize, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[out, inp])?,
            b: if cfg.bias { Some(w.get(&format!("{name}.bias"), &[out])?) } else { None },
            kernels: cfg.kernels,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        nn::linear_k(x, &self.w, self.b.as_ref(), self.kernels)
    }
}

#[derive(Clone)]
struct LayerNorm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
    kernels: bool,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[c])?,
            b: if cfg.bias { Some(w.get(&format!("{name}.bias"), &[c])?) } else { None },
            eps: cfg.norm_eps,
            kernels: cfg.kernels,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels {
            return taper_kernels::layer_norm(x, &self.w, self.b.as_ref(), self.eps);
        }
        nn::layer_norm(x, &self.w, self.b.as_ref(), self.eps)
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
}

impl Attention {
    fn load(w: &Weights, p: &str, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            q_proj: Linear::load(w, &format!("{p}.q_proj"), c, c, cfg)?,
            k_proj: Linear::load(w, &format!("{p}.k_proj"), c, c, cfg)?,
            v_proj: Linear::load(w, &format!("{p}.v_proj"), c, c, cfg)?,
            out_proj: Linear::load(w, &format!("{p}.out_proj"), c, c, cfg)?,
        })
    }

    /// (B, L, C) -> keys and values (B, H, L, D) each.
    fn kv(&self, x: &Tensor, nh: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, l, c) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, l, nh, c / nh))?.transpose(1, 2)?.contiguous();
        Ok((split(self.k_proj.forward(x)?)?, split(self.v_proj.forward(x)?)?))
    }

    /// Queries from `x` (B, T, C) over keys/values (B, H, L, D), with an additive `mask`
    /// broadcastable to (B, H, T, L), or through the fused kernel with the same visibility as
    /// `fused` options (no attention dropout there). Returns (B, T, C).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        fused: Option<&AttnOpts>,
        p: f64,
        rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let nh = k.dim(1)?;
        let hd = c / nh;
        let q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
        let y = match fused {
            Some(opts) => taper_kernels::attention(&q, k, v, opts).map_err(candle_core::Error::wrap)?,
            None => {
                let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?; // (B, H, T, L)
                let mut att = nn::softmax(&att)?;
                if let Some(r) = rng {
                    att = nn::dropout(&att, p, r)?;
                }
                att.matmul(v)? // (B, H, T, D)
            }
        };
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.out_proj.forward(&y)
    }
}

#[derive(Clone)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

#[derive(Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

/// The decoder's state while generating: per layer, the self-attention keys/values so far and
/// the cross-attention keys/values of the source (computed once), plus the source mask.
#[derive(Clone)]
pub struct Seq2SeqCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    /// Additive source padding mask (B, 1, 1, S).
    src_mask: Tensor,
}

impl Seq2SeqCache {
    /// Target positions fed so far.
    pub fn len(&self) -> usize {
        match self.self_kv.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps rows `idx` of the batch, in that order (beam search's reordering; a row may repeat).
    pub fn select(&mut self, idx: &[u32]) -> Result<()> {
        let dev = self.src_mask.device().clone();
        let idx = Tensor::new(idx, &dev)?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        for slot in self.self_kv.iter_mut().flatten() {
            *slot = (pick(&slot.0)?, pick(&slot.1)?);
        }
        for kv in self.cross_kv.iter_mut() {
            *kv = (pick(&kv.0)?, pick(&kv.1)?);
        }
        self.src_mask = pick(&self.src_mask)?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct Seq2Seq {
    cfg: ModelConfig,
    enc_embed: Tensor,
    dec_embed: Tensor,
    /// Fixed sinusoidal tables or learned ones: (block_size, C).
    enc_pos: Option<Tensor>,
    dec_pos: Option<Tensor>,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    lm_head: Tensor,
    /// (1, V), added to the logits.
    final_logits_bias: Tensor,
    /// Which encoder and decoder layers recompute their forward in the backward (each stack
    /// counted from its first layer).
    checkpointing: ActivationCheckpointing,
    /// The trainable variables among the weights: the gradients a checkpointed layer finds.
    trained: Vec<Tensor>,
}

/// The masks every decoder layer of a teacher-forced forward uses.
#[derive(Clone)]
struct DecoderMasks {
    /// (T, T) additive.
    causal: Tensor,
    /// (B, 1, 1, S) additive.
    src_mask: Tensor,
    self_fused: Option<AttnOpts>,
    cross_fused: Option<AttnOpts>,
}

/// An additive padding mask (B, 1, 1, S) from a keep mask (B, S) of 1s (tokens) and 0s (padding).
pub fn padding_mask(keep: &Tensor) -> Result<Tensor> {
    let (b, s) = keep.dims2()?;
    let keep = keep.to_dtype(DType::F32)?;
    // f32::MIN, not -inf, as transformers does: a row of nothing but padding stays finite.
    let add = ((keep.ones_like()? - keep)? * f32::MIN as f64)?;
    Ok(add.reshape((b, 1, 1, s))?)
}

impl Seq2Seq {
    /// Builds the model over `w`; gradients flow to whichever tensors in `w` are variables.
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self> {
        check(cfg, ModelKind::EncoderDecoder)?;
        let (v, c, h) = (cfg.vocab_size, cfg.n_embd, cfg.hidden());
        let (en, dn) = embed_names(cfg);
        let enc_embed = w.get(en, &[v, c])?;
        let dec_embed = w.get(dn, &[v, c])?;
        let dev = enc_embed.device().clone();
        let (enc_pos, dec_pos) = match cfg.pos_emb {
            PosEmb::Learned => (
                Some(w.get("model.encoder.embed_positions.weight", &[cfg.block_size, c])?),
                Some(w.get("model.decoder.embed_positions.weight", &[cfg.block_size, c])?),
            ),
            PosEmb::Sinusoidal => {
                let t = sinusoidal_table(c, cfg.block_size, &dev)?;
                (Some(t.clone()), Some(t))
            }
            PosEmb::Rope | PosEmb::None => (None, None),
        };
        let encoder = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("model.encoder.layers.{i}");
                Ok(EncoderLayer {
                    self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
                    self_attn_layer_norm: LayerNorm::load(w, &format!("{p}.self_attn_layer_norm"), cfg)?,
                    fc1: Linear::load(w, &format!("{p}.fc1"), h, c, cfg)?,
                    fc2: Linear::load(w, &format!("{p}.fc2"), c, h, cfg)?,
                    final_layer_norm: LayerNorm::load(w, &format!("{p}.final_layer_norm"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..decoder_layers(cfg))
            .map(|i| {
                let p = format!("model.decoder.layers.{i}");
                Ok(DecoderLayer {
                    self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
                    self_attn_layer_norm: LayerNorm::load(w, &format!("{p}.self_attn_layer_norm"), cfg)?,
                    encoder_attn: Attention::load(w, &format!("{p}.encoder_attn"), cfg)?,
                    encoder_attn_layer_norm: LayerNorm::load(w, &format!("{p}.encoder_attn_layer_norm"), cfg)?,
                    fc1: Linear::load(w, &format!("{p}.fc1"), h, c, cfg)?,
                    fc2: Linear::load(w, &format!("{p}.fc2"), c, h, cfg)?,
                    final_layer_norm: LayerNorm::load(w, &format!("{p}.final_layer_norm"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_embeddings { dec_embed.clone() } else { w.get("lm_head.weight", &[v, c])? };
        Ok(Self {
            cfg: cfg.clone(),
            final_logits_bias: w.get("final_logits_bias", &[1, v])?,
            enc_embed,
            dec_embed,
            enc_pos,
            dec_pos,
            encoder,
            decoder,
            lm_head,
            checkpointing: ActivationCheckpointing::None,
            trained: w.trained(),
        })
    }

    /// The model with `which` layers of each stack recomputing their forward in the backward.
    pub fn with_checkpointing(mut self, which: ActivationCheckpointing) -> Self {
        self.checkpointing = which;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.enc_embed.device()
    }

    fn embed(&self, table: &Tensor, pos: Option<&Tensor>, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if offset + t > self.cfg.block_size {
            return Err(ModelError::TooLong { len: offset + t, max: self.cfg.block_size });
        }
        let mut x = table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.n_embd))?; // (B, T, C)
        if self.cfg.scale_embedding {
            x = (x * (self.cfg.n_embd as f64).sqrt())?;
        }
        if let Some(p) = pos {
            x = x.broadcast_add(&p.narrow(0, offset, t)?)?;
        }
        Ok(x)
    }

    fn dropout(&self, x: Tensor, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        match rng {
            Some(r) => nn::dropout(&x, self.cfg.dropout, r),
            None => Ok(x),
        }
    }

    fn mlp(&self, fc1: &Linear, fc2: &Linear, x: &Tensor, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let up = fc1.forward(x)?;
        let act = match self.cfg.mlp {
            Mlp::Gelu if self.cfg.kernels => taper_kernels::gelu_erf(&up)?,
            Mlp::GeluTanh if self.cfg.kernels => taper_kernels::gelu_tanh(&up)?,
            Mlp::Gelu => up.gelu_erf()?,
            Mlp::GeluTanh => up.gelu()?,
            Mlp::Relu => up.relu()?,
            Mlp::Swiglu => unreachable!("validate refuses swiglu for the encoder-decoder"),
        };
        self.dropout(fc2.forward(&act)?, rng)
    }

    /// Options for the fused attention kernel when the config asks for it and no attention
    /// dropout is active (`inference`, or dropout 0): causal, or under the padding of `keys`
    /// (B, L) keep mask (1 token, 0 padding).
    fn fused(&self, inference: bool, causal: bool, keys: Option<&Tensor>) -> Result<Option<AttnOpts>> {
        // Elsewhere than the CPU's own kernels the mask stays a tensor: nothing is read back.
        let on_cpu = taper_kernels::fused_on(self.enc_embed.device());
        if !self.cfg.kernels || !on_cpu || !(inference || self.cfg.dropout <= 0.0) {
            return Ok(None);
        }
        let mut o = AttnOpts { causal, ..AttnOpts::new(1.0 / (self.cfg.head_dim() as f64).sqrt()) };
        if let Some(keep) = keys {
            let keep = keep.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            o.key_padding = Some(keep.iter().map(|&k| k == 0.0).collect());
        }
        Ok(Some(o))
    }

    /// Encoder output (B, S, C) for source ids (B, S) with keep mask (B, S) (1 token, 0 padding).
    /// `rng` turns dropout on.
    pub fn encode(&self, src: &Tensor, src_keep: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let mask = padding_mask(src_keep)?; // (B, 1, 1, S)
        let fused = self.fused(rng.is_none(), false, Some(src_keep))?;
        let mut x = self.embed(&self.enc_embed, self.enc_pos.as_ref(), src, 0)?;
        x = self.dropout(x, rng.as_deref_mut())?;
        let shared = self.checkpointing.is_on().then(|| Arc::new((self.clone(), mask.clone(), fused.clone())));
        for (i, l) in self.encoder.iter().enumerate() {
            x = match &shared {
                Some(s) if self.checkpointing.covers(i) => {
                    let s = s.clone();
                    checkpointing::checkpoint_block(&[&x], &self.trained, rng.as_deref_mut(), move |ins, r| {
                        let (me, mask, fused) = &*s;
                        me.encoder_layer(&me.encoder[i], &ins[0], mask, fused.as_ref(), r)
                    })?
                }
                _ => self.encoder_layer(l, &x, &mask, fused.as_ref(), rng.as_deref_mut())?,
            };
        }
        Ok(x)
    }

    fn encoder_layer(
        &self,
        l: &EncoderLayer,
        x: &Tensor,
        mask: &Tensor,
        fused: Option<&AttnOpts>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (k, v) = l.self_attn.kv(x, self.cfg.n_head)?;
        let y = l.self_attn.attend(x, &k, &v, mask, fused, self.cfg.dropout, rng.as_deref_mut())?;
        let x = l.self_attn_layer_norm.forward(&(x + self.dropout(y, rng.as_deref_mut())?)?)?;
        let y = self.mlp(&l.fc1, &l.fc2, &x, rng)?;
        Ok(l.final_layer_norm.forward(&(x + y)?)?)
    }

    fn decoder_layer(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        enc: &Tensor,
        m: &DecoderMasks,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (nh, p) = (self.cfg.n_head, self.cfg.dropout);
        let (k, v) = l.self_attn.kv(x, nh)?;
        let y = l.self_attn.attend(x, &k, &v, &m.causal, m.self_fused.as_ref(), p, rng.as_deref_mut())?;
        let x = l.self_attn_layer_norm.forward(&(x + self.dropout(y, rng.as_deref_mut())?)?)?;
        let (ck, cv) = l.encoder_attn.kv(enc, nh)?;
        let y = l.encoder_attn.attend(&x, &ck, &cv, &m.src_mask, m.cross_fused.as_ref(), p, rng.as_deref_mut())?;
        let x = l.encoder_attn_layer_norm.forward(&(x + self.dropout(y, rng.as_deref_mut())?)?)?;
        let y = self.mlp(&l.fc1, &l.fc2, &x, rng)?;
        Ok(l.final_layer_norm.forward(&(x + y)?)?)
    }

    /// A fresh decoding state for `enc` (B, S, C): cross-attention keys/values computed here,
    /// once per source.
    pub fn start(&self, enc: &Tensor, src_keep: &Tensor) -> Result<Seq2SeqCache> {
        let cross_kv =
            self.decoder.iter().map(|l| l.encoder_attn.kv(enc, self.cfg.n_head)).collect::<candle_core::Result<_>>()?;
        Ok(Seq2SeqCache { self_kv: vec![None; self.decoder.len()], cross_kv, src_mask: padding_mask(src_keep)? })
    }

    /// Logits (B, T, V) for target ids (B, T) continuing `cache` (positions cache.len()..).
    pub fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> Result<Tensor> {
        let offset = cache.len();
        let (_, t) = ids.dims2()?;
        let causal = nn::causal_mask(t, offset, 0, ids.device())?; // (T, L)
        let self_fused = self.fused(true, true, None)?;
        let mut x = self.embed(&self.dec_embed, self.dec_pos.as_ref(), ids, offset)?;
        for (i, l) in self.decoder.iter().enumerate() {
            let (k, v) = l.self_attn.kv(&x, self.cfg.n_head)?;
            let (k, v) = match cache.self_kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            cache.self_kv[i] = Some((k.clone(), v.clone()));
            let y = l.self_attn.attend(&x, &k, &v, &causal, self_fused.as_ref(), 0.0, None)?;
            x = l.self_attn_layer_norm.forward(&(x + y)?)?;
            let (ck, cv) = &cache.cross_kv[i];
            let y = l.encoder_attn.attend(&x, ck, cv, &cache.src_mask, None, 0.0, None)?;
            x = l.encoder_attn_layer_norm.forward(&(x + y)?)?;
            let y = self.mlp(&l.fc1, &l.fc2, &x, None)?;
            x = l.final_layer_norm.forward(&(x + y)?)?;
        }
        self.head(&x)
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::linear(x, &self.lm_head, None)?.broadcast_add(&self.final_logits_bias)?)
        // (B, T, V)
    }

    /// Teacher-forced logits (B, T, V): source (B, S) with keep mask (B, S), decoder inputs
    /// (B, T). `rng` turns dropout on (training).
    pub fn forward(
        &self,
        src: &Tensor,
        src_keep: &Tensor,
        dec_in: &Tensor,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let enc = self.encode(src, src_keep, rng.as_deref_mut())?;
        let (_, t) = dec_in.dims2()?;
        let masks = DecoderMasks {
            causal: nn::causal_mask(t, 0, 0, dec_in.device())?,
            src_mask: padding_mask(src_keep)?,
            self_fused: self.fused(rng.is_none(), true, None)?,
            cross_fused: self.fused(rng.is_none(), false, Some(src_keep))?,
        };
        let mut x = self.embed(&self.dec_embed, self.dec_pos.as_ref(), dec_in, 0)?;
        x = self.dropout(x, rng.as_deref_mut())?;
        let shared = self.checkpointing.is_on().then(|| Arc::new((self.clone(), masks.clone())));
        for (i, l) in self.decoder.iter().enumerate() {
            x = match &shared {
                Some(s) if self.checkpointing.covers(i) => {
                    let s = s.clone();
                    checkpointing::checkpoint_block(&[&x, &enc], &self.trained, rng.as_deref_mut(), move |ins, r| {
                        let (me, masks) = &*s;
                        me.decoder_layer(&me.decoder[i], &ins[0], &ins[1], masks, r)
                    })?
                }
                _ => self.decoder_layer(l, &x, &enc, &masks, rng.as_deref_mut())?,
            };
        }
        self.head(&x)
    }
}

/// How [`Seq2Seq::generate`] decodes.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// 1 is greedy.
    pub beams: usize,
    /// HF's `length_penalty`: a finished hypothesis scores sum(log p) / len^length_penalty.
    pub length_penalty: f64,
    pub max_new_tokens: usize,
    /// The decoder's first input (Marian: the pad token).
    pub start: u32,
    pub eos: u32,
}

fn last_log_probs(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = logits.dim(1)?;
    let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?; // (B, V)
    Ok(nn::log_softmax(&last)?.to_vec2()?)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32
}

impl Seq2Seq {
    /// Greedy decoding of a batch of sources (B, S) with keep mask (B, S): each row's tokens
    /// after the start token, up to and including eos (or `max_new_tokens` of them).
    pub fn greedy(&self, src: &Tensor, src_keep: &Tensor, o: &DecodeOptions) -> Result<Vec<Vec<u32>>> {
        let b = src.dim(0)?;
        let enc = self.encode(src, src_keep, None)?;
        let mut cache = self.start(&enc, src_keep)?;
        let max_new = o.max_new_tokens.min(self.cfg.block_size);
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut next = vec![o.start; b];
        for _ in 0..max_new {
            let ids = Tensor::from_vec(next.clone(), (b, 1), self.device())?;
            let lp = last_log_probs(&self.decode(&ids, &mut cache)?)?;
            for r in 0..b {
                // A finished row keeps being fed (the batch moves together); its output is closed.
                next[r] = argmax(&lp[r]);
                if !done[r] {
                    out[r].push(next[r]);
                    done[r] = next[r] == o.eos;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }

    /// Beam search for one source (1, S), as transformers' `generate(num_beams=N,
    /// early_stopping=False)`: each step keeps the best 2N continuations of the N running
    /// beams by summed log-probability; those of the top N that end (eos, or the length limit)
    /// enter the finished list, scored sum / len^length_penalty; the N best unfinished run on.
    /// The search stops when no running beam can beat the worst of N finished ones (HF's
    /// heuristic: its score over the current length). Returns the best finished hypothesis.
    pub fn beam_search(&self, src: &Tensor, src_keep: &Tensor, o: &DecodeOptions) -> Result<Vec<u32>> {
        let n = o.beams.max(1);
        let max_new = o.max_new_tokens.min(self.cfg.block_size);
        if max_new == 0 {
            return Ok(Vec::new());
        }
        let enc = self.encode(src, src_keep, None)?;
        let mut cache = self.start(&enc, src_keep)?;
        // Running beams: (tokens, summed log-prob); the cache's rows follow them.
        let mut running: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
        let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
        for step in 1..=max_new {
            let last: Vec<u32> = running.iter().map(|(t, _)| t.last().copied().unwrap_or(o.start)).collect();
            let ids = Tensor::from_vec(last, (running.len(), 1), self.device())?;
            let lp = last_log_probs(&self.decode(&ids, &mut cache)?)?;
            // The best 2N (beam, token, score) continuations, best first; ties to the lower index.
            let mut cands: Vec<(usize, u32, f64)> = Vec::with_capacity(running.len() * lp[0].len());
            for (bi, (_, s)) in running.iter().enumerate() {
                cands.extend(lp[bi].iter().enumerate().map(|(t, &l)| (bi, t as u32, s + l as f64)));
            }
            cands.sort_by(|a, b| b.2.total_cmp(&a.2));
            cands.truncate(2 * n);
            let mut next: Vec<(Vec<u32>, f64)> = Vec::new();
            let mut rows: Vec<u32> = Vec::new();
            for (rank, &(bi, tok, score)) in cands.iter().enumerate() {
                let ends = tok == o.eos || step == max_new;
                if ends {
                    if rank < n {
                        let mut toks = running[bi].0.clone();
                        toks.push(tok);
                        finished.push((toks, score / (step as f64).powf(o.length_penalty)));
                    }
                } else if next.len() < n {
                    let mut toks = running[bi].0.clone();
                    toks.push(tok);
                    next.push((toks, score));
                    rows.push(bi as u32);
                }
            }
            finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            finished.truncate(n);
            if next.is_empty() || step == max_new {
                break;
            }
            // HF's early-stop heuristic: the best running beam's score over the current length.
            if finished.len() == n {
                let best_possible = next[0].1 / (step as f64).powf(o.length_penalty);
                if best_possible <= finished[n - 1].1 {
                    break;
                }
            }
            cache.select(&rows)?;
            running = next;
        }
        Ok(finished.into_iter().next().map(|(t, _)| t).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn tiny() -> ModelConfig {
        ModelConfig {
            kind: ModelKind::EncoderDecoder,
            vocab_size: 19,
            n_layer: 2,
            n_decoder_layer: 3,
            n_head: 4,
            n_embd: 16,
            block_size: 12,
            pos_emb: PosEmb::Sinusoidal,
            scale_embedding: true,
            init_std: 0.3,
            ..Default::default()
        }
    }

    fn batch(dev: &Device) -> (Tensor, Tensor, Tensor, Tensor) {
        let src = Tensor::new(&[[3u32, 5, 7, 9, 1], [4, 6, 1, 0, 0]], dev).unwrap();
        let keep = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dev).unwrap();
        let dec = Tensor::new(&[[0u32, 8, 2, 11], [0, 12, 13, 14]], dev).unwrap();
        let labels = Tensor::new(&[8i64, 2, 11, 1, 12, 13, 1, -100], dev).unwrap();
        (src, keep, dec, labels)
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() -> Result<()> {
        for (learned, share, tie) in [(false, true, true), (true, false, false)] {
            let mut cfg = tiny();
            cfg.dropout = 0.1;
            cfg.share_embeddings = share;
            cfg.tie_embeddings = tie;
            if learned {
                cfg.pos_emb = PosEmb::Learned;
                cfg.mlp = Mlp::Relu;
            }
            let dev = Device::Cpu;
            let vars: Vec<(String, Var)> = crate::init_weights(&cfg, 1, &dev)?
                .into_iter()
                .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
                .collect::<Result<_>>()?;
            let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
            let model = Seq2Seq::load(&w, &cfg)?;
            let (src, keep, dec, labels) = batch(&dev);
            let mut rng = Rng::new(0);
            let logits = model.forward(&src, &keep, &dec, Some(&mut rng))?;
            assert_eq!(logits.dims(), &[2, 4, 19]);
            let loss = nn::cross_entropy(&crate::flatten_logits(&logits)?, &labels, -100)?;
            let grads = loss.backward()?;
            for (name, var) in &vars {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0 && norm.is_finite(), "zero gradient for {name} (learned={learned})");
            }
        }
        Ok(())
    }

    /// Checkpointed encoder and decoder layers give the same loss and gradients, with dropout,
    /// and leave the RNG where the plain forward does. The encoder output feeds every decoder
    /// layer's cross-attention, so its gradient is summed per checkpointed layer first: the
    /// gradients of the encoder side may differ in the last bits (measured and bounded here).
    #[test]
    fn checkpointed_gradients_match() -> Result<()> {
        let mut cfg = tiny();
        cfg.dropout = 0.1;
        cfg.n_layer = 3;
        let dev = Device::Cpu;
        let init = crate::init_weights(&cfg, 1, &dev)?;
        let (src, keep, dec, labels) = batch(&dev);
        let run = |which: ActivationCheckpointing| -> Result<(Vec<Vec<f32>>, u64)> {
            let vars: Vec<Var> = init.iter().map(|(_, t)| Var::from_tensor(t)).collect::<candle_core::Result<_>>()?;
            let w = Weights::from_pairs(init.iter().zip(&vars).map(|((n, _), v)| (n.clone(), v.as_tensor().clone())));
            let model = Seq2Seq::load(&w, &cfg)?.with_checkpointing(which);
            let mut rng = Rng::new(3);
            let logits = model.forward(&src, &keep, &dec, Some(&mut rng))?;
            let loss = nn::cross_entropy(&crate::flatten_logits(&logits)?, &labels, -100)?;
            let grads = checkpointing::backward(&loss)?;
            let mut out = vec![vec![loss.to_scalar::<f32>()?]];
            for v in &vars {
                out.push(grads.get(v.as_tensor()).expect("a gradient").flatten_all()?.to_vec1()?);
            }
            Ok((out, rng.state()))
        };
        let plain = run(ActivationCheckpointing::None)?;
        for which in [ActivationCheckpointing::Every(1), ActivationCheckpointing::Every(2)] {
            let got = run(which)?;
            assert_eq!(got.1, plain.1, "{which:?}: the RNG ends elsewhere");
            assert_eq!(got.0[0][0].to_bits(), plain.0[0][0].to_bits(), "{which:?}: the loss differs");
            let mut identical = 0;
            for (i, (a, b)) in got.0.iter().zip(&plain.0).enumerate().skip(1) {
                // Key biases get a gradient of zero up to rounding (softmax ignores a shift of
                // every score): the scale has a floor.
                let scale = b.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                assert!(err <= 1e-5, "{which:?}: the gradient of {} differs by {err} relative", init[i - 1].0);
                identical += usize::from(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
            // The decoder side, where nothing is summed in another order, is bit for bit.
            let decoder_side = init.iter().filter(|(n, _)| n.contains("decoder.layers")).count();
            assert!(identical >= decoder_side, "{which:?}: only {identical} of {} gradients bit-identical", init.len());
        }
        Ok(())
    }

    /// Decoding step by step with the caches gives the teacher-forced logits.
    #[test]
    fn cached_decoding_matches_full_forward() -> Result<()> {
        let cfg = tiny();
        let dev = Device::Cpu;
        let model = Seq2Seq::load(&Weights::from_pairs(crate::init_weights(&cfg, 2, &dev)?), &cfg)?;
        let (src, keep, dec, _) = batch(&dev);
        let full = model.forward(&src, &keep, &dec, None)?;
        let enc = model.encode(&src, &keep, None)?;
        let mut cache = model.start(&enc, &keep)?;
        let a = model.decode(&dec.narrow(1, 0, 1)?, &mut cache)?;
        let b = model.decode(&dec.narrow(1, 1, 3)?, &mut cache)?;
        let diff = (full - Tensor::cat(&[&a, &b], 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn beam_of_one_is_greedy() -> Result<()> {
        for seed in 0..4 {
            let cfg = tiny();
            let dev = Device::Cpu;
            let model = Seq2Seq::load(&Weights::from_pairs(crate::init_weights(&cfg, seed, &dev)?), &cfg)?;
            let (src, keep, _, _) = batch(&dev);
            let o = DecodeOptions { beams: 1, length_penalty: 1.0, max_new_tokens: 10, start: 0, eos: 1 };
            let greedy = model.greedy(&src, &keep, &o)?;
            assert_eq!(greedy.len(), 2);
            for (r, want) in greedy.iter().enumerate() {
                let beam = model.beam_search(&src.narrow(0, r, 1)?, &keep.narrow(0, r, 1)?, &o)?;
                assert_eq!(&beam, want, "seed {seed} row {r}");
            }
        }
        Ok(())
    }

    #[test]
    fn marian_sinusoids_put_cosines_in_the_second_half() -> Result<()> {
        let t = sinusoidal_table(6, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        let a = |p: f64, i: f64| p / 10_000f64.powf(2.0 * i / 6.0);
        for (j, want) in
            [(0, a(2.0, 0.0).sin()), (2, a(2.0, 2.0).sin()), (3, a(2.0, 0.0).cos()), (5, a(2.0, 2.0).cos())]
        {
            assert!((t[2][j] as f64 - want).abs() < 1e-6, "col {j}");
        }
        Ok(())
    }
}
