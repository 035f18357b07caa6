//! A BERT-style bidirectional encoder with a masked-LM head (Devlin et al. 2019; HF
//! `modeling_bert.py`, `BertForMaskedLM`), built so that it trains: every op has a backward.
//!
//! Embeddings: token + position (learned, or the fixed sinusoids of "Attention Is All You
//! Need") + token type, then LayerNorm. Layers: self-attention over all positions (padding
//! keys masked out) and a GELU / ReLU feed-forward, each followed by residual add and LayerNorm
//! (post-LN, BERT) or preceded by LayerNorm (pre-LN, with a final LayerNorm). The MLM head is
//! dense + activation + LayerNorm, then the word embeddings (tied) plus a bias.
//!
//! Tensor names are `BertForMaskedLM`'s, so HF checkpoints load and export as they are; one
//! place ([`param_specs`]) lists them with their shapes.

use crate::checkpointing::{self, ActivationCheckpointing};
use crate::config::{Mlp, ModelConfig, ModelKind, PosEmb};
use crate::init::{check, Init};
use crate::nn;
use crate::rng::Rng;
use crate::weights::Weights;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The final LayerNorm of a pre-LN encoder (post-LN BERT has none).
pub const FINAL_NORM: &str = "bert.encoder.LayerNorm";

/// Every parameter: (name, shape, init), in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (v, c, h, std) = (cfg.vocab_size, cfg.n_embd, cfg.hidden(), cfg.init_std);
    let mut s: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let linear = |s: &mut Vec<_>, name: &str, out: usize, inp: usize| {
        s.push((format!("{name}.weight"), vec![out, inp], Init::Normal(std)));
        s.push((format!("{name}.bias"), vec![out], Init::Zeros));
    };
    let norm = |s: &mut Vec<(String, Vec<usize>, Init)>, name: &str| {
        s.push((format!("{name}.weight"), vec![c], Init::Ones));
        s.push((format!("{name}.bias"), vec![c], Init::Zeros));
    };
    s.push(("bert.embeddings.word_embeddings.weight".into(), vec![v, c], Init::Normal(std)));
    if cfg.pos_emb == PosEmb::Learned {
        s.push(("bert.embeddings.position_embeddings.weight".into(), vec![cfg.block_size, c], Init::Normal(std)));
    }
    if cfg.type_vocab_size > 0 {
        s.push((
            "bert.embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, c],
            Init::Normal(std),
        ));
    }
    norm(&mut s, "bert.embeddings.LayerNorm");
    for i in 0..cfg.n_layer {
        let p = format!("bert.encoder.layer.{i}");
        for qkv in ["query", "key", "value"] {
            linear(&mut s, &format!("{p}.attention.self.{qkv}"), c, c);
        }
        linear(&mut s, &format!("{p}.attention.output.dense"), c, c);
        norm(&mut s, &format!("{p}.attention.output.LayerNorm"));
        linear(&mut s, &format!("{p}.intermediate.dense"), h, c);
        linear(&mut s, &format!("{p}.output.dense"), c, h);
        norm(&mut s, &format!("{p}.output.LayerNorm"));
    }
    if !cfg.post_norm {
        norm(&mut s, FINAL_NORM);
    }
    linear(&mut s, "cls.predictions.transform.dense", c, c);
    norm(&mut s, "cls.predictions.transform.LayerNorm");
    if !cfg.tie_embeddings {
        s.push(("cls.predictions.decoder.weight".into(), vec![v, c], Init::Normal(std)));
    }
    s.push(("cls.predictions.bias".into(), vec![v], Init::Zeros));
    s
}

#[derive(Clone)]
struct Linear {
    w: Tensor,
    b: Tensor,
    /// `model.kernels`: the fused linear.
    kernels: bool,
}

impl Linear {
    fn load(w: &Weights, name: &str, out: usize, inp: usize, kernels: bool) -> Result<Self> {
        let (wt, b) = (w.get(&format!("{name}.weight"), &[out, inp])?, w.get(&format!("{name}.bias"), &[out])?);
        Ok(Self { w: wt, b, kernels })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        nn::linear_k(x, &self.w, Some(&self.b), self.kernels)
    }
}

