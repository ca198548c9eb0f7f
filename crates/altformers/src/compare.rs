//! `altformers compare`: every causal architecture in the registry trained on the same bytes
//! with the same budget, validation bits per byte side by side.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::config::RunConfig;
use crate::data::{Corpus, DataFormat};
use crate::registry::ARCHITECTURES;
use crate::train::{train, TrainOptions};

/// A preset: the model shape and training budget every architecture gets.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub description: String,
    /// `--set`-style overrides applied to every model's defaults.
    pub sets: Vec<String>,
}

pub fn preset(name: &str) -> Result<Preset> {
    let text = match name {
        "quick" => include_str!("../../../configs/compare-quick.toml"),
        "full" => include_str!("../../../configs/compare-full.toml"),
        other => bail!("unknown preset `{other}`: use quick or full"),
    };
    toml::from_str(text).with_context(|| format!("preset {name} is invalid"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QualityRow {
    pub model: String,
    pub params: usize,
    pub steps: usize,
    pub tokens: usize,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Trains every causal model under `out/runs/NAME` and writes `out/quality.jsonl`.
pub fn run(preset_name: &str, data: &str, format: DataFormat, out: &Path, device: &Device) -> Result<Vec<QualityRow>> {
    let preset = preset(preset_name)?;
    let corpus = Corpus::load(data, format)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("compare --preset {preset_name}: {}", preset.description);
    let mut rows = Vec::new();
    for arch in ARCHITECTURES.iter().filter(|a| a.causal) {
        let cfg = RunConfig::build(arch.name, None, &preset.sets)?;
        let run_dir = out.join("runs").join(arch.name);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)?;
        }
        let opts = TrainOptions {
            out: run_dir,
            resume: false,
            device: device.clone(),
            dtype: DType::F32,
            verbose: true,
            stop_after: None,
        };
        let summary = train(&cfg, &corpus, format, &opts)?;
        let row = QualityRow {
            model: arch.name.to_string(),
            params: summary.params,
            steps: cfg.train.steps,
            tokens: cfg.train.steps * cfg.train.batch_size * cfg.model.context,
            val_loss: summary.last.val_loss,
            val_bpb: summary.last.val_bpb,
            tokens_per_s: summary.history.iter().map(|m| m.tokens_per_s).sum::<f64>() / summary.history.len() as f64,
            elapsed_s: summary.last.elapsed_s,
        };
        rows.push(row);
    }
    let lines: Vec<String> = rows.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    crate::util::write_atomic(&out.join("quality.jsonl"), (lines.join("\n") + "\n").as_bytes())?;
    let table = quality_table(&rows);
    crate::util::write_atomic(
        &out.join("report.md"),
        format!("# altformers comparison ({preset_name})\n\n{}\n\n## Quality\n\n{table}\n## Architectures\n\n{}", preset.description, crate::registry::table()).as_bytes(),
    )?;
    println!("{table}");
    Ok(rows)
}

pub fn quality_table(rows: &[QualityRow]) -> String {
    let mut s = String::from("| model | params | tokens | val loss (nats/byte) | val bpb | tokens/s | time (s) |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.0} | {:.0} |\n",
            r.model,
            crate::util::human(r.params as f64),
            crate::util::human(r.tokens as f64),
            r.val_loss,
            r.val_bpb,
            r.tokens_per_s,
            r.elapsed_s
        ));
    }
    s
}
