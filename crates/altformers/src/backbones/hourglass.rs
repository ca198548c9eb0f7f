//! The Hourglass Transformer (Nawrot et al. 2021, "Hierarchical Transformers Are More
//! Efficient Language Models", arXiv 2110.13711; reference code google/trax
//! `trax/models/research/hourglass.py` and `trax/layers/research/resampling.py`).
//!
//! A hierarchy such as `2@1 4@3 2@1` (layers @ shortening factor, a palindrome): 2 layers at
//! full resolution, then the sequence shortened 3 times, 4 layers on the short sequence, then
//! upsampled back, and 2 more layers at full resolution. Factors grow towards the middle,
//! each dividing the next (`1@1 2@2 4@4 2@2 1@1` nests two valleys). A valley of relative
//! factor k at resolution T (the paper's section 3, trax's `create_hourglass_valley`):
//!
//! ```text
//! s      = shorten(shift_right(x, k - 1))   [ceil(T/k) tokens]: linear pooling, W [k d] -> [d],
//!                                            or the average of the k
//! s      = layers(s)                         (a nested valley between two halves of them)
//! x_out  = x + LayerNorm(upsample(s))        repeat each short token k times, or linear:
//!                                            W [d] -> [k d] split into k tokens
//! ```
//!
//! Causality is in the shift: short token j pools inputs `j k - k + 1 ..= j k`, and serves the
//! full-resolution positions `j k .. j k + k - 1`, none of which precedes `j k`. (Shifting by
//! less leaks a later input into an earlier position; trax's `ShiftRight(k - 1)` drops the
//! last k - 1 inputs, which is the same when k divides T. Here the shifted sequence keeps
//! them, so T need not be a multiple of k: the last short token pools real inputs only.)
//!
//! Recurrent form: the short layers take a step once every k positions, when a group starts;
//! a valley keeps the last k - 1 inputs (to pool at the next group's start) and the
//! upsampled group (its k outputs), besides its layers' states. The layers are the
//! Transformer's blocks (attention + MLP); a one-level hierarchy `N@1` is the plain
//! Transformer, parameter for parameter.

