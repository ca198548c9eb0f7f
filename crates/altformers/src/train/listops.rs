//! Training a model on ListOps (LRA's long-range classification task): the one training step
//! ([`super::step::Trainer`]) on the [`ListOps`] task, a causal model read at its last
//! position, an encoder pooled ([`Readout`]); validation loss and accuracy on fixed examples
//! at every evaluation, test accuracy at the end.
//!
//! The run folder: `config.json` (the [`RunConfig`]), `listops.json` (the [`ListOpsSettings`]),
//! `metrics.jsonl` (one [`ListOpsMetrics`] per evaluation), `model.safetensors` (the final
//! weights) and `result.json` (the [`ListOpsSummary`] without its history). No checkpoints:
//! these runs are short.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

use super::step::Trainer;
use super::task::{ListOps, Readout};
use super::TrainOptions;
use crate::config::{Overrides, RunConfig};
use crate::data::listops::{ListOpsConfig, Split};

/// The task's settings (`[listops]` in a configuration file, `--set listops.KEY=VALUE`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOpsSettings {
    /// The generator: depth, arguments, lengths, seed (LRA's by default: 500 to 2000 tokens).
    pub generator: ListOpsConfig,
    /// The training set: the first N examples of the training split (LRA: 96K).
    pub train_examples: u64,
    /// Validation and test examples scored (the first N of each split; LRA: 2K).
    pub eval_examples: u64,
}

impl Default for ListOpsSettings {
    fn default() -> Self {
        Self { generator: ListOpsConfig::default(), train_examples: 96_000, eval_examples: 2_000 }
    }
}

impl ListOpsSettings {
    /// The defaults with `over`'s `[listops]` tables and `listops.*` lines laid on them (taken
    /// out of `over`, which keeps the run configuration's).
    pub fn take_from(over: &mut Overrides) -> Result<Self> {
        let settings: Self = crate::config::layered(&Self::default(), &over.take_section("listops"))
            .context("in the [listops] settings")?;
        settings.generator.validate()?;
        ensure!(
            settings.train_examples > 0 && settings.eval_examples > 0,
            "listops.train_examples and listops.eval_examples must be positive"
        );
        Ok(settings)
    }

    /// Whether `config`'s model can read every example: its context holds the longest.
    pub fn check(&self, config: &RunConfig) -> Result<()> {
        self.generator.validate()?;
        let longest = self.generator.max_len - 1;
        if config.model.context < longest {
            bail!(
                "model.context ({}) is shorter than the longest ListOps example (listops.generator.max_len - 1 = {longest}): raise model.context or lower the maximum length",
                config.model.context
            );
        }
        Ok(())
    }
}

/// One evaluation, one line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListOpsMetrics {
    pub step: usize,
    /// The last training step's loss (nats; with dropout where the model has any).
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub elapsed_s: f64,
    pub lr: f64,
}

/// A finished ListOps run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListOpsSummary {
    pub model: String,
    /// `last-position` (causal) or `mean-pool` (encoder).
    pub readout: String,
    pub params: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub elapsed_s: f64,
    #[serde(skip)]
    pub history: Vec<ListOpsMetrics>,
}

