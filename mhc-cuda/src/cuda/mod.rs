//! The CUDA backend: fused mHC wrapper kernels (`kernels/mhc.cu`, compiled at
//! run time with NVRTC through `cudarc`; no CUDA is needed to build), a safe
//! API over device buffers, and typed errors.
//!
//! Every kernel is compiled for one `n` (a `-DN=` define), so each expansion
//! rate — the paper's n = 4 included — gets its own fully unrolled code.
//!
//! Nothing here panics when no GPU is present: [`CudaDevice::new`] probes for
//! the driver and NVRTC libraries first and returns [`CudaError::NoDriver`].
//!
//! Limits (checked, with a typed error outside them): `1 ≤ n ≤ 8`; `C` a
//! multiple of 4 (16-byte vector access of f32, 8-byte of bf16); at most 64
//! Sinkhorn–Knopp iterations; `T·n·C < 2³¹`
//! elements per buffer; the scheme is mHC dynamic (the paper's form).

#![allow(unsafe_code)] // kernel launches and the driver probe are `unsafe` in cudarc; each use says why it is sound

mod hc;
mod model;
mod model_ops;
pub mod nccl;
mod wrapper;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

pub use hc::HcCuda;
pub use model::{DeviceParam, GpuStepStats, GpuTrainer, StreamDtype};
pub use model_ops::{GemmPrecision, MatMul, ModelKernels, Operand};
pub use wrapper::{CudaSublayer, MhcCuda, ScaleSublayer};

/// The mHC wrapper kernels' source, compiled per (n, stream dtype) on first use.
pub const KERNEL_SOURCE: &str = include_str!("kernels/mhc.cu");

/// The model kernels' source (RMSNorm, GELU, cross-entropy, AdamW, sums) for the CUDA trainer.
pub const MODEL_KERNEL_SOURCE: &str = include_str!("kernels/model.cu");

/// Everything that can go wrong on the CUDA path.
#[derive(Debug)]
pub enum CudaError {
    /// No CUDA driver (libcuda) or NVRTC library was found, or no device answered.
    NoDriver(String),
    /// A driver call failed.
    Driver(String),
    /// NVRTC rejected the kernels (a bug: the message holds its log).
    Compile(String),
    /// The device has too little free memory.
    OutOfMemory {
        /// Bytes requested.
        requested: usize,
        /// Bytes free on the device.
        free: usize,
    },
    /// A buffer or dimension does not match.
    Shape {
        /// What.
        what: &'static str,
        /// Expected element count.
        expected: usize,
        /// Given element count.
        got: usize,
    },
    /// Outside what the kernels support (the message says the limit).
    Unsupported(String),
    /// An error of the core (configuration or parameters).
    Core(mhc_core::MhcError),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDriver(m) => write!(f, "no usable CUDA driver: {m}"),
            Self::Driver(m) => write!(f, "CUDA driver error: {m}"),
            Self::Compile(m) => write!(f, "NVRTC failed to compile the mHC kernels: {m}"),
            Self::OutOfMemory { requested, free } => write!(
                f,
                "out of GPU memory: {requested} bytes requested, {free} free; use fewer tokens per call"
            ),
            Self::Shape {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch for {what}: expected {expected} elements, got {got}"
            ),
            Self::Unsupported(m) => write!(f, "unsupported by the CUDA kernels: {m}"),
            Self::Core(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        Self::Driver(format!("{e:?}"))
    }
}

impl From<mhc_core::MhcError> for CudaError {
    fn from(e: mhc_core::MhcError) -> Self {
        Self::Core(e)
    }
}

/// Result of this module.
pub type CudaResult<T> = Result<T, CudaError>;

/// A stream element type: `f32` or `half::bf16`.
pub trait StreamElement:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// Whether the kernels treat it as bf16.
    const BF16: bool;
    /// Name for messages and benchmark tables.
    const NAME: &'static str;
    /// Rounds an f32 to this type.
    fn from_f32(v: f32) -> Self;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// `s` as the f32 or bf16 slice it is (for code that treats the two apart).
    fn view(s: &CudaSlice<Self>) -> StreamRef<'_>;
    /// `s` as the f32 or bf16 slice it is, mutably.
    fn view_mut(s: &mut CudaSlice<Self>) -> StreamMut<'_>;
}

/// A device slice of a [`StreamElement`], by type.
pub enum StreamRef<'a> {
    /// f32 elements.
    F32(&'a CudaSlice<f32>),
    /// bf16 elements.
    Bf16(&'a CudaSlice<half::bf16>),
}

/// A mutable device slice of a [`StreamElement`], by type.
pub enum StreamMut<'a> {
    /// f32 elements.
    F32(&'a mut CudaSlice<f32>),
    /// bf16 elements.
    Bf16(&'a mut CudaSlice<half::bf16>),
}

impl StreamElement for f32 {
    const BF16: bool = false;
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn view(s: &CudaSlice<Self>) -> StreamRef<'_> {
        StreamRef::F32(s)
    }
    fn view_mut(s: &mut CudaSlice<Self>) -> StreamMut<'_> {
        StreamMut::F32(s)
    }
}

