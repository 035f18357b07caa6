//! The model's hyper-parameters: one struct covers GPT-2 style and Llama style decoders.

use serde::{Deserialize, Serialize};

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosEmb {
    /// A learned table added to the token embeddings (GPT-2).
    Learned,
    /// Fixed sines and cosines added to the embeddings ("Attention Is All You Need", 3.5).
    Sinusoidal,
    /// Rotary embeddings on queries and keys (RoFormer; Llama's rotate-half layout).
    Rope,
    /// No positional signal besides the causal mask.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    LayerNorm,
    RmsNorm,
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    /// down(gelu(up(x))) with the exact erf GELU (nanoGPT, BERT).
    Gelu,
    /// down(gelu_tanh(up(x))), the tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// down(relu(up(x))) ("Attention Is All You Need").
    Relu,
    /// down(silu(gate(x)) * up(x)) (Shazeer 2020; Llama).
    Swiglu,
}

/// Which transformer shape a config builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Causal decoder-only LM (GPT, Llama).
    #[default]
    Decoder,
    /// Bidirectional encoder with a masked-LM head (BERT).
    Encoder,
    /// Encoder and decoder joined by cross-attention ("Attention Is All You Need", Marian, BART).
    EncoderDecoder,
}

impl ModelKind {
    /// For messages: "an encoder (BERT-style masked LM)".
    pub fn describe(self) -> &'static str {
        match self {
            ModelKind::Decoder => "a decoder (causal LM)",
            ModelKind::Encoder => "an encoder (BERT-style masked LM)",
            ModelKind::EncoderDecoder => "an encoder-decoder (seq2seq)",
        }
    }
}

