//! Every kernel source compiles with NVRTC and ptxas for the H100/H200
//! (sm_90) and the oldest supported architecture (sm_80), for every define the
//! trainer uses — without a GPU. Catches kernel edits that would fail to
//! build or load on the device. Skips with a message when NVRTC is not found
//! (`scripts/setup.sh` installs it for CI: see `scripts/cuda-tools.sh`), or
//! fails when `MHC_REQUIRE_NVRTC` is set (as `scripts/test.sh` does).

use mhc_cuda::cuda::{KERNEL_SOURCE, MODEL_KERNEL_SOURCE, compile_offline, nvrtc_present};

const ARCHES: [u32; 2] = [90, 80];

fn nvrtc() -> bool {
    if nvrtc_present() {
        true
    } else if std::env::var_os("MHC_REQUIRE_NVRTC").is_some() {
        panic!("MHC_REQUIRE_NVRTC is set but libnvrtc.so is not found (LD_LIBRARY_PATH?)");
    } else {
        eprintln!(
            "skipping the offline kernel compile: libnvrtc.so not found \
             (run scripts/cuda-tools.sh and put its lib folder in LD_LIBRARY_PATH)"
        );
        false
    }
}

#[test]
fn mhc_kernels_compile_for_every_n_and_stream_dtype() {
    if !nvrtc() {
        return;
    }
    for sm in ARCHES {
        for n in 1..=8 {
            for bf16 in [0, 1] {
                let defines = [format!("-DN={n}"), format!("-DSTREAM_BF16={bf16}")];
                let built = compile_offline(KERNEL_SOURCE, &defines, sm, false)
                    .unwrap_or_else(|e| panic!("mhc.cu, sm_{sm}, n = {n}, bf16 = {bf16}: {e}"));
                assert!(built.cubin_bytes > 0, "mhc.cu sm_{sm} n = {n}: empty cubin");
                assert!(
                    !built.log.contains("warning"),
                    "mhc.cu sm_{sm} n = {n} bf16 = {bf16} warns:\n{}",
                    built.log
                );
            }
        }
    }
}

#[test]
fn model_kernels_compile() {
    if !nvrtc() {
        return;
    }
    for sm in ARCHES {
        let built = compile_offline(MODEL_KERNEL_SOURCE, &[], sm, false)
            .unwrap_or_else(|e| panic!("model.cu, sm_{sm}: {e}"));
        assert!(built.cubin_bytes > 0);
        assert!(
            !built.log.contains("warning"),
            "model.cu sm_{sm} warns:\n{}",
            built.log
        );
    }
}

/// The tuning variants that `scripts/gpu-ab.sh` compares on the device stay
/// buildable (sm_90): they are off by default, so nothing else compiles them.
#[test]
fn tuning_variants_compile() {
    if !nvrtc() {
        return;
    }
    let model: [&[&str]; 3] = [
        &["-DFA_LDSM=1"],
        &["-DFA_LDSM=1", "-DFA_REG_ROWS_MAX_D=32"],
        &["-DFA_LDSM=1", "-DFA_MINB_DKV=2", "-DFA_MINB_DQ=2"],
    ];
    for defines in model {
        let defines: Vec<String> = defines.iter().map(|d| d.to_string()).collect();
        let built = compile_offline(MODEL_KERNEL_SOURCE, &defines, 90, false)
            .unwrap_or_else(|e| panic!("model.cu {defines:?}: {e}"));
        assert!(
            !built.log.contains("warning"),
            "{defines:?}:\n{}",
            built.log
        );
    }
    // dx_dphi_tc's shared-memory epilogue exists for bf16 streams only.
    for n in 1..=8 {
        let defines = [
            format!("-DN={n}"),
            "-DSTREAM_BF16=1".to_string(),
            "-DTC_EPI_SMEM=1".to_string(),
        ];
        let built = compile_offline(KERNEL_SOURCE, &defines, 90, false)
            .unwrap_or_else(|e| panic!("mhc.cu {defines:?}: {e}"));
        assert!(
            !built.log.contains("warning"),
            "{defines:?}:\n{}",
            built.log
        );
    }
}

#[test]
fn a_broken_kernel_is_a_compile_error_with_the_log() {
    if !nvrtc() {
        return;
    }
    let err = compile_offline(
        "extern \"C\" __global__ void k(float* p) { p[0] = undefined_name; }",
        &[],
        90,
        false,
    )
    .expect_err("an undefined identifier must not compile");
    let msg = err.to_string();
    assert!(
        msg.contains("undefined_name"),
        "the log names the error: {msg}"
    );
}
