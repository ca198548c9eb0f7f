//! RWKV-4 as `transformers` lays it out (`RwkvForCausalLM`, the RWKV-4 Pile models on the
//! Hub), to and from our `rwkv4`. The layers are the official ones under other names
//! (`rwkv.blocks.N.attention.time_mix_key` is our `blocks.N.att.time_mix_k`); `time_decay` is
//! stored raw in both. `transformers` halves the hidden state every `rescale_every` layers at
//! inference (a float16 guard, with the weights rescaled to match): the same function up to
//! rounding, so exports set it to 0.

use anyhow::Result;

use super::hf;
use super::mapping::{NameMap, Pairs};
use crate::config::{ModelConfig, RunConfig};
use crate::mixers::rwkv4::{Init, Rwkv4Options};

fn no_buffers(_: &str) -> bool {
    false
}

/// Every `RwkvForCausalLM` tensor of `m`'s shape beside ours.
pub fn name_map(m: &ModelConfig) -> NameMap {
    let (v, d) = (m.vocab, m.width);
    let hidden = ((m.ffn_mult * d as f64).round() as usize).max(1);
    let mut p = Pairs::default();
    p.same("rwkv.embeddings.weight", "emb.weight", &[v, d]);
    p.layer_norm("rwkv.blocks.0.pre_ln", "blocks.0.ln0", d);
    for i in 0..m.depth {
        let (h, b) = (format!("rwkv.blocks.{i}"), format!("blocks.{i}"));
        p.layer_norm(&format!("{h}.ln1"), &format!("{b}.ln1"), d);
        p.layer_norm(&format!("{h}.ln2"), &format!("{b}.ln2"), d);
        for (theirs, ours) in [("time_decay", "time_decay"), ("time_first", "time_first")] {
            p.same(format!("{h}.attention.{theirs}"), format!("{b}.att.{ours}"), &[d]);
        }
        for (theirs, ours) in [("key", "k"), ("value", "v"), ("receptance", "r")] {
            p.same(format!("{h}.attention.time_mix_{theirs}"), format!("{b}.att.time_mix_{ours}"), &[1, 1, d]);
        }
        for name in ["key", "value", "receptance", "output"] {
            p.same(format!("{h}.attention.{name}.weight"), format!("{b}.att.{name}.weight"), &[d, d]);
        }
        for (theirs, ours) in [("key", "k"), ("receptance", "r")] {
            p.same(format!("{h}.feed_forward.time_mix_{theirs}"), format!("{b}.ffn.time_mix_{ours}"), &[1, 1, d]);
        }
        p.same(format!("{h}.feed_forward.key.weight"), format!("{b}.ffn.key.weight"), &[hidden, d]);
        p.same(format!("{h}.feed_forward.receptance.weight"), format!("{b}.ffn.receptance.weight"), &[d, d]);
        p.same(format!("{h}.feed_forward.value.weight"), format!("{b}.ffn.value.weight"), &[d, hidden]);
    }
    p.layer_norm("rwkv.ln_out", "ln_out", d);
    if !m.tie_embeddings {
        p.same("head.weight", "head.weight", &[v, d]);
    }
    NameMap { pairs: p.0, skippable: no_buffers }
}

/// Our run configuration for an RWKV `config.json`; settings our RWKV-4 does not compute the
/// same way are refused, by key.
pub fn run_config(c: &hf::Config) -> Result<RunConfig> {
    c.expect_model_type("rwkv")?;
    let width = c.size("hidden_size", None)?;
    let attention = c.size("attention_hidden_size", Some(width))?;
    c.require("attention_hidden_size", attention == width, "our time mixing is as wide as the model (hidden_size)")?;
    let eps = c.float("layer_norm_epsilon", 1e-5)?;
    c.require("layer_norm_epsilon", (eps - 1e-5).abs() < 1e-12, "our layer norms use 1e-5")?;
    let mut config = crate::registry::find("rwkv4")?.defaults();
    let m = &mut config.model;
    m.vocab = c.size("vocab_size", None)?;
    m.width = width;
    m.depth = c.size("num_hidden_layers", None)?;
    m.context = c.size("context_length", Some(1024))?;
    m.heads = 1;
    m.ffn_mult = c.size("intermediate_size", Some(4 * width))? as f64 / width as f64;
    m.tie_embeddings = c.boolean("tie_word_embeddings", false)?;
    // the initialisation is overwritten; `normal` is the cheaper one to draw
    m.set_options(&Rwkv4Options { init: Init::Normal, ..Default::default() })?;
    m.validate()?;
    Ok(config)
}

/// `m` as an RWKV `config.json`, or an error naming the first setting `RwkvForCausalLM`
/// cannot express.
pub fn hf_config(m: &ModelConfig) -> Result<serde_json::Value> {
    let refuse = |setting: String, why: &str| {
        anyhow::anyhow!("this model cannot be exported as RwkvForCausalLM: {setting}: {why}")
    };
    if m.architecture != "rwkv4" {
        return Err(refuse(format!("model `{}`", m.architecture), "RwkvForCausalLM is our `rwkv4`"));
    }
    if !m.options::<Rwkv4Options>()?.embed_norm {
        return Err(refuse("model.options.embed_norm = false".into(), "RwkvForCausalLM always has `pre_ln` (our ln0)"));
    }
    if m.channel_mixer != "rwkv" {
        return Err(refuse(format!("model.channel_mixer = {}", m.channel_mixer), "its channel mix is RWKV's"));
    }
    if m.shared_ffn {
        return Err(refuse("model.shared_ffn = true".into(), "it has one channel mix per block"));
    }
    Ok(serde_json::json!({
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": m.vocab,
        "context_length": m.context,
        "hidden_size": m.width,
        "num_hidden_layers": m.depth,
        "attention_hidden_size": m.width,
        "intermediate_size": ((m.ffn_mult * m.width as f64).round() as usize).max(1),
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 0,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "dtype": "float32",
    }))
}
