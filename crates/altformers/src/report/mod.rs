//! `altformers report --from DIR`: `DIR/report.md` and its SVG plots from the JSON lines
//! that `compare` (or the separate bench commands) wrote. Sections whose inputs are absent
//! say so instead of failing.

pub mod plots;

use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::bench::decode::DecodePoint;
use crate::bench::performer_error::PerformerErrorRow;
use crate::bench::scaling::{headline_component, BenchMode, ScalingFit, ScalingPoint};
use crate::bench::{fit, Provenance};
use crate::registry::ARCHITECTURES;
use crate::results::{
    head_note, listops_table, quality_table, read_lines, seed_spreads, ListOpsRow, MqarResult, QualityRow,
    CURVE_EXAMPLES,
};
use crate::train::Metrics;
use plots::{figure, Chart, Series};

fn group<T, K: Ord + Clone>(items: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, Vec<&T>> {
    let mut m: BTreeMap<K, Vec<&T>> = BTreeMap::new();
    for it in items {
        m.entry(key(it)).or_default().push(it);
    }
    m
}

/// One series per model (in name order) of the points `point` gives its rows (`None`: left out).
fn series_by_model<T>(
    rows: &[&T],
    model: impl Fn(&T) -> &String,
    point: impl Fn(&T) -> Option<(f64, f64)>,
) -> Vec<Series> {
    group(rows, |r| model(r).clone())
        .into_iter()
        .map(|(name, rs)| Series { name, points: rs.iter().filter_map(|r| point(r)).collect() })
        .collect()
}

/// Renders `dir/report.md` and `dir/plots/*.svg`: one section per part of the comparison.
pub fn render(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a folder of results", dir.display());
    }
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)?;
    let (mut md, caption) = heading(dir)?;
    let quality = read_lines::<QualityRow>(&dir.join("quality.jsonl"))?.unwrap_or_default();
    md += &quality_section(&quality, &dir.join("runs"), &plots, &caption)?;
    let recall = read_lines::<MqarResult>(&dir.join("mqar.jsonl"))?.unwrap_or_default();
    md += &mqar_section(&recall, &plots, &caption)?;
    let classified = read_lines::<ListOpsRow>(&dir.join("listops.jsonl"))?.unwrap_or_default();
    md += &listops_section(&classified, &caption);
    let (points, fits) = scaling_inputs(dir)?;
    md += &scaling_section(&points, &plots, &caption)?;
    let decoded = read_lines::<DecodePoint>(&dir.join("decode.jsonl"))?.unwrap_or_default();
    md += &decode_section(&decoded, &plots, &caption)?;
    let approximations = read_lines::<PerformerErrorRow>(&dir.join("performer-error.jsonl"))?.unwrap_or_default();
    md += &performer_error_section(&approximations, &plots, &caption)?;
    let throughput = read_lines::<TrainingSpeedRow>(&dir.join("training-speed.jsonl"))?.unwrap_or_default();
    md += &training_speed_section(&throughput);
    md += &peers_section(dir)?;
    md += &complexity_section(&fits);
    crate::util::write_atomic(&dir.join("report.md"), md.as_bytes())
}

/// The title and description of the report, and the caption naming where its figures come
/// from (`dir/meta.json`'s provenance).
fn heading(dir: &Path) -> Result<(String, String)> {
    let meta: Option<serde_json::Value> =
        if dir.join("meta.json").exists() { Some(crate::util::read_json(&dir.join("meta.json"))?) } else { None };
    let prov: Option<Provenance> = meta.as_ref().and_then(|m| serde_json::from_value(m["provenance"].clone()).ok());
    let caption = match &prov {
        Some(p) => {
            format!("`{}` on {} ({}), {}, commit `{}`", p.command, p.device, p.machine, p.date, p.commit)
        }
        None => "provenance unknown (no meta.json)".to_string(),
    };
    let mut md = String::from("# altformers: the comparison\n\n");
    if let Some(m) = &meta {
        let _ = writeln!(md, "{}\n", m["description"].as_str().unwrap_or(""));
    }
    let _ = writeln!(md, "Produced by {caption}.\n");
    Ok((md, caption))
}

/// Language modelling: the table of `rows`, and the validation loss of the runs whose
/// training log is in `runs/MODEL/metrics.jsonl`.
fn quality_section(rows: &[QualityRow], runs: &Path, plots: &Path, caption: &str) -> Result<String> {
    let mut md = String::from("## Language modelling at equal parameters and tokens\n\n");
    if rows.is_empty() {
        md.push_str("Not run.\n\n");
        return Ok(md);
    }
    md.push_str(&quality_table(rows));
    for (model, seeds, lo, hi) in seed_spreads(rows) {
        let seeds: Vec<String> = seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            md,
            "\nSeed noise: {model} at seeds {} reaches val loss {lo:.4} to {hi:.4} nats/byte, a spread of {:.4}. A difference between two models smaller than that is within seed noise at this budget.",
            seeds.join(", "),
            hi - lo
        );
    }
    let first_seed = |r: &&QualityRow| rows.iter().find(|o| o.model == r.model).is_some_and(|o| std::ptr::eq(o, *r));
    md.push_str(&models_list(rows.iter().filter(first_seed).map(|r| r.model.as_str())));
    md.push_str(&encoders_absent());
    let mut series = Vec::new();
    for r in rows.iter().filter(first_seed) {
        if let Some(ms) = read_lines::<Metrics>(&runs.join(&r.model).join("metrics.jsonl"))? {
            series.push(Series {
                name: r.model.clone(),
                points: ms.iter().map(|m| (m.step as f64, m.val_loss)).collect(),
            });
        }
    }
    if !series.is_empty() {
        let chart = Chart {
            title: "Validation loss during training",
            x_label: "step",
            y_label: "val loss (nats/byte)",
            log_x: false,
            log_y: false,
        };
        let text = format!("Validation loss against step. {caption}.");
        md.push('\n');
        md += &figure(plots, "loss.svg", &chart, &series, "validation loss", &text)?;
    }
    Ok(md)
}