#[derive(Clone)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
    kernels: bool,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[c])?,
            b: w.get(&format!("{name}.bias"), &[c])?,
            eps: cfg.norm_eps,
            kernels: cfg.kernels,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels {
            return taper_kernels::layer_norm(x, &self.w, Some(&self.b), self.eps);
        }
        nn::layer_norm(x, &self.w, Some(&self.b), self.eps)
    }
}

#[derive(Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

#[derive(Clone)]
pub struct Bert {
    cfg: ModelConfig,
    word_embeddings: Tensor,
    /// Learned (a parameter) or sinusoidal (a fixed table): (block_size, C).
    position_embeddings: Tensor,
    token_type_embeddings: Option<Tensor>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: Option<LayerNorm>,
    transform: Linear,
    transform_norm: LayerNorm,
    decoder: Tensor,
    decoder_bias: Tensor,
    /// Which layers recompute their forward in the backward.
    checkpointing: ActivationCheckpointing,
    /// The trainable variables among the weights: the gradients a checkpointed layer finds.
    trained: Vec<Tensor>,
}

fn act(cfg: &ModelConfig, x: &Tensor) -> candle_core::Result<Tensor> {
    match cfg.mlp {
        Mlp::Gelu if cfg.kernels => taper_kernels::gelu_erf(x),
        Mlp::GeluTanh if cfg.kernels => taper_kernels::gelu_tanh(x),
        Mlp::Gelu => x.gelu_erf(),
        Mlp::GeluTanh => x.gelu(),
        Mlp::Relu => x.relu(),
        Mlp::Swiglu => Err(candle_core::Error::Msg("an encoder has no swiglu".into())),
    }
}

impl Bert {
    /// Builds the model over `w`. Gradients flow to whichever tensors in `w` are variables;
    /// pass [`Weights::detached`] for inference without a graph.
    pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self> {
        check(cfg, ModelKind::Encoder)?;
        let (c, v, h) = (cfg.n_embd, cfg.vocab_size, cfg.hidden());
        let word_embeddings = w.get("bert.embeddings.word_embeddings.weight", &[v, c])?;
        let position_embeddings = match cfg.pos_emb {
            PosEmb::Learned => w.get("bert.embeddings.position_embeddings.weight", &[cfg.block_size, c])?,
            _ => nn::sinusoidal_table(c, cfg.block_size, word_embeddings.device())?,
        };
        let token_type_embeddings = match cfg.type_vocab_size {
            0 => None,
            n => Some(w.get("bert.embeddings.token_type_embeddings.weight", &[n, c])?),
        };
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("bert.encoder.layer.{i}");
                Ok(Layer {
                    query: Linear::load(w, &format!("{p}.attention.self.query"), c, c, cfg.kernels)?,
                    key: Linear::load(w, &format!("{p}.attention.self.key"), c, c, cfg.kernels)?,
                    value: Linear::load(w, &format!("{p}.attention.self.value"), c, c, cfg.kernels)?,
                    attention_output: Linear::load(w, &format!("{p}.attention.output.dense"), c, c, cfg.kernels)?,
                    attention_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), cfg)?,
                    intermediate: Linear::load(w, &format!("{p}.intermediate.dense"), h, c, cfg.kernels)?,
                    output: Linear::load(w, &format!("{p}.output.dense"), c, h, cfg.kernels)?,
                    output_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = match cfg.tie_embeddings {
            true => word_embeddings.clone(),
            false => w.get("cls.predictions.decoder.weight", &[v, c])?,
        };
        Ok(Self {
            cfg: cfg.clone(),
            position_embeddings,
            token_type_embeddings,
            embeddings_norm: LayerNorm::load(w, "bert.embeddings.LayerNorm", cfg)?,
            layers,
            final_norm: if cfg.post_norm { None } else { Some(LayerNorm::load(w, FINAL_NORM, cfg)?) },
            transform: Linear::load(w, "cls.predictions.transform.dense", c, c, cfg.kernels)?,
            transform_norm: LayerNorm::load(w, "cls.predictions.transform.LayerNorm", cfg)?,
            decoder,
            decoder_bias: w.get("cls.predictions.bias", &[v])?,
            word_embeddings,
            checkpointing: ActivationCheckpointing::None,
            trained: w.trained(),
        })
    }

    /// The model with `which` layers recomputing their forward in the backward.
    pub fn with_checkpointing(mut self, which: ActivationCheckpointing) -> Self {
        self.checkpointing = which;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    /// MLM logits (B, T, V) for token ids (B, T). `token_type_ids` (B, T) default to 0;
    /// `attention_mask` (B, T) holds 1 for real tokens and 0 for padding, which no position
    /// attends to. `rng` enables dropout (training).
    pub fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(ids, token_type_ids, attention_mask, rng)?; // (B, T, C)
        self.head(&h)
    }

