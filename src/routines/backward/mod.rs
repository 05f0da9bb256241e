//! The backward kernels of the key and value gradients
//! (`kernels::backward_diag` and `kernels::backward_non_diag`), which stand
//! in for diag and non-diag in the reversed pass whose states are the
//! gradient states `G` (see the backward entry point): their plan and their
//! launch. kv-parallel and kv-reduce of that pass are the reverse sweep,
//! unchanged.

pub(crate) mod launch;
pub(crate) mod plan;
