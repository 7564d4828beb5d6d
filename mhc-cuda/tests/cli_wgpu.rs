//! `mhc-train --device wgpu` end to end: a few steps of every scheme on the
//! wgpu adapter (lavapipe in CI), the device line naming the adapter, the
//! same metrics and checkpoint files as the CPU path, and the same losses
//! as the CPU reference within 1e-4 relative. Without an adapter the
//! command must fail with exit code 2 and a message naming the problem;
//! the test then prints `skipping: no wgpu adapter (...)`.

use assert_cmd::Command;
use mhc_cuda::metrics::read_jsonl;

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
    "2",
    "--steps",
    "3",
    "--log-every",
    "1",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "3",
];

#[test]
fn wgpu_device_trains_every_scheme_like_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let gpu_dir = tmp.path().join("wgpu");
    let out = Command::cargo_bin("mhc-train")
        .unwrap()
        .args(SMALL)
        .args(["--compare", "--device", "wgpu", "--out"])
        .arg(&gpu_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("no wgpu adapter"), "{stderr}");
        eprintln!("skipping: no wgpu adapter ({})", stderr.trim());
        return;
    }
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("device: wgpu (") && first.contains("for residual, hc, mhc"),
        "{stdout}"
    );
    let cpu_dir = tmp.path().join("cpu");
    Command::cargo_bin("mhc-train")
        .unwrap()
        .args(SMALL)
        .args(["--compare", "--device", "cpu", "--out"])
        .arg(&cpu_dir)
        .assert()
        .success();
    for scheme in ["residual", "hc", "mhc"] {
        assert!(gpu_dir.join(scheme).join("checkpoint.safetensors").exists());
        let gpu = read_jsonl(gpu_dir.join(scheme).join("metrics.jsonl")).unwrap();
        let cpu = read_jsonl(cpu_dir.join(scheme).join("metrics.jsonl")).unwrap();
        assert_eq!(gpu.len(), 3, "{scheme}: one record per step");
        for (g, c) in gpu.iter().zip(&cpu) {
            let rel = (g.train_loss - c.train_loss).abs() / c.train_loss;
            assert!(
                rel < 1e-4,
                "{scheme} step {}: loss {} vs {}",
                g.step,
                g.train_loss,
                c.train_loss
            );
            assert_eq!(g.amax_fwd.len(), c.amax_fwd.len());
        }
        let (g, c) = (gpu.last().unwrap(), cpu.last().unwrap());
        let (gv, cv) = (g.val_loss.unwrap(), c.val_loss.unwrap());
        assert!((gv - cv).abs() < 1e-4 * cv, "{scheme}: val {gv} vs {cv}");
    }
}