/// Why the registry's encoders have no language-model row: each with its summary (which
/// says, for Linformer, why it has no causal form at all).
fn encoders_absent() -> String {
    let encoders: Vec<_> = ARCHITECTURES.iter().filter(|a| !a.causal).collect();
    if encoders.is_empty() {
        return String::new();
    }
    let mut md = String::from("\nNot in this table: the encoders (bidirectional: every position sees the byte it would predict, so they are no language models; they are compared on ListOps):\n\n");
    for a in encoders {
        let _ = writeln!(md, "- `{}` ({}): {}", a.name, a.paper, a.summary);
    }
    md
}

/// ListOps: accuracy per model beside chance and LRA's published figures.
fn listops_section(rows: &[ListOpsRow], caption: &str) -> String {
    let mut md = String::from("## ListOps (Long Range Arena)\n\n");
    if rows.is_empty() {
        md.push_str("Not run.\n\n");
        return md;
    }
    let r0 = &rows[0];
    let _ = writeln!(
        md,
        "Classification of ListOps expressions (LRA's generator, shorter than {} tokens, {} training examples) into their value, 10 classes: chance is 10%. A causal model is read at its last position (the byte after the expression, restricted to the digits), an encoder mean-pools its real positions. The LRA column is the test accuracy the Long Range Arena reports (Table 1, sequences of 500-2000 tokens, its own budget): a reference, not the same run. {caption}.\n",
        r0.max_len, r0.train_examples
    );
    md.push_str(&listops_table(rows));
    md.push_str("\nLRA's models are all encoders: its figures sit beside our encoders (`transformer-encoder`, `linformer`, `performer-encoder`, `reformer-encoder`); `transformer`, `performer` and `reformer` are the causal models read at their last position.\n\n");
    md
}

/// What each of `models` is, from the registry (its summary says where a model adapts its
/// paper's setting, as One Wide FFN's decoder-only form does).
fn models_list<'a>(models: impl Iterator<Item = &'a str>) -> String {
    let mut md = String::from("\nThe models:\n\n");
    for name in models {
        if let Ok(a) = crate::registry::find(name) {
            let _ = writeln!(md, "- `{}` ({}): {}", a.name, a.paper, a.summary);
        }
    }
    md
}

/// Multi-query associative recall: per task, accuracy by model and width, and the learning
/// curves where the runs recorded them.
fn mqar_section(rows: &[MqarResult], plots: &Path, caption: &str) -> Result<String> {
    let mut md = String::from("## Multi-query associative recall\n\n");
    if rows.is_empty() {
        md.push_str("Not run.\n\n");
        return Ok(md);
    }
    let mut widths: Vec<usize> = rows.iter().map(|r| r.width).collect();
    widths.sort();
    widths.dedup();
    for ((seq, pairs), task_rows) in group(rows, |r| (r.seq_len, r.pairs)) {
        md += &mqar_task(seq, pairs, &task_rows, &widths, plots, caption)?;
        md += &mqar_curves(seq, pairs, &task_rows, plots, caption)?;
    }
    Ok(md)
}

/// The table and chart of one MQAR task (`seq` tokens, `pairs` pairs): each model's best
/// accuracy over the learning rates tried (as Zoology reports) at each of `widths`.
fn mqar_task(
    seq: usize,
    pairs: usize,
    rows: &[&MqarResult],
    widths: &[usize],
    plots: &Path,
    caption: &str,
) -> Result<String> {
    let mut md = String::new();
    // with several rates tried, each cell names the one that won
    let several_rates = {
        let mut lrs: Vec<f64> = rows.iter().map(|r| r.lr).collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        lrs.len() > 1
    };
    let which = if several_rates { "; in brackets the learning rate that gave it" } else { "" };
    let _ = writeln!(md, "Sequence length {seq}, {pairs} key-value pairs: accuracy by model width (the best over the learning rates tried{which}).\n");
    let _ = writeln!(md, "| model | {} |", widths.iter().map(|w| format!("d = {w}")).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(widths.len()));
    let mut series = Vec::new();
    for (model, rs) in group(rows, |r| r.model.clone()) {
        let best = |w: usize| {
            rs.iter()
                .filter(|r| r.width == w)
                .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
                .map(|r| (r.accuracy, r.lr))
        };
        let cell = |(a, lr): (f64, f64)| {
            if several_rates {
                format!("{a:.3} ({lr:e})")
            } else {
                format!("{a:.3}")
            }
        };
        let cells: Vec<String> = widths.iter().map(|&w| best(w).map(cell).unwrap_or_else(|| "-".into())).collect();
        // the head width of each width's run, where it matters (RetNet's)
        let dh: Vec<usize> =
            widths.iter().filter_map(|&w| rs.iter().find(|r| r.width == w).and_then(|r| r.head_dim)).collect();
        let mut note = head_note(&model, &dh);
        if let Some(o) = rs.iter().find_map(|r| r.overrides.as_deref()) {
            note += &format!(" [{o}]");
        }
        let _ = writeln!(md, "| {model}{note} | {} |", cells.join(" | "));
        series.push(Series {
            name: model,
            points: widths.iter().filter_map(|&w| best(w).map(|(a, _)| (w as f64, a))).collect(),
        });
    }
    let title = format!("MQAR accuracy, T = {seq}, {pairs} pairs");
    let chart = Chart { title: &title, x_label: "model width", y_label: "accuracy", log_x: true, log_y: false };
    let text = format!("MQAR accuracy against width, T = {seq}, {pairs} pairs. {caption}.");
    md.push('\n');
    md += &figure(plots, &format!("mqar-{seq}-{pairs}.svg"), &chart, &series, "MQAR", &text)?;
    Ok(md)
}

