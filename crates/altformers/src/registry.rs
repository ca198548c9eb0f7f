//! Everything a user can select: one entry per architecture. `altformers models`,
//! `train --model`, the benchmarks and the report all read this list, so a new
//! architecture appears everywhere by adding one entry here.

use anyhow::{bail, Context, Result};

use crate::backbones::{self, hourglass, megabyte, Backbone, BackboneFn, MixerFn, Parts};
use crate::complexity::Complexity;
use crate::config::{ModelConfig, NoOptions, Options, Overrides, RunConfig};
use crate::mixers::{self, aft, hyena, linformer, longnet, m2, performer, reformer, retnet, rwkv4};
use crate::params::ParamBuilder;

pub struct Architecture {
    pub name: &'static str,
    pub summary: &'static str,
    /// arXiv id(s) of the paper(s) followed.
    pub paper: &'static str,
    /// Trains as a causal language model (else: a bidirectional encoder).
    pub causal: bool,
    /// Its recurrent form needs no fixed window (no learned positions, constant state), so
    /// generation may run past the training context.
    pub unbounded_context: bool,
    /// Its own options (`model.options.*`): defaults and checks from one typed struct.
    pub options: OptionsSpec,
    /// Changes to the common model defaults this architecture's paper makes.
    pub adjust_defaults: fn(&mut ModelConfig),
    /// How its token table and head start ([`backbones::Ends`]), from its configuration.
    pub ends: fn(&ModelConfig) -> Result<backbones::Ends>,
    /// Its official trainer adds L2Wrap ([`crate::train::step::l2wrap_penalty`]): what
    /// `train.l2wrap = "auto"` (the default) means for it.
    pub l2wrap: bool,
    /// The sequence mixer of each layer, where the architecture has one (the benchmarks
    /// time it alone).
    pub mixer: Option<MixerFn>,
    /// Builds the whole model: [`backbones::stack::build`] for a new mixer in the default
    /// stack, or a backbone of its own.
    pub backbone: BackboneFn,
    pub complexity: Complexity,
}

/// An [`Options`] type seen through function pointers, so a static table can hold it.
pub struct OptionsSpec {
    /// `T::default()` as JSON.
    pub defaults: fn() -> serde_json::Map<String, serde_json::Value>,
    /// Parses and checks `model.options` as `T`.
    pub check: fn(&ModelConfig) -> Result<()>,
}

/// The [`OptionsSpec`] of `T`.
pub const fn options<T: Options>() -> OptionsSpec {
    fn defaults<T: Options>() -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(T::default()) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => panic!("an options type must serialise to a JSON object"),
        }
    }
    fn check<T: Options>(cfg: &ModelConfig) -> Result<()> {
        cfg.options::<T>().map(|_| ())
    }
    OptionsSpec { defaults: defaults::<T>, check: check::<T> }
}

fn keep_defaults(_: &mut ModelConfig) {}

impl Architecture {
    /// The run configuration every setting of which is this architecture's default.
    pub fn defaults(&self) -> RunConfig {
        let mut config = RunConfig::default();
        config.model.architecture = self.name.to_string();
        config.model.options = (self.options.defaults)();
        (self.adjust_defaults)(&mut config.model);
        config
    }

    /// The defaults with `over` laid on them, checked.
    pub fn config(&self, over: &Overrides) -> Result<RunConfig> {
        let config = RunConfig::layered(&self.defaults(), over)?;
        self.check(&config.model)?;
        Ok(config)
    }

    /// Everything about `model` that the common checks cannot see: its options, its channel
    /// mixer's name.
    pub fn check(&self, model: &ModelConfig) -> Result<()> {
        model.validate()?;
        channel_mixer(&model.channel_mixer)?;
        (self.options.check)(model)
    }
}

/// A position-wise channel mixer (`model.channel_mixer`).
pub struct ChannelMixer {
    pub name: &'static str,
    pub summary: &'static str,
    pub build: MixerFn,
}

