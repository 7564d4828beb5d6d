//! End-to-end tests of `mhc-train` (assert_cmd): error handling with exit
//! code 2, bit-identical resume, divergence handling, metrics schema, sampling.

use std::path::Path;

use assert_cmd::Command;
use mhc_cuda::metrics::read_jsonl;
use safetensors::SafeTensors;

const SMALL: &[&str] = &[
    "--width",
    "16",
    "--heads",
    "2",
    "--layers",
    "1",
    "--context",
    "16",
    "--batch",
    "4",
    "--log-every",
    "5",
    "--eval-every",
    "10",
    "--checkpoint-every",
    "10",
];

fn text_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("corpus.txt");
    let text =
        "the quick brown fox jumps over the lazy dog . a stitch in time saves nine .\n".repeat(60);
    std::fs::write(&path, text).unwrap();
    path
}

fn mhc_train() -> Command {
    Command::cargo_bin("mhc-train").unwrap()
}

fn stderr_of(cmd: &mut Command, code: i32) -> String {
    let out = cmd.assert().code(code).get_output().clone();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_exits_with_code_2_and_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let missing = tmp.path().join("nope.txt");
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .arg("--data")
            .arg(&missing)
            .arg("--out")
            .arg(&out),
        2,
    );
    assert!(
        err.contains("does not exist") && err.starts_with("error: "),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .arg("--data")
            .arg(&empty)
            .arg("--out")
            .arg(&out),
        2,
    );
    assert!(
        err.to_lowercase().contains("empty") || err.contains("no text"),
        "{err}"
    );

    let binary = tmp.path().join("binary.txt");
    std::fs::write(&binary, [b'a', b'b', 0xff, 0xfe, b'c']).unwrap();
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .arg("--data")
            .arg(&binary)
            .arg("--out")
            .arg(&out),
        2,
    );
    assert!(err.contains("UTF-8") && err.contains("binary.txt"), "{err}");

    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "tiny text").unwrap();
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .arg("--data")
            .arg(&short)
            .arg("--out")
            .arg(&out),
        2,
    );
    assert!(err.contains("context"), "{err}");

    let data = text_file(tmp.path());
    for bad in [
        &["--lr", "-1"][..],
        &["--heads", "3"],
        &["--steps", "0"],
        &["--scheme", "resnet"],
        &["--n", "0"],
        &["--preset", "huge"],
        &["--streams", "f16"],
    ] {
        let err = stderr_of(
            mhc_train()
                .args(SMALL)
                .args(bad)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&out),
            2,
        );
        assert!(err.starts_with("error: "), "{bad:?}: {err}");
    }
    assert!(
        !out.join("mhc").join("checkpoint.safetensors").exists(),
        "nothing trained on bad input"
    );
}

fn checkpoint_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), st.tensor(&n).unwrap().data().to_vec()))
        .collect()
}

