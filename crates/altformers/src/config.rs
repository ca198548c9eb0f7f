//! Run configuration: model shape and training hyperparameters, from defaults, a TOML file
//! and `--set key=value` overrides. Every key must already exist in the defaults, so a typo
//! is an error that names the key, never a silently ignored setting.
//!
//! This module is data only: the defaults of each architecture (its typed options, the
//! changes its paper makes to the common shape) come from the registry, which calls
//! [`RunConfig::layered`] with them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// No positional signal beyond causality (fine for recurrent mixers).
    None,
    /// Learned absolute position embeddings added to the token embeddings (GPT-2).
    Learned,
    /// Rotary embeddings applied to queries and keys inside attention (RoFormer).
    Rope,
}

/// An architecture's own settings (`model.options.*`): a serde struct whose `Default` gives
/// the defaults (the registry writes them into every new configuration), that refuses
/// unknown keys (`#[serde(deny_unknown_fields)]`) and checks its values in [`Options::check`].
pub trait Options: Serialize + serde::de::DeserializeOwned + Default {
    /// Values the type cannot rule out (a zero chunk, an even filter width...).
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// For architectures without options of their own.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

impl Options for NoOptions {}

/// The model's shape. `architecture` names a registry entry; `options` holds that
/// architecture's own settings (its [`Options`] type, checked when the model is built).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The registry entry (`--model`); earlier run folders call it `mixer`.
    #[serde(alias = "mixer")]
    pub architecture: String,
    pub vocab: usize,
    pub width: usize,
    pub depth: usize,
    /// Training context in tokens.
    pub context: usize,
    pub heads: usize,
    /// Key/value heads for attention: 1 = multi-query, `heads` = multi-head, between =
    /// grouped-query. 0 means "same as heads".
    pub kv_heads: usize,
    pub position: Position,
    pub rope_base: f64,
    /// A channel-mixer registry entry (`mlp`, `swiglu`, `rwkv`, `monarch`; `altformers models`
    /// lists them).
    pub channel_mixer: String,
    /// Hidden width of the channel mixer as a multiple of `width` (per block: a shared one,
    /// `shared_ffn`, gets `depth` times it).
    pub ffn_mult: f64,
    /// One Wide FFN (2309.01826): one channel mixer shared by every block, `depth` times as
    /// wide, so it holds the parameters of the `depth` mixers it replaces. Absent from configs
    /// saved before it existed, which read as `false`.
    #[serde(default)]
    pub shared_ffn: bool,
    /// Biases in linear layers and layer norms.
    pub bias: bool,
    pub dropout: f64,
    /// Share the embedding matrix with the output head (GPT-2, nanoGPT).
    pub tie_embeddings: bool,
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            architecture: "transformer".into(),
            vocab: 256,
            width: 128,
            depth: 4,
            context: 64,
            heads: 4,
            kv_heads: 0,
            position: Position::Learned,
            rope_base: 10000.0,
            channel_mixer: "mlp".into(),
            ffn_mult: 4.0,
            shared_ffn: false,
            bias: false,
            dropout: 0.0,
            tie_embeddings: true,
            options: Default::default(),
        }
    }
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        if self.kv_heads == 0 {
            self.heads
        } else {
            self.kv_heads
        }
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// Checks what every model needs; mixers check their own options when built.
    pub fn validate(&self) -> Result<()> {
        let w = self.width;
        for (key, value) in [
            ("model.vocab", self.vocab),
            ("model.width", w),
            ("model.depth", self.depth),
            ("model.context", self.context),
            ("model.heads", self.heads),
        ] {
            at_least_one(key, value)?;
        }
        if !w.is_multiple_of(self.heads) {
            bail!("model.heads ({}) does not divide model.width ({w})", self.heads);
        }
        if !self.heads.is_multiple_of(self.kv_heads()) {
            bail!("model.kv_heads ({}) does not divide model.heads ({})", self.kv_heads, self.heads);
        }
        if self.position == Position::Rope && !self.head_dim().is_multiple_of(2) {
            bail!("RoPE needs an even head dimension; model.width / model.heads = {}", self.head_dim());
        }
        in_unit_interval("model.dropout", self.dropout)?;
        finite_positive("model.ffn_mult", self.ffn_mult)?;
        // RoPE's (and RetNet's) angles are positions times base^(-2i/d): a base of 0, below 0
        // or not finite makes them NaN, which surfaces only as a diverged first step
        finite_positive("model.rope_base", self.rope_base)?;
        Ok(())
    }

    /// The architecture's options as its own type, checked (unknown keys are errors).
    pub fn options<T: Options>(&self) -> Result<T> {
        // TOML has no null: a null here is a NaN or an infinity that the JSON table could not
        // hold (serde would say only "invalid type: null, expected f64")
        if let Some((key, _)) = self.options.iter().find(|(_, v)| v.is_null()) {
            bail!("model.options.{key} must be a finite number, got NaN or an infinity");
        }
        let o: T = serde_json::from_value(serde_json::Value::Object(self.options.clone()))
            .with_context(|| format!("invalid model.options for `{}`", self.architecture))?;
        o.check().with_context(|| format!("invalid model.options for `{}`", self.architecture))?;
        Ok(o)
    }

    /// Replaces the options with `o` (checked).
    pub fn set_options<T: Options>(&mut self, o: &T) -> Result<()> {
        o.check()?;
        self.options = match serde_json::to_value(o)? {
            serde_json::Value::Object(m) => m,
            other => bail!("options must serialise to a table, got {other}"),
        };
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Rows of every step's batch, over all workers together.
    pub batch_size: usize,
    /// Gradient accumulation: each worker scores its rows of the batch in this many equal
    /// micro-batches, one after another, and sums their gradients before the exchange and the
    /// update (nanoGPT's `gradient_accumulation_steps`). The step is the same (up to the order
    /// of floating-point sums); the activations held are a micro-batch's. May change on
    /// `--resume` (`--set train.accumulate=K`), e.g. to resume on fewer GPUs.
    #[serde(default = "one")]
    pub accumulate: usize,
    pub steps: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Floor of the cosine decay, reached at `decay_steps`.
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub decay_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW) on matrices only.
    pub weight_decay: f64,
    /// Decay the embedding tables too (nanoGPT's grouping: every 2-D parameter). Off by
    /// default: the usual grouping leaves embeddings, norms and biases alone.
    #[serde(default)]
    pub decay_embeddings: bool,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f64,
    /// L2Wrap, the official RWKV trainers' push of each position's largest logit towards 0
    /// (gradient only; the reported loss is the cross-entropy alone): `on`, `off`, or `auto`
    /// (the default), the architecture's (on for `rwkv4`, as its official trainer; off for
    /// the others).
    #[serde(default)]
    pub l2wrap: L2Wrap,
    pub eval_every: usize,
    /// Validation batches averaged per evaluation (always the same batches).
    pub eval_batches: usize,
    pub seed: u64,
}

