//! Data-parallel training: `N` replicas of one [`Trainer`], each computing
//! the gradient of one shard of the global batch, an all-reduce that turns
//! the shard gradients into the full batch's mean gradient, and the same
//! update on every replica, so the replicas stay identical.
//!
//! Algorithm of [`Trainer::data_parallel_step`] on replica (rank) `r` of `N`:
//! 1. Draw the global batch of `B` sequences with the trainer's RNG; every
//!    replica starts from the same seed, so every replica draws the same batch
//!    and nothing but gradients is communicated.
//! 2. Take shard `r`: sequences `[r·B/N, (r+1)·B/N)` (contiguous; `N` must
//!    divide `B`, else [`MhcError::BatchNotDivisible`]).
//! 3. Gradient `g_r` of the shard's mean loss `L_r`, scaled by the shard's
//!    share of the tokens, `w_r = (B/N)/B`.
//! 4. All-reduce (sum) of `w_r·g_r` and `w_r·L_r` over the replicas, in
//!    buckets of whole tensors ([`AllReduce::bucket_elements`]). Since every
//!    shard has the same number of tokens, `Σ_r w_r·g_r` is the gradient of
//!    the full batch's mean cross-entropy and `Σ_r w_r·L_r` its loss.
//! 5. Global norm of the reduced gradient, clipping by it, AdamW
//!    ([`Trainer::apply`]) — the same arithmetic on the same values on every
//!    replica, so the weights stay bit-identical across replicas.
//!
//! With `N = 1` (e.g. [`SingleReplica`]) this is [`Trainer::step`] bit for
//! bit. With `N > 1` it equals it up to rounding: the backward sums each
//! weight gradient over the tokens of one shard, then the all-reduce sums
//! the shards, instead of one sum over the whole batch.
//!
//! The all-reduce is a trait so that one code path serves every transport:
//! threads on the CPU (`mhc-cuda`'s `ThreadAllReduce`), NCCL between GPUs.
//! A non-finite shard loss does not stop a replica before the all-reduce
//! (the others would wait for it forever): it is reduced as NaN, and every
//! replica then returns the same [`MhcError::NonFinite`].

use core::ops::Range;

use super::{StepStats, Trainer};
use crate::error::{MhcError, Result};
use crate::real::Real;

/// Buckets of the gradient all-reduce hold whole tensors, at least this many
/// elements each (the last may hold fewer): 4 MiB of f32.
pub const DEFAULT_BUCKET_ELEMENTS: usize = 1 << 20;

/// A collective sum over the replicas of a data-parallel run.
///
/// Every replica calls the methods in the same order with buffers of the
/// same length; a call returns when every replica's contribution is in.
pub trait AllReduce<T> {
    /// Number of replicas `N` (≥ 1).
    fn ranks(&self) -> usize;
    /// This replica's rank, `0..N`.
    fn rank(&self) -> usize;
    /// In place: every replica's `values[i]` becomes `Σ_r values_r[i]`, the
    /// same bits on every replica (implementations sum in rank order, or
    /// otherwise deterministically).
    fn sum(&mut self, values: &mut [T]) -> Result<()>;
    /// Minimum elements of one gradient bucket (buckets hold whole tensors).
    fn bucket_elements(&self) -> usize {
        DEFAULT_BUCKET_ELEMENTS
    }
}

/// The all-reduce of a run with one replica: the identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SingleReplica;

