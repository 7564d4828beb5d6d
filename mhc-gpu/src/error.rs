//! Typed errors of the wgpu backend, with messages a user can act on.

use std::fmt;

/// Everything that can go wrong on the wgpu path.
#[derive(Clone, Debug, PartialEq)]
pub enum GpuError {
    /// No adapter (GPU or software rasteriser) was found for the enabled backends.
    NoAdapter(String),
    /// The adapter refused to create a device.
    DeviceRequest(String),
    /// The device was lost (driver reset, GPU removed, timeout); its buffers are gone.
    DeviceLost(String),
    /// wgpu reported a validation or out-of-memory error (a bug of this crate, or memory exhausted).
    Device(String),
    /// Mapping a buffer for reading back failed.
    Readback(String),
    /// A request exceeds a limit of the device.
    LimitExceeded {
        /// What was too large.
        what: String,
        /// The amount asked for.
        requested: u64,
        /// The device's limit.
        limit: u64,
        /// What to change.
        hint: &'static str,
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
    /// Outside what the shaders support (the message says the limit).
    Unsupported(String),
    /// An error of the core (configuration, parameters, data).
    Core(mhc_core::MhcError),
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAdapter(m) => write!(
                f,
                "no wgpu adapter found ({m}); install a Vulkan driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers libvulkan1` gives the lavapipe software adapter), or set WGPU_BACKEND, or use --device cpu"
            ),
            Self::DeviceRequest(m) => write!(
                f,
                "the wgpu adapter refused to create a device: {m}; update the GPU driver or try another adapter"
            ),
            Self::DeviceLost(m) => write!(
                f,
                "the GPU device was lost ({m}); its buffers are gone: restart the run (resume from the last checkpoint)"
            ),
            Self::Device(m) => write!(
                f,
                "wgpu reported an error: {m}; if it says out of memory, use a smaller batch or model"
            ),
            Self::Readback(m) => write!(f, "reading a GPU buffer back failed: {m}"),
            Self::LimitExceeded {
                what,
                requested,
                limit,
                hint,
            } => write!(
                f,
                "{what}: {requested} exceeds this device's limit of {limit}; {hint}"
            ),
            Self::Shape {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch for {what}: expected {expected} elements, got {got}"
            ),
            Self::Unsupported(m) => write!(f, "unsupported by the wgpu shaders: {m}"),
            Self::Core(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for GpuError {}

impl From<mhc_core::MhcError> for GpuError {
    fn from(e: mhc_core::MhcError) -> Self {
        Self::Core(e)
    }
}

/// Result of this crate.
pub type GpuResult<T> = Result<T, GpuError>;
