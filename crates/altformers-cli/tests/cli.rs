//! The command line as a user meets it: bad input gives a clear message and a non-zero
//! exit, never a panic; a tiny run trains, evaluates and generates end to end.

use std::path::PathBuf;
use std::process::{Command, Output};

fn altformers(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_altformers")).args(args).output().expect("running altformers")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("altformers-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs and expects a clean failure whose message contains `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = altformers(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{args:?}: expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
}

const TINY: [&str; 14] = [
    "--set",
    "model.width=16",
    "--set",
    "model.depth=1",
    "--set",
    "model.heads=2",
    "--set",
    "model.context=16",
    "--set",
    "train.steps=4",
    "--set",
    "train.eval_every=2",
    "--set",
    "train.eval_batches=1",
];

#[test]
fn bad_input_is_a_clear_error() {
    let out = temp("bad").join("run");
    let out_s = out.to_str().unwrap();
    fails_with(&["train", "--model", "nosuch", "--data", "shakespeare", "--out", out_s], "unknown model `nosuch`");
    fails_with(&["train", "--model", "transformer", "--data", "/no/such/file", "--out", out_s], "does not exist");
    let empty = temp("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    fails_with(&["train", "--model", "transformer", "--data", empty.to_str().unwrap(), "--out", out_s], "is empty");
    // one bad setting each (NaN compares false both ways: it must not slip through the range checks)
    for (set, needle) in [
        ("model.heads=5", "model.heads (5) does not divide model.width (128)"),
        ("model.widht=64", "unknown config key `model.widht`"),
        ("model.width=abc", "invalid configuration"),
        ("train.min_lr=nan", "need 0 <= train.min_lr <= train.lr"),
        ("model.channel_mixer=nosuch", "unknown model.channel_mixer `nosuch`"),
        ("model.options.chunk=1", "unknown config key `model.options.chunk`"),
    ] {
        fails_with(&["train", "--model", "transformer", "--data", "shakespeare", "--set", set, "--out", out_s], needle);
    }
    fails_with(
        &["train", "--model", "retnet", "--data", "shakespeare", "--set", "model.options.chunk=0", "--out", out_s],
        "model.options.chunk must be positive",
    );
    let bad_toml = temp("bad.toml");
    std::fs::write(&bad_toml, "[train]\nlearning_rate = 1.0\n").unwrap();
    fails_with(
        &[
            "train",
            "--model",
            "transformer",
            "--data",
            "shakespeare",
            "--config",
            bad_toml.to_str().unwrap(),
            "--out",
            out_s,
        ],
        "unknown config key `train.learning_rate`",
    );
    fails_with(&["eval", "--run", "/no/such/run", "--data", "shakespeare"], "not a run folder");
    fails_with(&["compare", "--parts", "mqar", "--jobs", "0", "--out", out_s], "--jobs must be at least 1");
    fails_with(
        &["train", "--model", "transformer", "--data", "shakespeare", "--device", "cuda", "--out", out_s],
        "CUDA",
    );
    std::fs::remove_file(empty).unwrap();
    std::fs::remove_file(bad_toml).unwrap();
}

#[test]
fn train_eval_generate_end_to_end_and_corrupt_checkpoints() {
    let dir = temp("e2e");
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--model", "transformer", "--data", "shakespeare", "--out", d, "--quiet"];
    args.extend_from_slice(&TINY);
    let out = altformers(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for key in ["step", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "elapsed_s"] {
        assert!(lines[1][key].is_number(), "metrics lack {key}");
    }

    let eval = altformers(&["eval", "--run", d, "--data", "shakespeare", "--max-bytes", "2000"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let (loss, bpb) = (v["val_loss"].as_f64().unwrap(), v["val_bpb"].as_f64().unwrap());
    assert!(loss > 1.0 && loss < 6.0 && (bpb - loss / std::f64::consts::LN_2).abs() < 1e-9);

    let gen = |mode: &str| {
        let o = altformers(&[
            "generate", "--run", d, "--prompt", "ROMEO:", "--tokens", "30", "--mode", mode, "--seed", "4",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let (p, r) = (gen("parallel"), gen("recurrent"));
    assert!(p.starts_with(b"ROMEO:") && p.len() > 30);
    assert_eq!(p, r, "modes differ");

    // resuming a finished run is a no-op that reports the last evaluation
    let resumed =
        altformers(&["train", "--model", "transformer", "--data", "shakespeare", "--out", d, "--resume", "--quiet"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    fails_with(&["train", "--model", "transformer", "--data", "shakespeare", "--out", d], "already holds a run");

    // truncated, then corrupt, then mis-shaped weights
    let weights = dir.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    fails_with(&["eval", "--run", d, "--data", "shakespeare"], "not a valid safetensors file");
    std::fs::write(&weights, b"garbage that is not safetensors").unwrap();
    fails_with(&["generate", "--run", d, "--prompt", "A"], "not a valid safetensors file");
    std::fs::write(&weights, &good).unwrap();
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"width\": 16", "\"width\": 32")).unwrap();
    fails_with(&["eval", "--run", d, "--data", "shakespeare"], "has shape");
    std::fs::write(&cfg_path, "{ not json").unwrap();
    fails_with(&["eval", "--run", d, "--data", "shakespeare"], "config.json is not valid");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn models_lists_every_architecture_with_its_complexity() {
    let out = altformers(&["models"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for arch in altformers::registry::ARCHITECTURES {
        let line = text.lines().find(|l| l.starts_with(&format!("| {} |", arch.name))).expect(arch.name);
        assert!(line.contains(arch.complexity.true_time), "{line}");
    }
    assert!(text.contains("O(T log Td)") && text.contains("wrong"));
}

/// `train --task listops` trains an encoder and prints its accuracies; encoders are refused
/// as language models and by `generate`, by name; bad ListOps input is a clear error.
#[test]
fn listops_trains_any_model_and_encoders_refuse_the_lm_by_name() {
    let dir = temp("listops");
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let listops = [
        "--set",
        "listops.generator.min_len=4",
        "--set",
        "listops.generator.max_len=16",
        "--set",
        "listops.train_examples=8",
        "--set",
        "listops.eval_examples=4",
    ];
    let mut args = vec!["train", "--task", "listops", "--model", "linformer", "--out", out_s, "--quiet"];
    args.extend(TINY);
    args.extend(listops);
    let run = altformers(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON line");
    assert_eq!(printed["readout"], "mean-pool");
    assert!(printed["test_accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));
    fails_with(&["generate", "--run", out_s, "--prompt", "M1"], "`linformer` is an encoder");
    fails_with(
        &["train", "--model", "m2-bert", "--data", "shakespeare", "--out", dir.join("lm").to_str().unwrap()],
        "`m2-bert` is an encoder",
    );
    fails_with(
        &["train", "--task", "listops", "--model", "transformer", "--data", "shakespeare", "--out", out_s],
        "drop --data",
    );
    fails_with(
        &["train", "--task", "listops", "--model", "transformer", "--set", "listops.train_exampels=3", "--out", out_s],
        "train_exampels",
    );
    fails_with(
        &["train", "--task", "listops", "--model", "transformer", "--out", dir.join("short").to_str().unwrap()],
        "model.context (64) is shorter than the longest ListOps example",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two trainings started together into one folder: one is refused (the folder is locked, or
/// already holds the other's run), the other finishes, and its folder is whole: its own
/// config.json, weights that evaluate. Repeated, since a race shows only sometimes.
#[test]
fn two_trainings_into_one_folder_leave_one_whole_run() {
    let base = temp("concurrent");
    for trial in 0..8 {
        let dir = base.join(format!("run{trial}"));
        let d = dir.to_str().unwrap();
        let spawn = |seed: &str| {
            let mut args = vec!["--threads", "1", "train", "--model", "transformer", "--data", "shakespeare", "--out"];
            args.extend([d, "--quiet", "--set", seed]);
            args.extend(TINY);
            Command::new(env!("CARGO_BIN_EXE_altformers"))
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn("train.seed=1"), spawn("train.seed=2"));
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let ok: Vec<usize> = [&a, &b].iter().enumerate().filter(|(_, o)| o.status.success()).map(|(i, _)| i).collect();
        let msgs = format!("{}\n{}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
        assert_eq!(ok.len(), 1, "trial {trial}: exactly one run must succeed: {msgs}");
        let loser = if ok[0] == 0 { &b } else { &a };
        let why = String::from_utf8_lossy(&loser.stderr);
        assert!(why.contains("is in use") || why.contains("already holds a run"), "trial {trial}: {why}");
        assert!(!why.contains("panicked"), "{why}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["train"]["seed"], ok[0] as u64 + 1, "trial {trial}: the folder holds the loser's config");
        assert!(!dir.join("LOCK").exists(), "trial {trial}: the lock outlived its run");
        let eval = altformers(&["--threads", "1", "eval", "--run", d, "--data", "shakespeare", "--max-bytes", "500"]);
        assert!(eval.status.success(), "trial {trial}: {}", String::from_utf8_lossy(&eval.stderr));
    }
    std::fs::remove_dir_all(&base).unwrap();
}
