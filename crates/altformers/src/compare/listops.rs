//! The ListOps part of a comparison: every model of the registry, causal ones read at their
//! last position and encoders pooled, trained on LRA's ListOps with one budget, each at the
//! Transformer's parameter count ([`super::match_params`], not counting length-bound parameters
//! such as Linformer's `E, F`: [`Counted::WidthBound`]), scored on validation and test
//! examples: `listops.jsonl` and the report's classification table.

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::{counted_params, layered_config, length_bound_params, match_params, Counted};

use crate::registry::{self, Architecture};
use crate::results::{write_lines, ListOpsRow};
use crate::train::listops::{train_listops, ListOpsSettings};
use crate::train::TrainOptions;

/// A preset's `[listops]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOpsPart {
    /// Laid over every model's defaults as a configuration file's `[model]` table is.
    #[serde(default)]
    pub model: toml::Table,
    /// Likewise the `[train]` table.
    #[serde(default)]
    pub train: toml::Table,
    /// Every model's width is solved so its parameters match the Transformer's at this width.
    pub reference_width: usize,
    /// The generator and the numbers of examples.
    pub task: ListOpsSettings,
    /// A model's own settings laid over `model` for it alone (`[listops.per_model.NAME]`,
    /// e.g. M2's `options.filter_width`, whose filter networks do not shrink with the width
    /// and at small budgets would take the parameters the width needs).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub per_model: std::collections::BTreeMap<String, toml::Table>,
    /// The activations' dtype (`f32`, or `bf16` for mixed precision on a GPU; parameters and
    /// optimizer state stay f32).
    #[serde(default = "f32_name")]
    pub dtype: String,
}

fn f32_name() -> String {
    "f32".into()
}

impl ListOpsPart {
    /// `arch`'s defaults with `model`, then its `per_model` table, and `train` laid over them.
    pub fn config(&self, arch: &Architecture) -> Result<crate::config::RunConfig> {
        let mut model = self.model.clone();
        if let Some(own) = self.per_model.get(arch.name) {
            for (k, v) in own {
                match (model.get_mut(k), v) {
                    (Some(toml::Value::Table(shared)), toml::Value::Table(own)) => shared.extend(own.clone()),
                    _ => {
                        model.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        layered_config(arch, &model, &self.train)
    }
}

/// Trains every model of `models` on ListOps into `out/runs-listops/NAME` (emptied first),
/// `workers.jobs` at once (on a GPU each on a stream of its own), writing `out/listops.jsonl` after
/// each (in `models`' order).
pub(crate) fn run(
    part: &ListOpsPart,
    models: &[&Architecture],
    out: &Path,
    device: &Device,
    workers: super::Workers,
) -> Result<()> {
    let reference = registry::find("transformer")?;
    let reference_cfg = part.config(reference)?;
    let target = counted_params(reference, &reference_cfg.model, part.reference_width, Counted::WidthBound)
        .context("the reference Transformer does not build")?;
    let dtype = crate::device::parse_dtype(&part.dtype).context("[listops] dtype")?;
    let todo: Vec<usize> = (0..models.len()).collect();
    super::run_queue(
        &todo,
        vec![None; models.len()],
        workers,
        device,
        |i, dev| train_one(part, models[i], target, out, dev, dtype, workers.jobs == 1),
        |finished| write_lines(&out.join("listops.jsonl"), models, finished),
    )?;
    Ok(())
}

/// One model's ListOps run at the reference's parameter count `target`.
fn train_one(
    part: &ListOpsPart,
    arch: &Architecture,
    target: usize,
    out: &Path,
    device: &Device,
    dtype: candle_core::DType,
    verbose: bool,
) -> Result<ListOpsRow> {
    let mut cfg = part.config(arch)?;
    let params;
    (cfg.model, params) = match_params(arch, &cfg.model, target, Counted::WidthBound)?;
    let length_bound = length_bound_params(arch, &cfg.model)?;
    let dir = out.join("runs-listops").join(arch.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let opts = TrainOptions { dtype, ..TrainOptions::fresh(dir, device, verbose) };
    let s = train_listops(&cfg, &part.task, &opts).with_context(|| format!("ListOps for {}", arch.name))?;
    eprintln!("listops {}: val accuracy {:.3}, test accuracy {:.3}", arch.name, s.val_accuracy, s.test_accuracy);
    Ok(ListOpsRow {
        model: arch.name.to_string(),
        readout: s.readout,
        width: cfg.model.width,
        params: params + length_bound,
        length_bound_params: length_bound,
        params_ratio: params as f64 / target as f64,
        steps: s.steps,
        train_examples: part.task.train_examples,
        max_len: part.task.generator.max_len,
        train_loss: s.train_loss,
        val_accuracy: s.val_accuracy,
        test_accuracy: s.test_accuracy,
        elapsed_s: s.elapsed_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// A model's own table lands on it alone, merged into the shared `model` table (its
    /// options beside the shared ones).
    #[test]
    fn per_model_settings_land_on_that_model_only() -> Result<()> {
        let part: ListOpsPart = toml::from_str(
            "reference_width = 16\n[model]\ndepth = 1\n[task]\ntrain_examples = 1\neval_examples = 1\n[task.generator]\nmax_depth = 3\nmax_args = 3\nmin_len = 2\nmax_len = 9\nseed = 0\n[per_model.m2-bert.options]\nfilter_width = 8\n",
        )?;
        let bert = part.config(registry::find("m2-bert")?)?;
        assert_eq!((bert.model.depth, bert.model.options["filter_width"].as_u64()), (1, Some(8)));
        assert_eq!(bert.model.options["bidirectional"].as_bool(), Some(true), "the defaults' other options stay");
        assert_eq!(part.config(registry::find("m2")?)?.model.options["filter_width"].as_u64(), Some(128));
        Ok(())
    }

    /// At a long maximum length Linformer's `E, F` (k x n per layer) are length-bound: the
    /// match holds its width at the Transformer's and counts them apart (counting them, as
    /// the first H200 run did, shrank its width to 4 at n = 2000).
    #[test]
    fn linformer_keeps_the_width_at_long_lengths() -> Result<()> {
        let part: ListOpsPart = toml::from_str(
            "reference_width = 32\n[model]\ndepth = 2\nheads = 4\ncontext = 1024\n[task]\ntrain_examples = 1\neval_examples = 1\n[task.generator]\nmax_depth = 3\nmax_args = 3\nmin_len = 2\nmax_len = 9\nseed = 0\n[per_model.linformer.options]\nk = 64\n",
        )?;
        let reference = registry::find("transformer")?;
        let target =
            counted_params(reference, &part.config(reference)?.model, 32, Counted::WidthBound).context("reference")?;
        let linformer = registry::find("linformer")?;
        let (matched, p) = match_params(linformer, &part.config(linformer)?.model, target, Counted::WidthBound)?;
        assert_eq!(matched.width, 32, "params {p} vs {target}");
        let encoder = registry::find("transformer-encoder")?;
        let positions = length_bound_params(encoder, &ModelConfig { width: 32, ..part.config(encoder)?.model })?;
        assert_eq!(length_bound_params(linformer, &matched)?, positions + 2 * 2 * 64 * 1024, "E and F per layer");
        // counting everything, E and F take the width's place
        let (all, _) = match_params(linformer, &part.config(linformer)?.model, target, Counted::All)?;
        assert!(all.width < 16, "width {}", all.width);
        Ok(())
    }
}