/// The learning curves of one MQAR task, where the runs recorded them (`curve_every`);
/// empty where none did.
fn mqar_curves(seq: usize, pairs: usize, rows: &[&MqarResult], plots: &Path, caption: &str) -> Result<String> {
    let curves: Vec<Series> = rows
        .iter()
        .filter(|r| !r.curve.is_empty())
        .map(|r| Series {
            name: format!("{} d={} lr={}", r.model, r.width, r.lr),
            points: r.curve.iter().map(|&(step, acc)| (step as f64, acc)).collect(),
        })
        .collect();
    if curves.is_empty() {
        return Ok(String::new());
    }
    let title = format!("MQAR accuracy during training, T = {seq}, {pairs} pairs");
    let chart = Chart { title: &title, x_label: "step", y_label: "accuracy", log_x: false, log_y: false };
    let text = format!(
        "MQAR accuracy on {CURVE_EXAMPLES} held-out queries during training, T = {seq}, {pairs} pairs. {caption}."
    );
    figure(plots, &format!("mqar-curve-{seq}-{pairs}.svg"), &chart, &curves, "MQAR curves", &text)
}

/// The scaling points in `dir`, and their fitted exponents (`scaling-fits.jsonl`, else fitted
/// here).
fn scaling_inputs(dir: &Path) -> Result<(Vec<ScalingPoint>, Vec<ScalingFit>)> {
    let points = read_lines::<ScalingPoint>(&dir.join("scaling.jsonl"))?.unwrap_or_default();
    let mut fits = read_lines::<ScalingFit>(&dir.join("scaling-fits.jsonl"))?.unwrap_or_default();
    if fits.is_empty() && !points.is_empty() {
        fits = crate::bench::scaling::fits(&points);
    }
    Ok((points, fits))
}

/// Time and memory of one mixer layer against sequence length: per mode measured (forward,
/// forward and backward), the charts, the table, and where each model's time crosses the
/// Transformer's.
fn scaling_section(points: &[ScalingPoint], plots: &Path, caption: &str) -> Result<String> {
    let mut md = String::from("## Time and memory against sequence length\n\n");
    if points.is_empty() {
        md.push_str("Not run.\n\n");
        return Ok(md);
    }
    let headline: Vec<&ScalingPoint> = points.iter().filter(|p| is_headline(p)).collect();
    let whole: Vec<&str> = ARCHITECTURES
        .iter()
        .filter(|a| a.mixer.is_none() && headline.iter().any(|p| p.model == a.name))
        .map(|a| a.name)
        .collect();
    let caption = if whole.is_empty() {
        caption.to_string()
    } else {
        format!("{caption}. Without a per-layer mixer ({}), the curve is the whole model, one layer per stage, embedding and head included", whole.join(", "))
    };
    let modes = modes_of(headline.iter().map(|p| p.mode));
    for &mode in &modes {
        let curve: Vec<&ScalingPoint> = headline.iter().copied().filter(|p| p.mode == mode).collect();
        if modes.len() > 1 {
            let _ = writeln!(md, "### {}\n", capitalised(mode.describe()));
        }
        // one mode keeps the plain file names (earlier reports link them)
        let file = |stem: &str| match (modes.len(), mode) {
            (1, _) | (_, BenchMode::Fwd) => format!("{stem}.svg"),
            (_, BenchMode::Fwdbwd) => format!("{stem}-fwdbwd.svg"),
        };
        md += &scaling_curves(&curve, plots, &caption, &file("time"), &file("memory"))?;
    }
    Ok(md)
}

/// The modes among `modes`, forward first.
fn modes_of(modes: impl Iterator<Item = BenchMode>) -> Vec<BenchMode> {
    let present: Vec<BenchMode> = modes.collect();
    [BenchMode::Fwd, BenchMode::Fwdbwd].into_iter().filter(|m| present.contains(m)).collect()
}

fn capitalised(text: &str) -> String {
    let mut c = text.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// One mode's charts, table and crossovers.
fn scaling_curves(
    curve: &[&ScalingPoint],
    plots: &Path,
    caption: &str,
    time_file: &str,
    memory_file: &str,
) -> Result<String> {
    let mut md = String::new();
    let p0 = curve[0];
    let setting = format!(
        "one mixer layer, width {}, {} heads, B x T = {} tokens, {}",
        p0.width,
        p0.heads,
        p0.batch * p0.seq,
        p0.mode.describe()
    );
    let per_model = |value: fn(&ScalingPoint) -> Option<f64>| {
        series_by_model(curve, |p| &p.model, |p| value(p).map(|v| (p.seq as f64, v / p.batch as f64)))
    };
    let time_series = per_model(|p| p.timing.map(|t| t.median_s));
    let mem_series = per_model(|p| p.peak_bytes.map(|b| b as f64));
    let chart = Chart::log_log("Time per sequence against T", "T", "seconds per sequence");
    let text = format!("Median time per sequence (step time / batch), {setting}. {caption}.");
    md += &figure(plots, time_file, &chart, &time_series, "time", &text)?;
    if mem_series.iter().any(|s| !s.points.is_empty()) {
        let chart = Chart::log_log("Peak memory per sequence against T", "T", "bytes per sequence");
        let text = format!("Peak memory above the weights per sequence, {setting}. {caption}.");
        md += &figure(plots, memory_file, &chart, &mem_series, "memory", &text)?;
    }
    md.push_str("| model | T | batch | median (ms) | min | max | peak memory (MB) | GFLOP/s | status |\n|---|---|---|---|---|---|---|---|---|\n");
    for p in curve {
        let t = p.timing;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.model,
            p.seq,
            p.batch,
            t.map(|t| format!("{:.2}", t.median_s * 1e3)).unwrap_or("-".into()),
            t.map(|t| format!("{:.2}", t.min_s * 1e3)).unwrap_or("-".into()),
            t.map(|t| format!("{:.2}", t.max_s * 1e3)).unwrap_or("-".into()),
            p.peak_bytes.map(|b| format!("{:.1}", b as f64 / 1e6)).unwrap_or("-".into()),
            p.flops_per_s.map(|f| format!("{:.1}", f / 1e9)).unwrap_or("-".into()),
            // a status recorded before statuses were cut to their first line
            p.status.lines().next().unwrap_or("")
        );
    }
    if let Some(reference) = time_series.iter().find(|s| s.name == "transformer") {
        md += &crossovers(&time_series, &reference.points);
    }
    Ok(md)
}