/// `train.l2wrap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L2Wrap {
    /// The architecture's default (the registry's `l2wrap`).
    #[default]
    Auto,
    On,
    Off,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 12,
            accumulate: 1,
            steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 2000,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            grad_clip: 1.0,
            l2wrap: L2Wrap::Auto,
            eval_every: 250,
            eval_batches: 20,
            seed: 1337,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("train.batch_size", self.batch_size),
            ("train.accumulate", self.accumulate),
            ("train.steps", self.steps),
            ("train.eval_every", self.eval_every),
            ("train.eval_batches", self.eval_batches),
        ] {
            at_least_one(key, value)?;
        }
        if !self.batch_size.is_multiple_of(self.accumulate) {
            bail!(
                "train.batch_size {} cannot be cut into train.accumulate = {} equal micro-batches",
                self.batch_size,
                self.accumulate
            );
        }
        // NaN compares false both ways: every float check starts with `is_finite`
        if !self.lr.is_finite()
            || self.lr <= 0.0
            || !self.min_lr.is_finite()
            || self.min_lr < 0.0
            || self.min_lr > self.lr
        {
            bail!(
                "need 0 <= train.min_lr <= train.lr and train.lr > 0, both finite (got lr {:?}, min_lr {:?})",
                self.lr,
                self.min_lr
            );
        }
        in_unit_interval("train.beta1", self.beta1)?;
        in_unit_interval("train.beta2", self.beta2)?;
        finite_non_negative("train.grad_clip", self.grad_clip)?;
        finite_non_negative("train.weight_decay", self.weight_decay)?;
        // Adam's epsilon keeps the update finite where a second moment is 0 (PyTorch refuses
        // a negative one; 0 would divide 0 by 0 for a parameter with no gradient yet)
        finite_positive("train.eps (AdamW's epsilon)", self.eps)
    }
}