pub static CHANNEL_MIXERS: &[ChannelMixer] = &[
    ChannelMixer {
        name: "mlp",
        summary: "GPT-2's Linear(d, m d), exact GELU, Linear(m d, d) (m = model.ffn_mult)",
        build: crate::channel_mixers::mlp,
    },
    ChannelMixer {
        name: "mlp-tanh",
        summary: "the MLP with GELU's tanh approximation (GPT-2's gelu_new: what its checkpoints were trained with)",
        build: crate::channel_mixers::mlp_tanh,
    },
    ChannelMixer {
        name: "swiglu",
        summary: "SwiGLU (2002.05202): down(silu(gate x) * up x), hidden 2/3 m d so parameters match the MLP",
        build: crate::channel_mixers::swiglu,
    },
    ChannelMixer {
        name: "rwkv",
        summary: "RWKV-4's channel mix: token shift, sigmoid(W_r x'_r) * W_v relu(W_k x'_k)^2, hidden m d",
        build: rwkv4::channel_mix,
    },
    ChannelMixer {
        name: "monarch",
        summary: "M2's Monarch MLP (2310.12109, the official blockdiag_linear GLU): W2 (gelu(g) * u) with (g, u) = W1 x, W1 and W2 block-diagonal of 4 blocks; hidden m d, 3 m d^2 / 4 weights",
        build: crate::channel_mixers::monarch_mlp,
    },
];

pub fn channel_mixer(name: &str) -> Result<&'static ChannelMixer> {
    lookup(CHANNEL_MIXERS, |c| c.name, name, "model.channel_mixer")
}

