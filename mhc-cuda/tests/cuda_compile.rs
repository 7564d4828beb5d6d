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

/// Compiles `source` (named `what` in messages) for `sm` with `defines`:
/// machine code must come out, with no warning in NVRTC's log.
fn build(what: &str, source: &str, defines: &[String], sm: u32) {
    let built = compile_offline(source, defines, sm, false)
        .unwrap_or_else(|e| panic!("{what} sm_{sm} {defines:?}: {e}"));
    assert!(
        !built.cubin.is_empty(),
        "{what} sm_{sm} {defines:?}: empty cubin"
    );
    assert!(
        !built.log.contains("warning"),
        "{what} sm_{sm} {defines:?} warns:\n{}",
        built.log
    );
}

fn strings(defines: &[&str]) -> Vec<String> {
    defines.iter().map(|d| d.to_string()).collect()
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
                build("mhc.cu", KERNEL_SOURCE, &defines, sm);
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
        build("model.cu", MODEL_KERNEL_SOURCE, &[], sm);
    }
}

/// The tuning variants that `scripts/gpu-ab.sh` compares on the device stay
/// buildable (sm_90): they are not the defaults, so nothing else compiles them.
#[test]
fn tuning_variants_compile() {
    if !nvrtc() {
        return;
    }
    for defines in [
        &["-DFA_LDSM=0"][..],
        &["-DFA_REG_ROWS_MAX_D=32"],
        &["-DFA_MINB_DKV=2", "-DFA_MINB_DQ=2"],
    ] {
        build("model.cu", MODEL_KERNEL_SOURCE, &strings(defines), 90);
    }
    // dx_dphi_tc's register epilogue (bf16 streams only), and the former
    // defaults of mhc.cu (a thread per token for Sinkhorn–Knopp, the inline
    // cvta shared addresses, coeff_fwd's register version) for both stream types.
    for n in 1..=8 {
        let n = format!("-DN={n}");
        let defines = strings(&[&n, "-DSTREAM_BF16=1", "-DTC_EPI_SMEM=0"]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        // dx_dphi_tc's 16-token tiles (with the planned copies and the four-channel
        // epilogue, now the defaults), coeff_fwd's former ring, and Sinkhorn–Knopp
        // with a lane per element (measured on the H200, kept off: no gain).
        let defines = strings(&[
            &n,
            "-DSTREAM_BF16=1",
            "-DCF_LEAN=0",
            "-DSK_LANES=2",
            "-DTC_TB=16",
            "-DTC_PTRS=1",
            "-DTC_EPI4=1",
        ]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        let defines = strings(&[&n, "-DSTREAM_BF16=1", "-DTC_PTRS=1", "-DTC_EPI4=0"]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        let defines = strings(&[&n, "-DSTREAM_BF16=1", "-DTC_PTRS=1", "-DDP_HL=0"]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        // The former defaults of coeff_bwd (no read-ahead), dx_dphi_tc (fragments
        // from shared memory every tile, dp converted in the kernel, generic tile
        // copies, the two-channel epilogue) and
        // Sinkhorn–Knopp's column sums (butterflies), and a deeper read-ahead.
        let defines = strings(&[
            &n,
            "-DSTREAM_BF16=1",
            "-DSK_PF=0",
            "-DTC_FRAG=0",
            "-DSK_RS=0",
            "-DDP_HL=0",
            "-DTC_PTRS=0",
            "-DTC_EPI4=0",
        ]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        let defines = strings(&[&n, "-DSTREAM_BF16=0", "-DSK_PF=8", "-DSK_RS=0"]);
        build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        for bf16 in ["-DSTREAM_BF16=0", "-DSTREAM_BF16=1"] {
            let defines = strings(&[&n, bf16, "-DSK_LANES=0", "-DTC_LEAN=0", "-DCF_ASYNC=0"]);
            build("mhc.cu", KERNEL_SOURCE, &defines, 90);
        }
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
