//! The fused routine's launch (`kernels::fused`), planned beside it in `plan.rs`.

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;

use super::plan::FusedPlan;
use crate::device::limits::LaunchDims;
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::Call;

/// The states' vector: the portable routine moves them one scalar at a time.
const STATE_VECTOR: usize = 1;

/// Launches the fused routine for inputs of `F`: every output of the call's
/// prefill sequences, and each one's final state into its slot of `states`.
pub(crate) fn launch<F: Float + CubeElement>(call: &Call, plan: &FusedPlan) {
    let (table, variant) = (call.table, call.variant);
    let dims = LaunchDims {
        cubes: (plan.dims.cubes.0, plan.dims.cubes.1, table.walks as u32),
        ..plan.dims
    };
    // SAFETY: the plan checked the tiles, grid and shared memory against the
    // device; the tables and every buffer's size were validated; the kernel
    // bounds-checks the tails of n, d and e.
    unsafe {
        launch_kernel!(
            call.target,
            kernels::fused::fused[F],
            dims.cube_count(),
            dims.cube_dim(),
            STATE_VECTOR,
            arg(call.q),
            arg(call.k),
            arg(call.v),
            arg(call.slopes),
            table.seq_starts.arg(),
            table.initial_slots.arg(),
            table.final_slots.arg(),
            table.chunk_walks.arg(),
            call.initial_arg(),
            arg(call.states),
            arg(call.out),
            call.heads as u32,
            call.layout.head_stride,
            call.layout.token_stride,
            call.config.scale.unwrap_or(1.0),
            variant.initial_scale,
            variant.final_scale,
            call.key_dim,
            call.value_dim,
            plan.chunk,
            plan.key_chunk,
            plan.rows_per_unit,
            plan.cols_per_unit,
            call.initial.is_none(),
            variant.transpose_initial,
            variant.advance_initial,
            variant.retreat_final,
            variant.reversed,
        )
    }
}
