//! The floating-point element type the core is generic over.

use core::fmt::{Debug, Display};
use core::iter::Sum;

use num_traits::{Float, FromPrimitive, ToPrimitive};

/// A real scalar the core computes in: `f32` or `f64`.
///
/// Everything in `mhc-core` is generic over this trait, so the f64 path can
/// serve as the reference for the f32 one (and for every GPU backend).
pub trait Real:
    Float + FromPrimitive + ToPrimitive + Sum + Default + Debug + Display + Send + Sync + 'static
{
    /// Converts an `f64` constant (rounding to nearest for `f32`).
    #[inline(always)]
    fn of(value: f64) -> Self {
        // Every f64 is representable (possibly rounded or infinite) in f32/f64.
        Self::from_f64(value).unwrap_or_else(Self::nan)
    }

    /// Converts to `f64` (exact for both `f32` and `f64`).
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self.to_f64().unwrap_or(f64::NAN)
    }
}

impl Real for f32 {}
impl Real for f64 {}
