//! kv-reduce, the scan over each sequence's blocks (`kernels::kv_reduce`):
//! each block's slot becomes its incoming state, and each sequence's final
//! state goes to its slot of the states: the plan (a unit per vector of the
//! state) and the launch.

use lightning_attention_kernels as kernels;

use crate::Result;
use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{BlockRun, Call, TARGET_UNITS};
use crate::routines::table::PrefillWork;

/// kv-reduce's launch and vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvReducePlan {
    /// The launch: x over vectors of the state, y over heads, z over sequences.
    pub dims: LaunchDims,
    /// Scalars per vector it moves states in (see [`kv_reduce_vector_size`]).
    pub vector_size: usize,
}

/// kv-reduce's vector: 4 scalars (16 bytes) where they divide the flat
/// `d x e` state, else 1. The kernel only streams states, so wide accesses
/// are what it has to gain.
pub fn kv_reduce_vector_size(key_dim: usize, value_dim: usize) -> usize {
    if (key_dim * value_dim).is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// Plans kv-reduce: one unit per vector of the state.
pub(crate) fn plan(work: &PrefillWork, limits: &DeviceLimits) -> Result<KvReducePlan> {
    let units = TARGET_UNITS.min(limits.max_units);
    let vector_size = kv_reduce_vector_size(work.key_dim, work.value_dim);
    let dims = LaunchDims {
        cubes: (
            count((work.key_dim * work.value_dim / vector_size).div_ceil(units as usize)),
            count(work.heads),
            // Cubes along z loop over the sequences past the grid's limit.
            count(work.sequences).clamp(1, limits.max_cube_count.2),
        ),
        units,
        shared_bytes: 0,
    }
    .check("kv-reduce", limits)?;
    Ok(KvReducePlan { dims, vector_size })
}

/// Launches kv-reduce over `run`: each block's slot becomes its incoming
/// state, and each sequence's final state goes to its slot of `states`.
pub(crate) fn launch(call: &Call, plan: &KvReducePlan, run: &BlockRun) {
    let (table, variant) = (call.table, call.variant);
    // SAFETY: as for kv-parallel; kv-reduce's grid was planned per sequence.
    unsafe {
        launch_kernel!(call.target, kernels::kv_reduce::kv_reduce[],
            plan.dims.cube_count(),
            plan.dims.cube_dim(),
            plan.vector_size,
            arg(call.slopes),
            table.seq_starts.arg(),
            run.offsets.arg(),
            table.initial_slots.arg(),
            table.final_slots.arg(),
            table.reduce_work.arg(),
            table.reduces as u32,
            call.initial_arg(),
            call.run_states(run),
            arg(call.states),
            call.heads as u32,
            variant.initial_scale,
            variant.final_scale,
            call.key_dim,
            call.value_dim,
            run.block,
            call.initial.is_none(),
            variant.transpose_initial,
            variant.advance_initial,
            variant.retreat_final,
            // The loop over sequences past the grid, only where there are any.
            table.reduces > plan.dims.cubes.2 as usize,
        )
    }
}