use anyhow::{bail, ensure, Context, Result as AnyResult};
use candle_core::{DType, IndexOp, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::stack::{self, Embedding, Head, Layers};
use super::{again, Backbone, MixerFn, ModelState, Parts};
use crate::complexity::{Complexity, CostShape, Review};
use crate::config::{ModelConfig, Options};
use crate::mixers::MixerState;
use crate::nn::{dropout, LayerNorm, Linear};
use crate::params::ParamBuilder;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shortening {
    /// `W [k d] -> [d]` over the k concatenated tokens (the paper's choice for text).
    Linear,
    /// The mean of the k tokens.
    Average,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upsampling {
    /// `W [d] -> [k d]`, split into k tokens.
    Linear,
    /// Each short token repeated k times.
    Repeat,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HourglassOptions {
    /// The paper's notation, e.g. `2@1 4@3 2@1`; its layers must add up to `model.depth`.
    /// Empty: `a@1 (d - 2a)@3 a@1` with `a = d / 4` for `d = model.depth` (the paper's
    /// `2@1 4@3 2@1` at depth 8, factor 3 as its text models use).
    pub hierarchy: String,
    pub shortening: Shortening,
    pub upsampling: Upsampling,
}

impl Default for HourglassOptions {
    fn default() -> Self {
        Self { hierarchy: String::new(), shortening: Shortening::Linear, upsampling: Upsampling::Linear }
    }
}

impl Options for HourglassOptions {
    fn check(&self) -> AnyResult<()> {
        if !self.hierarchy.trim().is_empty() {
            Hierarchy::parse(&self.hierarchy)?;
        }
        Ok(())
    }
}

/// One level of the hierarchy: `layers @ factor`, the factor counted from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub layers: usize,
    pub factor: usize,
}

/// The levels from the full resolution down to the shortest (the first half of the
/// palindrome, middle included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub levels: Vec<Level>,
}

impl Hierarchy {
    /// Parses `2@1 4@3 2@1`: a palindrome, factor 1 first, each factor dividing (and smaller
    /// than) the next up to the middle.
    pub fn parse(s: &str) -> AnyResult<Self> {
        let all = s
            .split_whitespace()
            .map(|item| {
                let (n, k) = item.split_once('@').with_context(|| format!("`{item}` is not LAYERS@FACTOR"))?;
                let layers = n.parse().with_context(|| format!("layer count in `{item}`"))?;
                let factor = k.parse().with_context(|| format!("shortening factor in `{item}`"))?;
                Ok(Level { layers, factor })
            })
            .collect::<AnyResult<Vec<Level>>>()
            .with_context(|| format!("hierarchy `{s}`"))?;
        ensure!(!all.is_empty(), "an empty hierarchy");
        ensure!(all.iter().eq(all.iter().rev()), "hierarchy `{s}` is not a palindrome");
        let levels = all[..all.len().div_ceil(2)].to_vec();
        ensure!(levels[0].factor == 1, "hierarchy `{s}` must start at full resolution (`N@1`)");
        for pair in levels.windows(2) {
            let (a, b) = (pair[0].factor, pair[1].factor);
            ensure!(
                b > a && b.is_multiple_of(a),
                "hierarchy `{s}`: factors must grow towards the middle, each dividing the next ({a} then {b})"
            );
        }
        Ok(Self { levels })
    }

    /// `a@1 (d - 2a)@3 a@1` with `a = d / 4`.
    pub fn for_depth(depth: usize) -> Self {
        let a = depth / 4;
        Self { levels: vec![Level { layers: a, factor: 1 }, Level { layers: depth - 2 * a, factor: 3 }] }
    }

    /// `model.options.hierarchy` of `config`, checked against `model.depth`.
    pub fn of(config: &ModelConfig) -> AnyResult<Self> {
        let o: HourglassOptions = config.options()?;
        if o.hierarchy.trim().is_empty() {
            return Ok(Self::for_depth(config.depth));
        }
        let h = Self::parse(&o.hierarchy)?;
        if h.layers() != config.depth {
            bail!(
                "hierarchy `{}` has {} layers but model.depth is {}: set model.depth={} (or leave the hierarchy empty to derive it from the depth)",
                o.hierarchy,
                h.layers(),
                config.depth,
                h.layers()
            );
        }
        Ok(h)
    }

    /// Every layer, both sides of every valley.
    pub fn layers(&self) -> usize {
        let (middle, sides) = self.levels.split_last().unwrap();
        middle.layers + 2 * sides.iter().map(|l| l.layers).sum::<usize>()
    }
}

impl std::fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.levels.len();
        let items: Vec<String> = (0..2 * n - 1)
            .map(|i| self.levels[if i < n { i } else { 2 * n - 2 - i }])
            .map(|l| format!("{}@{}", l.layers, l.factor))
            .collect();
        write!(f, "{}", items.join(" "))
    }
}

/// A valley's shortening and upsampling, at its relative factor `k`.
struct Resampling {
    k: usize,
    /// `None`: average pooling.
    pool: Option<Linear>,
    /// `None`: repeat.
    up: Option<Linear>,
    norm: LayerNorm,
}

impl Resampling {
    /// `x: [B, T, D]` after the k - 1 inputs before it (`before`, or zeros at the start):
    /// `[B, k - 1 + T, D]`, the sequence shifted right by k - 1.
    fn shifted(&self, x: &Tensor, before: Option<Tensor>) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let before = match before {
            Some(inputs) => inputs,
            None => Tensor::zeros((b, self.k - 1, d), x.dtype(), x.device())?,
        };
        Tensor::cat(&[&before, x], 1)
    }

    /// The [`Resampling::shifted`] sequence of T inputs -> `[B, ceil(T/k), D]`: group j pools
    /// inputs `j k - k + 1 ..= j k`.
    fn shorten(&self, shifted: &Tensor) -> Result<Tensor> {
        let k = self.k;
        let n = (shifted.dim(1)? + 1 - k).div_ceil(k);
        self.pool_groups(&shifted.narrow(1, 0, n * k)?.contiguous()?)
    }

    /// `groups: [B, n k, D]` (n groups of k consecutive tokens) -> `[B, n, D]`.
    fn pool_groups(&self, groups: &Tensor) -> Result<Tensor> {
        let (b, nk, d) = groups.dims3()?;
        let n = nk / self.k;
        match &self.pool {
            Some(linear) => linear.forward(&groups.reshape((b, n, self.k * d))?),
            None => groups.reshape((b, n, self.k, d))?.mean(2),
        }
    }

    /// `s: [B, n, D]` -> `[B, n k, D]`: short token j becomes positions `j k .. j k + k - 1`.
    fn upsample(&self, s: &Tensor) -> Result<Tensor> {
        let (b, n, d) = s.dims3()?;
        match &self.up {
            Some(linear) => linear.forward(s)?.reshape((b, n * self.k, d)),
            None => s.unsqueeze(2)?.broadcast_as((b, n, self.k, d))?.reshape((b, n * self.k, d)),
        }
    }
}

