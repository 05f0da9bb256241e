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

#![warn(missing_docs)]

mod backward;
mod backward_launch;
#[cfg(feature = "burn")]
pub mod burn;
mod chunk_launch;
pub mod chunk_plan;
mod config;
mod decode;
mod dtype;
mod error;
mod finite;
mod launch;
pub mod memory;
pub mod plan;
mod prefill;
pub mod runtime;
pub mod sequence_parallel;
mod sequences;
mod serving;
pub mod shapes;
pub mod slopes;
mod split_cache;
mod tensor;
mod varlen;
mod varlen_checks;
mod widen;

pub use backward::{BackwardInputs, Gradients, backward};
pub use config::{Precision, PrefillConfig, Routines};
pub use decode::{DecodeInputs, PADDING_SLOT, decode, decode_into, plan_decode_step};
pub use dtype::DType;
pub use error::{LightningError, Result};
pub use finite::{FiniteScan, check_finite};
pub use memory::MemoryLimit;
pub use prefill::{
    PrefillInputs, PrefillOutput, StageTimes, plan_prefill, prefill, prefill_into, profile_prefill_into,
};
pub use serving::{BackendConfig, LightningBackend};
pub use split_cache::{SplitCache, decode_split, decode_split_into};
pub use tensor::DeviceTensor;
pub use varlen::{Snapshots, VarlenBatch, VarlenInputs, plan_varlen, prefill_varlen, prefill_varlen_into};
pub use varlen_checks::VarlenShape;

pub use cubecl;
pub use lightning_attention_reference as reference;

/// The README's example, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
