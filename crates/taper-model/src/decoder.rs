//! A decoder-only transformer covering two families through [`ModelConfig`]:
//! - GPT-2 style (Radford et al. 2019; nanoGPT's `model.py`): learned positions, LayerNorm,
//!   GELU MLP, biases, tied embeddings.
//! - Llama style (Touvron et al. 2023; HF `modeling_llama.py`): RoPE, RMSNorm, SwiGLU,
//!   grouped-query attention, no biases.
//!
//! Tensor names mirror HF's Llama layout (`model.layers.{i}.self_attn.q_proj.weight`); one
//! place ([`param_specs`]) lists them all with their shapes.

use crate::checkpointing::{self, ActivationCheckpointing};
use crate::config::{Mlp, ModelConfig, ModelKind, Norm, PosEmb};
use crate::init::{check, Init};
use crate::nn;
use crate::rng::Rng;
use crate::weights::Weights;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;
use taper_kernels::AttnOpts;

/// Every parameter of a decoder: (name, shape, init), in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (v, c, h, hd) = (cfg.vocab_size, cfg.n_embd, cfg.hidden(), cfg.head_dim());
    let (q, kv) = (cfg.n_head * hd, cfg.kv_heads() * hd);
    let std = cfg.init_std;
    // GPT-2's scaled init: projections into the residual stream shrink with depth.
    let resid_std = std / (2.0 * cfg.n_layer as f64).sqrt();
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, c], Init::Normal(std))];
    if cfg.pos_emb == PosEmb::Learned {
        specs.push(("model.embed_positions.weight".into(), vec![cfg.block_size, c], Init::Normal(std)));
    }
    let norm = |specs: &mut Vec<_>, name: String| {
        specs.push((format!("{name}.weight"), vec![c], Init::Ones));
        if cfg.bias && cfg.norm == Norm::LayerNorm {
            specs.push((format!("{name}.bias"), vec![c], Init::Zeros));
        }
    };
    let linear = |specs: &mut Vec<_>, name: String, out: usize, inp: usize, s: f64, bias: bool| {
        specs.push((format!("{name}.weight"), vec![out, inp], Init::Normal(s)));
        if bias {
            specs.push((format!("{name}.bias"), vec![out], Init::Zeros));
        }
    };
    for i in 0..cfg.n_layer {
        let p = format!("model.layers.{i}");
        norm(&mut specs, format!("{p}.input_layernorm"));
        let (qkv_b, o_b, mlp_b) = (cfg.qkv_bias(), cfg.o_bias(), cfg.mlp_bias());
        linear(&mut specs, format!("{p}.self_attn.q_proj"), q, c, std, qkv_b);
        linear(&mut specs, format!("{p}.self_attn.k_proj"), kv, c, std, qkv_b);
        linear(&mut specs, format!("{p}.self_attn.v_proj"), kv, c, std, qkv_b);
        linear(&mut specs, format!("{p}.self_attn.o_proj"), c, q, resid_std, o_b);
        if cfg.qk_norm {
            specs.push((format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::Ones));
            specs.push((format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::Ones));
        }
        norm(&mut specs, format!("{p}.post_attention_layernorm"));
        if cfg.mlp == Mlp::Swiglu {
            linear(&mut specs, format!("{p}.mlp.gate_proj"), h, c, std, mlp_b);
        }
        linear(&mut specs, format!("{p}.mlp.up_proj"), h, c, std, mlp_b);
        linear(&mut specs, format!("{p}.mlp.down_proj"), c, h, resid_std, mlp_b);
    }
    norm(&mut specs, "model.norm".into());
    if !cfg.tie_embeddings {
        specs.push(("lm_head.weight".into(), vec![v, c], Init::Normal(std)));
    }
    specs
}

/// A low-rank adapter on a linear: A (r, in), B (out, r), alpha / r, dropout.
#[derive(Clone)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

#[derive(Clone)]
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    lora: Option<Adapter>,
    kernels: bool,
}

impl Linear {
    fn load(w: &Weights, name: &str, out: usize, inp: usize, bias: bool, kernels: bool) -> Result<Self> {
        let a_name = format!("{name}.lora_A.weight");
        let lora = match (w.lora(), w.contains(&a_name)) {
            (Some(l), true) => Some(Adapter {
                a: w.get(&a_name, &[l.r, inp])?,
                b: w.get(&format!("{name}.lora_B.weight"), &[out, l.r])?,
                scale: l.scale(),
                dropout: l.dropout,
            }),
            _ => None,
        };
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[out, inp])?,
            b: if bias { Some(w.get(&format!("{name}.bias"), &[out])?) } else { None },
            lora,
            kernels,
        })
    }

    /// Whether [`nn::linear_k`] would take the fused kernel for `x`: kernels on, no adapter, and
    /// W trained or no gradient taken at all.
    fn fusable(&self, x: &Tensor) -> bool {
        self.kernels && self.lora.is_none() && (self.w.track_op() || !x.track_op())
    }

    /// With an adapter, `rng` (training) turns its dropout on.
    fn forward_rng(&self, x: &Tensor, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let y = nn::linear_k(x, &self.w, self.b.as_ref(), self.kernels)?;
        match &self.lora {
            None => Ok(y),
            Some(ad) => {
                let xd = match rng {
                    Some(r) => nn::dropout(x, ad.dropout, r)?,
                    None => x.clone(),
                };
                let low = nn::linear(&nn::linear(&xd, &ad.a, None)?, &ad.b, None)?;
                y + (low * ad.scale)?
            }
        }
    }
}

#[derive(Clone)]
struct NormLayer {
    w: Tensor,
    b: Option<Tensor>,
    kind: Norm,
    eps: f64,
    kernels: bool,
}

impl NormLayer {
    fn load(w: &Weights, name: &str, cfg: &ModelConfig) -> Result<Self> {
        Self::load_width(w, name, cfg, cfg.n_embd, cfg.norm)
    }