impl StreamElement for half::bf16 {
    const BF16: bool = true;
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn view(s: &CudaSlice<Self>) -> StreamRef<'_> {
        StreamRef::Bf16(s)
    }
    fn view_mut(s: &mut CudaSlice<Self>) -> StreamMut<'_> {
        StreamMut::Bf16(s)
    }
}

/// One GPU: its context, a stream, and the compiled kernel modules.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
}

/// Whether the CUDA driver and NVRTC libraries can be loaded (never panics).
pub fn libraries_present() -> bool {
    // SAFETY: this only tries to dlopen the driver library and reports whether that worked.
    let driver = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() })
        .unwrap_or(false);
    driver && nvrtc_present()
}

impl CudaDevice {
    /// Number of CUDA devices the driver sees, or [`CudaError::NoDriver`]
    /// when the driver or NVRTC cannot be loaded (never panics).
    pub fn count() -> CudaResult<usize> {
        if !libraries_present() {
            return Err(CudaError::NoDriver(
                "libcuda.so / libnvrtc.so not found (is the NVIDIA driver and CUDA 13 installed?)"
                    .into(),
            ));
        }
        let count = std::panic::catch_unwind(CudaContext::device_count)
            .map_err(|_| CudaError::NoDriver("the CUDA driver could not be initialised".into()))?;
        match count {
            Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
            Err(e) => match e.0 {
                cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => Ok(0),
                _ => Err(CudaError::NoDriver(format!("{e:?}"))),
            },
        }
    }

    /// Opens GPU `ordinal`, or [`CudaError::NoDriver`] when there is no driver or device.
    pub fn new(ordinal: usize) -> CudaResult<Self> {
        if !libraries_present() {
            return Err(CudaError::NoDriver(
                "libcuda.so / libnvrtc.so not found (is the NVIDIA driver and CUDA 13 installed?)"
                    .into(),
            ));
        }
        use cudarc::driver::sys::cudaError_enum as E;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CudaError::NoDriver("the CUDA driver could not be initialised".into()))?
            .map_err(|e| match e.0 {
                // Only "there is no GPU" is a missing driver; any other failure is a real error.
                E::CUDA_ERROR_NO_DEVICE
                | E::CUDA_ERROR_INVALID_DEVICE
                | E::CUDA_ERROR_NOT_INITIALIZED
                | E::CUDA_ERROR_STUB_LIBRARY => {
                    CudaError::NoDriver(format!("device {ordinal}: {e:?}"))
                }
                _ => CudaError::Driver(format!("device {ordinal}: {e:?}")),
            })?;
        // SAFETY: every buffer of this crate lives on the one stream below, so cudarc's
        // cross-stream event tracking (an event per use) is unnecessary; turning it off
        // before any allocation keeps it off for all of them.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// The stream every kernel of this device is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> CudaResult<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// Waits for the stream, then hands the memory the stream-ordered allocator
    /// keeps cached (freed buffers) back to the device, so that [`Self::memory`]
    /// counts only live buffers (e.g. between benchmarks of several models).
    pub fn release_cached_memory(&self) -> CudaResult<()> {
        self.stream.synchronize()?;
        // SAFETY: the device handle comes from this context; the default pool of a
        // valid device is valid, and trimming only releases unused memory.
        unsafe {
            let pool = cudarc::driver::result::device::get_default_mem_pool(self.ctx.cu_device())?;
            cudarc::driver::result::mem_pool::trim_to(pool, 0)?;
        }
        Ok(())
    }

    /// Fails with [`CudaError::OutOfMemory`] if fewer than `bytes` are free.
    pub fn ensure_free(&self, bytes: usize) -> CudaResult<()> {
        let (free, _) = self.memory()?;
        if bytes > free {
            Err(CudaError::OutOfMemory {
                requested: bytes,
                free,
            })
        } else {
            Ok(())
        }
    }

    /// The kernel `name` for `n` streams of the given dtype (compiled once per pair).
    pub(crate) fn function(&self, n: usize, bf16: bool, name: &str) -> CudaResult<CudaFunction> {
        let defines = vec![
            format!("-DN={n}"),
            format!("-DSTREAM_BF16={}", u8::from(bf16)),
        ];
        let module = self.module(&format!("mhc/{n}/{bf16}"), KERNEL_SOURCE, defines)?;
        Ok(module.load_function(name)?)
    }

    /// `source` compiled with NVRTC for this device (once per `key`), with
    /// `defines` and any `-D` options of the `MHC_CUDA_DEFINES` variable
    /// (tuning experiments, e.g. `"-DDX_MINB=2"`).
    pub(crate) fn module(
        &self,
        key: &str,
        source: &str,
        defines: Vec<String>,
    ) -> CudaResult<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| CudaError::Driver("module cache poisoned".into()))?;
        if let Some(m) = modules.get(key) {
            return Ok(m.clone());
        }
        let (major, minor) = self.compute_capability()?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let mut options = defines;
        options.push("-std=c++17".into());
        if let Ok(extra) = std::env::var("MHC_CUDA_DEFINES") {
            options.extend(
                extra
                    .split_whitespace()
                    .filter(|d| d.starts_with("-D"))
                    .map(String::from),
            );
        }
        let opts = CompileOptions {
            arch: Some(arch),
            options,
            fmad: Some(true),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(source, opts)
            .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
        let m = self.ctx.load_module(ptx)?;
        modules.insert(key.to_string(), m.clone());
        Ok(m)
    }

    fn compute_capability(&self) -> CudaResult<(i32, i32)> {
        use cudarc::driver::sys::CUdevice_attribute;
        let major = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        Ok((major, minor))
    }

    /// Number of multiprocessors (for grid sizing).
    pub fn multiprocessors(&self) -> CudaResult<u32> {
        use cudarc::driver::sys::CUdevice_attribute;
        Ok(self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32)
    }
}

