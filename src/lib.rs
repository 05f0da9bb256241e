//! GPU kernels for MiniMax's Lightning Attention, written once in CubeCL.
//!
//! Per head with slope `s`: `kv_t = exp(-s) kv_{t-1} + k_t^T v_t` and
//! `o_t = q_t kv_t`, with an f32 `d x e` state. [`prefill`] runs a whole
//! sequence in blocks (five `#[cube]` kernels in `lightning-attention-kernels`),
//! [`decode`] runs one token per sequence against a slot-indexed state cache.
//! [`prefill_varlen`] runs a packed batch of sequences of any lengths (prefills
//! and decodes mixed, optional speculative snapshots) against the cache in one
//! call, and [`LightningBackend`] is the per-model object a serving engine
//! holds (per-layer slopes and caches, per-step metadata, graph-capturable
//! decode steps).
//! [`decode_split_into`] decodes against a [`SplitCache`], a state cache held
//! in several buffers (wgpu binds at most about 2 GiB in one).
//! [`sequence_parallel`] splits one long sequence across ranks (GPUs), only
//! the `d x e` states crossing between them.
//! Every call validates its arguments and plans its launches against the
//! device's reported limits first, and returns a [`LightningError`] for
//! anything it cannot run; a call whose buffers the device cannot hold
//! returns [`LightningError::OutOfMemory`] (see [`memory`]).
//!
//! The pure-Rust f64 reference that judges the kernels is re-exported as
//! [`reference`](mod@crate::reference).
//!
//! # The house
//! The source is in layers, each importing only from the layers below it
//! (`scripts/check-layers.py` checks it in CI):
//! 1. `problem`: what the caller asked, validated (shapes, dtypes, the block
//!    config, precision and tuning, errors, packed batches, slopes);
//! 2. `device`: what the device is and holds ([`DeviceTensor`], runtime
//!    selection, limits and tensor cores, memory accounting, the finite scan);
//! 3. `routines`: one folder per routine family, each with its plan beside its
//!    launch, and the one function that chooses among them
//!    ([`plan::PrefillPlan::new`]);
//! 4. `entry`: [`prefill`], [`prefill_varlen`], [`decode`], [`backward`] and
//!    the split cache: validate, choose, launch, return;
//! 5. the users of the entry points: the serving backend
//!    ([`LightningBackend`]), [`sequence_parallel`] and the Burn extension.

#![warn(missing_docs)]

mod device;
mod entry;
mod problem;
mod routines;

#[cfg(feature = "burn")]
pub mod burn;
pub mod sequence_parallel;
mod serving;

pub use device::finite::{FiniteScan, check_finite};
pub use device::memory::MemoryLimit;
pub use device::tensor::DeviceTensor;
pub use entry::backward::{BackwardInputs, Gradients, backward, plan_backward, tuned_backward_variant};
pub use entry::decode::{DecodeInputs, PADDING_SLOT, decode, decode_into, plan_decode_step};
pub use entry::packed::{
    PackedBackwardInputs, PackedGradients, PackedInputs, PackedOutput, backward_packed, backward_packed_into,
    plan_packed, prefill_packed, prefill_packed_into,
};
pub use entry::prefill::{
    PrefillInputs, PrefillOutput, StageTimes, plan_prefill, prefill, prefill_into, profile_prefill_into,
    tuned_fused_variant,
};
pub use entry::split_cache::{SplitCache, decode_split, decode_split_into};
pub use entry::varlen::{
    Snapshots, VarlenBatch, VarlenInputs, plan_varlen, prefill_varlen, prefill_varlen_into,
};
pub use problem::config::{FusedChoice, FusedProducts, Precision, PrefillConfig, Routines, Tuning};
pub use problem::dtype::DType;
pub use problem::error::{LightningError, Result};
pub use problem::packed::VarlenShape;
pub use serving::{BackendConfig, LightningBackend};

/// Launch planning: what each call launches, its grids and tiles, checked
/// against the device's limits, and the one function that chooses the
/// routines ([`crate::plan::PrefillPlan::new`]).
pub mod plan {
    pub use crate::device::limits::{CMMA_VECTOR, DeviceLimits, LaunchDims, TensorCores};
    pub use crate::entry::decode::plan_decode_shapes;
    pub use crate::entry::packed::{PackedPlan, plan_packed_limits, plan_packed_shapes};
    pub use crate::entry::prefill::plan_prefill_shapes;
    pub use crate::routines::decode::{DecodePlan, plan_decode};
    pub use crate::routines::five_kernels::diag::{DiagPlan, DiagRoutine};
    pub use crate::routines::five_kernels::kv_parallel::{KvParallelPlan, KvParallelRoutine};
    pub use crate::routines::five_kernels::kv_reduce::{KvReducePlan, kv_reduce_vector_size};
    pub use crate::routines::five_kernels::non_diag::NonDiagPlan;
    pub use crate::routines::fused::plan::{FragmentWalk, FusedPlan};
    pub use crate::routines::fused::variants::FusedVariant;
    pub use crate::routines::prefill::plan::PrefillPlan;
    pub use crate::routines::products::{Products, cmma_vector_size};
    pub use crate::routines::table::PrefillWork;
}

/// The chunk-recurrent routine's state pass: its plan (see
/// [`crate::plan::PrefillPlan::chunk_state`]).
pub mod chunk_plan {
    pub use crate::routines::chunk_recurrent::plan::ChunkStatePlan;
}

/// Device memory: the buffers a call allocates, checked against what the
/// device can give before anything is allocated.
pub mod memory {
    pub use crate::device::memory::{Buffer, DeviceMemory, MemoryLimit};
}

/// Shape, dtype and buffer validation of every argument, before anything launches.
pub mod shapes {
    pub use crate::entry::decode::validate_decode;
    pub use crate::entry::prefill::validate_prefill;
    pub use crate::problem::shapes::{
        DecodeShape, PrefillShape, TensorShape, validate_decode_shapes, validate_prefill_shapes,
    };
}

/// Every kernel a call would launch, built without a device, for compiling
/// a runtime's kernels where it has none (see `tools/cuda-offline`).
pub mod offline {
    pub use crate::device::target::{OfflineBuild, OfflineKernel};
    pub use crate::entry::offline::{build_backward, build_decode, build_prefill, build_varlen};
}
/// Narrower limits than the device's for the packed training calls, so
/// that tests run their launch groups and kv-reduce's loop over sequences
/// at sizes a CPU device holds.
pub mod testing {
    pub use crate::entry::packed::{PackedKnobs, backward_packed_into_with, prefill_packed_into_with};
}
pub use device::runtime;
pub use problem::slopes;

pub use cubecl;
pub use lightning_attention_reference as reference;

/// The README's example, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
