//! Data-parallel training over several GPUs of one host with NCCL (cudarc's
//! `nccl` bindings, loaded at run time like the driver: nothing is needed to
//! build). **Written and compiled, not yet run on GPUs**: no machine with
//! several GPUs was available when it was written; `tests/cuda_data_parallel.rs`
//! and `scripts/gpu-dataparallel.sh` are what a session with one runs first.
//!
//! One thread per GPU, each with its own [`CudaDevice`], [`GpuTrainer`](super::GpuTrainer)
//! replica and [`NcclAllReduce`] (an NCCL communicator is made and used by
//! one thread). The step is the core's algorithm
//! ([`mhc_core::model::parallel`]): every replica draws the same global
//! batch, trains on its contiguous shard, the dense gradients are summed
//! in place on the devices (one NCCL group per parameter group — a block's
//! six dense tensors, or the embeddings, or norm + head — so a group is one
//! fused launch), the host-side connection gradients and the loss are summed
//! through the same communicator, and every replica applies the same update
//! with clipping on the global norm of the averaged gradient.
//!
//! NVLink multicast (NVLS) stays off: [`prepare_environment`] sets
//! `NCCL_NVLS_ENABLE=0` when it is unset and refuses any other value, before
//! any communicator exists.
//!
//! Next step, not done: overlap the all-reduce of a parameter group with the
//! backward of the groups before it (launch each group's NCCL sum on a second
//! stream as soon as the backward has written its gradients, with an event).

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use mhc_core::MhcError;
use mhc_core::model::parallel::AllReduce;

use super::{CudaDevice, CudaError, CudaResult};

/// The environment variable that turns NCCL's NVLink multicast (NVLS) on or off.
pub const NVLS_VARIABLE: &str = "NCCL_NVLS_ENABLE";

/// Whether `libnccl.so` can be loaded (never panics).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether that worked.
    std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false)
}

/// Readies the process for NCCL: checks that the library loads and keeps
/// NVLink multicast off (`NCCL_NVLS_ENABLE=0` is set when unset; any other
/// value is refused). Call it on the main thread before starting any thread.
pub fn prepare_environment() -> CudaResult<()> {
    if !nccl_present() {
        return Err(CudaError::NoDriver(
            "libnccl.so (NCCL 2) not found: install NCCL (e.g. the nvidia-nccl-cu13 package) or put it on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    match std::env::var(NVLS_VARIABLE) {
        Ok(v) if v.trim() == "0" => Ok(()),
        Ok(v) => Err(CudaError::Unsupported(format!(
            "{NVLS_VARIABLE}={v}: this trainer keeps NVLink multicast off; unset it or set it to 0"
        ))),
        Err(_) => {
            // SAFETY: called before any thread of this crate starts (documented
            // above), so nothing reads the environment concurrently.
            unsafe { std::env::set_var(NVLS_VARIABLE, "0") };
            Ok(())
        }
    }
}

/// The identifier every rank of one NCCL group is created with (made once, on the main thread).
#[derive(Clone, Copy, Debug)]
pub struct NcclGroupId(Id);

impl NcclGroupId {
    /// A fresh identifier; runs [`prepare_environment`] first.
    pub fn new() -> CudaResult<Self> {
        prepare_environment()?;
        Id::new()
            .map(Self)
            .map_err(|e| CudaError::Driver(format!("ncclGetUniqueId: {e:?}")))
    }
}

/// One GPU's end of an NCCL all-reduce group (see the module docs).
pub struct NcclAllReduce {
    comm: Comm,
    dev: Arc<CudaDevice>,
    staging: CudaSlice<f32>,
}

impl NcclAllReduce {
    /// Rank `rank` of `ranks` on `dev`; blocks until every rank has joined
    /// (call it on the rank's own thread, all ranks at once).
    pub fn new(
        dev: Arc<CudaDevice>,
        rank: usize,
        ranks: usize,
        id: NcclGroupId,
    ) -> CudaResult<Self> {
        if ranks == 0 {
            return Err(CudaError::Core(MhcError::ZeroReplicas));
        }
        let comm = Comm::from_rank(dev.stream().clone(), rank, ranks, id.0).map_err(|e| {
            CudaError::Driver(format!("ncclCommInitRank (rank {rank} of {ranks}): {e:?}"))
        })?;
        let staging = dev.stream().alloc_zeros(1)?;
        Ok(Self { comm, dev, staging })
    }

    /// Sums each buffer over the ranks, in place, as one NCCL group (one
    /// fused launch for a parameter group's tensors).
    pub fn sum_device(&self, buffers: &mut [&mut CudaSlice<f32>]) -> CudaResult<()> {
        let err = |e| CudaError::Driver(format!("ncclAllReduce: {e:?}"));
        cudarc::nccl::safe::group_start().map_err(err)?;
        let mut result = Ok(());
        for b in buffers.iter_mut() {
            if let Err(e) = self.comm.all_reduce_in_place(*b, &ReduceOp::Sum) {
                result = Err(err(e));
                break;
            }
        }
        // The group must be closed even after a failed call.
        cudarc::nccl::safe::group_end().map_err(err)?;
        result
    }
}

impl AllReduce<f32> for NcclAllReduce {
    fn ranks(&self) -> usize {
        self.comm.world_size()
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Host values (the connection gradients and the loss): copied to the
    /// device, summed with NCCL, copied back.
    fn sum(&mut self, values: &mut [f32]) -> Result<(), MhcError> {
        let collective = |e: CudaError| MhcError::Collective(e.to_string());
        let st = self.dev.stream().clone();
        if self.staging.len() < values.len() {
            self.staging = st
                .alloc_zeros(values.len())
                .map_err(|e| collective(e.into()))?;
        }
        let mut view = self.staging.slice_mut(..values.len());
        st.memcpy_htod(values, &mut view)
            .map_err(|e| collective(e.into()))?;
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| MhcError::Collective(format!("ncclAllReduce: {e:?}")))?;
        st.memcpy_dtoh(&view, values)
            .map_err(|e| collective(e.into()))?;
        st.synchronize().map_err(|e| collective(e.into()))?;
        Ok(())
    }
}