fn one() -> usize {
    1
}

// The checks of one value, each naming its key and the value given. Floats print with `{:?}`
// so that 1e300 reads as such, not as 301 digits.

fn at_least_one(key: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{key} must be at least 1, got 0");
    }
    Ok(())
}

/// NaN fails every comparison, so `contains` refuses it too.
fn in_unit_interval(key: &str, value: f64) -> Result<()> {
    if !(0.0..1.0).contains(&value) {
        bail!("{key} must be in [0, 1), got {value:?}");
    }
    Ok(())
}

fn finite_positive(key: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value <= 0.0 {
        bail!("{key} must be finite and positive, got {value:?}");
    }
    Ok(())
}

fn finite_non_negative(key: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        bail!("{key} must be finite and non-negative, got {value:?}");
    }
    Ok(())
}

/// Everything a run needs to be reproduced; saved as `config.json` in the run folder.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
}

/// Settings laid over the defaults: a configuration file's tables, then `--set key=value`
/// lines (the one place settings arrive as strings).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// TOML tables (`[model]`, `[train]`), applied in order.
    pub tables: Vec<toml::Value>,
    pub sets: Vec<String>,
}

impl Overrides {
    /// `--set` lines only.
    pub fn sets(sets: &[impl ToString]) -> Self {
        Self { tables: vec![], sets: sets.iter().map(|s| s.to_string()).collect() }
    }

    /// A configuration file (optional) and `--set` lines, as on the command line.
    pub fn from_cli(file: Option<&std::path::Path>, sets: &[String]) -> Result<Self> {
        let mut tables = Vec::new();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
            let value: toml::Value =
                toml::from_str(&text).with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            tables.push(value);
        }
        Ok(Self { tables, sets: sets.to_vec() })
    }
}

impl Overrides {
    /// These overrides without `model.options.*` (the `--set` lines and every table's
    /// `[model.options]`): an architecture's own options mean nothing to another (`params
    /// --matching` lays the rest on the reference model).
    pub fn without_model_options(&self) -> Overrides {
        let mut tables = self.tables.clone();
        for table in &mut tables {
            if let Some(model) = table.get_mut("model").and_then(|m| m.as_table_mut()) {
                model.remove("options");
            }
        }
        let sets = self.sets.iter().filter(|s| !s.trim_start().starts_with("model.options.")).cloned().collect();
        Overrides { tables, sets }
    }

    /// Takes the settings of `section` out: every table's `[section]` and the `--set
    /// section.key=value` lines, as overrides of their own with keys relative to the section
    /// (a task's settings kept beside, not inside, a run configuration).
    pub fn take_section(&mut self, section: &str) -> Overrides {
        let mut taken = Overrides::default();
        for table in &mut self.tables {
            if let Some(inner) = table.as_table_mut().and_then(|t| t.remove(section)) {
                taken.tables.push(inner);
            }
        }
        let prefix = format!("{section}.");
        let (inside, rest): (Vec<String>, Vec<String>) = self.sets.drain(..).partition(|s| s.starts_with(&prefix));
        self.sets = rest;
        taken.sets = inside.into_iter().map(|s| s[prefix.len()..].to_string()).collect();
        taken
    }
}

/// `defaults`, then `over`'s tables, then its `key=value` lines; every key must exist in the
/// defaults (a typo is an error naming the key).
pub fn layered<T: Serialize + serde::de::DeserializeOwned>(defaults: &T, over: &Overrides) -> Result<T> {
    let mut value = toml::Value::try_from(defaults).context("serializing defaults")?;
    for table in &over.tables {
        merge(&mut value, table, "")?;
    }
    for set in &over.sets {
        let (key, raw) = set.split_once('=').with_context(|| format!("--set expects key=value, got `{set}`"))?;
        let parsed = parse_value(raw.trim());
        set_path(&mut value, key.trim(), parsed)?;
    }
    value.try_into().context("invalid configuration")
}