/// Where each of `time_series` crosses the Transformer's curve `reference`, and how their
/// times compare at the longest length both reached. Within 5% at every length is level: a
/// crossing there is noise.
fn crossovers(time_series: &[Series], reference: &[(f64, f64)]) -> String {
    let mut md = String::from("\nAgainst the Transformer (lengths where the time curves cross, and the time ratio at the longest length both reached):\n\n");
    for s in time_series.iter().filter(|s| s.name != "transformer") {
        let ratios = fit::ratios(&s.points, reference);
        let (Some(&(first, _)), Some(&(last, ratio))) = (ratios.first(), ratios.last()) else {
            let _ = writeln!(md, "- {}: no length in common", s.name);
            continue;
        };
        let at_end = format!("{ratio:.2}x the Transformer's time at T = {last:.0}");
        let xs = fit::crossovers(&s.points, reference);
        let verdict = if ratio < 1.0 { "faster" } else { "slower" };
        let text = if ratios.iter().all(|(_, r)| (r.ln()).abs() < 1.05f64.ln()) {
            format!("within 5% of it at every measured length from T = {first:.0}; {at_end}")
        } else if xs.is_empty() {
            format!("{verdict} at every measured length from T = {first:.0}; {at_end}")
        } else {
            let at: Vec<String> = xs.iter().map(|x| format!("T ~ {x:.0}")).collect();
            format!("crosses at {}, {verdict} after; {at_end}", at.join(", "))
        };
        let _ = writeln!(md, "- {}: {text}", s.name);
    }
    md.push('\n');
    md
}

/// Decoding: per-token latency and state bytes against context at the smallest batch, and
/// the table of every point.
fn decode_section(rows: &[DecodePoint], plots: &Path, caption: &str) -> Result<String> {
    let mut md = String::from("## Decoding cost against context\n\n");
    if rows.is_empty() {
        md.push_str("Not run.\n\n");
        return Ok(md);
    }
    let b1 = rows.iter().map(|r| r.batch).min().unwrap_or(1);
    let single: Vec<&DecodePoint> = rows.iter().filter(|r| r.batch == b1).collect();
    let per_model = |value: fn(&DecodePoint) -> Option<f64>| {
        series_by_model(&single, |r| &r.model, |r| value(r).map(|v| (r.context as f64, v)))
    };
    let chart = Chart::log_log("Per-token decoding latency", "context", "ms per token");
    let latency = per_model(|r| r.latency_s.map(|l| l * 1e3));
    let text = format!("Per-token latency at batch {b1}. {caption}.");
    md += &figure(plots, "decode-latency.svg", &chart, &latency, "latency", &text)?;
    let chart = Chart::log_log("Decoding state", "context", "bytes");
    let state = per_model(|r| r.state_bytes.map(|b| b as f64));
    let text = format!("Bytes held by the decoding state (KV cache or recurrent state), whole model. {caption}.");
    md += &figure(plots, "decode-state.svg", &chart, &state, "state", &text)?;
    md += &decode_against_reference(&single, "transformer");
    md.push_str(
        "| model | context | batch | ms/token | tokens/s | state (MB) | status |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.model,
            r.context,
            r.batch,
            r.latency_s.map(|l| format!("{:.3}", l * 1e3)).unwrap_or("-".into()),
            r.tokens_per_s.map(|t| format!("{:.0}", t)).unwrap_or("-".into()),
            r.state_bytes.map(|b| format!("{:.3}", b as f64 / 1e6)).unwrap_or("-".into()),
            r.status
        );
    }
    md.push('\n');
    Ok(md)
}