/// Shortening, the layers at the shorter resolution (around a deeper valley, if any),
/// upsampling, and the residual from before shortening.
struct Valley {
    resampling: Resampling,
    /// Before the deeper valley (all the layers of the innermost one).
    pre: Layers,
    inner: Option<Box<Valley>>,
    /// After the deeper valley (none in the innermost).
    post: Layers,
}

impl Valley {
    /// State entries: its own (the last k - 1 inputs, the upsampled group), then its layers'.
    fn state_len(&self) -> usize {
        1 + self.pre.state_len() + self.inner.as_ref().map_or(0, |v| v.state_len()) + self.post.state_len()
    }

    /// The layers at this valley's resolution, `s: [B, n, D]`.
    fn middle(&self, s: &Tensor, mut dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let mut s = self.pre.forward(s, again(&mut dropout))?;
        if let Some(inner) = &self.inner {
            s = inner.forward(&s, again(&mut dropout))?;
        }
        self.post.forward(&s, dropout)
    }

    /// `x: [B, T, D]` -> `x + norm(upsample(middle(shorten(x))))`.
    fn forward(&self, x: &Tensor, dropout: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let r = &self.resampling;
        let up = r.upsample(&self.middle(&r.shorten(&r.shifted(x, None)?)?, dropout)?)?.narrow(1, 0, t)?;
        x + r.norm.forward(&up)?
    }

    fn prefill(&self, x: &Tensor) -> Result<(Tensor, Vec<MixerState>)> {
        let t = x.dim(1)?;
        let r = &self.resampling;
        let shifted = r.shifted(x, None)?;
        let (s, mut pre) = self.pre.prefill(&r.shorten(&shifted)?)?;
        let (s, inner) = match &self.inner {
            Some(v) => v.prefill(&s)?,
            None => (s, vec![]),
        };
        let (s, post) = self.post.prefill(&s)?;
        let up = r.upsample(&s)?;
        let y = (x + r.norm.forward(&up.narrow(1, 0, t)?)?)?;
        // the last k - 1 inputs (zeros before the first), and the last group's k outputs
        let k = r.k;
        let recent = shifted.narrow(1, t, k - 1)?;
        let group = up.narrow(1, up.dim(1)? - k, k)?;
        let mut states = vec![MixerState { tensors: vec![recent, group], pos: t }];
        states.append(&mut pre);
        states.extend(inner);
        states.extend(post);
        Ok((y, states))
    }

    /// One position `x: [B, 1, D]`; the short layers step when a group starts.
    fn step(&self, x: &Tensor, state: &mut [MixerState]) -> Result<Tensor> {
        if state.len() != self.state_len() {
            candle_core::bail!("a valley's state of {} entries, expected {}", state.len(), self.state_len());
        }
        let (own, rest) = state.split_first_mut().unwrap();
        let (pre, rest) = rest.split_at_mut(self.pre.state_len());
        let (inner, post) = rest.split_at_mut(rest.len() - self.post.state_len());
        let r = &self.resampling;
        let window = r.shifted(x, own.tensors.first().cloned())?;
        let recent = window.narrow(1, 1, r.k - 1)?;
        let slot = own.pos % r.k;
        if slot == 0 {
            let mut s = self.pre.step(&r.pool_groups(&window)?, pre)?;
            if let Some(v) = &self.inner {
                s = v.step(&s, inner)?;
            }
            s = self.post.step(&s, post)?;
            own.tensors = vec![recent.clone(), r.upsample(&s)?];
        }
        let y = (x + r.norm.forward(&own.tensors[1].narrow(1, slot, 1)?)?)?;
        own.tensors[0] = recent;
        own.pos += 1;
        Ok(y)
    }
}

