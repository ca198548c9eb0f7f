//! Everything a user can select: one entry per architecture. `altformers models`,
//! `train --model`, the benchmarks and the report all read this list, so a new
//! architecture appears everywhere by adding one entry here.

use anyhow::{bail, Result};

use crate::complexity::Complexity;
use crate::config::ModelConfig;
use crate::mixers::{self, SequenceMixer};
use crate::params::ParamBuilder;

pub struct Architecture {
    pub name: &'static str,
    pub summary: &'static str,
    /// arXiv id(s) of the paper(s) followed.
    pub paper: &'static str,
    /// Trains as a causal language model.
    pub causal: bool,
    /// Its recurrent form needs no fixed window (no learned positions, constant state), so
    /// generation may run past the training context.
    pub unbounded_context: bool,
    /// The mixer's own options and their defaults (`model.options.*`).
    pub default_options: fn() -> serde_json::Value,
    /// Changes to the common model defaults this architecture's paper makes.
    pub adjust_defaults: fn(&mut ModelConfig),
    /// Builds the sequence mixer of layer `layer`, parameters under `pb`.
    pub build: fn(&ModelConfig, usize, &ParamBuilder) -> Result<Box<dyn SequenceMixer>>,
    pub complexity: Complexity,
}

fn no_options() -> serde_json::Value {
    serde_json::json!({})
}

fn keep_defaults(_: &mut ModelConfig) {}

pub static ARCHITECTURES: &[Architecture] = &[Architecture {
    name: "transformer",
    summary: "causal softmax attention; multi-head, grouped or multi-query K/V (model.kv_heads); learned, rotary or no positions",
    paper: "1706.03762, 1911.02150, 2305.13245, 2104.09864",
    causal: true,
    unbounded_context: false,
    default_options: no_options,
    adjust_defaults: keep_defaults,
    build: mixers::attention::build,
    complexity: mixers::attention::COMPLEXITY,
},
Architecture {
    name: "hyena",
    summary: "Hyena: order-N gated long convolutions with implicit filters (sine FFN of positional features, decay window), short depthwise convs; FFT convolution for training, direct convolution over the cache for decoding",
    paper: "2302.10866",
    causal: true,
    unbounded_context: false,
    default_options: mixers::hyena::default_options,
    adjust_defaults: mixers::hyena::adjust_defaults,
    build: mixers::hyena::build,
    complexity: mixers::hyena::COMPLEXITY,
},
Architecture {
    name: "longnet",
    summary: "LongNet dilated attention: (segment, dilation) pairs (geometric by default), per-head offsets, causal inside segments, pairs mixed by their softmax denominators; KV-cache decoding",
    paper: "2307.02486",
    causal: true,
    unbounded_context: false,
    default_options: mixers::longnet::default_options,
    adjust_defaults: mixers::longnet::adjust_defaults,
    build: mixers::longnet::build,
    complexity: mixers::longnet::COMPLEXITY,
},
Architecture {
    name: "rwkv4",
    summary: "RWKV-4: token shift, time mixing by the WKV decayed average (chunkwise for training, O(d)-state recurrence for decoding), squared-ReLU channel mixing",
    paper: "2305.13048",
    causal: true,
    unbounded_context: true,
    default_options: mixers::rwkv4::default_options,
    adjust_defaults: mixers::rwkv4::adjust_defaults,
    build: mixers::rwkv4::build,
    complexity: mixers::rwkv4::COMPLEXITY,
},
Architecture {
    name: "retnet",
    summary: "RetNet multi-scale retention: per-head decay 1 - 2^(-5-h), rotation, the paper's normalisations, GroupNorm, swish gate; parallel, chunkwise (default past model.options.chunk) and O(1)-state recurrent forms",
    paper: "2307.08621",
    causal: true,
    unbounded_context: true,
    default_options: mixers::retnet::default_options,
    adjust_defaults: mixers::retnet::adjust_defaults,
    build: mixers::retnet::build,
    complexity: mixers::retnet::COMPLEXITY,
},
Architecture {
    name: "aft-full",
    summary: "AFT-full: sigmoid(Q) times a causal average of V weighted by exp(K + w), w a learned [context, context] position bias (or U V^T with model.options.rank > 0)",
    paper: "2105.14103",
    causal: true,
    unbounded_context: false,
    default_options: mixers::aft::full_options,
    adjust_defaults: mixers::aft::adjust_defaults,
    build: mixers::aft::build_full,
    complexity: mixers::aft::FULL_COMPLEXITY,
},
Architecture {
    name: "aft-simple",
    summary: "AFT-simple: w = 0, a per-channel softmax over the past (chunkwise prefix sums via the shared decayed primitive, O(d)-state decoding)",
    paper: "2105.14103",
    causal: true,
    unbounded_context: true,
    default_options: mixers::aft::simple_options,
    adjust_defaults: mixers::aft::adjust_defaults,
    build: mixers::aft::build_simple,
    complexity: mixers::aft::SIMPLE_COMPLEXITY,
},
Architecture {
    name: "aft-local",
    summary: "AFT-local: learned pairwise bias inside a window s (model.options.window), zero outside (global connectivity kept); prefix sums plus the window, O(s d)-state decoding",
    paper: "2105.14103",
    causal: true,
    unbounded_context: false,
    default_options: mixers::aft::window_options,
    adjust_defaults: mixers::aft::adjust_defaults,
    build: mixers::aft::build_local,
    complexity: mixers::aft::WINDOW_COMPLEXITY,
},
Architecture {
    name: "aft-conv",
    summary: "AFT-conv: per-head relative bias kernel of size s (the causal depthwise-convolution form), zero outside the window; prefix sums plus the window, O(s d)-state decoding",
    paper: "2105.14103",
    causal: true,
    unbounded_context: true,
    default_options: mixers::aft::window_options,
    adjust_defaults: mixers::aft::adjust_defaults,
    build: mixers::aft::build_conv,
    complexity: mixers::aft::WINDOW_COMPLEXITY,
}];

pub fn find(name: &str) -> Result<&'static Architecture> {
    match ARCHITECTURES.iter().find(|a| a.name == name) {
        Some(a) => Ok(a),
        None => {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
            bail!("unknown model `{name}`; known models: {}", known.join(", "))
        }
    }
}

/// The `altformers models` listing: a Markdown table.
pub fn table() -> String {
    let mut s = String::from(
        "| model | causal | stated time | stated space | true time | true space | review | paper |\n|---|---|---|---|---|---|---|---|\n",
    );
    for a in ARCHITECTURES {
        let c = &a.complexity;
        let verdict = c.verdict();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            a.name,
            if a.causal { "yes" } else { "no" },
            c.stated_time,
            c.stated_space,
            c.true_time,
            c.true_space,
            verdict,
            a.paper
        ));
    }
    s
}
