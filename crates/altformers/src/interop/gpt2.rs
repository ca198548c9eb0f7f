//! GPT-2 as `transformers` lays it out (`GPT2LMHeadModel`), to and from our `transformer`.
//!
//! Our Transformer expresses GPT-2 exactly: learned absolute positions (`pos_emb` = `wpe`),
//! pre-norm blocks with biases everywhere (`model.bias`), LayerNorm epsilon 1e-5, one fused
//! `qkv` projection whose rows are GPT-2's `c_attn` columns in the same order (queries, keys,
//! values, each head after head), the MLP with GELU's tanh approximation (`mlp-tanh`;
//! `activation_function = "gelu"` is our default `mlp`), and the head tied to the token
//! table. GPT-2's `Conv1D` stores weights `[in, out]`: they are transposed on the way.

use anyhow::{bail, Result};

use super::hf;
use super::mapping::{NameMap, Pairs};
use crate::config::{ModelConfig, Position, RunConfig};

/// Names a GPT-2 file may hold that are buffers, not weights: older checkpoints store each
/// layer's causal mask (`attn.bias`, `attn.masked_bias`).
fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// Every GPT-2 tensor of `m`'s shape beside ours; `prefix` is `transformer.` as
/// `GPT2LMHeadModel` saves, or empty (a bare `GPT2Model`, as the Hub's `gpt2` stores it).
pub fn name_map(m: &ModelConfig, prefix: &str) -> NameMap {
    let (v, d, hidden) = (m.vocab, m.width, ffn_hidden(m));
    let mut p = Pairs::default();
    p.same(format!("{prefix}wte.weight"), "emb.weight", &[v, d]);
    p.optional(format!("{prefix}wpe.weight"), "pos_emb.weight", &[m.context, d]);
    for i in 0..m.depth {
        let (h, b) = (format!("{prefix}h.{i}"), format!("blocks.{i}"));
        p.layer_norm(&format!("{h}.ln_1"), &format!("{b}.ln1"), d);
        p.transposed(format!("{h}.attn.c_attn.weight"), format!("{b}.att.qkv.weight"), &[d, 3 * d]);
        p.optional(format!("{h}.attn.c_attn.bias"), format!("{b}.att.qkv.bias"), &[3 * d]);
        p.transposed(format!("{h}.attn.c_proj.weight"), format!("{b}.att.out.weight"), &[d, d]);
        p.optional(format!("{h}.attn.c_proj.bias"), format!("{b}.att.out.bias"), &[d]);
        p.layer_norm(&format!("{h}.ln_2"), &format!("{b}.ln2"), d);
        p.transposed(format!("{h}.mlp.c_fc.weight"), format!("{b}.ffn.fc.weight"), &[d, hidden]);
        p.optional(format!("{h}.mlp.c_fc.bias"), format!("{b}.ffn.fc.bias"), &[hidden]);
        p.transposed(format!("{h}.mlp.c_proj.weight"), format!("{b}.ffn.proj.weight"), &[hidden, d]);
        p.optional(format!("{h}.mlp.c_proj.bias"), format!("{b}.ffn.proj.bias"), &[d]);
    }
    p.layer_norm(&format!("{prefix}ln_f"), "ln_out", d);
    if !m.tie_embeddings {
        p.same("lm_head.weight", "head.weight", &[v, d]);
    }
    NameMap { pairs: p.0, skippable: is_buffer }
}

/// The MLP's hidden width, as [`crate::channel_mixers::mlp`] rounds it.
fn ffn_hidden(m: &ModelConfig) -> usize {
    (m.ffn_mult * m.width as f64).round() as usize
}

/// The tensor-name prefix a GPT-2 file uses: `transformer.` unless its token table is bare.
pub fn prefix_of(names: impl IntoIterator<Item = impl AsRef<str>>) -> &'static str {
    if names.into_iter().any(|n| n.as_ref() == "wte.weight") {
        ""
    } else {
        "transformer."
    }
}