pub struct Hourglass {
    hierarchy: Hierarchy,
    context: usize,
    dropout: f64,
    embedding: Embedding,
    pre: Layers,
    valley: Option<Valley>,
    post: Layers,
    head: Head,
    compute_dtype: DType,
}

/// [`super::BackboneFn`] of `hourglass`: Transformer blocks at every level.
pub fn build(config: &ModelConfig, pb: &ParamBuilder, parts: &Parts) -> AnyResult<Box<dyn Backbone>> {
    Ok(Box::new(Hourglass::new(config, pb, crate::mixers::attention::build, parts.channel_mixer, parts.ends)?))
}

impl Hourglass {
    pub fn new(
        config: &ModelConfig,
        pb: &ParamBuilder,
        mixer: MixerFn,
        channel_mixer: MixerFn,
        ends: super::Ends,
    ) -> AnyResult<Self> {
        let hierarchy = Hierarchy::of(config)?;
        anyhow::ensure!(
            !config.shared_ffn,
            "model.shared_ffn (One Wide FFN) is an option of the default stack; `{}` does not take it",
            config.architecture
        );
        let o: HourglassOptions = config.options()?;
        let d = config.width;
        // Parameters in execution order, layers numbered through the whole model, so that a
        // one-level hierarchy creates exactly the Transformer's parameters.
        let embedding = stack::embedding(config, pb, false, ends)?;
        let mut next = 0;
        let mut layers = |n: usize| -> AnyResult<Layers> {
            let l = Layers::new(config, pb, next..next + n, mixer, channel_mixer)?;
            next += n;
            Ok(l)
        };
        let levels = &hierarchy.levels;
        let pre = layers(levels[0].layers)?;
        // the valleys, outermost first; their closing halves after the innermost
        let mut opened: Vec<(Resampling, Layers)> = Vec::new();
        for (i, pair) in levels.windows(2).enumerate() {
            let vb = pb.pp(format!("valleys.{i}"));
            let k = pair[1].factor / pair[0].factor;
            let resampling = Resampling {
                k,
                pool: match o.shortening {
                    Shortening::Linear => Some(Linear::new(&vb, "pool", k * d, d, 0.02, config.bias)?),
                    Shortening::Average => None,
                },
                up: match o.upsampling {
                    Upsampling::Linear => Some(Linear::new(&vb, "up", d, k * d, 0.02, config.bias)?),
                    Upsampling::Repeat => None,
                },
                norm: LayerNorm::new(&vb, "norm", d, config.bias)?,
            };
            opened.push((resampling, layers(pair[1].layers)?));
        }
        let mut valley: Option<Valley> = None;
        while let Some((resampling, pre)) = opened.pop() {
            let post = if valley.is_some() { layers(pre.blocks.len())? } else { Layers { blocks: vec![] } };
            valley = Some(Valley { resampling, pre, inner: valley.map(Box::new), post });
        }
        let post = if valley.is_some() { layers(levels[0].layers)? } else { Layers { blocks: vec![] } };
        let head = Head::new(pb, config.vocab, d, config.bias, config.tie_embeddings, ends)?;
        Ok(Self {
            hierarchy,
            context: config.context,
            dropout: config.dropout,
            embedding,
            pre,
            valley,
            post,
            head,
            compute_dtype: pb.dtype,
        })
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        self.embedding.forward_as(tokens, offset, self.compute_dtype)
    }

    fn hidden(&self, tokens: &Tensor, mut dropout_p: Option<(f64, &mut Rng)>) -> Result<Tensor> {
        let mut x = self.embed(tokens, 0)?;
        if let Some((p, rng)) = &mut dropout_p {
            x = dropout(&x, *p, rng)?;
        }
        x = self.pre.forward(&x, again(&mut dropout_p))?;
        if let Some(v) = &self.valley {
            x = v.forward(&x, again(&mut dropout_p))?;
        }
        self.post.forward(&x, dropout_p)
    }

    fn states(&self) -> (usize, usize, usize) {
        (self.pre.state_len(), self.valley.as_ref().map_or(0, Valley::state_len), self.post.state_len())
    }
}

