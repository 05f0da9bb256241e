//! non-diag, the inter-block part `Q S` of every sub-block from its block's
//! incoming state (`kernels::non_diag`): the plan (the 16 x 16 grid of units,
//! each holding `sub_block / 16` rows and up to 4 columns of outputs; Q and
//! the state staged in chunks of `d`) and the launch.

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;

use super::{GRID_SIDE, MAX_KEY_CHUNK, per_unit};
use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{Call, Staging};
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Result};

/// non-diag's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonDiagPlan {
    /// The launch.
    pub dims: LaunchDims,
    /// Chunk of `d` staged per step.
    pub key_chunk: usize,
    /// Rows of outputs each unit computes.
    pub rows_per_unit: usize,
    /// Columns of outputs each unit computes.
    pub cols_per_unit: usize,
}

/// Plans non-diag.
pub(crate) fn plan(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> Result<NonDiagPlan> {
    let (cb, d, e) = (config.sub_block, work.key_dim, work.value_dim);
    let rows_per_unit = (cb / GRID_SIDE).max(1);
    let cols_per_unit = per_unit(e);
    let key_chunk = d.next_power_of_two().min(MAX_KEY_CHUNK);
    let value_tile = GRID_SIDE * cols_per_unit;
    let dims = LaunchDims {
        cubes: (
            count(work.sub_blocks),
            count(work.heads),
            count(e.div_ceil(value_tile)),
        ),
        units: count(GRID_SIDE * GRID_SIDE),
        shared_bytes: (cb * (key_chunk + 1) + key_chunk * value_tile) * 4,
    }
    .check("non-diag", limits)?;
    Ok(NonDiagPlan {
        dims,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
    })
}

/// Launches non-diag for inputs of `F`, reading the per-block states of the
/// call's workspace.
pub(crate) fn launch<F: Float + CubeElement>(call: &Call, staging: &Staging, plan: &NonDiagPlan) {
    let (config, layout, table) = (call.config, call.layout, call.table);
    // SAFETY: each size, tile, grid and table entry was validated and planned
    // against the device's limits; the kernel bounds-checks the tails of n,
    // d and e.
    unsafe {
        launch_kernel!(
            call.target,
            kernels::non_diag::non_diag[F],
            plan.dims.cube_count(),
            plan.dims.cube_dim(),
            arg(call.q),
            arg(call.slopes),
            table.seq_starts.arg(),
            table.block_offsets.arg(),
            table.sub_block_work.arg(),
            call.block_states_arg(staging),
            arg(call.out),
            call.heads as u32,
            layout.head_stride,
            layout.token_stride,
            config.scale.unwrap_or(1.0),
            call.key_dim,
            call.value_dim,
            config.block,
            config.sub_block,
            plan.key_chunk,
            plan.rows_per_unit,
            plan.cols_per_unit,
            call.variant.reversed,
        )
    }
}
