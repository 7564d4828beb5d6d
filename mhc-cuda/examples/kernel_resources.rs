//! Registers, shared memory and spills of every kernel, as ptxas reports them,
//! compiled with NVRTC on a machine without a GPU (for kernel work between
//! device sessions; Nsight on the device says what the numbers cost).
//!
//! ```text
//! export LD_LIBRARY_PATH="$(bash scripts/cuda-tools.sh)"
//! cargo run -p mhc-cuda --example kernel_resources -- --source mhc --n 4 --streams bf16
//! cargo run -p mhc-cuda --example kernel_resources -- --source model -D FA_MINB_DQ=2
//! ```

use clap::{Parser, ValueEnum};
use mhc_cuda::cuda::{KERNEL_SOURCE, MODEL_KERNEL_SOURCE, compile_offline};

#[derive(Clone, Copy, ValueEnum)]
enum Source {
    /// The mHC/HC wrapper kernels (kernels/mhc.cu).
    Mhc,
    /// The model kernels: RMSNorm, flash attention, GELU, AdamW… (kernels/model.cu).
    Model,
}

#[derive(Parser)]
#[command(about = "ptxas's resource report per kernel, without a GPU")]
struct Args {
    /// Which kernel file.
    #[arg(long, value_enum, default_value = "mhc")]
    source: Source,
    /// Streams n (mhc.cu only).
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Stream dtype, bf16 or f32 (mhc.cu only).
    #[arg(long, default_value = "bf16")]
    streams: String,
    /// Real architecture (90: H100/H200).
    #[arg(long, default_value_t = 90)]
    sm: u32,
    /// Extra defines, as NAME=VALUE (repeatable), like MHC_CUDA_DEFINES on the device.
    #[arg(short = 'D')]
    define: Vec<String>,
    /// Print NVRTC's whole log instead of the table.
    #[arg(long)]
    raw: bool,
}

#[derive(Default)]
struct Kernel {
    name: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// The number just before `unit` in `line` ("… 40 registers" → 40).
fn before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split_whitespace().last()?.parse().ok()
}

fn parse(log: &str) -> Vec<Kernel> {
    let mut out: Vec<Kernel> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(Kernel {
                name,
                ..Kernel::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("registers") {
                k.registers = before(line, "registers").unwrap_or(0);
                k.smem = before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut defines: Vec<String> = args.define.iter().map(|d| format!("-D{d}")).collect();
    let source = match args.source {
        Source::Mhc => {
            let bf16 = match args.streams.as_str() {
                "bf16" => 1,
                "f32" => 0,
                other => {
                    eprintln!("--streams must be bf16 or f32, not {other:?}");
                    return std::process::ExitCode::from(2);
                }
            };
            defines.push(format!("-DN={}", args.n));
            defines.push(format!("-DSTREAM_BF16={bf16}"));
            KERNEL_SOURCE
        }
        Source::Model => MODEL_KERNEL_SOURCE,
    };
    let built = match compile_offline(source, &defines, args.sm, true) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.raw {
        println!("{}", built.log);
        return std::process::ExitCode::SUCCESS;
    }
    println!("sm_{} {}", args.sm, defines.join(" "));
    println!(
        "{:<48} {:>5} {:>7} {:>6} {:>7} {:>7}",
        "kernel", "regs", "smem", "stack", "spill>", "spill<"
    );
    for k in parse(&built.log) {
        println!(
            "{:<48} {:>5} {:>7} {:>6} {:>7} {:>7}",
            k.name, k.registers, k.smem, k.stack, k.spill_stores, k.spill_loads
        );
    }
    std::process::ExitCode::SUCCESS
}
