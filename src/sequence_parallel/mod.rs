//! Sequence parallelism: one long sequence split across ranks (GPUs), with
//! only the f32 `d x e` states crossing between them (the LASP-2 scheme).
//!
//! Rank `r` holds tokens `[start_r, end_r)` of the same sequences (the same
//! batch and heads on every rank). Per head with `a = exp(-s)`, the state
//! entering rank `r` is the decayed prefix of the earlier segments' final
//! states from zero, `L_j` (rank 0's from the caller's initial state):
//!
//! `P_r = sum_{j<r} a^(start_r - end_j) L_j`.
//!
//! [`prefill`] computes `L_r` (the state pass alone; rank 0 its whole
//! prefill), gathers the `L_j` through a [`StateComm`] (`world x b x h x d x
//! e x 4` bytes per call), and runs the segment's prefill from `P_r`: its
//! outputs and final state are then those of the whole sequence.
//! [`backward`] runs the same recurrence in reverse: the gradient reaching the
//! end of segment `r` is `G_r = sum_{j>r} a^(start_j - end_r) D_j`, with `D_j`
//! the gradient of segment `j`'s incoming state when none reaches its end
//! (the last rank's carries the caller's final-state gradient).
//!
//! Each pass makes two collectives on every rank: a gather of a few numbers
//! (each rank's segment length, and the sizes the ranks must share, checked
//! before any state crosses) and the gather of the states. The communicators
//! are [`InProcessComm`] (ranks as threads on one device: the tests) and, with
//! the `cuda` feature, `NcclComm` (NCCL through cubecl's collectives).

mod agree;
mod backward;
mod combine;
mod comm;
mod forward;
mod in_process;
#[cfg(feature = "cuda")]
mod nccl;
mod state_pass;

pub use backward::backward;
pub use comm::StateComm;
pub use forward::{SegmentOutput, prefill};
pub use in_process::{InProcessComm, in_process_group, run_in_process};
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