/// Our run configuration for a GPT-2 `config.json`; settings our Transformer does not
/// compute the same way are refused, by key.
pub fn run_config(c: &hf::Config) -> Result<RunConfig> {
    c.expect_model_type("gpt2")?;
    let width = c.size("n_embd", None)?;
    let heads = c.size("n_head", None)?;
    c.require("n_head", width.is_multiple_of(heads), "it must divide n_embd")?;
    let channel_mixer = match c.string("activation_function", "gelu_new")?.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" => "mlp-tanh",
        "gelu" => "mlp",
        _ => bail!(
            "{}: activation_function `{}` is not supported (gelu_new, gelu_pytorch_tanh and gelu are)",
            c.path.display(),
            c.string("activation_function", "")?
        ),
    };
    let eps = c.float("layer_norm_epsilon", 1e-5)?;
    c.require("layer_norm_epsilon", (eps - 1e-5).abs() < 1e-12, "our layer norms use 1e-5")?;
    c.require("scale_attn_weights", c.boolean("scale_attn_weights", true)?, "our attention scales by 1/sqrt(d_h)")?;
    let by_layer = c.boolean("scale_attn_by_inverse_layer_idx", false)?;
    c.require("scale_attn_by_inverse_layer_idx", !by_layer, "our attention does not scale by the layer")?;
    c.require("add_cross_attention", !c.boolean("add_cross_attention", false)?, "a decoder-only model has none")?;
    let dropout = c.float("resid_pdrop", 0.1)?;
    c.require("resid_pdrop", (0.0..1.0).contains(&dropout), "a dropout probability is in [0, 1)")?;

    let mut config = crate::registry::find("transformer")?.defaults();
    let m = &mut config.model;
    m.vocab = c.size("vocab_size", None)?;
    m.context = c.size("n_positions", Some(1024))?;
    m.width = width;
    m.depth = c.size("n_layer", None)?;
    m.heads = heads;
    m.kv_heads = 0;
    m.position = Position::Learned;
    m.channel_mixer = channel_mixer.into();
    m.ffn_mult = c.size("n_inner", Some(4 * width))? as f64 / width as f64;
    m.bias = true;
    m.dropout = dropout;
    m.tie_embeddings = c.boolean("tie_word_embeddings", true)?;
    m.validate()?;
    Ok(config)
}

/// `m` as a GPT-2 `config.json`, or an error naming the first setting GPT-2 cannot express.
pub fn hf_config(m: &ModelConfig) -> Result<serde_json::Value> {
    let refuse =
        |setting: String, why: &str| anyhow::anyhow!("this model cannot be exported as GPT-2: {setting}: {why}");
    if m.architecture != "transformer" {
        return Err(refuse(format!("model `{}`", m.architecture), "GPT-2 is our `transformer`"));
    }
    // Position::None exports as a zero `wpe`: the same function
    if m.position == Position::Rope {
        return Err(refuse("model.position = rope".into(), "GPT-2 has learned absolute positions only (wpe)"));
    }
    if m.kv_heads() != m.heads {
        return Err(refuse(
            format!("model.kv_heads = {} (grouped or multi-query K/V)", m.kv_heads),
            "GPT-2 has one key/value head per query head",
        ));
    }
    let activation = match m.channel_mixer.as_str() {
        "mlp-tanh" => "gelu_new",
        "mlp" => "gelu",
        other => return Err(refuse(format!("model.channel_mixer = {other}"), "GPT-2's MLP is Linear, GELU, Linear")),
    };
    if m.shared_ffn {
        return Err(refuse("model.shared_ffn = true".into(), "GPT-2 has one MLP per block"));
    }
    Ok(serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab,
        "n_positions": m.context,
        "n_embd": m.width,
        "n_layer": m.depth,
        "n_head": m.heads,
        "n_inner": ffn_hidden(m),
        "activation_function": activation,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": null,
        "eos_token_id": null,
        "dtype": "float32",
    }))
}