impl RunConfig {
    /// `defaults` (an architecture's, from the registry), then `over`'s tables, then its
    /// `key=value` lines; every key must exist in the defaults.
    pub fn layered(defaults: &RunConfig, over: &Overrides) -> Result<Self> {
        let config: RunConfig = layered(defaults, over)?;
        if config.model.architecture != defaults.model.architecture {
            bail!("model.architecture is chosen by --model (`{}`), not by the config", defaults.model.architecture);
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()
    }

    /// A configuration saved by this or an earlier version (a run folder's `config.json`).
    /// Earlier versions called the architecture `model.mixer` (read as an alias) and kept
    /// RWKV-4's `ln0` switch as `model.embed_norm`, now `model.options.embed_norm` of `rwkv4`;
    /// a saved `embed_norm = true` for another architecture cannot be honoured and is an error.
    pub fn from_saved(mut value: serde_json::Value) -> Result<Self> {
        if let Some(model) = value.get_mut("model").and_then(|m| m.as_object_mut()) {
            if let Some(embed_norm) = model.remove("embed_norm") {
                let arch = model.get("architecture").or(model.get("mixer")).and_then(|a| a.as_str()).unwrap_or("");
                match (arch, embed_norm.as_bool()) {
                    ("rwkv4", Some(on)) => {
                        if let Some(options) = model.get_mut("options").and_then(|o| o.as_object_mut()) {
                            options.entry("embed_norm").or_insert(serde_json::Value::Bool(on));
                        }
                    }
                    (_, Some(false)) => {}
                    _ => bail!("model.embed_norm = {embed_norm} is no longer a setting of `{arch}` (only RWKV-4 has ln0, as model.options.embed_norm)"),
                }
            }
        }
        let config: RunConfig = serde_json::from_value(value).context("not a configuration of this version")?;
        config.validate()?;
        Ok(config)
    }
}

/// A `--set` value: TOML literal if it parses (numbers, booleans, quoted strings, arrays),
/// otherwise the raw text as a string (so `model.position=rope` works unquoted).
fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn merge(base: &mut toml::Value, over: &toml::Value, path: &str) -> Result<()> {
    let (Some(base_t), Some(over_t)) = (base.as_table_mut(), over.as_table()) else {
        *base = over.clone();
        return Ok(());
    };
    for (k, v) in over_t {
        let full = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        match base_t.get_mut(k) {
            None => bail!("unknown config key `{full}`"),
            Some(slot) if slot.is_table() && v.is_table() => merge(slot, v, &full)?,
            Some(slot) if slot.is_table() => bail!(
                "config key `{full}` is a section of settings (`[{full}]` in a file, or `--set {full}.KEY=VALUE`), not one value (got {} `{v}`)",
                v.type_str()
            ),
            Some(slot) => *slot = coerce(slot, v.clone()),
        }
    }
    Ok(())
}

fn set_path(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = node.as_table_mut().with_context(|| format!("unknown config key `{key}`"))?;
        let Some(next) = table.get_mut(*part) else { bail!("unknown config key `{key}`") };
        if i + 1 == parts.len() {
            if next.is_table() {
                bail!("config key `{key}` is a section; set one of its fields");
            }
            *next = coerce(next, value);
            return Ok(());
        }
        node = next;
    }
    unreachable!()
}