/// The integer value of `-DNAME=V` in `defines` (space-separated `-D` options),
/// the last one winning as it does for the compiler.
fn define_value(defines: &str, name: &str) -> Option<i64> {
    defines
        .split_whitespace()
        .rev()
        .filter_map(|d| d.strip_prefix("-D")?.split_once('='))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// A kernel tuning define that also changes host-side sizes (e.g. shared
/// memory), as set in `MHC_CUDA_DEFINES`; `None` when unset.
pub(crate) fn tuning_define(name: &str) -> Option<i64> {
    define_value(&std::env::var("MHC_CUDA_DEFINES").ok()?, name)
}

#[cfg(test)]
mod define_tests {
    use super::define_value;

    #[test]
    fn tuning_defines_are_read_like_the_compiler_reads_them() {
        let d = "-DFA_LDSM=1 -DFA_REG_ROWS_MAX_D=32 junk -DX -DFA_REG_ROWS_MAX_D=16";
        assert_eq!(define_value(d, "FA_REG_ROWS_MAX_D"), Some(16));
        assert_eq!(define_value(d, "FA_LDSM"), Some(1));
        assert_eq!(define_value(d, "X"), None);
        assert_eq!(define_value(d, "FA_QW"), None);
        assert_eq!(define_value("", "FA_LDSM"), None);
    }
}

/// For unit tests that compile kernels offline: whether NVRTC is there;
/// without it they skip with a message, or fail when `MHC_REQUIRE_NVRTC` is
/// set (as `scripts/test.sh` does).
#[cfg(test)]
pub(crate) fn offline_nvrtc() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var_os("MHC_REQUIRE_NVRTC").is_none(),
        "MHC_REQUIRE_NVRTC is set but libnvrtc.so is not found (LD_LIBRARY_PATH?)"
    );
    eprintln!("skipping an offline kernel compile: libnvrtc.so not found (scripts/cuda-tools.sh)");
    false
}

/// What NVRTC and ptxas made of one kernel source, compiled without a GPU.
#[derive(Debug, Clone)]
pub struct OfflineBuild {
    /// The machine code (an ELF cubin): two builds with the same bytes run
    /// the same instructions, which proves a refactor changed nothing.
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings, and ptxas's per-kernel registers, shared
    /// memory and spills when `verbose` was asked.
    pub log: String,
}

/// Whether NVRTC alone can be loaded (no driver needed): what [`compile_offline`] uses.
pub fn nvrtc_present() -> bool {
    // SAFETY: this only tries to dlopen the library and reports whether that worked.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Compiles `source` with NVRTC to machine code for the real architecture
/// `sm` (e.g. 90 for H100/H200) with `defines`, without a GPU or driver: the
/// same options as the run-time path ([`CudaDevice`] compiles to PTX for the
/// device's `compute_` architecture), then ptxas, so code that would fail to
/// load on the device fails here. `verbose` adds ptxas's resource report to
/// the log. [`CudaError::NoDriver`] when NVRTC cannot be loaded.
pub fn compile_offline(
    source: &str,
    defines: &[String],
    sm: u32,
    verbose: bool,
) -> CudaResult<OfflineBuild> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    if !nvrtc_present() {
        return Err(CudaError::NoDriver(
            "libnvrtc.so not found (CUDA 13's NVRTC: a CUDA install, or the \
             nvidia-cuda-nvrtc wheel's lib folder in LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let src = CString::new(source)
        .map_err(|_| CudaError::Compile("the kernel source holds a NUL byte".into()))?;
    let mut options: Vec<String> = defines.to_vec();
    options.push("-std=c++17".into());
    options.push(format!("--gpu-architecture=sm_{sm}"));
    options.push("--fmad=true".into());
    if verbose {
        options.push("--ptxas-options=-v".into());
    }
    let prog =
        result::create_program(&src, None).map_err(|e| CudaError::Compile(format!("{e:?}")))?;
    // SAFETY: `prog` was created above from `src`, which outlives it, and is
    // destroyed exactly once, below, on every path.
    unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let cubin = compiled.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
            let mut bytes = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast()).result()?;
            Ok(bytes)
        });
        let _ = result::destroy_program(prog);
        match cubin {
            Ok(cubin) => Ok(OfflineBuild { cubin, log }),
            Err(e) => Err(CudaError::Compile(format!("{e:?}\n{log}"))),
        }
    }
}