    fn load_width(w: &Weights, name: &str, cfg: &ModelConfig, c: usize, kind: Norm) -> Result<Self> {
        let has_bias = cfg.bias && kind == Norm::LayerNorm;
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[c])?,
            b: if has_bias { Some(w.get(&format!("{name}.bias"), &[c])?) } else { None },
            kind,
            eps: cfg.norm_eps,
            kernels: cfg.kernels,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match (self.kind, self.kernels) {
            (Norm::LayerNorm, false) => nn::layer_norm(x, &self.w, self.b.as_ref(), self.eps),
            (Norm::LayerNorm, true) => taper_kernels::layer_norm(x, &self.w, self.b.as_ref(), self.eps),
            (Norm::RmsNorm, false) => nn::rms_norm(x, &self.w, self.eps),
            (Norm::RmsNorm, true) => taper_kernels::rms_norm(x, &self.w, self.eps),
        }
    }
}

impl Block {
    /// q, k and v projections without adapters and with biases on all or none: they can run
    /// as one stacked GEMM.
    fn plain_qkv(&self) -> bool {
        let (q, k, v) = (&self.q_proj, &self.k_proj, &self.v_proj);
        q.kernels
            && q.lora.is_none()
            && k.lora.is_none()
            && v.lora.is_none()
            && (q.b.is_some() == k.b.is_some() && k.b.is_some() == v.b.is_some())
    }
}

#[derive(Clone)]
struct Block {
    input_layernorm: NormLayer,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<NormLayer>,
    k_norm: Option<NormLayer>,
    post_attention_layernorm: NormLayer,
    gate_proj: Option<Linear>,
    up_proj: Linear,
    down_proj: Linear,
}

/// Keys and values of the positions seen so far, per layer: (B, KV, L, D) each.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

/// One layer's keys and values.
#[derive(Default, Clone)]
enum LayerKv {
    #[default]
    Empty,
    /// Grown by concatenation, for one sequence of unknown length.
    Grown(Tensor, Tensor),
    /// (B, KV, capacity, D) each, allocated once and written in place; the first `len`
    /// positions hold keys and values.
    Slots { k: Tensor, v: Tensor, len: usize },
}

impl LayerKv {
    /// Appends keys and values (B, KV, T, D) and returns all those cached so far, (B, KV, L, D)
    /// each: preallocated slots give views of their filled prefix, not copies.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            LayerKv::Empty => {
                *self = LayerKv::Grown(k.clone(), v.clone());
                Ok((k, v))
            }
            LayerKv::Grown(pk, pv) => {
                let (k, v) = (Tensor::cat(&[&*pk, &k], 2)?, Tensor::cat(&[&*pv, &v], 2)?);
                *self = LayerKv::Grown(k.clone(), v.clone());
                Ok((k, v))
            }
            LayerKv::Slots { k: ck, v: cv, len } => {
                let (t, cap) = (k.dim(2)?, ck.dim(2)?);
                if *len + t > cap {
                    return Err(ModelError::TooLong { len: *len + t, max: cap });
                }
                ck.slice_set(&k.contiguous()?, 2, *len)?;
                cv.slice_set(&v.contiguous()?, 2, *len)?;
                *len += t;
                Ok((ck.narrow(2, 0, *len)?, cv.narrow(2, 0, *len)?))
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            LayerKv::Empty => 0,
            LayerKv::Grown(k, _) => k.dim(2).unwrap_or(0),
            LayerKv::Slots { len, .. } => *len,
        }
    }
}

impl KvCache {
    /// An empty cache that grows with each forward.
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![LayerKv::Empty; n_layer] }
    }

    /// A cache for `capacity` positions of `b` rows, allocated here once and written in place
    /// by every forward after. Inference only: the writes are not part of any graph, and clones
    /// share the storage.
    pub fn preallocated(cfg: &ModelConfig, b: usize, capacity: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let shape = (b, cfg.kv_heads(), capacity, cfg.head_dim());
        let layers = (0..cfg.n_layer)
            .map(|_| {
                let (k, v) = (Tensor::zeros(shape, dtype, dev)?, Tensor::zeros(shape, dtype, dev)?);
                Ok(LayerKv::Slots { k, v, len: 0 })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills this empty preallocated cache from `from`, another: row r takes row `rows[r]` of
    /// `from` (rows (B,) u32), every position it holds.
    pub(crate) fn copy_rows(&mut self, from: &KvCache, rows: &Tensor) -> Result<()> {
        if !self.is_empty() || self.layers.len() != from.layers.len() {
            return Err(ModelError::Config("a KV cache takes rows into an empty cache of as many layers".into()));
        }
        for (to, from) in self.layers.iter_mut().zip(&from.layers) {
            let (LayerKv::Slots { k, v, len }, LayerKv::Slots { k: fk, v: fv, len: n }) = (to, from) else {
                return Err(ModelError::Config("only preallocated KV caches copy rows".into()));
            };
            let pick = |t: &Tensor| t.narrow(2, 0, *n)?.contiguous()?.index_select(rows, 0); // (B, KV, n, D)
            k.slice_set(&pick(fk)?, 2, 0)?;
            v.slice_set(&pick(fv)?, 2, 0)?;
            *len = *n;
        }
        Ok(())
    }

    /// Forgets the cached positions; preallocated slots keep their storage.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            match l {
                LayerKv::Slots { len, .. } => *len = 0,
                _ => *l = LayerKv::Empty,
            }
        }
    }

    /// The preallocated key and value tensors of each layer (empty for a growing cache).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> Vec<(Tensor, Tensor)> {
        let slot = |l: &LayerKv| match l {
            LayerKv::Slots { k, v, .. } => Some((k.clone(), v.clone())),
            _ => None,
        };
        self.layers.iter().filter_map(slot).collect()
    }
}

