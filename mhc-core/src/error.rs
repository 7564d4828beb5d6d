//! Typed errors for every bad input a caller can give the public API.

use alloc::string::String;
use core::fmt;

/// Everything that can go wrong in `mhc-core`'s public API.
///
/// Each variant says what was wrong and, where it helps, what to do; the
/// `Display` text is meant to be shown to a user as is.
#[derive(Clone, Debug, PartialEq)]
pub enum MhcError {
    /// The expansion rate `n` (number of streams) was 0.
    ZeroStreams,
    /// The stream width `C` was 0.
    ZeroWidth,
    /// A batch with no tokens was given.
    EmptyBatch,
    /// Sinkhorn–Knopp was asked to run 0 iterations.
    ZeroIterations,
    /// An epsilon (`what`) was negative, zero where it must be positive, or not finite.
    InvalidEpsilon {
        /// Which epsilon.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// A buffer had the wrong number of elements.
    ShapeMismatch {
        /// Which buffer.
        what: &'static str,
        /// The number of elements expected from the configuration.
        expected: usize,
        /// The number of elements given.
        got: usize,
    },
    /// An input or parameter held NaN or ±Inf.
    NonFinite {
        /// Which buffer.
        what: &'static str,
        /// The first offending flat index.
        index: usize,
    },
    /// The plain residual scheme has exactly one stream.
    ResidualNeedsOneStream {
        /// The `n` that was given.
        n: usize,
    },
    /// A workspace was used for more tokens than it was sized for, or for another configuration.
    WorkspaceTooSmall {
        /// Tokens requested.
        tokens: usize,
        /// Tokens the workspace holds.
        capacity: usize,
    },
    /// `backward` was called on a workspace no `forward` has filled (or for another batch size).
    BackwardBeforeForward,
    /// A sublayer reported an error of its own.
    Sublayer(String),
    /// A model or training hyperparameter is invalid; the message says which and why.
    InvalidConfig(String),
    /// A token id is not below the vocabulary size.
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// Data-parallel training was asked for zero replicas (ranks).
    ZeroReplicas,
    /// The global batch does not split into equal shards, one per replica.
    BatchNotDivisible {
        /// Sequences per step (the global batch).
        batch: usize,
        /// Replicas (ranks) it was to be split over.
        replicas: usize,
    },
    /// A collective operation (all-reduce) failed, e.g. another replica stopped.
    Collective(String),
}

impl fmt::Display for MhcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroStreams => write!(
                f,
                "the expansion rate n (number of streams) must be at least 1, got 0"
            ),
            Self::ZeroWidth => write!(f, "the stream width C must be at least 1, got 0"),
            Self::EmptyBatch => write!(f, "the batch is empty: give at least one token"),
            Self::ZeroIterations => {
                write!(
                    f,
                    "Sinkhorn–Knopp needs at least 1 iteration (the paper uses 20), got 0"
                )
            }
            Self::InvalidEpsilon { what, value } => {
                write!(f, "{what} must be finite and positive, got {value}")
            }
            Self::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch for {what}: expected {expected} elements from the configuration, got {got}"
            ),
            Self::NonFinite { what, index } => write!(
                f,
                "{what} holds a non-finite value (NaN or ±Inf) at flat index {index}; check the inputs or lower the learning rate"
            ),
            Self::ResidualNeedsOneStream { n } => write!(
                f,
                "the residual scheme has exactly one stream; got n = {n} (use HC or mHC for n > 1)"
            ),
            Self::WorkspaceTooSmall { tokens, capacity } => write!(
                f,
                "the workspace holds {capacity} tokens but {tokens} were given; create it with Workspace::new for at least {tokens}"
            ),
            Self::BackwardBeforeForward => write!(
                f,
                "backward needs the state of a forward on the same workspace and batch: run forward first"
            ),
            Self::Sublayer(message) => write!(f, "sublayer error: {message}"),
            Self::InvalidConfig(message) => write!(f, "invalid configuration: {message}"),
            Self::TokenOutOfRange { token, vocab } => {
                write!(
                    f,
                    "token id {token} is outside the vocabulary of {vocab} tokens"
                )
            }
            Self::ZeroReplicas => write!(
                f,
                "data-parallel training needs at least 1 replica (GPU or thread), got 0"
            ),
            Self::BatchNotDivisible { batch, replicas } => write!(
                f,
                "the batch of {batch} sequences does not split into {replicas} equal shards; choose a batch that is a multiple of {replicas}"
            ),
            Self::Collective(message) => write!(f, "all-reduce failed: {message}"),
        }
    }
}

impl core::error::Error for MhcError {}

/// Shorthand for results of this crate.
pub type Result<T, E = MhcError> = core::result::Result<T, E>;

/// Checks that `buffer` holds `expected` elements.
pub(crate) fn check_len<T>(what: &'static str, buffer: &[T], expected: usize) -> Result<()> {
    if buffer.len() == expected {
        Ok(())
    } else {
        Err(MhcError::ShapeMismatch {
            what,
            expected,
            got: buffer.len(),
        })
    }
}

/// Checks that every element of `buffer` is finite.
pub(crate) fn check_finite<T: crate::Real>(what: &'static str, buffer: &[T]) -> Result<()> {
    match buffer.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(MhcError::NonFinite { what, index }),
    }
}

/// Checks that an epsilon is finite and positive.
pub(crate) fn check_eps(what: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(MhcError::InvalidEpsilon { what, value })
    }
}
