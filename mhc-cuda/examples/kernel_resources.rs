//! Registers, shared memory and spills of every kernel, as ptxas reports them,
//! compiled with NVRTC on a machine without a GPU (for kernel work between
//! device sessions; Nsight on the device says what the numbers cost).
//!
//! ```text
//! export LD_LIBRARY_PATH="$(bash scripts/cuda-tools.sh)"
//! cargo run -p mhc-cuda --example kernel_resources -- --source mhc --n 4 --streams bf16
//! cargo run -p mhc-cuda --example kernel_resources -- --source model -D FA_MINB_DQ=2
//! git show HEAD:mhc-cuda/src/cuda/kernels/mhc.cu > /tmp/before.cu
//! cargo run -p mhc-cuda --example kernel_resources -- --n 4 --against /tmp/before.cu
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
    /// Compile this file instead of the built-in source of --source (e.g. an
    /// older version from `git show`), with the same defines.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Also compile this file with the same defines and say, per kernel,
    /// whether the machine code is the same (a refactor should be).
    #[arg(long)]
    against: Option<std::path::PathBuf>,
    /// Also write the machine code (cubin) here: `cmp` of two builds tells
    /// whether a source refactor changed any instruction.
    #[arg(long)]
    cubin: Option<std::path::PathBuf>,
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

/// The `.text.<kernel>` sections (machine code per kernel) of a 64-bit
/// little-endian ELF cubin.
fn kernel_code(elf: &[u8]) -> Result<std::collections::BTreeMap<String, Vec<u8>>, String> {
    let bad = || "not a 64-bit ELF cubin".to_string();
    // The little-endian unsigned integer of `width` bytes at `o`.
    let le = |o: usize, width: usize| -> Result<usize, String> {
        let bytes = elf.get(o..o + width).ok_or_else(bad)?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | usize::from(b)))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        return Err(bad());
    }
    let (shoff, shentsize, shnum, shstrndx) =
        (le(0x28, 8)?, le(0x3a, 2)?, le(0x3c, 2)?, le(0x3e, 2)?);
    // (name offset, data offset, size) of section i
    let header = |i: usize| -> Result<(usize, usize, usize), String> {
        let h = shoff + i * shentsize;
        Ok((le(h, 4)?, le(h + 0x18, 8)?, le(h + 0x20, 8)?))
    };
    let names = header(shstrndx)?.1;
    let mut out = std::collections::BTreeMap::new();
    for i in 0..shnum {
        let (name_at, offset, size) = header(i)?;
        let start = names + name_at;
        let len = elf
            .get(start..)
            .ok_or_else(bad)?
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(bad)?;
        let name = String::from_utf8_lossy(&elf[start..start + len]);
        if let Some(kernel) = name.strip_prefix(".text.") {
            out.insert(
                kernel.to_string(),
                elf.get(offset..offset + size).ok_or_else(bad)?.to_vec(),
            );
        }
    }
    Ok(out)
}

fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn run(args: Args) -> Result<(), String> {
    let mut defines: Vec<String> = args.define.iter().map(|d| format!("-D{d}")).collect();
    let builtin = match args.source {
        Source::Mhc => {
            let bf16 = match args.streams.as_str() {
                "bf16" => 1,
                "f32" => 0,
                other => return Err(format!("--streams must be bf16 or f32, not {other:?}")),
            };
            defines.push(format!("-DN={}", args.n));
            defines.push(format!("-DSTREAM_BF16={bf16}"));
            KERNEL_SOURCE
        }
        Source::Model => MODEL_KERNEL_SOURCE,
    };
    let source = match &args.file {
        Some(path) => read(path)?,
        None => builtin.to_string(),
    };
    let built = compile_offline(&source, &defines, args.sm, true).map_err(|e| e.to_string())?;
    if let Some(path) = &args.cubin {
        std::fs::write(path, &built.cubin)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if args.raw {
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), "{}", built.log);
        return Ok(());
    }
    // With --against: whether each kernel's machine code is the same in the other source.
    let same = match &args.against {
        Some(path) => {
            let other = compile_offline(&read(path)?, &defines, args.sm, false)
                .map_err(|e| e.to_string())?;
            let (a, b) = (kernel_code(&built.cubin)?, kernel_code(&other.cubin)?);
            Some(move |k: &str| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) if x == y => "same",
                (Some(_), Some(_)) => "DIFFERS",
                _ => "only here",
            })
        }
        None => None,
    };
    // A closed pipe (`| head`) ends the listing quietly.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "sm_{} {}", args.sm, defines.join(" "));
    let _ = writeln!(
        out,
        "{:<48} {:>5} {:>7} {:>6} {:>7} {:>7}{}",
        "kernel",
        "regs",
        "smem",
        "stack",
        "spill>",
        "spill<",
        if same.is_some() { "  vs --against" } else { "" }
    );
    for k in parse(&built.log) {
        let line = writeln!(
            out,
            "{:<48} {:>5} {:>7} {:>6} {:>7} {:>7}{}",
            k.name,
            k.registers,
            k.smem,
            k.stack,
            k.spill_stores,
            k.spill_loads,
            same.as_ref()
                .map(|f| format!("  {}", f(&k.name)))
                .unwrap_or_default()
        );
        if line.is_err() {
            break;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