#[derive(Clone)]
pub struct Decoder {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    /// Learned (a parameter) or sinusoidal (a fixed table): (block_size, C).
    embed_positions: Option<Tensor>,
    layers: Vec<Block>,
    norm: NormLayer,
    lm_head: Tensor,
    /// RoPE cos and sin for every position, (block_size, head_dim) each, on the model's device:
    /// built once, so a forward only narrows or gathers them.
    rope: Option<(Tensor, Tensor)>,
    /// Which blocks recompute their forward in the backward.
    checkpointing: ActivationCheckpointing,
    /// The trainable variables among the weights: the gradients a checkpointed block finds.
    trained: Vec<Tensor>,
}

impl Decoder {
    /// Builds the model over `w`. Gradients flow to whichever tensors in `w` are variables;
    /// pass [`Weights::detached`] for inference without a graph.
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self> {
        check(cfg, ModelKind::Decoder)?;
        let (c, v, kv) = (cfg.n_embd, cfg.vocab_size, cfg.kv_heads() * cfg.head_dim());
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, c])?;
        let dev = embed_tokens.device().clone();
        let embed_positions = match cfg.pos_emb {
            PosEmb::Learned => Some(w.get("model.embed_positions.weight", &[cfg.block_size, c])?),
            PosEmb::Sinusoidal => Some(nn::sinusoidal_table(c, cfg.block_size, &dev)?),
            PosEmb::Rope | PosEmb::None => None,
        };
        let rope = match cfg.pos_emb {
            PosEmb::Rope => Some(nn::rope_tables(&nn::rope_inv_freq(cfg), 0, cfg.block_size, &dev)?),
            _ => None,
        };
        let h = cfg.hidden();
        let (q, hd) = (cfg.n_head * cfg.head_dim(), cfg.head_dim());
        let (qkv_b, o_b, mlp_b) = (cfg.qkv_bias(), cfg.o_bias(), cfg.mlp_bias());
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    input_layernorm: NormLayer::load(w, &format!("{p}.input_layernorm"), cfg)?,
                    q_proj: Linear::load(w, &format!("{p}.self_attn.q_proj"), q, c, qkv_b, cfg.kernels)?,
                    k_proj: Linear::load(w, &format!("{p}.self_attn.k_proj"), kv, c, qkv_b, cfg.kernels)?,
                    v_proj: Linear::load(w, &format!("{p}.self_attn.v_proj"), kv, c, qkv_b, cfg.kernels)?,
                    o_proj: Linear::load(w, &format!("{p}.self_attn.o_proj"), c, q, o_b, cfg.kernels)?,
                    q_norm: match cfg.qk_norm {
                        true => {
                            Some(NormLayer::load_width(w, &format!("{p}.self_attn.q_norm"), cfg, hd, Norm::RmsNorm)?)
                        }
                        false => None,
                    },
                    k_norm: match cfg.qk_norm {
                        true => {
                            Some(NormLayer::load_width(w, &format!("{p}.self_attn.k_norm"), cfg, hd, Norm::RmsNorm)?)
                        }
                        false => None,
                    },
                    post_attention_layernorm: NormLayer::load(w, &format!("{p}.post_attention_layernorm"), cfg)?,
                    gate_proj: if cfg.mlp == Mlp::Swiglu {
                        Some(Linear::load(w, &format!("{p}.mlp.gate_proj"), h, c, mlp_b, cfg.kernels)?)
                    } else {
                        None
                    },
                    up_proj: Linear::load(w, &format!("{p}.mlp.up_proj"), h, c, mlp_b, cfg.kernels)?,
                    down_proj: Linear::load(w, &format!("{p}.mlp.down_proj"), c, h, mlp_b, cfg.kernels)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_embeddings { embed_tokens.clone() } else { w.get("lm_head.weight", &[v, c])? };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            embed_positions,
            layers,
            norm: NormLayer::load(w, "model.norm", cfg)?,
            lm_head,
            rope,
            checkpointing: ActivationCheckpointing::None,
            trained: w.trained(),
        })
    }

    /// The model with `which` blocks recomputing their forward in the backward (training
    /// forwards without a KV cache).
    pub fn with_checkpointing(mut self, which: ActivationCheckpointing) -> Self {
        self.checkpointing = which;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The dtype of the activations (and of a KV cache).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Logits (B, T, V) for token ids (B, T) at positions offset..offset+T.
    /// `rng` enables dropout (training); `cache` extends and uses a KV cache (generation).
    pub fn forward(
        &self,
        ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(ids, offset, cache, rng)?; // (B, T, C)
        Ok(nn::linear_k(&h, &self.lm_head, None, self.cfg.kernels)?) // (B, T, V)
    }

    /// The final normalised hidden states (B, T, C): the input of the LM head, and of any other
    /// head (a reward or value head).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (_, t) = ids.dims2()?;
        if offset + t > cfg.block_size {
            return Err(ModelError::TooLong { len: offset + t, max: cfg.block_size });
        }
        let pos = match &self.embed_positions {
            Some(p) => Some(p.narrow(0, offset, t)?), // (T, C)
            None => None,
        };
        let rope = match &self.rope {
            Some((cos, sin)) => Some((cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?)), // (T, D) each
            None => None,
        };
        self.run(ids, pos, rope, Visibility::Causal { offset }, cache, rng)
    }

    /// Logits (B, T, V) for packed rows: several documents per row, each with positions
    /// restarting at 0 (`position_ids`, (B, T)) and attention kept inside its segment
    /// (`segment_ids`, (B, T): 1, 2, ... per document, 0 for padding).
    pub fn forward_packed(
        &self,
        ids: &Tensor,
        position_ids: &[u32],
        segment_ids: &[u32],
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden_packed(ids, position_ids, segment_ids, rng)?;
        Ok(nn::linear_k(&h, &self.lm_head, None, self.cfg.kernels)?)
    }

    /// Mean cross-entropy of logits (N, V) against targets (N,) i64, skipping `ignore_index`,
    /// as [`nn::cross_entropy`] computes it (in f32), through the fused kernel when the config
    /// asks for kernels and the device has them.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
        Ok(if self.cfg.kernels && taper_kernels::fused_on(logits.device()) {
            taper_kernels::cross_entropy(&logits.to_dtype(DType::F32)?, targets, ignore_index)?.0
        } else {
            nn::cross_entropy(logits, targets, ignore_index)?
        })
    }

    /// Mean next-token cross-entropy of the LM head over final hidden states (.., C) against
    /// `targets` (one per row). With the kernels on, the head and the loss run together in
    /// chunks of rows, so the (N, V) logits never exist, forward or backward: the fused kernel
    /// on the CPU, the chunked composition elsewhere. Without them, the logits, then
    /// [`Self::loss`].
    pub fn head_loss(&self, h: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
        if !self.cfg.kernels {
            return self.loss(&flatten_logits(&self.head(h)?)?, targets, ignore_index);
        }
        let c = h.dim(D::Minus1)?;
        let fused = taper_kernels::fused_on(h.device()) && matches!(h.dtype(), DType::F32 | DType::F64);
        if !fused {
            let h = h.reshape(((), c))?;
            return Ok(taper_kernels::linear_cross_entropy_chunked(&h, &self.lm_head, targets, ignore_index)?);
        }
        Ok(taper_kernels::linear_cross_entropy(&h.reshape(((), c))?, &self.lm_head, targets, ignore_index, 0)?.0)
    }

    /// The LM head over final hidden states: (B, T, C) -> (B, T, V).
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(nn::linear_k(h, &self.lm_head, None, self.cfg.kernels)?)
    }

    pub fn forward_hidden_packed(
        &self,
        ids: &Tensor,
        position_ids: &[u32],
        segment_ids: &[u32],
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.block_size {
            return Err(ModelError::TooLong { len: t, max: self.cfg.block_size });
        }
        if position_ids.len() != b * t || segment_ids.len() != b * t {
            return Err(ModelError::Config(format!("packed batch of {b}x{t} needs as many position and segment ids")));
        }
        let (pos, rope) = self.row_positions(position_ids, b, t, None)?;
        self.run(ids, pos, rope, Visibility::Segments { queries: segment_ids, keys: segment_ids }, None, rng)
    }

    /// Final hidden states (B, T, C) of `ids` (B, T) appended to `cache`, for rows that decode
    /// together with positions of their own (`position_ids`, B * T): segment ids of the new
    /// queries (B * T) and of all the keys, cached then new (B * L), 0 hiding padding. `rope`:
    /// cos and sin tables (P, D) covering every position id, made once by the caller.
    pub(crate) fn forward_hidden_rows(
        &self,
        ids: &Tensor,
        position_ids: &[u32],
        segments: (&[u32], &[u32]),
        rope: Option<&(Tensor, Tensor)>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (queries, keys) = segments;
        if position_ids.len() != b * t || queries.len() != b * t || keys.len() != b * (cache.len() + t) {
            return Err(ModelError::Config(format!(
                "{b} rows of {t} new tokens after {} cached need as many position and segment ids",
                cache.len()
            )));
        }
        let (pos, rope) = self.row_positions(position_ids, b, t, rope)?;
        self.run(ids, pos, rope, Visibility::Segments { queries, keys }, Some(cache), None)
    }

    /// RoPE cos and sin tables (P, D) for positions 0..P, None without rotary positions.
    pub(crate) fn rope_tables(&self, p: usize) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match &self.rope {
            Some((cos, sin)) => Some((cos.narrow(0, 0, p)?, sin.narrow(0, 0, p)?)),
            None => None,
        })
    }

    /// Position inputs of rows with position ids of their own (B * T): rows of the position
    /// table (B, T, C), or RoPE cos and sin (B, 1, T, D) picked from `tables` (P, D), made
    /// here when not given.
    fn row_positions(
        &self,
        position_ids: &[u32],
        b: usize,
        t: usize,
        tables: Option<&(Tensor, Tensor)>,
    ) -> Result<(Option<Tensor>, Option<RopeTables>)> {
        let cfg = &self.cfg;
        let max_pos = position_ids.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= cfg.block_size {
            return Err(ModelError::TooLong { len: max_pos + 1, max: cfg.block_size });
        }
        let pid = Tensor::new(position_ids, self.device())?;
        let pos = match &self.embed_positions {
            Some(p) => Some(p.index_select(&pid, 0)?.reshape((b, t, cfg.n_embd))?), // (B, T, C)
            None => None,
        };
        let rope = match tables.or(self.rope.as_ref()) {
            Some((cos, sin)) => {
                let d = cos.dim(1)?;
                let pick = |tab: &Tensor| tab.index_select(&pid, 0)?.reshape((b, 1, t, d));
                Some((pick(cos)?, pick(sin)?)) // (B, 1, T, D) each
            }
            None => None,
        };
        Ok((pos, rope))
    }

    /// The shared body: embeddings (+ positions), the blocks, the final norm.
    fn run(
        &self,
        ids: &Tensor,
        pos: Option<Tensor>,
        rope: Option<(Tensor, Tensor)>,
        vis: Visibility,
        mut cache: Option<&mut KvCache>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.n_embd))?;
        if let Some(p) = pos {
            x = x.broadcast_add(&p)?;
        }
        if let Some(r) = rng.as_deref_mut() {
            x = nn::dropout(&x, self.cfg.dropout, r)?;
        }
        // The fused CPU kernel has no dropout on the attention probabilities; with it active the
        // additive-mask path runs there, drawing the same random numbers it always did. Other
        // devices take the chunked composed attention, which applies the dropout itself.
        let fused = cfg.kernels && (rng.is_none() || cfg.dropout <= 0.0 || !taper_kernels::fused_on(ids.device()));
        let (window, dev) = (cfg.sliding_window, ids.device());
        let mask = match (vis, fused) {
            (Visibility::Causal { .. }, true) => Mask::Fused(AttnOpts::causal(cfg.head_dim(), window)),
            (Visibility::Segments { queries, keys }, true) => Mask::Fused(AttnOpts {
                segments: Some((queries.to_vec(), keys.to_vec())),
                ..AttnOpts::causal(cfg.head_dim(), window)
            }),
            (Visibility::Causal { offset }, false) => {
                Mask::Additive(nn::causal_mask(t, offset, window, dev)?.to_dtype(x.dtype())?)
                // (T, L)
            }
            (Visibility::Segments { queries, keys }, false) => {
                Mask::Additive(nn::cached_segment_mask(queries, keys, b, t, window, dev)?.to_dtype(x.dtype())?)
                // (B, 1, T, L)
            }
        };
        // Checkpointed blocks run again in the backward, from a copy of the model and inputs.
        let shared = match (self.checkpointing.is_on(), &cache) {
            (true, None) => Some(Arc::new((self.clone(), rope.clone(), mask.clone()))),
            _ => None,
        };
        for i in 0..self.layers.len() {
            x = match &shared {
                Some(s) if self.checkpointing.covers(i) => Self::checkpointed_block(s, i, &x, rng.as_deref_mut())?,
                Some(_) => self.block(&self.layers[i], &x, rope.as_ref(), &mask, None, rng.as_deref_mut())?,
                None => {
                    let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                    self.block(&self.layers[i], &x, rope.as_ref(), &mask, layer_cache, rng.as_deref_mut())?
                }
            };
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Block `i` keeping only its input, recomputed in the backward from the shared copy.
    fn checkpointed_block(
        shared: &Arc<(Decoder, Option<RopeTables>, Mask)>,
        i: usize,
        x: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let s = shared.clone();
        checkpointing::checkpoint_block(&[x], &shared.0.trained, rng, move |ins, r| {
            let (me, rope, mask) = &*s;
            me.block(&me.layers[i], &ins[0], rope.as_ref(), mask, None, r)
        })
    }

    fn block(
        &self,
        l: &Block,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: &Mask,
        cache: Option<&mut LayerKv>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv) = (cfg.n_head, cfg.kv_heads());

        // Attention, pre-norm.
        let hx = l.input_layernorm.forward(x)?;
        let with_dropout;
        let mask = match (mask, rng.as_deref_mut()) {
            // Each layer's attention dropout under a key of its own.
            (Mask::Fused(opts), Some(r)) if cfg.dropout > 0.0 => {
                with_dropout = Mask::Fused(AttnOpts { dropout: Some((cfg.dropout, r.next_u64())), ..opts.clone() });
                &with_dropout
            }
            _ => mask,
        };
        let y = match mask {
            // Without qk-norm or a cache, the kernel takes the projections as they come out,
            // (B, T, H*D), rotates q and k itself, and gives o_proj its input: no reshape,
            // transpose, copy or rotation nodes.
            Mask::Fused(opts) if l.q_norm.is_none() && cache.is_none() && l.plain_qkv() => {
                // One GEMM for q, k and v: the stacked weights' backward is a cheap split, and
                // hx gets one gradient instead of three to add up.
                let w = Tensor::cat(&[&l.q_proj.w, &l.k_proj.w, &l.v_proj.w], 0)?; // ((H+2KV)*D, C)
                let b = match (&l.q_proj.b, &l.k_proj.b, &l.v_proj.b) {
                    (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
                    _ => None,
                };
                let qkv = nn::linear_k(&hx, &w, b.as_ref(), true)?; // (B, T, (H+2KV)*D)
                match rope {
                    Some((cos, sin)) => taper_kernels::attention_packed_rope(&qkv, nh, nkv, cos, sin, opts)?,
                    None => taper_kernels::attention_packed(&qkv, nh, nkv, opts)?,
                } // (B, T, H*D)
            }
            Mask::Fused(opts) if rope.is_none() && l.q_norm.is_none() && cache.is_none() => {
                let q = l.q_proj.forward_rng(&hx, rng.as_deref_mut())?; // (B, T, H*D)
                let k = l.k_proj.forward_rng(&hx, rng.as_deref_mut())?; // (B, T, KV*D)
                let v = l.v_proj.forward_rng(&hx, rng.as_deref_mut())?;
                taper_kernels::attention_bthd(&q, &k, &v, nh, nkv, opts)? // (B, T, H*D)
            }
            _ => self.attend_bhtd(l, &hx, rope, mask, cache, rng.as_deref_mut())?,
        };
        let mut y = l.o_proj.forward_rng(&y, rng.as_deref_mut())?;
        if let Some(r) = rng.as_deref_mut() {
            y = nn::dropout(&y, cfg.dropout, r)?;
        }
        let x = (x + y)?;
        self.mlp_residual(l, &x, rng)
    }

    /// Attention on (B, H, T, D) heads: RoPE, qk-norm, the KV cache, an additive mask.
    fn attend_bhtd(
        &self,
        l: &Block,
        hx: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: &Mask,
        cache: Option<&mut LayerKv>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = hx.dims3()?;
        let (nh, nkv, hd) = (cfg.n_head, cfg.kv_heads(), cfg.head_dim());
        let q = l.q_proj.forward_rng(hx, rng.as_deref_mut())?.reshape((b, t, nh, hd))?.transpose(1, 2)?; // (B, H, T, D)
        let k = l.k_proj.forward_rng(hx, rng.as_deref_mut())?.reshape((b, t, nkv, hd))?.transpose(1, 2)?; // (B, KV, T, D)
        let v =
            l.v_proj.forward_rng(hx, rng.as_deref_mut())?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = match (&l.q_norm, &l.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let (q, k) = match rope {
            Some((cos, sin)) if cfg.kernels => (taper_kernels::rope(&q, cos, sin)?, taper_kernels::rope(&k, cos, sin)?),
            Some((cos, sin)) => (nn::rope(&q, cos, sin)?, nn::rope(&k, cos, sin)?),
            None => (q.contiguous()?, k.contiguous()?),
        };
        let (k, v) = match cache {
            Some(slot) => slot.append(k, v)?,
            None => (k, v),
        };
        let y = match mask {
            // The kernel reads each kv head in place for its group of query heads.
            Mask::Fused(opts) => taper_kernels::attention(&q, &k, &v, opts)?, // (B, H, T, D)
            Mask::Additive(mask) => {
                let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?); // (B, H, L, D)
                let scale = 1.0 / (hd as f64).sqrt();
                let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // (B, H, T, L)
                let mut att = nn::softmax(&att)?;
                if let Some(r) = rng {
                    att = nn::dropout(&att, cfg.dropout, r)?;
                }
                att.matmul(&v)? // (B, H, T, D)
            }
        };
        Ok(y.transpose(1, 2)?.reshape((b, t, nh * hd))?) // (B, T, H*D)
    }

    /// The MLP sublayer and its residual.
    fn mlp_residual(&self, l: &Block, x: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let x = x.clone();

        // MLP, pre-norm.
        let hx = l.post_attention_layernorm.forward(&x)?;
        let up_proj = &l.up_proj;
        if matches!(cfg.mlp, Mlp::Gelu | Mlp::GeluTanh) && up_proj.fusable(&hx) {
            // The up-projection and its GELU as one node.
            let act = taper_kernels::linear_gelu(&hx, &up_proj.w, up_proj.b.as_ref(), cfg.mlp == Mlp::GeluTanh)?;
            let mut y = l.down_proj.forward_rng(&act, rng.as_deref_mut())?;
            if let Some(r) = rng {
                y = nn::dropout(&y, cfg.dropout, r)?;
            }
            return Ok((x + y)?);
        }
        let up = up_proj.forward_rng(&hx, rng.as_deref_mut())?;
        let act = match (cfg.mlp, &l.gate_proj) {
            (Mlp::Swiglu, Some(g)) if cfg.kernels => {
                taper_kernels::swiglu(&g.forward_rng(&hx, rng.as_deref_mut())?, &up)?
            }
            (Mlp::Swiglu, Some(g)) => (g.forward_rng(&hx, rng.as_deref_mut())?.silu()? * up)?,
            (Mlp::Gelu, _) if cfg.kernels => taper_kernels::gelu_erf(&up)?,
            (Mlp::Gelu, _) => up.gelu_erf()?,
            (Mlp::GeluTanh, _) if cfg.kernels => taper_kernels::gelu_tanh(&up)?,
            (Mlp::GeluTanh, _) => up.gelu()?,
            (Mlp::Relu, _) => up.relu()?,
            (Mlp::Swiglu, None) => unreachable!("gate_proj is loaded for swiglu"),
        };
        let mut y = l.down_proj.forward_rng(&act, rng.as_deref_mut())?;
        if let Some(r) = rng {
            y = nn::dropout(&y, cfg.dropout, r)?;
        }
        Ok((x + y)?)
    }
}

