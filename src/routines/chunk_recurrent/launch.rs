//! The launch of the chunk-recurrent routine's state pass
//! (`kernels::chunk_state`), planned beside it in `plan.rs`; with segments,
//! kv-parallel and kv-reduce run over them first.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels as kernels;

use super::plan::ChunkStatePlan;
use crate::device::limits::LaunchDims;
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{BlockRun, Call, Staging};
use crate::routines::five_kernels::kv_parallel::{self, KvParallelPlan};
use crate::routines::five_kernels::kv_reduce::{self, KvReducePlan};

/// Launches the state pass for inputs of type `F`: each block's incoming
/// state into the workspace (as `F` or f32, as the plan says) and each
/// sequence's final state into `states`, as kv-parallel and kv-reduce
/// would leave them.
///
/// With segments, kv-parallel first sums each segment's `K^T V` and
/// kv-reduce carries the states across segments (and writes the final
/// states), into a buffer of one state per segment; the walks then start
/// from those.
pub(crate) fn launch<F: Float + CubeElement, M: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    chunk: &ChunkStatePlan,
    kv_parallel: &KvParallelPlan,
    kv_reduce: &KvReducePlan,
) {
    let segments = chunk.segment_blocks.map(|segment_blocks| {
        segment_states::<F, M>(
            call,
            staging,
            segment_blocks * chunk.block,
            kv_parallel,
            kv_reduce,
        )
    });
    if chunk.states_in_input_dtype {
        launch_as::<F, M, F>(call, staging, chunk, segments.as_ref())
    } else {
        launch_as::<F, M, f32>(call, staging, chunk, segments.as_ref())
    }
}

/// Each segment's incoming state, for the walk routines that cut sequences
/// into segments of `segment_tokens` tokens (this state pass and the fused
/// walk): kv-parallel sums each segment's `K^T V` and kv-reduce carries the
/// states across segments (and writes the final states), into a new buffer
/// of one f32 state per segment.
pub(crate) fn segment_states<F: Float + CubeElement, M: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    segment_tokens: usize,
    kv_parallel: &KvParallelPlan,
    kv_reduce: &KvReducePlan,
) -> Handle {
    let table = call.table;
    let states_len = segment_states_len(call);
    let states = call.target.empty(states_len.max(1) * 4);
    let run = BlockRun {
        block: segment_tokens,
        cubes: table.segments as u32,
        work: &table.segment_work,
        offsets: &table.segment_offsets,
        states: &states,
        states_len,
    };
    kv_parallel::launch::<F, M>(call, staging, kv_parallel, &run);
    kv_reduce::launch(call, kv_reduce, &run);
    states
}

/// The buffer of [`segment_states`], as a walk's `initial` argument.
pub(crate) fn segment_states_arg(call: &Call, states: &Handle) -> BufferArg {
    // SAFETY: one f32 state per segment, as `segment_states` allocates.
    unsafe { BufferArg::from_raw_parts(states.clone(), segment_states_len(call).max(1)) }
}

/// Elements of the buffer of one f32 state per segment.
fn segment_states_len(call: &Call) -> usize {
    call.table.segments * call.heads * call.key_dim * call.value_dim
}

/// The walks, staging K and V as `M` (split as the plan says) and storing
/// the per-block states as `S`; with segments, from
/// their incoming states in `segment_states`.
fn launch_as<F: Float + CubeElement, M: Float + CubeElement, S: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    chunk: &ChunkStatePlan,
    segment_states: Option<&Handle>,
) {
    let table = call.table;
    let variant = call.variant;
    let initial = match segment_states {
        Some(states) => segment_states_arg(call, states),
        None => call.initial_arg(),
    };
    let walks = table.walks as u32;
    let dims = LaunchDims {
        cubes: (chunk.dims.cubes.0, chunk.dims.cubes.1, walks),
        ..chunk.dims
    };
    // SAFETY: the plan checked the tiles, grid and shared memory against
    // the device; the tables and every buffer's size were validated; the
    // kernel bounds-checks the tails of n, d and e.
    unsafe {
        launch_kernel!(call.target, kernels::chunk_state::chunk_state[F, M, S],
            dims.cube_count(),
            dims.cube_dim(),
            chunk.vector_size,
            arg(call.k),
            arg(call.v),
            arg(call.slopes),
            table.seq_starts.arg(),
            table.block_offsets.arg(),
            table.initial_slots.arg(),
            table.final_slots.arg(),
            table.chunk_walks.arg(),
            initial,
            call.block_states_arg(staging),
            arg(call.states),
            call.heads as u32,
            call.layout.head_stride,
            call.layout.token_stride,
            if segment_states.is_some() {
                1.0
            } else {
                variant.initial_scale
            },
            variant.final_scale,
            call.key_dim,
            call.value_dim,
            call.config.block,
            chunk.stage,
            chunk.key_tile,
            chunk.value_tile,
            chunk.units,
            staging.plane_size,
            chunk.tensor_cores,
            // A segment's incoming state is read as is.
            call.initial.is_none() && segment_states.is_none(),
            variant.transpose_initial && segment_states.is_none(),
            variant.advance_initial && segment_states.is_none(),
            variant.retreat_final,
            variant.reversed,
            segment_states.is_some(),
            chunk.split,
        )
    }
}
