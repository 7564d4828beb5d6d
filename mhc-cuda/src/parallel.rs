//! Data-parallel training on the CPU: replicas as threads, joined by
//! [`ThreadAllReduce`], a deterministic all-reduce (the last replica to
//! arrive sums the contributions in rank order, in f64, and every replica
//! copies the same result). The algorithm itself is the core's
//! [`mhc_core::model::parallel`]; the GPU path uses the same one with NCCL
//! ([`crate::cuda::nccl`]).
//!
//! A replica that stops (an error, a panic) drops its handle; the others'
//! pending and later calls then fail with [`MhcError::Collective`] instead of
//! waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use mhc_core::model::parallel::AllReduce;
use mhc_core::{MhcError, Real};

struct Round {
    /// Incremented when a round's sum is ready.
    generation: u64,
    /// Contributions of the current round, by rank.
    contributions: Vec<Option<Vec<f64>>>,
    /// The last round's sum.
    result: Vec<f64>,
    /// Replicas that still have to copy `result` out.
    readers_left: usize,
    /// A replica has gone: every call fails.
    broken: bool,
}

struct Group {
    round: Mutex<Round>,
    changed: Condvar,
    ranks: usize,
}

/// One replica's end of a CPU all-reduce among threads (see the module docs).
pub struct ThreadAllReduce {
    group: Arc<Group>,
    rank: usize,
    bucket_elements: usize,
}

impl ThreadAllReduce {
    /// A group of `ranks` connected replicas, rank `i` at index `i`; move
    /// each into its thread. [`MhcError::ZeroReplicas`] for `ranks = 0`.
    pub fn group(ranks: usize) -> Result<Vec<Self>, MhcError> {
        if ranks == 0 {
            return Err(MhcError::ZeroReplicas);
        }
        let group = Arc::new(Group {
            round: Mutex::new(Round {
                generation: 0,
                contributions: vec![None; ranks],
                result: Vec::new(),
                readers_left: 0,
                broken: false,
            }),
            changed: Condvar::new(),
            ranks,
        });
        Ok((0..ranks)
            .map(|rank| Self {
                group: group.clone(),
                rank,
                bucket_elements: mhc_core::model::parallel::DEFAULT_BUCKET_ELEMENTS,
            })
            .collect())
    }

    /// Sets the minimum gradient bucket size (elements; whole tensors per bucket).
    pub fn with_bucket_elements(mut self, elements: usize) -> Self {
        self.bucket_elements = elements.max(1);
        self
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>, MhcError> {
        self.group
            .round
            .lock()
            .map_err(|_| MhcError::Collective("a replica thread panicked".into()))
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Round>) -> Result<MutexGuard<'a, Round>, MhcError> {
        self.group
            .changed
            .wait(guard)
            .map_err(|_| MhcError::Collective("a replica thread panicked".into()))
    }
}

fn gone() -> MhcError {
    MhcError::Collective(
        "another replica stopped (its error is reported by that replica); this one stops too"
            .into(),
    )
}

impl<T: Real> AllReduce<T> for ThreadAllReduce {
    fn ranks(&self) -> usize {
        self.group.ranks
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn bucket_elements(&self) -> usize {
        self.bucket_elements
    }

    fn sum(&mut self, values: &mut [T]) -> Result<(), MhcError> {
        let ranks = self.group.ranks;
        let mut round = self.lock()?;
        // The previous round's result must be read by everyone before it is replaced.
        while round.readers_left > 0 && !round.broken {
            round = self.wait(round)?;
        }
        if round.broken {
            return Err(gone());
        }
        round.contributions[self.rank] = Some(values.iter().map(|v| v.as_f64()).collect());
        let generation = round.generation;
        if round.contributions.iter().all(Option::is_some) {
            let mut sum = vec![0.0f64; values.len()];
            for (rank, c) in round.contributions.iter_mut().enumerate() {
                let c = c.take().unwrap_or_default();
                if c.len() != sum.len() {
                    round.broken = true;
                    self.group.changed.notify_all();
                    return Err(MhcError::Collective(format!(
                        "replica {rank} contributed {} values, replica {} {}: the replicas run different models",
                        c.len(),
                        self.rank,
                        sum.len()
                    )));
                }
                for (s, v) in sum.iter_mut().zip(c) {
                    *s += v;
                }
            }
            round.result = sum;
            round.readers_left = ranks;
            round.generation += 1;
            self.group.changed.notify_all();
        } else {
            while round.generation == generation && !round.broken {
                round = self.wait(round)?;
            }
            if round.generation == generation {
                return Err(gone());
            }
        }
        for (v, &s) in values.iter_mut().zip(&round.result) {
            *v = T::of(s);
        }
        round.readers_left -= 1;
        if round.readers_left == 0 {
            self.group.changed.notify_all();
        }
        Ok(())
    }
}

impl Drop for ThreadAllReduce {
    fn drop(&mut self) {
        // Poisoned or not, mark the group broken so no replica waits for this one.
        let mut round = match self.group.round.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        round.broken = true;
        self.group.changed.notify_all();
    }
}