/// Which keys each query sees, kept as structure until [`Decoder::run`] knows whether the fused
/// kernel (which takes it as options and skips masked tiles) or the composed path (an additive
/// mask tensor) will run.
enum Visibility<'a> {
    /// Causal over `offset` earlier (cached) positions, within the config's sliding window.
    Causal { offset: usize },
    /// Causal within each segment, as [`nn::cached_segment_mask`] defines it: ids of the
    /// queries (B * T) and of the keys (B * L), the cached ones first; 0 is padding. Packed rows
    /// give both the same ids; left-padded generation marks its padding keys.
    Segments { queries: &'a [u32], keys: &'a [u32] },
}

/// RoPE cos and sin, (T, D) or (B, 1, T, D) each.
type RopeTables = (Tensor, Tensor);

/// The attention mask every block of one forward uses.
#[derive(Clone)]
enum Mask {
    Fused(AttnOpts),
    /// (T, L) or (B, 1, T, L), 0 or -inf.
    Additive(Tensor),
}

/// (B, KV, L, D) -> (B, KV * n_rep, L, D), each key/value head serving n_rep query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, l, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, l, d))?.contiguous()?.reshape((b, kv * n_rep, l, d))
}

/// (B, T, V) -> (B * T, V), the shape [`nn::cross_entropy`] takes.
pub fn flatten_logits(logits: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    logits.reshape(((), v))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::init_weights;
    use candle_core::Var;

    pub(crate) fn tiny(style: &str) -> ModelConfig {
        let mut cfg =
            ModelConfig { vocab_size: 17, n_layer: 2, n_head: 4, n_embd: 16, block_size: 12, ..Default::default() };
        if style == "llama" {
            cfg.pos_emb = PosEmb::Rope;
            cfg.norm = Norm::RmsNorm;
            cfg.mlp = Mlp::Swiglu;
            cfg.bias = false;
            cfg.tie_embeddings = false;
            cfg.n_kv_head = 2;
        }
        cfg
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() -> Result<()> {
        for (style, kernels) in
            [("gpt2", true), ("llama", true), ("sinusoidal", true), ("gpt2", false), ("llama", false)]
        {
            let mut cfg = tiny(style);
            cfg.kernels = kernels;
            if style == "sinusoidal" {
                cfg.pos_emb = PosEmb::Sinusoidal;
                cfg.mlp = Mlp::Relu;
                cfg.dropout = 0.1;
            }
            let dev = Device::Cpu;
            let vars: Vec<(String, Var)> = init_weights(&cfg, 1, &dev)?
                .into_iter()
                .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
                .collect::<Result<_>>()?;
            let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
            let model = Decoder::load(&w, &cfg)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4], [3, 3, 2, 1, 0, 7, 8, 9]], &dev)?;
            let targets = Tensor::new(&[[5i64, 3, 9, 2, 0, 16, 4, 1], [3, 2, 1, 0, 7, 8, 9, 10]], &dev)?;
            let mut rng = Rng::new(0);
            let logits = model.forward(&ids, 0, None, Some(&mut rng))?;
            let loss = model.loss(&flatten_logits(&logits)?, &targets.flatten_all()?, -100)?;
            let grads = loss.backward()?;
            for (name, var) in &vars {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{style}: no gradient for {name}"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0 && norm.is_finite(), "{style}: zero gradient for {name}");
            }
        }
        Ok(())
    }

    /// Checkpointed blocks give the same loss and every gradient bit for bit, and leave the RNG
    /// where the plain forward does: with dropout (fused and composed), packed rows, grouped
    /// heads, LoRA adapters over a frozen base, and every other block checkpointed.
    #[test]
    fn checkpointed_gradients_are_bit_identical() -> Result<()> {
        use crate::lora::{init_lora, LoraConfig};
        for case in ["gpt2-dropout", "gpt2-composed-dropout", "llama", "llama-packed", "llama-lora"] {
            let mut cfg = tiny(case.split('-').next().unwrap());
            cfg.n_layer = 3;
            cfg.kernels = !case.contains("composed");
            if case.contains("dropout") {
                cfg.dropout = 0.1;
            }
            let dev = Device::Cpu;
            let base = init_weights(&cfg, 3, &dev)?;
            let lora = LoraConfig { r: 2, dropout: 0.1, ..Default::default() };
            let adapters = match case.ends_with("lora") {
                true => init_lora(&cfg, &lora, 4, &dev)?
                    .into_iter()
                    .map(|(n, t)| Ok((n.clone(), if n.contains("lora_B") { (t.ones_like()? * 0.05)? } else { t })))
                    .collect::<Result<Vec<_>>>()?,
                false => Vec::new(),
            };
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4], [3, 3, 2, 1, 0, 7, 8, 9]], &dev)?;
            let targets = Tensor::new(&[5i64, 3, 9, -100, 0, 16, 4, 1, 3, 2, 1, 0, 7, 8, -100, 10], &dev)?;
            let pos = [0u32, 1, 2, 0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 0, 1, 2];
            let seg = [1u32, 1, 1, 2, 2, 2, 2, 0, 1, 1, 1, 1, 1, 2, 2, 2];
            // (loss and every gradient as bits, the RNG's state after the forward)
            let run = |which: ActivationCheckpointing| -> Result<(Vec<Vec<u32>>, u64)> {
                let trained: Vec<(String, Var)> = match adapters.is_empty() {
                    true => base.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?,
                    false => {
                        adapters.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?
                    }
                };
                let tensors = trained.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone()));
                let w = match adapters.is_empty() {
                    true => Weights::from_pairs(tensors),
                    false => Weights::from_pairs(base.iter().map(|(n, t)| (n.clone(), t.detach())))
                        .with_lora(tensors, lora.clone()),
                };
                let model = Decoder::load(&w, &cfg)?.with_checkpointing(which);
                let mut rng = Rng::new(7);
                let logits = match case.ends_with("packed") {
                    true => model.forward_packed(&ids, &pos, &seg, Some(&mut rng))?,
                    false => model.forward(&ids, 0, None, Some(&mut rng))?,
                };
                let loss = model.loss(&flatten_logits(&logits)?, &targets, -100)?;
                let grads = checkpointing::backward(&loss)?;
                let bits = |t: &Tensor| -> Result<Vec<u32>> {
                    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
                };
                let mut out = vec![bits(&loss)?];
                for (name, v) in &trained {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
                    out.push(bits(g)?);
                }
                Ok((out, rng.state()))
            };
            let plain = run(ActivationCheckpointing::None)?;
            for which in [ActivationCheckpointing::Every(1), ActivationCheckpointing::Every(2)] {
                let got = run(which)?;
                assert_eq!(got.1, plain.1, "{case} {which:?}: the RNG ends elsewhere");
                assert!(got.0[0] == plain.0[0], "{case} {which:?}: the loss differs");
                for (i, (a, b)) in got.0.iter().zip(&plain.0).enumerate().skip(1) {
                    assert!(a == b, "{case} {which:?}: gradient {i} differs");
                }
            }
        }
        Ok(())
    }

    /// The fused attention kernel (`kernels`) and the composed ops agree on logits and on every
    /// parameter's gradient, plain, packed, windowed and with grouped-query heads.
    #[test]
    fn fused_attention_matches_composed() -> Result<()> {
        for style in ["gpt2", "llama", "llama-window"] {
            let mut cfg = tiny(style.trim_end_matches("-window"));
            if style == "llama-window" {
                cfg.sliding_window = 3;
            }
            let dev = Device::Cpu;
            let init = init_weights(&cfg, 5, &dev)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4, 7], [3, 3, 2, 1, 0, 7, 8, 9, 11]], &dev)?;
            let pos: Vec<u32> = [0, 1, 2, 3, 0, 1, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0].into();
            let seg: Vec<u32> = [1, 1, 1, 1, 2, 2, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0].into();
            let mut runs = Vec::new();
            for kernels in [true, false] {
                let cfg = ModelConfig { kernels, ..cfg.clone() };
                let vars: Vec<Var> =
                    init.iter().map(|(_, t)| Var::from_tensor(t)).collect::<candle_core::Result<_>>()?;
                let w =
                    Weights::from_pairs(init.iter().zip(&vars).map(|((n, _), v)| (n.clone(), v.as_tensor().clone())));
                let model = Decoder::load(&w, &cfg)?;
                let plain = model.forward(&ids, 0, None, None)?;
                let packed = model.forward_packed(&ids, &pos, &seg, None)?;
                let loss = (plain.sqr()?.mean_all()? + packed.sin()?.mean_all()?)?;
                let grads = loss.backward()?;
                let mut out = vec![plain.flatten_all()?, packed.flatten_all()?];
                out.extend(vars.iter().map(|v| grads.get(v.as_tensor()).expect("gradient").flatten_all().unwrap()));
                runs.push(out);
            }
            for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
                let scale = 1.0 + b.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(diff < 1e-5, "{style}: output {i} differs by {diff}");
            }
        }
        Ok(())
    }

    /// The fused kernels and the composed ops give the same logits, loss and gradients, plain
    /// and packed, for every norm, MLP and position scheme they replace.
    #[test]
    fn kernels_match_composed_ops() -> Result<()> {
        for style in ["gpt2", "llama", "gelu_tanh", "qwen3"] {
            let mut cfg = tiny(style);
            match style {
                "gelu_tanh" => cfg.mlp = Mlp::GeluTanh,
                "qwen3" => {
                    cfg = tiny("llama");
                    cfg.qk_norm = true;
                }
                _ => {}
            }
            let dev = Device::Cpu;
            let init = init_weights(&cfg, 5, &dev)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4], [3, 3, 2, 1, 0, 7, 8, 9]], &dev)?;
            let targets = Tensor::new(&[5i64, 3, 9, -100, 0, 16, 4, 1, 3, 2, 1, 0, 7, 8, -100, 10], &dev)?;
            let (pos, seg) = ([0u32, 1, 2, 0, 1, 2, 3, 0], [1u32, 1, 1, 2, 2, 2, 2, 0]);
            // (logits then packed logits, [loss], each parameter's gradient)
            type Run = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>);
            let run = |kernels: bool| -> Result<Run> {
                let cfg = ModelConfig { kernels, ..cfg.clone() };
                let vars: Vec<(String, Var)> =
                    init.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
                let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
                let model = Decoder::load(&w, &cfg)?;
                let logits = model.forward(&ids, 0, None, None)?;
                let packed = model.forward_packed(&ids.narrow(0, 0, 1)?, &pos, &seg, None)?;
                let loss = model.loss(&flatten_logits(&logits)?, &targets, -100)?;
                let grads = loss.backward()?;
                let gs = vars
                    .iter()
                    .map(|(_, v)| Ok(grads.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?))
                    .collect::<Result<_>>()?;
                let mut out: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                out.extend(packed.flatten_all()?.to_vec1::<f32>()?);
                Ok((out, vec![loss.to_scalar::<f32>()?], gs))
            };
            let (fused, composed) = (run(true)?, run(false)?);
            let close = |a: &[f32], b: &[f32], what: &str| {
                let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(err <= 1e-5 * scale.max(1.0), "{style}: {what} differ by {err} (scale {scale})");
            };
            close(&fused.0, &composed.0, "logits");
            close(&fused.1, &composed.1, "losses");
            for (i, (a, b)) in fused.2.iter().zip(&composed.2).enumerate() {
                close(a, b, &format!("gradients of {}", init[i].0));
            }
        }
        Ok(())
    }

    #[test]
    fn kv_cache_matches_full_forward() -> Result<()> {
        for style in ["gpt2", "llama"] {
            let cfg = tiny(style);
            let dev = Device::Cpu;
            let model = Decoder::load(&Weights::from_pairs(init_weights(&cfg, 2, &dev)?), &cfg)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16]], &dev)?;
            let full = model.forward(&ids, 0, None, None)?;
            let mut cache = KvCache::new(cfg.n_layer);
            let a = model.forward(&ids.narrow(1, 0, 4)?, 0, Some(&mut cache), None)?;
            let b = model.forward(&ids.narrow(1, 4, 3)?, 4, Some(&mut cache), None)?;
            let inc = Tensor::cat(&[&a, &b], 1)?;
            let diff = (full - inc)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{style}: {diff}");
        }
        Ok(())
    }

    /// Two documents packed in one row (plus padding) give each document's own logits.
    #[test]
    fn packed_equals_unpacked() -> Result<()> {
        for style in ["gpt2", "llama"] {
            let cfg = tiny(style);
            let dev = Device::Cpu;
            let model = Decoder::load(&Weights::from_pairs(init_weights(&cfg, 4, &dev)?), &cfg)?;
            let (a, b) = ([3u32, 7, 1, 9, 4], [2u32, 8, 8, 5]);
            let row: Vec<u32> = a.iter().chain(&b).copied().chain([0, 0, 0]).collect();
            let pos: Vec<u32> = (0..5).chain(0..4).chain([0, 0, 0]).collect();
            let seg: Vec<u32> = [1; 5].into_iter().chain([2; 4]).chain([0; 3]).collect();
            let packed = model.forward_packed(&Tensor::new(row.as_slice(), &dev)?.unsqueeze(0)?, &pos, &seg, None)?;
            let alone = |x: &[u32]| model.forward(&Tensor::new(x, &dev).unwrap().unsqueeze(0).unwrap(), 0, None, None);
            let diff_a = (packed.narrow(1, 0, 5)? - alone(&a)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff_b = (packed.narrow(1, 5, 4)? - alone(&b)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff_a < 1e-5 && diff_b < 1e-5, "{style}: {diff_a} {diff_b}");
        }
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let cfg = tiny("gpt2");
        let mut pairs = init_weights(&cfg, 0, &Device::Cpu).unwrap();
        pairs[3].1 = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
        let name = pairs[3].0.clone();
        let err = Decoder::load(&Weights::from_pairs(pairs), &cfg).err().unwrap().to_string();
        assert!(err.contains(&name) && err.contains("[3, 3]"), "{err}");
    }
}