/// Trains `config` on ListOps with `settings`, writing the run folder `opts.out` (refused if
/// it already holds a run).
pub fn train_listops(config: &RunConfig, settings: &ListOpsSettings, opts: &TrainOptions) -> Result<ListOpsSummary> {
    config.validate()?;
    settings.check(config)?;
    ensure!(!opts.resume, "ListOps runs are short and keep no checkpoint: --resume is not supported");
    ensure!(
        config.train.accumulate == 1,
        "train.accumulate = {}: gradient accumulation splits the language-model task only (ListOps scores one position per example)",
        config.train.accumulate
    );
    let out = &opts.out;
    let _lock = super::lock::RunLock::acquire(out)?;
    if out.join("config.json").exists() {
        bail!("{} already holds a run; choose another --out", out.display());
    }
    crate::util::write_json_atomic(&out.join("config.json"), config)?;
    crate::util::write_json_atomic(&out.join("listops.json"), settings)?;

    let (m, t) = (&config.model, &config.train);
    let model = super::fresh_model(config, opts)?;
    let readout = Readout::of(&model);
    let split = |split, examples| ListOps { config: settings.generator, split, examples, readout };
    let train_task = split(Split::Train, settings.train_examples);
    let mut trainer = Trainer::new(&model, t)?;
    if opts.verbose {
        eprintln!(
            "training {} ({} parameters, {readout:?}) on ListOps ({} training examples of {} to {} tokens) for {} steps of {}",
            m.architecture,
            crate::util::human(model.num_params() as f64),
            settings.train_examples,
            settings.generator.min_len + 1,
            settings.generator.max_len - 1,
            t.steps,
            t.batch_size
        );
    }
    let started = Instant::now();
    let mut history = Vec::new();
    let mut lines = String::new();
    for step in 0..t.steps {
        let lr = trainer.learning_rate(step);
        let done = step + 1;
        let evaluate = done.is_multiple_of(t.eval_every) || done == t.steps;
        trainer.step(&model, &train_task, step).and_then(|_| trainer.settle_if_due(evaluate))?;
        if evaluate {
            let (val_loss, val_accuracy) =
                split(Split::Validation, 1).evaluate(&model, settings.eval_examples, t.batch_size)?;
            ensure!(val_loss.is_finite(), "the validation loss is {val_loss} after step {done}: the run diverged");
            let metrics = ListOpsMetrics {
                step: done,
                train_loss: trainer.last_loss(),
                val_loss,
                val_accuracy,
                elapsed_s: started.elapsed().as_secs_f64(),
                lr,
            };
            if opts.verbose {
                eprintln!(
                    "step {done:>6}  train loss {:.4}  val loss {val_loss:.4}  val accuracy {val_accuracy:.4}  {:.1}s",
                    metrics.train_loss, metrics.elapsed_s
                );
            }
            lines += &(serde_json::to_string(&metrics)? + "\n");
            crate::util::write_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
            history.push(metrics);
        }
    }
    model.params.save(&out.join("model.safetensors"))?;
    let (_, test_accuracy) = split(Split::Test, 1).evaluate(&model, settings.eval_examples, t.batch_size)?;
    let last = history.last().context("no evaluation was run")?;
    let summary = ListOpsSummary {
        model: m.architecture.clone(),
        readout: match readout {
            Readout::LastPosition => "last-position",
            Readout::MeanPool => "mean-pool",
        }
        .into(),
        params: model.num_params(),
        steps: t.steps,
        train_loss: last.train_loss,
        val_accuracy: last.val_accuracy,
        test_accuracy,
        elapsed_s: started.elapsed().as_secs_f64(),
        history: history.clone(),
    };
    crate::util::write_json_atomic(&out.join("result.json"), &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `[listops]` tables and `listops.*` lines become the settings and leave the run
    /// configuration's alone; an unknown key is named; a context too short is refused.
    #[test]
    fn settings_are_taken_from_the_overrides() -> Result<()> {
        let file: toml::Value = toml::from_str("[model]\nwidth = 32\n[listops]\ntrain_examples = 10\n")?;
        let sets = ["listops.generator.max_len=100", "listops.generator.min_len=5", "model.depth=1"];
        let mut over = Overrides { tables: vec![file], sets: sets.iter().map(|s| s.to_string()).collect() };
        let s = ListOpsSettings::take_from(&mut over)?;
        assert_eq!((s.train_examples, s.generator.max_len, s.eval_examples), (10, 100, 2000));
        assert_eq!(over.sets, ["model.depth=1"]);
        let cfg = crate::registry::config("transformer-encoder", &over)?;
        assert_eq!((cfg.model.width, cfg.model.depth), (32, 1));
        let err = s.check(&cfg).unwrap_err().to_string();
        assert!(err.contains("model.context (64)") && err.contains("99"), "{err}");
        let mut bad = Overrides::sets(&["listops.generator.max_length=3"]);
        let err = format!("{:#}", ListOpsSettings::take_from(&mut bad).unwrap_err());
        assert!(err.contains("generator.max_length") && err.contains("[listops]"), "{err}");
        Ok(())
    }

    /// A tiny run writes its folder and scores validation and test examples.
    #[test]
    fn a_tiny_run_trains_and_scores() -> Result<()> {
        let settings = ListOpsSettings {
            generator: ListOpsConfig { min_len: 5, max_len: 20, ..Default::default() },
            train_examples: 16,
            eval_examples: 8,
        };
        let over = Overrides::sets(&[
            "model.width=16",
            "model.depth=1",
            "model.heads=2",
            "model.context=24",
            "train.steps=4",
            "train.batch_size=4",
            "train.eval_every=2",
            "train.warmup_steps=1",
        ]);
        let cfg = crate::registry::config("m2-bert", &over)?;
        let dir = crate::testing::fresh_dir("listops-run")?;
        let opts = TrainOptions::fresh(dir.clone(), &Device::Cpu, false);
        let s = train_listops(&cfg, &settings, &opts)?;
        assert_eq!((s.history.len(), s.readout.as_str(), s.steps), (2, "mean-pool", 4));
        assert!((0.0..=1.0).contains(&s.test_accuracy) && s.train_loss.is_finite());
        for f in ["config.json", "listops.json", "metrics.jsonl", "model.safetensors", "result.json"] {
            assert!(dir.join(f).exists(), "{f}");
        }
        assert!(train_listops(&cfg, &settings, &opts).is_err(), "a second run into the same folder");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
