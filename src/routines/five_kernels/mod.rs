//! The five Triton-shaped kernels of vLLM's `lightning_attn.py`, the portable
//! routine on every runtime, with the tensor-core variants of diag and
//! kv-parallel beside them: diag (the intra-block part), kv-parallel (each
//! block's `K^T V`), kv-reduce (the scan over blocks into incoming and final
//! states), non-diag (the inter-block part) and kv-snapshot (states after
//! chosen tokens). Each file holds one kernel's plan and its launch.

pub(crate) mod diag;
pub(crate) mod kv_parallel;
pub(crate) mod kv_reduce;
pub(crate) mod kv_snapshot;
pub(crate) mod non_diag;

/// Units along each side of the 16 x 16 unit grid of diag, kv-parallel and
/// non-diag (fixed by the kernels).
pub(crate) const GRID_SIDE: usize = 16;
/// Largest chunk of `d` diag and non-diag stage per step.
pub(crate) const MAX_KEY_CHUNK: usize = 32;
/// Most rows (and columns) of the state one kv-parallel unit accumulates,
/// and most output columns one non-diag unit computes.
pub(crate) const MAX_PER_UNIT: usize = 4;

/// Elements per unit along a dimension of `dim` for the 16 x 16 grid.
pub(crate) fn per_unit(dim: usize) -> usize {
    (dim.next_power_of_two() / GRID_SIDE).clamp(1, MAX_PER_UNIT)
}