impl Backbone for Hourglass {
    fn forward(&self, tokens: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let p = self.dropout;
        let x = self.hidden(tokens, dropout_rng.filter(|_| p > 0.0).map(|rng| (p, rng)))?;
        self.head.forward(&x, &self.embedding.table)
    }

    fn forward_at(&self, tokens: &Tensor, rows: &Tensor) -> Result<Tensor> {
        self.head.forward_at(&self.hidden(tokens, None)?, rows, &self.embedding.table)
    }

    fn prefill(&self, tokens: &Tensor) -> Result<(Tensor, ModelState)> {
        let (x, mut layers) = self.pre.prefill(&self.embed(tokens, 0)?)?;
        let x = match &self.valley {
            Some(v) => {
                let (y, s) = v.prefill(&x)?;
                layers.extend(s);
                y
            }
            None => x,
        };
        let (x, s) = self.post.prefill(&x)?;
        layers.extend(s);
        let mut state = ModelState { layers, pos: tokens.dim(1)?, position: None };
        state.detach();
        Ok((self.head.forward(&x, &self.embedding.table)?, state))
    }

    fn step(&self, token: &Tensor, state: &mut ModelState) -> Result<Tensor> {
        let b = token.dim(0)?;
        let x = self.embed(&token.reshape((b, 1))?, state.pos)?;
        let (n_pre, n_valley, n_post) = self.states();
        if state.layers.is_empty() {
            state.layers = vec![Default::default(); n_pre + n_valley + n_post];
        }
        let (pre, rest) = state.layers.split_at_mut(n_pre);
        let (valley, post) = rest.split_at_mut(n_valley);
        let mut x = self.pre.step(&x, pre)?;
        if let Some(v) = &self.valley {
            x = v.step(&x, valley)?;
        }
        x = self.post.step(&x, post)?;
        state.pos += 1;
        state.detach();
        self.head.forward(&x, &self.embedding.table)?.i((.., 0, ..))
    }

    fn window(&self) -> Option<usize> {
        Some(self.context)
    }

    fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }
}