/// The entry of `table` called `name`, or an error listing the known names.
fn lookup<T>(table: &'static [T], name_of: fn(&T) -> &str, name: &str, what: &str) -> Result<&'static T> {
    match table.iter().find(|e| name_of(e) == name) {
        Some(e) => Ok(e),
        None => {
            let known: Vec<&str> = table.iter().map(name_of).collect();
            bail!("unknown {what} `{name}`; known: {}", known.join(", "))
        }
    }
}

/// Builds the backbone `config` names, parameters under `pb`.
pub fn build(config: &ModelConfig, pb: &ParamBuilder) -> Result<Box<dyn Backbone>> {
    let arch = find(&config.architecture)?;
    arch.check(config)?;
    let parts = Parts {
        mixer: arch.mixer,
        channel_mixer: channel_mixer(&config.channel_mixer)?.build,
        unbounded_context: arch.unbounded_context,
        causal: arch.causal,
        ends: (arch.ends)(config)?,
    };
    (arch.backbone)(config, pb, &parts).with_context(|| format!("building `{}`", arch.name))
}

pub static ARCHITECTURES: &[Architecture] = &[Architecture {
    name: "transformer",
    summary: "causal softmax attention; multi-head, grouped or multi-query K/V (model.kv_heads); learned, rotary or no positions",
    paper: "1706.03762, 1911.02150, 2305.13245, 2104.09864",
    causal: true,
    unbounded_context: false,
    options: options::<NoOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(mixers::attention::build),
    backbone: backbones::stack::build,
    complexity: mixers::attention::COMPLEXITY,
},
Architecture {
    name: "one-wide-ffn",
    summary: "One Wide FFN, decoder-only adaptation of the paper's encoder-decoder setting (there: one shared encoder FFN, no decoder FFN): the Transformer with one channel mixer shared by all blocks, depth times as wide so the parameters match (model.shared_ffn)",
    paper: "2309.01826",
    causal: true,
    unbounded_context: false,
    options: options::<NoOptions>(),
    adjust_defaults: crate::channel_mixers::one_wide_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(mixers::attention::build),
    backbone: backbones::stack::build,
    complexity: crate::channel_mixers::ONE_WIDE_COMPLEXITY,
},
Architecture {
    name: "hyena",
    summary: "Hyena: order-N gated long convolutions with implicit filters (sine FFN of positional features, decay window), short depthwise convs; FFT convolution for training, direct convolution over the cache for decoding",
    paper: "2302.10866",
    causal: true,
    unbounded_context: false,
    options: options::<hyena::HyenaOptions>(),
    adjust_defaults: hyena::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(hyena::build),
    backbone: backbones::stack::build,
    complexity: hyena::COMPLEXITY,
},
Architecture {
    name: "m2",
    summary: "Monarch Mixer (M2-GPT): short conv, gate, causal long conv with an implicit filter evaluated by Monarch DFTs of length >= 2T (model.options.long_conv), gate; Monarch MLP channel mixer; direct convolution over the cache for decoding",
    paper: "2310.12109",
    causal: true,
    unbounded_context: false,
    options: options::<m2::M2Options>(),
    adjust_defaults: m2::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(m2::build),
    backbone: backbones::stack::build,
    complexity: m2::COMPLEXITY,
},
Architecture {
    name: "longnet",
    summary: "LongNet dilated attention: (segment, dilation) pairs (geometric by default), per-head offsets, causal inside segments, pairs mixed by their softmax denominators; KV-cache decoding",
    paper: "2307.02486",
    causal: true,
    unbounded_context: false,
    options: options::<longnet::LongNetOptions>(),
    adjust_defaults: longnet::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(longnet::build),
    backbone: backbones::stack::build,
    complexity: longnet::COMPLEXITY,
},
Architecture {
    name: "rwkv4",
    summary: "RWKV-4: token shift, time mixing by the WKV decayed average (chunkwise for training, O(d)-state recurrence for decoding), squared-ReLU channel mixing",
    paper: "2305.13048",
    causal: true,
    unbounded_context: true,
    options: options::<rwkv4::Rwkv4Options>(),
    adjust_defaults: rwkv4::adjust_defaults,
    ends: rwkv4::ends,
    l2wrap: true,
    mixer: Some(rwkv4::build),
    backbone: backbones::stack::build_rwkv4,
    complexity: rwkv4::COMPLEXITY,
},
Architecture {
    name: "retnet",
    summary: "RetNet multi-scale retention: per-head decay 1 - 2^(-5-h), rotation, the paper's normalisations, GroupNorm, swish gate; parallel, chunkwise (default past model.options.chunk) and O(1)-state recurrent forms",
    paper: "2307.08621",
    causal: true,
    unbounded_context: true,
    options: options::<retnet::RetNetOptions>(),
    adjust_defaults: retnet::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(retnet::build),
    backbone: backbones::stack::build,
    complexity: retnet::COMPLEXITY,
},
Architecture {
    name: "performer",
    summary: "Performer (FAVOR+): softmax attention estimated by positive orthogonal random features (m = model.options.features, default d_h ln d_h; redrawn every model.options.redraw_every steps); causal prefix sums via the shared decayed primitive with decay 1, O(m d)-state decoding",
    paper: "2009.14794",
    causal: true,
    unbounded_context: false,
    options: options::<performer::PerformerOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(performer::build),
    backbone: backbones::stack::build,
    complexity: performer::COMPLEXITY,
},
Architecture {
    name: "aft-full",
    summary: "AFT-full: sigmoid(Q) times a causal average of V weighted by exp(K + w), w = U V^T a factorised learned position bias (inner width model.options.rank, the paper's 128; 0: a full [context, context] matrix), computed over key blocks (O(T d + block^2) memory); learned absolute positions",
    paper: "2105.14103",
    causal: true,
    unbounded_context: false,
    options: options::<aft::FullOptions>(),
    adjust_defaults: aft::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(aft::build_full),
    backbone: backbones::stack::build,
    complexity: aft::FULL_COMPLEXITY,
},
Architecture {
    name: "aft-simple",
    summary: "AFT-simple: w = 0, a per-channel softmax over the past (chunkwise prefix sums via the shared decayed primitive, O(d)-state decoding); learned absolute positions",
    paper: "2105.14103",
    causal: true,
    unbounded_context: true,
    options: options::<aft::SimpleOptions>(),
    adjust_defaults: aft::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(aft::build_simple),
    backbone: backbones::stack::build,
    complexity: aft::SIMPLE_COMPLEXITY,
},
Architecture {
    name: "aft-local",
    summary: "AFT-local: learned pairwise bias inside a window s (model.options.window; factorised U V^T with model.options.rank > 0), zero outside (global connectivity kept); prefix sums plus the window, O(s d)-state decoding; learned absolute positions",
    paper: "2105.14103",
    causal: true,
    unbounded_context: false,
    options: options::<aft::LocalOptions>(),
    adjust_defaults: aft::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(aft::build_local),
    backbone: backbones::stack::build,
    complexity: aft::WINDOW_COMPLEXITY,
},
Architecture {
    name: "aft-conv",
    summary: "AFT-conv: one key channel per head and a per-head relative bias kernel of size s (the causal depthwise-convolution form; reparameterised gamma (w - mean) / std + beta, model.options.reparam), zero outside the window; prefix sums plus the window, O(s d)-state decoding; learned absolute positions",
    paper: "2105.14103",
    causal: true,
    unbounded_context: true,
    options: options::<aft::ConvOptions>(),
    adjust_defaults: aft::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(aft::build_conv),
    backbone: backbones::stack::build,
    complexity: aft::WINDOW_COMPLEXITY,
},
Architecture {
    name: "reformer",
    summary: "Reformer's causal LSH attention (shared QK, random-rotation hashing into model.options.n_buckets, n_hashes rounds combined by log-sum-exp, chunks of model.options.chunk inside each bucket's sorted run, self only when alone) ; reversible residual pairs (Y1 = X1 + Attn(X2), Y2 = X2 + FFN(Y1), backward by recomputation: memory flat in depth), chunked FFN, head on [Y1; Y2]; decoding re-hashes the KV cache (O(T) per token)",
    paper: "2001.04451",
    causal: true,
    unbounded_context: false,
    options: options::<reformer::ReformerOptions>(),
    adjust_defaults: reformer::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(reformer::build),
    backbone: backbones::reversible::build_reformer,
    complexity: reformer::COMPLEXITY,
},
Architecture {
    name: "megabyte",
    summary: "MegaByte: a global Transformer over patches of P bytes (their embeddings concatenated, shifted one patch), a local Transformer inside each patch; one global step per patch and one local step per byte when decoding",
    paper: "2305.07185",
    causal: true,
    unbounded_context: false,
    options: options::<megabyte::MegaByteOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: None,
    backbone: megabyte::build,
    complexity: megabyte::COMPLEXITY,
},
Architecture {
    name: "hourglass",
    summary: "Hourglass: Transformer layers at full resolution around shortened ones (hierarchy `2@1 4@3 2@1`; shift right k - 1, linear or average pooling, linear or repeat upsampling, residual); short layers step once every k bytes when decoding",
    paper: "2110.13711",
    causal: true,
    unbounded_context: false,
    options: options::<hourglass::HourglassOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: None,
    backbone: hourglass::build,
    complexity: hourglass::COMPLEXITY,
},
// Encoders (`causal: false`): bidirectional mixers, no recurrent form; trained and compared on
// classification (ListOps), not as language models.
Architecture {
    name: "transformer-encoder",
    summary: "encoder (bidirectional) softmax attention with a key-padding mask, the Transformer otherwise (LRA's baseline); the unfused attention on every device (the flash kernel is causal only); no recurrent form",
    paper: "1706.03762, 2011.04006",
    causal: false,
    unbounded_context: false,
    options: options::<NoOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(mixers::attention::build_bidirectional),
    backbone: backbones::stack::build,
    complexity: mixers::attention::ENCODER_COMPLEXITY,
},
Architecture {
    name: "m2-bert",
    summary: "Monarch Mixer's encoder (M2-BERT): short conv, gate, two-sided long conv (forward and reverse implicit filters) by Monarch DFTs, gate; Monarch MLP channel mixer; no recurrent form",
    paper: "2310.12109",
    causal: false,
    unbounded_context: false,
    options: options::<m2::M2Options>(),
    adjust_defaults: m2::adjust_bert_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(m2::build_bidirectional),
    backbone: backbones::stack::build,
    complexity: m2::BERT_COMPLEXITY,
},
Architecture {
    name: "linformer",
    summary: "Linformer: softmax attention over keys and values projected along the sequence, K' = E K, V' = F V with learned k x n E, F (model.options.k, sharing none / headwise / key-value / layerwise), padding masked before the projection; encoder only: each row of E K mixes every position, later ones included, so it has no causal form and no language-model row",
    paper: "2006.04768",
    causal: false,
    unbounded_context: false,
    options: options::<linformer::LinformerOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(linformer::build),
    backbone: backbones::stack::build,
    complexity: linformer::COMPLEXITY,
},
Architecture {
    name: "performer-encoder",
    summary: "Performer's encoder (LRA's Performer): bidirectional FAVOR+, D^-1 Q' ((K')^T [V 1]) with positive orthogonal random features (model.options as performer's), padded keys' features exactly 0; no recurrent form",
    paper: "2009.14794, 2011.04006",
    causal: false,
    unbounded_context: false,
    options: options::<performer::PerformerOptions>(),
    adjust_defaults: keep_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(performer::build_bidirectional),
    backbone: backbones::stack::build,
    complexity: performer::ENCODER_COMPLEXITY,
},
Architecture {
    name: "reformer-encoder",
    summary: "Reformer's encoder (LRA's Reformer): bidirectional LSH attention (trax's chunking: each round's real positions sorted by (bucket, position), cut every model.options.chunk tokens, a chunk seeing itself and the one before, cyclically; self only when alone; padding in no chunk) in the reversible pairs of `reformer`; no recurrent form",
    paper: "2001.04451, 2011.04006",
    causal: false,
    unbounded_context: false,
    options: options::<reformer::ReformerOptions>(),
    adjust_defaults: reformer::adjust_defaults,
    ends: backbones::gpt2_ends,
    l2wrap: false,
    mixer: Some(reformer::build_bidirectional),
    backbone: backbones::reversible::build_reformer,
    complexity: reformer::ENCODER_COMPLEXITY,
}];

pub fn find(name: &str) -> Result<&'static Architecture> {
    lookup(ARCHITECTURES, |a| a.name, name, "model")
}