/// Each model's decoding speed against `reference`'s (the Transformer with its KV cache) at
/// every context both measured: the reference's ms per token over the model's, so above 1 is
/// faster. Empty where the reference was not run.
fn decode_against_reference(rows: &[&DecodePoint], reference: &str) -> String {
    let latency = |model: &str, context: usize| {
        rows.iter().find(|r| r.model == model && r.context == context).and_then(|r| r.latency_s)
    };
    let mut contexts: Vec<usize> = rows.iter().filter(|r| r.model == reference).map(|r| r.context).collect();
    contexts.sort_unstable();
    contexts.dedup();
    if contexts.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "Speed against the {reference} with its KV cache at the same context (its ms per token over the \
         model's: above 1 is faster; \"-\" where either was not measured):\n\n| model |"
    );
    for c in &contexts {
        let _ = write!(md, " {} |", context_label(*c));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(contexts.len()));
    md.push('\n');
    for (model, _) in group(rows, |r| r.model.clone()) {
        if model == reference {
            continue;
        }
        let _ = write!(md, "| {model} |");
        for &c in &contexts {
            let cell = match (latency(reference, c), latency(&model, c)) {
                (Some(r), Some(m)) => format!("{:.2}x", r / m),
                _ => "-".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
    md
}

/// `1024` -> `1K`, `65536` -> `64K`; other lengths as they are.
fn context_label(context: usize) -> String {
    if context >= 1024 && context.is_multiple_of(1024) {
        format!("{}K", context / 1024)
    } else {
        context.to_string()
    }
}

/// Performer's approximation error against its number of random features m: one line per
/// feature kind and input scale (log-log), and the table of every point.
fn performer_error_section(rows: &[PerformerErrorRow], plots: &Path, caption: &str) -> Result<String> {
    let mut md = String::from("## Performer: approximation error against the number of features\n\n");
    let Some(first) = rows.first() else {
        md.push_str("Not run.\n\n");
        return Ok(md);
    };
    let mut series = Vec::new();
    for (std, group) in group(rows, |r| format!("{}", r.input_std)) {
        for kind in ["orthogonal", "iid"] {
            let mean = |r: &PerformerErrorRow| if kind == "iid" { r.iid_mean } else { r.orthogonal_mean };
            let points = group.iter().map(|r| (r.features as f64, mean(r))).collect();
            series.push(Series { name: format!("{kind}, input std {std}"), points });
        }
    }
    let chart = Chart::log_log("Performer: error against features", "random features m", "relative error");
    let text = format!(
        "Relative error |Y~ - Y|_F / |Y|_F of causal FAVOR+ against exact causal softmax attention (d_h {}, T {}, {} heads; mean over {} feature draws), orthogonal and iid features. The input std scales the entries of the queries and keys (their logits then have std input_std^2); Monte-Carlo error falls as 1 / sqrt(m). {caption}.",
        first.head_dim, first.length, first.heads, first.draws
    );
    md += &figure(plots, "performer-error.svg", &chart, &series, "Performer error", &text)?;
    md.push_str("| input std | m | orthogonal (mean +- sd) | iid (mean +- sd) |\n|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} +- {:.4} | {:.4} +- {:.4} |",
            r.input_std, r.features, r.orthogonal_mean, r.orthogonal_sd, r.iid_mean, r.iid_sd
        );
    }
    md.push('\n');
    Ok(md)
}

/// One training run's throughput (`scripts/gpu-bench.sh trainspeed`, gathered into
/// `training-speed.jsonl`): whose code trained (`altformers`, or a peer such as
/// `pytorch-compile`), which model at which size, and its tokens per second.
#[derive(serde::Deserialize)]
struct TrainingSpeedRow {
    model: String,
    size: String,
    trainer: String,
    tokens_per_s: f64,
    /// The training loss at the end of the timed steps (a check that the computation matched).
    #[serde(default)]
    loss: Option<f64>,
}

/// Training throughput: each run's tokens per second against ours for the Transformer at the
/// same size (above 1: faster than ours); empty where no run was gathered.
fn training_speed_section(rows: &[TrainingSpeedRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "## Training throughput

",
    );
    md.push_str("Whole-model training on one device, tokens per second after warm-up (the rows' sources: the results folder's README). Ratio: against our Transformer at the same size.

| size | model | trained by | tokens/s | against our Transformer | loss at the end |
|---|---|---|---|---|---|
");
    for (size, runs) in group(rows, |r| r.size.clone()) {
        let ours = runs.iter().find(|r| r.model == "transformer" && r.trainer == "altformers").map(|r| r.tokens_per_s);
        for r in runs {
            let ratio = ours.map(|o| format!("{:.2}", r.tokens_per_s / o)).unwrap_or("-".into());
            let loss = r.loss.map(|l| format!("{l:.3}")).unwrap_or("-".into());
            let _ = writeln!(
                md,
                "| {size} | {} | {} | {:.0}K | {ratio} | {loss} |",
                r.model,
                r.trainer,
                r.tokens_per_s / 1e3
            );
        }
    }
    md.push('\n');
    md
}

/// Fused kernels against their peers (GPU runs of scripts/gpu-bench.sh kernels only); empty
/// where `dir` holds no peer figures.
fn peers_section(dir: &Path) -> Result<String> {
    let Some(table) = peers_table(dir)? else {
        return Ok(String::new());
    };
    let mut md = String::from("## Fused kernels against their peers\n\n");
    md.push_str("Ours (`altformers bench ops`, the path a model takes) and the peers (`bench/peers/*.py`) at the same shapes on the same GPU, in the same run. Ratio: ours / peer throughput (above 1: ours is faster).\n\n");
    md.push_str(&table);
    md.push('\n');
    Ok(md)
}

/// A fitted time exponent with its 95% interval (`bench::scaling::slope_interval`); an interval wider than 0.2 (+-0.1)
/// reads "not determined", the number withheld.
fn time_exponent(f: &ScalingFit) -> String {
    match (f.time_slope, f.time_slope_interval) {
        (None, _) => "-".into(),
        (Some(v), None) => format!("{v:.2}"),
        (Some(_), Some((lo, hi))) if hi - lo > 0.2 => format!("not determined ({lo:.2} to {hi:.2})"),
        (Some(v), Some((lo, hi))) => format!("{v:.2} ({lo:.2} to {hi:.2})"),
    }
}

/// Whether `p` is on its model's headline curve ([`headline_component`]).
fn is_headline(p: &ScalingPoint) -> bool {
    crate::registry::find(&p.model).map(|a| headline_component(a) == p.component).unwrap_or(p.component == "mixer")
}

/// Every architecture's complexity as stated, as true, and as measured (`fits`).
fn complexity_section(fits: &[ScalingFit]) -> String {
    let mut md = String::from("## Complexity: stated, true, measured\n\n");
    let modes = modes_of(fits.iter().map(|f| f.mode));
    let described: Vec<&str> = modes.iter().map(|m| m.describe()).collect();
    let _ = writeln!(md, "Measured exponents are the log-log slopes of time (the fastest repetition) and peak memory per sequence against T over the upper half of the measured lengths, from the middle length up (one mixer layer, {}; the whole model at one layer per stage for an architecture without a per-layer mixer). In parentheses, the time exponent's 95% interval: where each model's sweep ran in several processes (`[scaling] processes`), a t interval over the exponents fitted to each process alone (it covers how much separate processes disagree); from one process, a bootstrap over its repetitions (only that run's timing noise); wider than 0.2, the exponent is reported as not determined.{}\n", if described.is_empty() { "forward".to_string() } else { described.join(" / ") }, if modes.len() > 1 { " Time exponents for each mode, separated by /; memory and the cost model for the first." } else { "" });
    md.push_str("| model | stated time | stated space | true time | true space | measured time exponent | cost model's exponent there | measured memory exponent | review |\n|---|---|---|---|---|---|---|---|---|\n");
    for a in ARCHITECTURES {
        let own = |mode: BenchMode| {
            fits.iter().find(|f| f.model == a.name && f.component == headline_component(a) && f.mode == mode)
        };
        let f = modes.iter().find_map(|&m| own(m));
        let times: Vec<String> = modes.iter().filter_map(|&m| own(m)).map(time_exponent).collect();
        let slope = |s: Option<f64>| s.map(|v| format!("{v:.2}")).unwrap_or("-".into());
        let c = &a.complexity;
        let verdict = c.verdict().replacen("wrong", "**wrong**", 1);
        let (stated_time, stated_space) = c.review.stated();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            a.name,
            stated_time,
            stated_space,
            c.true_time,
            c.true_space,
            if times.is_empty() { "-".to_string() } else { times.join(" / ") },
            slope(f.and_then(|f| f.cost_slope)),
            slope(f.and_then(|f| f.memory_slope)),
            verdict
        );
    }
    md.push_str("\nThe stated columns quote the review's complexity table word for word (`data/review-complexity.md`); \"(none)\": the review gives no line for this model. The cost model's exponent is the slope of the true complexity's FLOPs (the architecture's analytic count, `complexity.rs`) over the same lengths: what the measured exponent should approach. Where it lies below the asymptotic exponent (2 for attention), the leading term does not yet dominate at these lengths (the T d^2 projections still weigh), and the measured exponent cannot be expected to reach the asymptote either: read it where the lengths reach it, in the GPU sweep the README gives (one layer of every model on an H200 at T = 1K-64K, forward and forward+backward, `bench/results/2026-12-03-h200-report/`).\n");
    md
}

/// The table of ours against the peers from `DIR/peers.jsonl` and `DIR/ours-ops-*.jsonl`,
/// one row per op, mode and T that either side measured (a point only one side has shows
/// "-" for the other: a peer's rows are never dropped for want of ours), or `None` where
/// there are no peer figures.
fn peers_table(dir: &Path) -> Result<Option<String>> {
    let Some(peers) = read_lines::<ScalingPoint>(&dir.join("peers.jsonl"))? else {
        return Ok(None);
    };
    let mut ours = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("ours-ops-") && name.ends_with(".jsonl") {
            ours.extend(read_lines::<ScalingPoint>(&path)?.unwrap_or_default());
        }
    }
    let timed = |v: &[ScalingPoint]| v.iter().filter(|p| p.timing.is_some()).cloned().collect::<Vec<_>>();
    let (ours, peers) = (timed(&ours), timed(&peers));
    let key = |p: &ScalingPoint| (p.component.clone(), p.seq, p.mode as u8);
    let mut keys: Vec<_> = ours.iter().chain(&peers).map(key).collect();
    keys.sort();
    keys.dedup();
    let gb = |b: Option<u64>| b.map(|b| format!("{:.2}", b as f64 / 1e9)).unwrap_or("-".into());
    let ms =
        |p: Option<&ScalingPoint>| p.map(|p| format!("{:.2}", p.timing.unwrap().median_s * 1e3)).unwrap_or("-".into());
    let mut md = String::from("| op | mode | T | batch | ours (ms) | peer | peer (ms) | ours / peer | peak GB ours / peer |\n|---|---|---|---|---|---|---|---|---|\n");
    for k in &keys {
        let (o, p) = (ours.iter().find(|x| key(x) == *k), peers.iter().find(|x| key(x) == *k));
        let any = o.or(p).expect("a key comes from a point");
        let ratio = match (o, p) {
            (Some(o), Some(p)) => format!("{:.2}", p.timing.unwrap().median_s / o.timing.unwrap().median_s),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            any.component,
            if any.mode == BenchMode::Fwd { "fwd" } else { "fwd+bwd" },
            any.seq,
            any.batch,
            ms(o),
            p.map(|p| p.model.trim_start_matches("peer:")).unwrap_or("-"),
            ms(p),
            ratio,
            gb(o.and_then(|o| o.peak_bytes)),
            gb(p.and_then(|p| p.peak_bytes))
        );
    }
    Ok((!keys.is_empty()).then_some(md))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exponent is quoted with its interval, withheld where the interval is wider than 0.2.
    #[test]
    fn an_exponent_with_a_wide_interval_is_not_determined() {
        let fit = |slope: Option<f64>, interval| ScalingFit {
            model: "m".into(),
            component: "mixer".into(),
            mode: BenchMode::Fwd,
            time_slope: slope,
            time_slope_interval: interval,
            memory_slope: None,
            cost_slope: None,
            fit_lengths: vec![],
        };
        assert_eq!(time_exponent(&fit(Some(1.97), Some((1.95, 2.0)))), "1.97 (1.95 to 2.00)");
        assert_eq!(time_exponent(&fit(Some(0.44), Some((0.2, 1.3)))), "not determined (0.20 to 1.30)");
        assert_eq!(time_exponent(&fit(Some(1.06), None)), "1.06");
        assert_eq!(time_exponent(&fit(None, None)), "-");
    }

    /// Ours and the peers' JSON lines, joined on op, mode and T, give the ratio table; a
    /// point only one side measured keeps its row.
    #[test]
    fn peers_table_joins_ours_and_the_peers() -> Result<()> {
        let dir = crate::testing::fresh_dir("peers")?;
        let point = |model: &str, mode: &str, t: usize, ms: f64| {
            format!(
                r#"{{"model":"{model}","component":"longconv","mode":"{mode}","device":"cuda","seq":{t},"batch":64,"width":768,"heads":1,"status":"ok","timing":{{"median_s":{},"min_s":0.0,"max_s":0.0,"reps":10}},"peak_bytes":2000000000,"flops":1.0,"flops_per_s":1.0}}"#,
                ms / 1e3
            )
        };
        let peers = [point("peer:torch-fftconv", "fwd", 1024, 1.2), point("peer:torch-fftconv", "fwdbwd", 1024, 4.0)];
        std::fs::write(dir.join("peers.jsonl"), peers.join("\n") + "\n")?;
        let ours = [
            "{\"date\":\"x\"}".to_string(),
            point("altformers", "fwdbwd", 1024, 3.2),
            point("altformers", "fwd", 2048, 2.0),
        ];
        std::fs::write(dir.join("ours-ops-longconv.jsonl"), ours.join("\n") + "\n")?;
        let table = peers_table(&dir)?.expect("a table");
        assert!(
            table.contains("| longconv | fwd+bwd | 1024 | 64 | 3.20 | torch-fftconv | 4.00 | 1.25 | 2.00 / 2.00 |"),
            "{table}"
        );
        // the points only one side measured keep their rows, the other side's columns "-"
        assert!(table.contains("| longconv | fwd | 1024 | 64 | - | torch-fftconv | 1.20 | - |"), "{table}");
        assert!(table.contains("| longconv | fwd | 2048 | 64 | 2.00 | - | - | - |"), "{table}");
        assert_eq!(table.lines().count(), 5, "three points: {table}");
        std::fs::remove_file(dir.join("peers.jsonl"))?;
        assert!(peers_table(&dir)?.is_none());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// A small results folder as `compare` writes it renders every section and plot.
    #[test]
    fn renders_from_a_fixture_folder() -> Result<()> {
        let dir = crate::testing::fresh_dir("report")?;
        std::fs::create_dir_all(dir.join("runs/transformer"))?;
        let prov = Provenance {
            date: "2026-11-29".into(),
            machine: "test".into(),
            device: "cpu".into(),
            commit: "abc".into(),
            command: "altformers compare".into(),
        };
        crate::util::write_json_atomic(
            &dir.join("meta.json"),
            &serde_json::json!({"provenance": prov, "description": "fixture"}),
        )?;
        let q = r#"{"model":"transformer","width":64,"params":1000,"params_ratio":1.0,"steps":10,"tokens":640,"val_loss":2.0,"val_bpb":2.885,"tokens_per_s":100.0,"elapsed_s":1.0,"seed":1337}"#;
        // a model that adapts its paper's setting is labelled so (from its registry summary)
        let wide = q.replace("\"transformer\"", "\"one-wide-ffn\"");
        // the Transformer at a second seed: the noise band; RetNet's head width beside its name
        let seed2 = q.replace("\"seed\":1337", "\"seed\":2").replace("\"val_loss\":2.0", "\"val_loss\":2.1");
        let retnet = q.replace("\"transformer\"", "\"retnet\"").replace("\"seed\":1337", "\"head_dim\":16");
        std::fs::write(dir.join("quality.jsonl"), format!("{q}\n{seed2}\n{wide}\n{retnet}\n"))?;
        std::fs::write(
            dir.join("runs/transformer/metrics.jsonl"),
            "{\"step\":5,\"train_loss\":3.0,\"val_loss\":3.1,\"val_bpb\":4.4,\"tokens_per_s\":1.0,\"elapsed_s\":1.0,\"lr\":0.001}\n{\"step\":10,\"train_loss\":2.0,\"val_loss\":2.0,\"val_bpb\":2.9,\"tokens_per_s\":1.0,\"elapsed_s\":2.0,\"lr\":0.001}\n",
        )?;
        let m = |w: usize, a: f64, lr: f64| {
            format!(
                r#"{{"model":"transformer","seq_len":64,"pairs":4,"width":{w},"params":10,"accuracy":{a},"final_loss":0.1,"lr":{lr}}}"#
            )
        };
        // two learning rates at width 64: the table shows the better one; a third with a curve
        let curved = r#"{"model":"transformer","seq_len":64,"pairs":4,"width":64,"params":10,"accuracy":0.5,"final_loss":0.1,"lr":0.003,"curve":[[5,0.1],[10,0.5]]}"#;
        let roped = m(64, 0.98, 0.003)
            .replace("\"transformer\"", "\"longnet\"")
            .replace('}', r#","overrides":"position = \"rope\""}"#);
        let retnet_dh = m(64, 0.5, 0.003).replace("\"transformer\"", "\"retnet\"").replace('}', r#","head_dim":64}"#);
        std::fs::write(
            dir.join("mqar.jsonl"),
            format!(
                "{}\n{}\n{}\n{curved}\n{roped}\n{retnet_dh}\n",
                m(32, 0.5, 0.001),
                m(64, 0.99, 0.001),
                m(64, 0.25, 0.003)
            ),
        )?;
        let sp = |model: &str, mode: &str, t: usize, s: f64| {
            format!(
                r#"{{"model":"{model}","component":"mixer","mode":"{mode}","device":"cpu","seq":{t},"batch":1,"width":64,"heads":2,"status":"ok","timing":{{"median_s":{s},"min_s":{s},"max_s":{s},"reps":3}},"peak_bytes":{},"flops":{},"flops_per_s":1.0}}"#,
                t * t,
                (t * t * t) as f64
            )
        };
        // forward: the Transformer and a model faster at every length; forward and backward:
        // the Transformer, with a failure whose message has a backtrace under it
        let failed = r#"{"model":"transformer","component":"mixer","mode":"fwdbwd","device":"cpu","seq":4096,"batch":1,"width":64,"heads":2,"status":"failed: boom\n   0: <unknown>","timing":null,"peak_bytes":null,"flops":1.0,"flops_per_s":null}"#;
        let lines = [
            sp("transformer", "fwd", 512, 0.001),
            sp("transformer", "fwd", 1024, 0.004),
            sp("transformer", "fwd", 2048, 0.016),
            sp("aft-simple", "fwd", 512, 0.0005),
            sp("aft-simple", "fwd", 1024, 0.001),
            sp("aft-simple", "fwd", 2048, 0.008),
            sp("one-wide-ffn", "fwd", 512, 0.00102),
            sp("one-wide-ffn", "fwd", 1024, 0.0039),
            sp("one-wide-ffn", "fwd", 2048, 0.0161),
            sp("transformer", "fwdbwd", 512, 0.003),
            sp("transformer", "fwdbwd", 1024, 0.012),
            sp("transformer", "fwdbwd", 2048, 0.048),
            failed.to_string(),
        ];
        std::fs::write(dir.join("scaling.jsonl"), lines.join("\n") + "\n")?;
        let dp = |model: &str, c: usize, latency: f64| {
            format!(
                r#"{{"model":"{model}","device":"cpu","context":{c},"batch":1,"status":"ok","timing":null,"latency_s":{latency},"tokens_per_s":1000.0,"state_bytes":{},"params":10}}"#,
                c * 100
            )
        };
        // RetNet measured at 1K only: twice the Transformer's speed there, "-" at 2K
        let decode = [dp("transformer", 1024, 0.001), dp("transformer", 2048, 0.001), dp("retnet", 1024, 0.0005)];
        std::fs::write(dir.join("decode.jsonl"), decode.join("\n") + "\n")?;
        let lo = r#"{"model":"transformer-encoder","readout":"mean-pool","width":64,"params":1000,"params_ratio":1.0,"steps":10,"train_examples":100,"max_len":64,"train_loss":2.0,"val_accuracy":0.25,"test_accuracy":0.375,"elapsed_s":1.0}"#;
        std::fs::write(dir.join("listops.jsonl"), format!("{lo}\n"))?;
        let pe = |m: usize, e: f64| {
            format!(
                r#"{{"bench":"performer-error","head_dim":64,"heads":4,"length":256,"input_std":0.5,"features":{m},"draws":16,"orthogonal_mean":{e},"orthogonal_sd":0.01,"iid_mean":{},"iid_sd":0.02}}"#,
                e * 1.2
            )
        };
        std::fs::write(dir.join("performer-error.jsonl"), format!("{}\n{}\n", pe(16, 0.2), pe(4096, 0.0125)))?;
        let ts = |model: &str, trainer: &str, rate: f64| {
            format!(r#"{{"model":"{model}","size":"baby","trainer":"{trainer}","tokens_per_s":{rate},"loss":2.5}}"#)
        };
        let speeds = [
            ts("transformer", "altformers", 2e6),
            ts("transformer", "pytorch-compile", 1e6),
            ts("rwkv4", "altformers", 5e5),
        ];
        std::fs::write(dir.join("training-speed.jsonl"), speeds.join("\n") + "\n")?;
        render(&dir)?;
        let md = std::fs::read_to_string(dir.join("report.md"))?;
        for needle in [
            "## Language modelling",
            "| transformer (seed 1337) | 64 |",
            "| transformer (seed 2) | 64 |",
            "| one-wide-ffn | 64 |",
            "| retnet (d_h 16) | 64 |",
            "Seed noise: transformer at seeds 1337, 2 reaches val loss 2.0000 to 2.1000 nats/byte, a spread of 0.1000.",
            "| retnet (d_h 64) | - | 0.500",
            "| longnet [position = \"rope\"] | - | 0.980",
            "d = 64",
            "0.990",
            "MQAR accuracy on 512 held-out queries during training",
            "## Time and memory",
            "### Forward\n",
            "### Forward and backward\n",
            "- aft-simple: faster at every measured length from T = 512; 0.50x the Transformer's time at T = 2048",
            "- one-wide-ffn: within 5% of it at every measured length from T = 512; 1.01x the Transformer's time at T = 2048",
            "| transformer | 4096 | 1 | - | - | - | - | - | failed: boom |\n",
            "## Decoding cost",
            "| model | 1K | 2K |\n|---|---|---|\n| retnet | 2.00x | - |\n",
            "**wrong**",
            "O(T log Td)",
            "commit `abc`",
            "- `one-wide-ffn` (2309.01826): One Wide FFN, decoder-only adaptation of the paper's encoder-decoder setting",
            "Not in this table: the encoders",
            "- `transformer-encoder` (",
            "## ListOps (Long Range Arena)",
            "chance is 10%",
            "| transformer-encoder | mean-pool | 64 | 1.00K (+0.0%) | 10 | 2.0000 | 25.0% | 37.5% | 36.4% | 1 |",
            "## Performer: approximation error against the number of features",
            "| 0.5 | 4096 | 0.0125 +- 0.0100 | 0.0150 +- 0.0200 |",
            "## Training throughput",
            "| baby | transformer | pytorch-compile | 1000K | 0.50 | 2.500 |",
            "| baby | rwkv4 | altformers | 500K | 0.25 | 2.500 |",
        ] {
            assert!(md.contains(needle), "report lacks `{needle}`:\n{md}");
        }
        // the fitted exponents of a T^2 curve (time and memory) and its cost model's (a T^3
        // count, to tell the columns apart) show in the complexity table
        assert!(md.contains("| 2.00 / 2.00 | 3.00 | 2.00 |"), "{md}");
        assert!(
            md.contains("| transformer | 0.500 (1e-3) | 0.990 (1e-3) |") && !md.contains("0.250"),
            "MQAR shows the best learning rate: {md}"
        );
        for svg in
            ["loss", "mqar-64-4", "mqar-curve-64-4", "time", "memory", "time-fwdbwd", "decode-latency", "decode-state"]
        {
            let text = std::fs::read_to_string(dir.join(format!("plots/{svg}.svg")))?;
            assert!(text.starts_with("<svg") && text.contains("transformer"), "{svg}.svg");
        }
        let text = std::fs::read_to_string(dir.join("plots/performer-error.svg"))?;
        assert!(
            text.contains("orthogonal, input std 0.5") && text.contains("iid, input std 0.5"),
            "performer-error.svg"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