/// RoPE frequency scaling for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// Only "llama3" (Llama 3.1's wavelength-dependent scaling, as in HF's
    /// `_compute_llama3_parameters`).
    pub rope_type: String,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// decoder | encoder | encoder-decoder.
    pub kind: ModelKind,
    /// 0 takes the tokenizer's vocabulary size; a larger value pads the embedding table.
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads for grouped-query attention; 0 means n_head (multi-head attention).
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// Width of one attention head; 0 means n_embd / n_head (Qwen3 sets it apart).
    pub head_dim: usize,
    /// Hidden width of the MLP; 0 means 4 x n_embd, or 8/3 x n_embd (rounded up to 32) for SwiGLU.
    pub intermediate_size: usize,
    /// The context length: the most positions the model sees at once.
    pub block_size: usize,
    pub pos_emb: PosEmb,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Attention sees only the last `sliding_window` positions (Mistral); 0 means all.
    pub sliding_window: usize,
    pub norm: Norm,
    pub norm_eps: f64,
    pub mlp: Mlp,
    /// Biases on every linear layer and on LayerNorms.
    pub bias: bool,
    /// Overrides `bias` for the q, k and v projections (Qwen2 has them, nothing else does).
    pub qkv_bias: Option<bool>,
    /// Overrides `bias` for the attention output projection.
    pub o_bias: Option<bool>,
    /// Overrides `bias` for the MLP projections.
    pub mlp_bias: Option<bool>,
    /// RMSNorm on each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The output head shares the token embedding matrix.
    pub tie_embeddings: bool,
    pub dropout: f64,
    pub init_std: f64,
    /// Use taper-kernels' fused CPU ops (false: the composed candle ops, same math).
    pub kernels: bool,
    /// Encoders: segment (token type) embeddings, BERT's sentence A / B; 0 means none.
    pub type_vocab_size: usize,
    /// Encoders: LayerNorm after each residual add (BERT, the original Transformer) rather than
    /// before each sublayer (GPT-2). Post-LN is what HF's `bert` computes.
    pub post_norm: bool,
    /// Encoder-decoder only: decoder layers (0 = n_layer; `n_layer` counts the encoder's).
    pub n_decoder_layer: usize,
    /// Encoder-decoder only: token embeddings scaled by sqrt(n_embd) (Marian, "Attention Is
    /// All You Need" 3.4).
    pub scale_embedding: bool,
    /// Encoder-decoder only: source and target share one embedding table (`model.shared`).
    pub share_embeddings: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Decoder,
            vocab_size: 0,
            n_layer: 4,
            n_head: 4,
            n_kv_head: 0,
            n_embd: 128,
            head_dim: 0,
            intermediate_size: 0,
            block_size: 64,
            pos_emb: PosEmb::Learned,
            rope_theta: 10_000.0,
            rope_scaling: None,
            sliding_window: 0,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            mlp: Mlp::Gelu,
            bias: true,
            qkv_bias: None,
            o_bias: None,
            mlp_bias: None,
            qk_norm: false,
            tie_embeddings: true,
            dropout: 0.0,
            init_std: 0.02,
            kernels: true,
            type_vocab_size: 2,
            post_norm: true,
            n_decoder_layer: 0,
            scale_embedding: false,
            share_embeddings: true,
        }
    }
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        if self.n_kv_head == 0 {
            self.n_head
        } else {
            self.n_kv_head
        }
    }

    pub fn head_dim(&self) -> usize {
        if self.head_dim > 0 {
            self.head_dim
        } else {
            self.n_embd / self.n_head.max(1)
        }
    }

    pub fn qkv_bias(&self) -> bool {
        self.qkv_bias.unwrap_or(self.bias)
    }

    pub fn o_bias(&self) -> bool {
        self.o_bias.unwrap_or(self.bias)
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(self.bias)
    }

    pub fn hidden(&self) -> usize {
        match (self.intermediate_size, self.mlp) {
            (0, Mlp::Swiglu) => (8 * self.n_embd / 3).div_ceil(32) * 32,
            (0, _) => 4 * self.n_embd,
            (n, _) => n,
        }
    }

    /// Every problem with the config, not just the first.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (k, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                errs.push(format!("model.{k} must be > 0"));
            }
        }
        if self.head_dim == 0 && self.n_head > 0 && !self.n_embd.is_multiple_of(self.n_head) {
            errs.push(format!("model.n_embd = {} is not divisible by model.n_head = {}", self.n_embd, self.n_head));
        }
        if self.n_head > 0 && !self.n_head.is_multiple_of(self.kv_heads()) {
            errs.push(format!(
                "model.n_head = {} is not a multiple of model.n_kv_head = {}",
                self.n_head, self.n_kv_head
            ));
        }
        if self.pos_emb == PosEmb::Rope && self.n_head > 0 && !self.head_dim().is_multiple_of(2) {
            errs.push(format!("rope needs an even head size, found {}", self.head_dim()));
        }
        if let Some(r) = &self.rope_scaling {
            if r.rope_type != "llama3" {
                errs.push(format!("model.rope_scaling.rope_type = {:?}: only \"llama3\" is supported", r.rope_type));
            }
            if self.pos_emb != PosEmb::Rope {
                errs.push("model.rope_scaling needs pos_emb = \"rope\"".into());
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            errs.push(format!("model.dropout = {} must be in [0, 1)", self.dropout));
        }
        for (k, v) in [("init_std", self.init_std), ("norm_eps", self.norm_eps), ("rope_theta", self.rope_theta)] {
            if !(v.is_finite() && v > 0.0) {
                errs.push(format!("model.{k} = {v}: must be a finite number > 0"));
            }
        }
        match self.kind {
            ModelKind::Decoder => {}
            ModelKind::Encoder => errs.extend(self.encoder_rules()),
            ModelKind::EncoderDecoder => errs.extend(self.encoder_decoder_rules()),
        }
        errs
    }

    /// What a BERT-style encoder can be.
    fn encoder_rules(&self) -> Vec<String> {
        let mut e = Vec::new();
        if !matches!(self.pos_emb, PosEmb::Learned | PosEmb::Sinusoidal) {
            e.push(format!(
                "model.pos_emb = {:?}: an encoder takes \"learned\" or \"sinusoidal\" positions",
                self.pos_emb
            ));
        }
        if self.norm != Norm::LayerNorm {
            e.push("model.norm: an encoder uses \"layer_norm\"".into());
        }
        if self.mlp == Mlp::Swiglu {
            e.push("model.mlp = \"swiglu\": an encoder takes \"gelu\", \"gelu_tanh\" or \"relu\"".into());
        }
        if !self.bias || self.qkv_bias == Some(false) || self.o_bias == Some(false) || self.mlp_bias == Some(false) {
            e.push("model.bias: an encoder (BERT) has biases on every linear layer".into());
        }
        if self.kv_heads() != self.n_head || self.qk_norm || self.sliding_window > 0 || self.rope_scaling.is_some() {
            e.push("an encoder has plain multi-head attention (no n_kv_head, qk_norm, sliding_window or rope)".into());
        }
        if self.n_head > 0 && self.head_dim() * self.n_head != self.n_embd {
            e.push("an encoder's heads split model.n_embd evenly (leave model.head_dim at 0)".into());
        }
        e
    }

    /// What a Marian-shaped encoder-decoder can be.
    fn encoder_decoder_rules(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.pos_emb == PosEmb::Rope {
            errs.push(
                "model.pos_emb = \"rope\" is not supported by the encoder-decoder (use sinusoidal or learned)".into(),
            );
        }
        if self.norm != Norm::LayerNorm {
            errs.push("the encoder-decoder uses model.norm = \"layer_norm\"".into());
        }
        if self.mlp == Mlp::Swiglu {
            errs.push("the encoder-decoder's MLP is gelu, gelu_tanh or relu, not swiglu".into());
        }
        if self.kv_heads() != self.n_head || (self.head_dim != 0 && self.head_dim * self.n_head != self.n_embd) {
            errs.push(
                "the encoder-decoder has plain multi-head attention (n_kv_head = n_head, head_dim = n_embd / n_head)"
                    .into(),
            );
        }
        if self.qk_norm || self.sliding_window > 0 || self.rope_scaling.is_some() {
            errs.push("model.qk_norm, sliding_window and rope_scaling do not apply to the encoder-decoder".into());
        }
        if self.qkv_bias.is_some() || self.o_bias.is_some() || self.mlp_bias.is_some() {
            errs.push("the encoder-decoder takes model.bias alone (no qkv_bias, o_bias, mlp_bias)".into());
        }
        errs
    }
}