/// The defaults of `name` with `over` laid on them, checked: what `train --model NAME
/// --config FILE --set ...` trains.
pub fn config(name: &str, over: &Overrides) -> Result<RunConfig> {
    find(name)?.config(over)
}

/// The `altformers models` listing: a Markdown table.
pub fn table() -> String {
    let mut s = String::from(
        "| model | causal | stated time | stated space | true time | true space | review | paper |\n|---|---|---|---|---|---|---|---|\n",
    );
    for a in ARCHITECTURES {
        let c = &a.complexity;
        let verdict = c.verdict();
        let (stated_time, stated_space) = c.review.stated();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            a.name,
            if a.causal { "yes" } else { "no" },
            stated_time,
            stated_space,
            c.true_time,
            c.true_space,
            verdict,
            a.paper
        ));
    }
    s.push_str("\n| channel mixer (model.channel_mixer) | what it is |\n|---|---|\n");
    for c in CHANNEL_MIXERS {
        s.push_str(&format!("| {} | {} |\n", c.name, c.summary));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::complexity::{review_line, review_rows};

    /// The review's rows for models not in the registry yet; the last row lists the models it
    /// gives no line (registered with `Review::NO_LINE`).
    const NOT_REGISTERED: &[&str] = &[];
    const NO_LINE_ROW: &str = "MegaByte, MQA, RoFormer, Monarch Mixer, Hierarchical, One Wide FFN";

    /// Every line of the review is quoted beside the architecture it is about: each
    /// architecture's row exists in the review's table, and each row of the table is claimed by
    /// an architecture, or its model is not registered yet (and then no architecture claims it).
    #[test]
    fn every_review_line_is_quoted_by_its_architecture() {
        let claimed: Vec<&str> = ARCHITECTURES.iter().filter_map(|a| a.complexity.review.row).collect();
        for a in ARCHITECTURES {
            if let Some(row) = a.complexity.review.row {
                assert!(review_line(row).is_some(), "{}: no row `{row}` in the review's table", a.name);
            }
        }
        for row in review_rows().filter(|r| *r != NO_LINE_ROW) {
            let pending = NOT_REGISTERED.contains(&row);
            assert!(
                claimed.contains(&row) != pending,
                "review row `{row}`: claimed {}, listed as not registered {pending}",
                claimed.contains(&row)
            );
        }
        let table = table();
        assert!(table.contains("| transformer | yes | O(T log Td) | O(T^2 + Td) |"), "{table}");
        assert!(table.contains("| aft-full | yes | AFT-simple O(Td), AFT-full O(T^2d) | O(Td) |"), "{table}");
        assert!(table.contains("| megabyte | yes | (none) | (none) |"), "{table}");
    }
}
