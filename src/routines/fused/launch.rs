//! The fused routine's launch (`kernels::fused_fragments` on tensor cores
//! or emulated, else `kernels::fused`), planned beside it in `plan.rs`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels as kernels;

use super::plan::FusedPlan;
use crate::device::limits::LaunchDims;
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::chunk_recurrent::launch::{segment_states, segment_states_arg};
use crate::routines::common::{Call, Staging};
use crate::routines::five_kernels::kv_parallel::KvParallelPlan;
use crate::routines::five_kernels::kv_reduce::KvReducePlan;
use crate::{DType, DeviceTensor};

/// The states' vector: the portable routine moves them one scalar at a time.
const STATE_VECTOR: usize = 1;

/// Launches the fused routine for inputs of `F`: every output of the call's
/// prefill sequences, and each one's final state into its slot of `states`.
///
/// With segments, kv-parallel first sums each segment's `K^T V` and kv-reduce
/// carries the states across segments (and writes the final states), into a
/// buffer of one state per segment, as for the chunk-recurrent routine; the
/// walks then start from those and write no final state. That buffer is
/// returned (with one-block segments it holds every block's incoming state,
/// which kv-snapshot reads).
pub(crate) fn launch<F: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    plan: &FusedPlan,
    kv_parallel: &KvParallelPlan,
    kv_reduce: &KvReducePlan,
) -> Option<Handle> {
    let (table, variant) = (call.table, call.variant);
    let segments = plan.segment_blocks.map(|segment_blocks| {
        segment_states::<F, F>(call, staging, segment_blocks * plan.block, kv_parallel, kv_reduce)
    });
    let segmented = segments.is_some();
    let initial = match &segments {
        Some(states) => segment_states_arg(call, states),
        None => call.initial_arg(),
    };
    let dims = LaunchDims {
        cubes: (plan.dims.cubes.0, plan.dims.cubes.1, table.walks as u32),
        ..plan.dims
    };
    let initial_scale = if segmented { 1.0 } else { variant.initial_scale };
    let initial_in_states = call.initial.is_none() && !segmented;
    let transpose_initial = variant.transpose_initial && !segmented;
    let advance_initial = variant.advance_initial && !segmented;
    if let Some(walk) = plan.fragments {
        // SAFETY: as below; the plan checked the planes and chunk the
        // kernel requires (module doc of `kernels::fused_fragments`).
        unsafe {
            launch_kernel!(
                call.target,
                kernels::fused_fragments::fused_fragments[F],
                dims.cube_count(),
                dims.cube_dim(),
                STATE_VECTOR,
                walk.vector,
                arg(call.q),
                arg(call.k),
                arg(call.v),
                arg(call.slopes),
                table.seq_starts.arg(),
                table.initial_slots.arg(),
                table.final_slots.arg(),
                table.chunk_walks.arg(),
                initial,
                arg(call.states),
                arg(call.out),
                call.heads as u32,
                call.layout.head_stride,
                call.layout.token_stride,
                call.config.scale.unwrap_or(1.0),
                // A segment's incoming state is read as is.
                initial_scale,
                variant.final_scale,
                call.key_dim,
                call.value_dim,
                plan.block,
                plan.chunk,
                walk.planes,
                initial_in_states,
                transpose_initial,
                advance_initial,
                variant.retreat_final,
                variant.reversed,
                segmented,
                walk.emulated,
                walk.stages,
            )
        }
        return segments;
    }
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
            initial,
            arg(call.states),
            arg(call.out),
            call.heads as u32,
            call.layout.head_stride,
            call.layout.token_stride,
            call.config.scale.unwrap_or(1.0),
            // A segment's incoming state is read as is.
            initial_scale,
            variant.final_scale,
            call.key_dim,
            call.value_dim,
            plan.block,
            plan.chunk,
            plan.key_chunk,
            plan.rows_per_unit,
            plan.cols_per_unit,
            initial_in_states,
            transpose_initial,
            advance_initial,
            variant.retreat_final,
            variant.reversed,
            segmented,
        )
    }
    segments
}

/// Launches the backward's dk and dv walk (`kernels::fused_key_value`,
/// planned by `key_value::plan`) in place of the dv pass's forward walk:
/// `call` is that pass's (`q' = k`, `k' = q`, `v' = d_out`, `out` = dv,
/// reversed, the gradient state's scales), `v` the forward's values and
/// `dk` the keys' gradient. Segments as in [`launch`] (kv-parallel and
/// kv-reduce of the dv pass carry the gradient state across them).
pub(crate) fn launch_key_value(
    call: &Call,
    staging: &Staging,
    plan: &FusedPlan,
    kv_parallel: &KvParallelPlan,
    kv_reduce: &KvReducePlan,
    [v, dk]: [&DeviceTensor; 2],
) {
    match call.q.dtype {
        DType::F32 => key_value_typed::<f32>(call, staging, plan, kv_parallel, kv_reduce, [v, dk]),
        DType::F16 => key_value_typed::<half::f16>(call, staging, plan, kv_parallel, kv_reduce, [v, dk]),
        DType::BF16 => key_value_typed::<half::bf16>(call, staging, plan, kv_parallel, kv_reduce, [v, dk]),
    }
}

/// [`launch_key_value`] for inputs of `F`.
fn key_value_typed<F: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    plan: &FusedPlan,
    kv_parallel: &KvParallelPlan,
    kv_reduce: &KvReducePlan,
    [v, dk]: [&DeviceTensor; 2],
) {
    let (table, variant) = (call.table, call.variant);
    let walk = plan
        .fragments
        .expect("the dk and dv walk is planned on the tensor-core walk");
    let segments = plan.segment_blocks.map(|segment_blocks| {
        segment_states::<F, F>(call, staging, segment_blocks * plan.block, kv_parallel, kv_reduce)
    });
    let segmented = segments.is_some();
    let initial = match &segments {
        Some(states) => segment_states_arg(call, states),
        None => call.initial_arg(),
    };
    let dims = LaunchDims {
        cubes: (1, plan.dims.cubes.1, table.walks as u32),
        ..plan.dims
    };
    // SAFETY: the plan checked the planes, chunk, tiles and shared memory
    // the kernel requires (module doc of `kernels::fused_key_value`) against
    // the device; the tables and every buffer's size were validated (dk is
    // q's shape, the pass's out is v's); the kernel bounds-checks the tails
    // of n, d and e.
    unsafe {
        launch_kernel!(
            call.target,
            kernels::fused_key_value::fused_key_value[F],
            dims.cube_count(),
            dims.cube_dim(),
            STATE_VECTOR,
            walk.vector,
            arg(call.k),
            arg(call.q),
            arg(v),
            arg(call.v),
            arg(call.slopes),
            table.seq_starts.arg(),
            table.initial_slots.arg(),
            table.final_slots.arg(),
            table.chunk_walks.arg(),
            initial,
            arg(call.states),
            arg(dk),
            arg(call.out),
            call.heads as u32,
            call.layout.head_stride,
            call.layout.token_stride,
            call.config.scale.unwrap_or(1.0),
            // A segment's incoming state is read as is.
            if segmented { 1.0 } else { variant.initial_scale },
            variant.final_scale,
            call.key_dim,
            call.value_dim,
            plan.block,
            plan.chunk,
            walk.planes,
            call.initial.is_none() && !segmented,
            variant.advance_initial && !segmented,
            variant.retreat_final,
            segmented,
            walk.emulated,
            walk.stages,
        )
    }
}