impl<T> AllReduce<T> for SingleReplica {
    fn ranks(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn sum(&mut self, _values: &mut [T]) -> Result<()> {
        Ok(())
    }
}

/// Sequences per replica, `batch / replicas`: [`MhcError::ZeroReplicas`] for
/// `replicas = 0`, [`MhcError::BatchNotDivisible`] when it does not divide.
pub fn shard_len(batch: usize, replicas: usize) -> Result<usize> {
    if replicas == 0 {
        return Err(MhcError::ZeroReplicas);
    }
    if batch == 0 || !batch.is_multiple_of(replicas) {
        return Err(MhcError::BatchNotDivisible { batch, replicas });
    }
    Ok(batch / replicas)
}

/// The sequences `[rank·B/N, (rank+1)·B/N)` of the global batch that replica `rank` of `replicas` trains on.
pub fn shard(batch: usize, replicas: usize, rank: usize) -> Result<Range<usize>> {
    let len = shard_len(batch, replicas)?;
    if rank >= replicas {
        return Err(MhcError::InvalidConfig(alloc::format!(
            "rank {rank} is outside 0..{replicas}"
        )));
    }
    Ok(rank * len..(rank + 1) * len)
}

/// Bucket boundaries over tensors of lengths `lens` (in order): each bucket
/// is a range of flat offsets covering whole tensors and at least
/// `min_elements` of them, except possibly the last.
pub fn buckets(lens: &[usize], min_elements: usize) -> alloc::vec::Vec<Range<usize>> {
    let mut out = alloc::vec::Vec::new();
    let (mut start, mut end) = (0, 0);
    for &len in lens {
        end += len;
        if end - start >= min_elements.max(1) {
            out.push(start..end);
            start = end;
        }
    }
    if end > start {
        out.push(start..end);
    }
    out
}

impl<T: Real> Trainer<T> {
    /// One data-parallel AdamW step of replica `reduce.rank()` of
    /// `reduce.ranks()` (see the [module docs](self) for the algorithm). The
    /// trainer must have been made by [`Trainer::replica`] (or
    /// [`Trainer::new`] for one replica) with the same arguments on every
    /// replica. Returns the full batch's loss and gradient norm, the same on
    /// every replica.
    pub fn data_parallel_step(
        &mut self,
        data: &[u8],
        reduce: &mut impl AllReduce<T>,
    ) -> Result<StepStats> {
        let (rank, ranks) = (reduce.rank(), reduce.ranks());
        let rows = shard(self.config.batch, ranks, rank)?;
        let window = self.model.config().context + 1;
        self.sample_batch(data)?;
        let tokens = core::mem::take(&mut self.batch_tokens);
        let local = self.gradients(&tokens[rows.start * window..rows.end * window], rows.len());
        self.batch_tokens = tokens;
        let local_loss = match local {
            Ok(loss) => loss,
            // Reduced as NaN so that every replica stops at this step together.
            Err(MhcError::NonFinite { what: "loss", .. }) => {
                self.model.zero_grad();
                T::nan()
            }
            Err(e) => return Err(e),
        };
        let weight = T::of(rows.len() as f64 / self.config.batch as f64);
        // Flatten the weighted gradients (and the loss, last) in parameter order.
        let mut flat = core::mem::take(&mut self.flat_grads);
        flat.clear();
        let mut lens = alloc::vec::Vec::new();
        self.model.for_each_param(|_, _, g| {
            lens.push(g.len());
            if ranks == 1 {
                flat.extend_from_slice(g);
            } else {
                flat.extend(g.iter().map(|&v| v * weight));
            }
        });
        flat.push(if ranks == 1 {
            local_loss
        } else {
            local_loss * weight
        });
        let mut result = Ok(());
        let last = flat.len();
        let mut ranges = buckets(&lens, reduce.bucket_elements());
        // The loss rides in the last bucket.
        match ranges.last_mut() {
            Some(r) => r.end = last,
            None => ranges.push(0..last),
        }
        for r in ranges {
            result = reduce.sum(&mut flat[r]);
            if result.is_err() {
                break;
            }
        }
        let loss = flat[last - 1];
        if result.is_ok() {
            let mut offset = 0;
            self.model.for_each_param(|_, _, g| {
                let len = g.len();
                g.copy_from_slice(&flat[offset..offset + len]);
                offset += len;
            });
        }
        self.flat_grads = flat;
        result?;
        if !loss.is_finite() {
            return Err(MhcError::NonFinite {
                what: "loss",
                index: 0,
            });
        }
        let grad_norm = self.gradient_norm();
        self.apply(loss, grad_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scheme;
    use crate::model::optim::{AdamWConfig, Schedule};
    use crate::model::{ModelConfig, TrainConfig};

    fn tiny() -> (ModelConfig, TrainConfig) {
        let model = ModelConfig {
            vocab: 256,
            width: 16,
            layers: 1,
            heads: 2,
            context: 8,
            streams: 4,
            scheme: Scheme::MhcDynamic,
            sinkhorn_iterations: 20,
        };
        let train = TrainConfig {
            batch: 4,
            schedule: Schedule {
                max_lr: 3e-3,
                min_lr: 3e-4,
                warmup: 1,
                total: 4,
            },
            adamw: AdamWConfig::default(),
            clip: 0.5,
            seed: 7,
        };
        (model, train)
    }

    #[test]
    fn one_replica_is_the_plain_step_bit_for_bit() {
        let data: alloc::vec::Vec<u8> = b"the quick brown fox jumps over the lazy dog. ".repeat(8);
        let (model, train) = tiny();
        let mut plain = Trainer::<f32>::new(model, train).unwrap();
        let mut dp = Trainer::<f32>::replica(model, train, 1).unwrap();
        for _ in 0..3 {
            let a = plain.step(&data).unwrap();
            let b = dp.data_parallel_step(&data, &mut SingleReplica).unwrap();
            assert_eq!(a.loss.to_bits(), b.loss.to_bits());
            assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
        }
        let (mut wa, mut wb) = (alloc::vec::Vec::new(), alloc::vec::Vec::new());
        plain
            .model
            .for_each_param(|_, p, _| wa.extend_from_slice(p));
        dp.model.for_each_param(|_, p, _| wb.extend_from_slice(p));
        assert!(wa.iter().zip(&wb).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(plain.optimizer, dp.optimizer);
    }

    #[test]
    fn replicas_need_a_divisible_batch() {
        let (model, train) = tiny();
        assert_eq!(
            Trainer::<f32>::replica(model, train, 3).err(),
            Some(MhcError::BatchNotDivisible {
                batch: 4,
                replicas: 3
            })
        );
        assert_eq!(
            Trainer::<f32>::replica(model, train, 0).err(),
            Some(MhcError::ZeroReplicas)
        );
    }

    #[test]
    fn shards_split_the_batch_contiguously() {
        assert_eq!(shard(8, 4, 0), Ok(0..2));
        assert_eq!(shard(8, 4, 3), Ok(6..8));
        assert_eq!(shard(8, 1, 0), Ok(0..8));
        assert_eq!(shard_len(8, 0), Err(MhcError::ZeroReplicas));
        assert_eq!(
            shard_len(6, 4),
            Err(MhcError::BatchNotDivisible {
                batch: 6,
                replicas: 4
            })
        );
        assert!(matches!(shard(8, 4, 4), Err(MhcError::InvalidConfig(_))));
    }

    #[test]
    fn buckets_hold_whole_tensors() {
        assert_eq!(buckets(&[3, 4, 1, 8, 2], 5), [0..7, 7..16, 16..18]);
        assert_eq!(buckets(&[3, 4], 100), [Range { start: 0, end: 7 }]);
        assert_eq!(buckets(&[3, 4], 0), [0..3, 3..7]);
        assert!(buckets(&[], 4).is_empty());
    }
}