    /// The MLM head over the encoder's output: (B, T, C) -> (B, T, V).
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = act(&self.cfg, &self.transform.forward(h)?)?;
        let x = self.transform_norm.forward(&x)?;
        Ok(nn::linear(&x, &self.decoder, Some(&self.decoder_bias))?)
    }

    /// The encoder's output (B, T, C): BERT's `last_hidden_state`.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        if t > cfg.block_size {
            return Err(ModelError::TooLong { len: t, max: cfg.block_size });
        }
        let c = cfg.n_embd;
        let mut x = self.word_embeddings.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?; // (B, T, C)
        x = x.broadcast_add(&self.position_embeddings.narrow(0, 0, t)?)?;
        if let Some(tt) = &self.token_type_embeddings {
            x = match token_type_ids {
                Some(types) => {
                    let types = types.flatten_all()?.to_dtype(DType::U32)?;
                    // Checked where reading costs nothing (host memory); a device reads no ids back.
                    if ids.device().is_cpu() {
                        let n = tt.dim(0)? as u32;
                        if let Some(bad) = types.to_vec1::<u32>()?.iter().find(|&&ty| ty >= n) {
                            return Err(ModelError::Config(format!("token type {bad} is outside type_vocab_size {n}")));
                        }
                    }
                    (x + tt.index_select(&types, 0)?.reshape((b, t, c))?)?
                }
                None => x.broadcast_add(&tt.get(0)?)?,
            };
        }
        x = self.embeddings_norm.forward(&x)?;
        if let Some(r) = rng.as_deref_mut() {
            x = nn::dropout(&x, cfg.dropout, r)?;
        }
        // Additive key mask (B, 1, 1, T): the dtype's lowest value, as HF, so a row of padding
        // alone still has a finite softmax.
        let mask = match attention_mask {
            Some(m) => {
                let keep = m.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
                let low = f32::MIN as f64;
                Some(keep.affine(-low, low)?.to_dtype(x.dtype())?) // 0 where kept, `low` at padding
            }
            None => None,
        };
        // The fused CPU kernel takes the padding as structure and skips masked keys; it has no
        // dropout on the attention probabilities, so with that active the additive-mask path
        // runs there. Elsewhere the chunked attention takes the options (dropout included)
        // unless a padding mask would have to be read back to become options.
        let on_cpu = taper_kernels::fused_on(x.device());
        let fused = cfg.kernels
            && match on_cpu {
                true => rng.is_none() || cfg.dropout <= 0.0,
                false => attention_mask.is_none(),
            };
        let opts = match (fused, attention_mask) {
            (false, _) => None,
            (true, m) => {
                let mut o = taper_kernels::AttnOpts::new(1.0 / (cfg.head_dim() as f64).sqrt());
                if let Some(m) = m {
                    let keep = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    o.key_padding = Some(keep.iter().map(|&k| k == 0.0).collect());
                    // (B, T)
                }
                Some(o)
            }
        };
        // Checkpointed layers run again in the backward, from a copy of the model and masks.
        let shared = self.checkpointing.is_on().then(|| Arc::new((self.clone(), mask.clone(), opts.clone())));
        for (i, layer) in self.layers.iter().enumerate() {
            x = match &shared {
                Some(s) if self.checkpointing.covers(i) => {
                    let s = s.clone();
                    checkpointing::checkpoint_block(&[&x], &self.trained, rng.as_deref_mut(), move |ins, r| {
                        let (me, mask, opts) = &*s;
                        me.layer(&me.layers[i], &ins[0], mask.as_ref(), opts.as_ref(), r)
                    })?
                }
                _ => self.layer(layer, &x, mask.as_ref(), opts.as_ref(), rng.as_deref_mut())?,
            };
        }
        Ok(match &self.final_norm {
            Some(n) => n.forward(&x)?,
            None => x,
        })
    }

    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
        fused: Option<&taper_kernels::AttnOpts>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, c) = x.dims3()?;
        let (nh, hd) = (cfg.n_head, cfg.head_dim());
        let dropout = |y: Tensor, rng: Option<&mut Rng>| -> candle_core::Result<Tensor> {
            match rng {
                Some(r) => nn::dropout(&y, cfg.dropout, r),
                None => Ok(y),
            }
        };

        // Self-attention over every position.
        let hx = if cfg.post_norm { x.clone() } else { l.attention_norm.forward(x)? };
        let heads = |lin: &Linear| -> candle_core::Result<Tensor> {
            lin.forward(&hx)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()
            // (B, H, T, D)
        };
        let (q, k, v) = (heads(&l.query)?, heads(&l.key)?, heads(&l.value)?);
        let y = match fused {
            // Each layer's attention dropout under a key of its own (never on the fused CPU path).
            Some(opts) if rng.is_some() && cfg.dropout > 0.0 => {
                let key = rng.as_deref_mut().map(|r| r.next_u64());
                let opts = taper_kernels::AttnOpts { dropout: key.map(|k| (cfg.dropout, k)), ..opts.clone() };
                taper_kernels::attention(&q, &k, &v, &opts)?
            }
            Some(opts) => taper_kernels::attention(&q, &k, &v, opts)?, // (B, H, T, D)
            None => {
                let mut att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (B, H, T, T)
                if let Some(m) = mask {
                    att = att.broadcast_add(m)?;
                }
                let att = dropout(nn::softmax(&att)?, rng.as_deref_mut())?;
                att.matmul(&v)? // (B, H, T, D)
            }
        };
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        let y = dropout(l.attention_output.forward(&y)?, rng.as_deref_mut())?;
        let x = match cfg.post_norm {
            true => l.attention_norm.forward(&(x + y)?)?,
            false => (x + y)?,
        };

        // Feed-forward.
        let hx = if cfg.post_norm { x.clone() } else { l.output_norm.forward(&x)? };
        let y = l.output.forward(&act(cfg, &l.intermediate.forward(&hx)?)?)?;
        let y = dropout(y, rng)?;
        Ok(match cfg.post_norm {
            true => l.output_norm.forward(&(x + y)?)?,
            false => (x + y)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn tiny() -> ModelConfig {
        ModelConfig {
            kind: ModelKind::Encoder,
            vocab_size: 19,
            n_layer: 2,
            n_head: 4,
            n_embd: 16,
            block_size: 12,
            ..Default::default()
        }
    }

    /// Every trainable tensor gets a finite, non-zero gradient, in each variant: post-LN and
    /// pre-LN, learned and sinusoidal positions, GELU and ReLU, tied and untied, with dropout.
    #[test]
    fn every_parameter_gets_a_nonzero_gradient() -> Result<()> {
        let variants = [
            tiny(),
            ModelConfig { post_norm: false, pos_emb: PosEmb::Sinusoidal, mlp: Mlp::Relu, dropout: 0.1, ..tiny() },
            ModelConfig { tie_embeddings: false, type_vocab_size: 0, mlp: Mlp::GeluTanh, ..tiny() },
        ];
        let dev = Device::Cpu;
        for cfg in variants {
            let vars: Vec<(String, Var)> = crate::init_weights(&cfg, 1, &dev)?
                .into_iter()
                .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
                .collect::<Result<_>>()?;
            let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
            let model = Bert::load(&w, &cfg)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4], [3, 3, 2, 1, 0, 7, 8, 9]], &dev)?;
            let types = Tensor::new(&[[0u32, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]], &dev)?;
            let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], &dev)?;
            let targets = Tensor::new(&[[5i64, -100, 9, 2, 0, 16, 4, 1], [3, 2, 1, 0, 7, 8, -100, -100]], &dev)?;
            let types = (cfg.type_vocab_size > 0).then_some(&types);
            let mut rng = Rng::new(0);
            let logits = model.forward(&ids, types, Some(&mask), Some(&mut rng))?; // (B, T, V)
            assert_eq!(logits.dims(), [2, 8, 19]);
            let loss = nn::cross_entropy(&logits.reshape((16, 19))?, &targets.flatten_all()?, -100)?;
            let grads = loss.backward()?;
            for (name, var) in &vars {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{cfg:?}: no gradient for {name}"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0 && norm.is_finite(), "zero gradient for {name} in {cfg:?}");
            }
        }
        Ok(())
    }

    /// Checkpointed layers give the same loss and gradients bit for bit, with dropout and
    /// padding, post-LN and pre-LN, on the fused and the composed attention.
    #[test]
    fn checkpointed_gradients_are_bit_identical() -> Result<()> {
        let variants = [
            ModelConfig { dropout: 0.1, n_layer: 3, ..tiny() },
            ModelConfig { dropout: 0.1, n_layer: 3, kernels: true, post_norm: false, ..tiny() },
            ModelConfig { n_layer: 3, kernels: true, ..tiny() },
        ];
        let dev = Device::Cpu;
        for cfg in variants {
            let init = crate::init_weights(&cfg, 1, &dev)?;
            let ids = Tensor::new(&[[1u32, 5, 3, 9, 2, 0, 16, 4], [3, 3, 2, 1, 0, 7, 8, 9]], &dev)?;
            let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], &dev)?;
            let targets = Tensor::new(&[5i64, -100, 9, 2, 0, 16, 4, 1, 3, 2, 1, 0, 7, 8, -100, -100], &dev)?;
            let run = |which: ActivationCheckpointing| -> Result<(Vec<Vec<u32>>, u64)> {
                let vars: Vec<Var> =
                    init.iter().map(|(_, t)| Var::from_tensor(t)).collect::<candle_core::Result<_>>()?;
                let w =
                    Weights::from_pairs(init.iter().zip(&vars).map(|((n, _), v)| (n.clone(), v.as_tensor().clone())));
                let model = Bert::load(&w, &cfg)?.with_checkpointing(which);
                let mut rng = Rng::new(3);
                let logits = model.forward(&ids, None, Some(&mask), Some(&mut rng))?;
                let loss = nn::cross_entropy(&logits.reshape((16, 19))?, &targets, -100)?;
                let grads = checkpointing::backward(&loss)?;
                let bits = |t: &Tensor| -> Result<Vec<u32>> {
                    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
                };
                let mut out = vec![bits(&loss)?];
                for v in &vars {
                    out.push(bits(grads.get(v.as_tensor()).expect("a gradient"))?);
                }
                Ok((out, rng.state()))
            };
            let plain = run(ActivationCheckpointing::None)?;
            for which in [ActivationCheckpointing::Every(1), ActivationCheckpointing::Every(2)] {
                let got = run(which)?;
                assert_eq!(got.1, plain.1, "{which:?}: the RNG ends elsewhere");
                for (i, (a, b)) in got.0.iter().zip(&plain.0).enumerate() {
                    assert!(a == b, "{cfg:?} {which:?}: output {i} (0 the loss, then the gradients) differs");
                }
            }
        }
        Ok(())
    }

    /// Padding changes nothing at the real positions: a padded row gives the unpadded logits.
    #[test]
    fn padding_is_invisible_to_real_tokens() -> Result<()> {
        let cfg = tiny();
        let dev = Device::Cpu;
        let model = Bert::load(&Weights::from_pairs(crate::init_weights(&cfg, 2, &dev)?), &cfg)?;
        let alone = model.forward(&Tensor::new(&[[4u32, 8, 15, 16]], &dev)?, None, None, None)?;
        let padded = Tensor::new(&[[4u32, 8, 15, 16, 0, 0, 0]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0, 0]], &dev)?;
        let out = model.forward(&padded, None, Some(&mask), None)?.narrow(1, 0, 4)?;
        let diff = (out - alone)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // Without the mask the padding leaks in: the test above can fail.
        let leaky = model.forward(&padded, None, None, None)?.narrow(1, 0, 4)?;
        let alone = model.forward(&Tensor::new(&[[4u32, 8, 15, 16]], &dev)?, None, None, None)?;
        assert!((leaky - alone)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-4);
        Ok(())
    }

    #[test]
    fn a_decoder_config_is_refused_and_bad_types_are_named() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny();
        let w = Weights::from_pairs(crate::init_weights(&cfg, 3, &dev)?);
        let dec = ModelConfig { kind: ModelKind::Decoder, ..cfg.clone() };
        let err = Bert::load(&w, &dec).err().unwrap().to_string();
        assert!(err.contains("decoder") && err.contains("encoder"), "{err}");
        let model = Bert::load(&w, &cfg)?;
        let ids = Tensor::new(&[[1u32, 2]], &dev)?;
        let err = model.forward(&ids, Some(&Tensor::new(&[[0u32, 5]], &dev)?), None, None).err().unwrap().to_string();
        assert!(err.contains("token type 5"), "{err}");
        Ok(())
    }
}