/// `lr = 1` in a file means 1.0 where the default is a float.
fn coerce(slot: &toml::Value, v: toml::Value) -> toml::Value {
    match (slot, &v) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(*i as f64),
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config.json written before the redesign (`model.mixer`, `model.embed_norm`) reads:
    /// RWKV-4's ln0 switch lands in its options; another architecture's `false` is dropped,
    /// its `true` refused with a message naming the setting.
    #[test]
    fn configs_saved_by_earlier_versions_read() -> Result<()> {
        let saved = |arch: &str, embed_norm: bool, options: serde_json::Value| {
            let mut v = serde_json::to_value(RunConfig::default()).unwrap();
            let m = v["model"].as_object_mut().unwrap();
            m.remove("architecture");
            m.insert("mixer".into(), arch.into());
            m.insert("embed_norm".into(), embed_norm.into());
            m.insert("options".into(), options);
            v
        };
        let rwkv = RunConfig::from_saved(saved("rwkv4", true, serde_json::json!({ "chunk": 32, "init": "paper" })))?;
        assert_eq!(rwkv.model.architecture, "rwkv4");
        assert_eq!(rwkv.model.options["embed_norm"], serde_json::Value::Bool(true));
        let gpt = RunConfig::from_saved(saved("transformer", false, serde_json::json!({})))?;
        assert!(gpt.model.options.is_empty());
        let err = RunConfig::from_saved(saved("transformer", true, serde_json::json!({}))).unwrap_err().to_string();
        assert!(err.contains("model.embed_norm"), "{err}");
        Ok(())
    }

    /// A section given a value (`model = 5` in a file) is refused naming the section and how
    /// to set its fields, not with serde's "expected struct ModelConfig".
    #[test]
    fn a_section_given_a_value_is_a_clear_error() {
        let file: toml::Value = toml::from_str("model = 5").unwrap();
        let over = Overrides { tables: vec![file], sets: vec![] };
        let err = layered(&RunConfig::default(), &over).map(|_: RunConfig| ()).unwrap_err().to_string();
        assert!(err.contains("`model` is a section") && err.contains("integer"), "{err}");
    }

    /// AdamW's epsilon must be positive (the tree's only epsilon setting: the layer norms'
    /// is fixed).
    #[test]
    fn a_non_positive_adam_epsilon_is_refused() {
        for eps in [-1e-8, 0.0, f64::NAN] {
            let t = TrainConfig { eps, ..TrainConfig::default() };
            let err = t.validate().unwrap_err().to_string();
            assert!(err.contains("train.eps"), "{err}");
        }
        assert!(TrainConfig::default().validate().is_ok());
    }

    /// A bad value is refused naming its key and the value given: zero sizes, NaN, infinite
    /// and out-of-range floats, and RoPE's base (NaN angles, seen before only as a run that
    /// diverged at its first step).
    #[test]
    fn a_bad_value_is_refused_naming_its_key_and_value() {
        for (set, needle) in [
            ("model.width=0", "model.width must be at least 1, got 0"),
            ("model.context=0", "model.context must be at least 1, got 0"),
            ("train.eval_batches=0", "train.eval_batches must be at least 1, got 0"),
            ("model.rope_base=0", "model.rope_base must be finite and positive, got 0.0"),
            ("model.rope_base=-1", "model.rope_base must be finite and positive, got -1.0"),
            ("model.rope_base=nan", "model.rope_base must be finite and positive, got NaN"),
            ("model.ffn_mult=inf", "model.ffn_mult must be finite and positive, got inf"),
            ("model.dropout=1e300", "model.dropout must be in [0, 1), got 1e300"),
            ("train.beta2=nan", "train.beta2 must be in [0, 1), got NaN"),
            ("train.weight_decay=-1", "train.weight_decay must be finite and non-negative, got -1.0"),
            ("train.min_lr=1e300", "min_lr 1e300"),
        ] {
            let err = RunConfig::layered(&RunConfig::default(), &Overrides::sets(&[set])).unwrap_err().to_string();
            assert!(err.contains(needle), "{set}: expected `{needle}` in: {err}");
        }
    }

    /// An option given NaN or an infinity is named, not reported as serde's "invalid type:
    /// null" (the options table is JSON, which has no NaN).
    #[test]
    fn a_non_finite_option_is_named() {
        let mut defaults = RunConfig::default();
        defaults.model.options.insert("rate".into(), serde_json::json!(1.5));
        for v in ["nan", "inf", "-inf"] {
            let cfg = RunConfig::layered(&defaults, &Overrides::sets(&[format!("model.options.rate={v}")])).unwrap();
            let err = cfg.model.options::<NoOptions>().unwrap_err().to_string();
            assert!(err.contains("model.options.rate must be a finite number"), "{v}: {err}");
        }
    }

    /// `params --matching` lays a model's settings on the reference too, but not its own
    /// options (the reference would refuse them as unknown keys).
    #[test]
    fn model_options_can_be_left_out_of_overrides() {
        let file: toml::Value = toml::from_str("[model]\nwidth = 96\n[model.options]\norder = 3\n").unwrap();
        let over =
            Overrides { tables: vec![file], sets: vec!["model.options.filter_width=8".into(), "model.depth=3".into()] };
        let rest = over.without_model_options();
        assert_eq!(rest.sets, vec!["model.depth=3".to_string()]);
        let cfg: RunConfig = layered(&RunConfig::default(), &rest).unwrap();
        assert_eq!((cfg.model.width, cfg.model.depth), (96, 3));
        // with the options the reference (no options of its own) refuses them
        assert!(layered::<RunConfig>(&RunConfig::default(), &over).is_err());
    }
}