#[test]
fn resume_continues_bit_identically_and_metrics_follow_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    let run = |out: &Path, extra: &[&str]| {
        mhc_train()
            .args(SMALL)
            .args(["--scheme", "mhc", "--steps", "20"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(extra)
            .assert()
            .success();
    };
    run(&straight, &[]);
    run(&split, &["--stop-after", "10"]);
    let partial = checkpoint_tensors(&split.join("mhc/checkpoint.safetensors"));
    assert_ne!(
        partial,
        checkpoint_tensors(&straight.join("mhc/checkpoint.safetensors"))
    );
    // Resuming refuses a changed configuration, then continues with the same one.
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .args([
                "--scheme", "mhc", "--steps", "20", "--width", "32", "--resume",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&split),
        2,
    );
    assert!(err.contains("different run configuration"), "{err}");
    run(&split, &["--resume"]);
    assert_eq!(
        checkpoint_tensors(&split.join("mhc/checkpoint.safetensors")),
        checkpoint_tensors(&straight.join("mhc/checkpoint.safetensors")),
        "weights, AdamW moments: bit for bit"
    );

    // Metrics: JSONL records with every field, CSV with a header and one row per record.
    let records = read_jsonl(straight.join("mhc/metrics.jsonl")).unwrap();
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![5, 10, 15, 20]
    );
    for r in &records {
        assert_eq!(r.scheme, "mhc");
        assert_eq!(r.amax_fwd.len(), 2, "one per wrapped sublayer");
        assert_eq!(r.composite_bwd_max.len(), 2, "one per depth");
        assert!(
            r.train_loss.is_finite() && r.grad_norm > 0.0 && r.tokens_per_s > 0.0 && r.lr > 0.0
        );
        assert!(r.sk_residual >= 0.0 && r.sk_residual < 1e-2);
    }
    assert!(records[1].val_loss.is_some() && records[0].val_loss.is_none());
    let first_line = std::fs::read_to_string(straight.join("mhc/metrics.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let json: serde_json::Value = serde_json::from_str(&first_line).unwrap();
    for key in [
        "scheme",
        "step",
        "tokens_seen",
        "train_loss",
        "val_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "elapsed_s",
        "sk_residual",
        "amax_fwd",
        "amax_bwd",
        "composite_fwd_mean",
        "composite_fwd_max",
        "composite_bwd_mean",
        "composite_bwd_max",
    ] {
        assert!(json.get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    let csv = std::fs::read_to_string(straight.join("mhc/metrics.csv")).unwrap();
    assert!(
        csv.starts_with("scheme,step,tokens_seen,train_loss,val_loss,grad_norm,lr"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1 + records.len());
    // Plots of the run.
    for f in [
        "loss.svg",
        "loss.png",
        "composite_gain.svg",
        "gain_vs_depth.png",
    ] {
        assert!(straight.join("plots").join(f).exists(), "{f}");
    }

    // Sampling from the checkpoint continues the prompt.
    let out = mhc_train()
        .args(["sample", "--length", "20", "--prompt", "the "])
        .arg("--checkpoint")
        .arg(straight.join("mhc/checkpoint.safetensors"))
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.starts_with("the ") && text.len() >= 20, "{text}");

    // A run folder is never overwritten by accident.
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .args(["--steps", "20"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&straight),
        2,
    );
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
}

#[test]
fn corrupt_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("run");
    std::fs::create_dir_all(out.join("mhc")).unwrap();
    let ckpt = out.join("mhc/checkpoint.safetensors");
    std::fs::write(&ckpt, b"definitely not safetensors").unwrap();
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .arg("--resume")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
        2,
    );
    assert!(err.contains("not a usable mhc checkpoint"), "{err}");
    let err = stderr_of(mhc_train().arg("sample").arg("--checkpoint").arg(&ckpt), 2);
    assert!(err.contains("not a usable mhc checkpoint"), "{err}");
    let err = stderr_of(
        mhc_train()
            .arg("sample")
            .arg("--checkpoint")
            .arg(tmp.path().join("missing.safetensors")),
        2,
    );
    assert!(err.contains("missing.safetensors"), "{err}");
    // A truncated real checkpoint.
    mhc_train()
        .args(SMALL)
        .args(["--steps", "10", "--force"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    let err = stderr_of(mhc_train().arg("sample").arg("--checkpoint").arg(&ckpt), 2);
    assert!(err.contains("not a usable mhc checkpoint"), "{err}");
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("run");
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .args(["--steps", "50", "--lr", "1e30", "--checkpoint-every", "1"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
        3,
    );
    assert!(
        err.contains("NaN/Inf") && err.contains("last good checkpoint"),
        "{err}"
    );
    let ckpt = out.join("mhc/checkpoint.safetensors");
    assert!(ckpt.exists());
    assert!(
        !out.join("mhc/checkpoint.safetensors.tmp").exists(),
        "no half-written file left"
    );
    // The kept checkpoint is intact: it reads back, with the step it was written at.
    let loaded = mhc_cuda::checkpoint::load(&ckpt).unwrap();
    assert!(loaded.step >= 1 && loaded.step < 50, "step {}", loaded.step);
}

#[test]
fn compare_prints_the_device_and_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("cmp");
    let assert = mhc_train()
        .args(SMALL)
        .args(["--compare", "--steps", "10", "--device", "cpu"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(stdout.starts_with("device: cpu"), "{stdout}");
    for scheme in ["| residual | 1 |", "| hc | 4 |", "| mhc | 4 |"] {
        assert!(stdout.contains(scheme), "{scheme} in {stdout}");
    }
    // `plot` redraws the figures of the runs in a folder (e.g. trained by separate processes).
    let plots = out.join("plots");
    std::fs::remove_dir_all(&plots).unwrap();
    let assert = mhc_train().arg("plot").arg(&out).assert().success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(stdout.starts_with("plots: "), "{stdout}");
    let drawn = std::fs::read_dir(&plots).unwrap().count();
    assert!(drawn >= 2, "{drawn} files in {}", plots.display());
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = stderr_of(mhc_train().arg("plot").arg(&empty), 2);
    assert!(err.contains("holds no run"), "{err}");
    let err = stderr_of(mhc_train().args(["--device", "cuda"]), 2);
    assert!(err.contains("cpu"), "{err}");
}

#[test]
fn auto_device_says_which_device_each_run_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("auto");
    let assert = mhc_train()
        .args(SMALL)
        .args(["--steps", "2", "--device", "auto"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    let first = stdout.lines().next().unwrap_or_default().to_string();
    match mhc_cuda::cuda::CudaDevice::new(0) {
        Err(mhc_cuda::cuda::CudaError::NoDriver(_)) => {
            assert!(
                first.starts_with("device: cpu") && first.contains("no CUDA driver found"),
                "{first}"
            )
        }
        _ => assert!(first.starts_with("device: cuda"), "{first}"),
    }
}

#[test]
fn replicas_train_data_parallel_on_the_cpu_with_the_same_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let run = |replicas: &str, out: &Path| {
        mhc_train()
            .args(SMALL)
            .args(["--scheme", "mhc", "--steps", "10", "--device", "cpu"])
            .args(["--replicas", replicas, "--force"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .assert()
            .success();
        read_jsonl(out.join("mhc/metrics.jsonl")).unwrap()
    };
    let one = run("1", &tmp.path().join("one"));
    let two = run("2", &tmp.path().join("two"));
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.step, b.step);
        assert!((a.train_loss - b.train_loss).abs() <= 1e-5 * a.train_loss);
    }
    assert!(
        tmp.path()
            .join("two/mhc")
            .join("checkpoint.safetensors")
            .is_file()
    );
    // Bad replica counts are refused with exit code 2 and a message that says why.
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .args(["--replicas", "3", "--device", "cpu", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(tmp.path().join("three")),
        2,
    );
    assert!(err.contains("does not split into 3 equal shards"), "{err}");
    let err = stderr_of(mhc_train().args(["--replicas", "0"]), 2);
    assert!(err.contains("--replicas must be at least 1"), "{err}");
}

#[test]
fn gpus_is_refused_clearly_without_enough_cuda_devices() {
    let found = mhc_cuda::cuda::CudaDevice::count().unwrap_or(0);
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr_of(
        mhc_train()
            .args(SMALL)
            .args(["--gpus", &(found + 1).to_string(), "--out"])
            .arg(tmp.path().join("run")),
        2,
    );
    assert!(
        err.contains("no usable CUDA driver") || err.contains("CUDA device(s) found"),
        "{err}"
    );
    let err = stderr_of(mhc_train().args(["--gpus", "0"]), 2);
    assert!(err.contains("--gpus must be at least 1"), "{err}");
}
