//! kv-snapshot, the state after chosen tokens of a packed batch (speculative
//! decoding), from the incoming state of the token's block
//! (`kernels::kv_snapshot`): the plan (one unit per element of the state)
//! and the launch.

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;

use crate::Result;
use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{Call, Staging, TARGET_UNITS};
use crate::routines::table::PrefillWork;

/// Plans kv-snapshot: zero cubes along z where no snapshot is asked for.
pub(crate) fn plan(work: &PrefillWork, limits: &DeviceLimits) -> Result<LaunchDims> {
    let units = TARGET_UNITS.min(limits.max_units);
    LaunchDims {
        cubes: (
            count((work.key_dim * work.value_dim).div_ceil(units as usize)),
            count(work.heads),
            count(work.snapshots),
        ),
        units,
        shared_bytes: 0,
    }
    .check("kv-snapshot", limits)
}

/// Launches kv-snapshot for inputs of `F`, writing into the call's states:
/// each block's incoming state from the call's per-block workspace, or from
/// `block_states` where given (the fused routine's one-block segments).
pub(crate) fn launch<F: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    dims: &LaunchDims,
    block_states: Option<BufferArg>,
) {
    let (layout, table) = (call.layout, call.table);
    // SAFETY: the grid was planned and every table entry validated; the
    // kernel reads one f32 state per block, which both sources hold.
    unsafe {
        launch_kernel!(
            call.target,
            kernels::kv_snapshot::kv_snapshot[F],
            dims.cube_count(),
            dims.cube_dim(),
            arg(call.k),
            arg(call.v),
            arg(call.slopes),
            table.seq_starts.arg(),
            table.block_offsets.arg(),
            table.snapshot_work.arg(),
            block_states.unwrap_or_else(|| call.block_states_arg(staging)),
            arg(call.states),
            call.heads as u32,
            layout.head_stride,
            layout.token_stride,
            call.key_dim,
            call.value_dim,
            call.config.block,
        )
    }
}