/// At the bench shape: the default hierarchy of one layer is that layer at factor 3, between
/// linear pooling and linear upsampling; `CostShape` has no depth, so this is per layer at the
/// shortened resolution plus the resampling.
pub const COMPLEXITY: Complexity = Complexity {
    review: Review::NO_LINE,
    true_time: "O(L_k (T/k)^2 d + L_k (T/k) d^2) per shortened level (k its factor) + the same at full resolution for its layers",
    true_space: "O(T d) with fused attention; O(h (T/k)^2) per shortened layer naive",
    flops: |s: &CostShape| {
        let (b, t, d) = (s.batch as f64, s.seq as f64, s.width as f64);
        let n = t / 3.0;
        // one attention + MLP layer on T/3 tokens, pooling (3d -> d) and upsampling (d -> 3d)
        b * (24.0 * n * d * d + 4.0 * n * n * d + 12.0 * n * d * d)
    },
    memory: |s: &CostShape| {
        let (b, t, d, h) = (s.batch as f64, s.seq as f64, s.width as f64, s.heads as f64);
        let n = t / 3.0;
        b * (h * n * n + 12.0 * t * d)
    },
    state: |s: &CostShape| 2.0 * (s.batch * s.seq * s.width) as f64 / 3.0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::testing::{self, random_tokens, tiny_config};
    use candle_core::Device;

    #[test]
    fn hierarchies_parse_and_print_in_the_papers_notation() -> AnyResult<()> {
        let h = Hierarchy::parse("2@1 4@3 2@1")?;
        assert_eq!(h.levels, vec![Level { layers: 2, factor: 1 }, Level { layers: 4, factor: 3 }]);
        assert_eq!((h.layers(), h.to_string()), (8, "2@1 4@3 2@1".to_string()));
        let nested = Hierarchy::parse("1@1 2@2 3@6 2@2 1@1")?;
        assert_eq!((nested.layers(), nested.levels.len()), (9, 3));
        assert_eq!(Hierarchy::for_depth(8), h);
        assert_eq!(Hierarchy::for_depth(1).to_string(), "0@1 1@3 0@1");
        for bad in ["2@1 4@3", "2@2 4@4 2@2", "1@1 2@3 2@4 2@3 1@1", "1@1 2@2 2@3 2@2 1@1", "2@1 x@3 2@1", ""] {
            assert!(Hierarchy::parse(bad).is_err(), "`{bad}` accepted");
        }
        let err = Model::new(
            &tiny_config("hourglass", &["model.options.hierarchy=1@1 1@2 1@1"])?,
            0,
            &Device::Cpu,
            DType::F32,
        )
        .err()
        .expect("a hierarchy of 3 layers at depth 2 was accepted");
        assert!(format!("{err:#}").contains("model.depth is 2"), "{err:#}");
        let shared = Model::new(&tiny_config("hourglass", &["model.shared_ffn=true"])?, 0, &Device::Cpu, DType::F32);
        assert!(format!("{:#}", shared.err().expect("a shared FFN was accepted")).contains("does not take it"));
        Ok(())
    }

    /// A one-level hierarchy builds the Transformer's parameters in the Transformer's order:
    /// the same seed gives the same logits, bit for bit.
    #[test]
    fn a_single_level_is_the_transformer() -> AnyResult<()> {
        let hourglass = tiny_config("hourglass", &["model.options.hierarchy=2@1"])?;
        let transformer = tiny_config("transformer", &[])?;
        let a = Model::new(&hourglass, 3, &Device::Cpu, DType::F32)?;
        let b = Model::new(&transformer, 3, &Device::Cpu, DType::F32)?;
        assert_eq!(a.num_params(), b.num_params());
        let tokens = random_tokens(2, 11, 256, 1)?;
        let diff = (a.forward(&tokens, None)? - b.forward(&tokens, None)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    /// Exact causality and recurrent = parallel for every shortening and upsampling, factors
    /// 2, 3 and 4, lengths that are not multiples of them, one valley and two nested ones.
    #[test]
    fn every_resampling_is_causal_and_its_forms_agree() -> AnyResult<()> {
        for hierarchy in ["1@1 1@2 1@1", "1@1 1@3 1@1", "0@1 2@4 0@1", "1@1 1@2 1@6 1@2 1@1"] {
            for shortening in ["linear", "average"] {
                for upsampling in ["linear", "repeat"] {
                    let depth = Hierarchy::parse(hierarchy)?.layers();
                    let cfg = tiny_config(
                        "hourglass",
                        &[
                            &format!("model.depth={depth}"),
                            &format!("model.options.hierarchy={hierarchy}"),
                            &format!("model.options.shortening={shortening}"),
                            &format!("model.options.upsampling={upsampling}"),
                        ],
                    )?;
                    let what = format!("{hierarchy}, {shortening} pooling, {upsampling} upsampling");
                    let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
                    testing::perturb(&model, 0.05, 2)?;
                    let tokens = random_tokens(2, 17, cfg.vocab, 4)?;
                    testing::assert_causal_tokens(&model, &tokens, 0.0).map_err(|e| e.context(what.clone()))?;
                    testing::assert_modes_agree(&model, &tokens, &[0, 1, 5, 12]).map_err(|e| e.context(what))?;
                }
            }
        }
        Ok(())
    }

    /// The short layers see one token per group: changing the input at a group's first
    /// position changes the short token and so every later output, yet not the outputs
    /// before it (the shift's whole point). A shift of k - 2 would let position j k - 1 see
    /// input j k; the causality test above fails for it.
    #[test]
    fn shortening_pools_the_k_inputs_ending_at_each_groups_start() -> AnyResult<()> {
        let r = Resampling {
            k: 3,
            pool: None,
            up: None,
            norm: LayerNorm::new(&ParamBuilder::new(0, &Device::Cpu, DType::F32), "n", 1, false)?,
        };
        let x = Tensor::new(&[1f32, 2., 3., 4., 5., 6., 7.], &Device::Cpu)?.reshape((1, 7, 1))?;
        let s: Vec<f32> = r.shorten(&r.shifted(&x, None)?)?.flatten_all()?.to_vec1()?;
        // groups: (0, 0, x0), (x1, x2, x3), (x4, x5, x6)
        assert_eq!(s, vec![1.0 / 3.0, 3.0, 6.0]);
        Ok(())
    }
}
