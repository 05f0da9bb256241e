//! The launch of the chunk-recurrent routine's state pass
//! (`kernels::chunk_state`), planned by [`crate::chunk_plan`]; the rest of a
//! call's launches are in [`crate::launch`].

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;

use cubecl::server::Handle;

use crate::chunk_plan::ChunkStatePlan;
use crate::launch::{BlockRun, CallLaunch, arg};
use crate::plan::LaunchDims;

impl CallLaunch<'_> {
    /// Launches the state pass for inputs of type `F`: each block's incoming
    /// state into the workspace (as `F` or f32, as the plan says) and each
    /// sequence's final state into `states`, as kv-parallel and kv-reduce
    /// would leave them.
    ///
    /// With segments, kv-parallel first sums each segment's `K^T V` and
    /// kv-reduce carries the states across segments (and writes the final
    /// states), into a buffer of one state per segment; the walks then start
    /// from those.
    pub(crate) fn launch_chunk_state<F: Float + CubeElement, M: Float + CubeElement>(
        &self,
        chunk: &ChunkStatePlan,
    ) {
        let segments = chunk.segment_blocks.map(|segment_blocks| {
            let table = self.table;
            let states_len = self.segment_states_len();
            let states = self.client.empty(states_len.max(1) * 4);
            let run = BlockRun {
                block: segment_blocks * chunk.block,
                cubes: table.segments as u32,
                work: &table.segment_work,
                offsets: &table.segment_offsets,
                states: &states,
                states_len,
            };
            self.launch_kv_parallel::<F, M>(&run);
            self.launch_kv_reduce(&run);
            states
        });
        if chunk.states_in_input_dtype {
            self.launch_chunk_state_as::<F, M, F>(chunk, segments.as_ref())
        } else {
            self.launch_chunk_state_as::<F, M, f32>(chunk, segments.as_ref())
        }
    }

    /// Elements of the buffer of one f32 state per segment.
    fn segment_states_len(&self) -> usize {
        self.table.segments * self.heads * self.key_dim * self.value_dim
    }

    /// The walks, staging K and V as `M` (split as the plan says) and storing
    /// the per-block states as `S`; with segments, from
    /// their incoming states in `segment_states`.
    fn launch_chunk_state_as<F: Float + CubeElement, M: Float + CubeElement, S: Float + CubeElement>(
        &self,
        chunk: &ChunkStatePlan,
        segment_states: Option<&Handle>,
    ) {
        let plan = self.plan;
        let table = self.table;
        let variant = self.variant;
        let initial = match segment_states {
            // SAFETY: one state per segment, as allocated above.
            Some(states) => unsafe {
                BufferArg::from_raw_parts(states.clone(), self.segment_states_len().max(1))
            },
            None => arg(self.initial.unwrap_or(self.unused)),
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
            kernels::chunk_state::chunk_state::launch_unchecked::<F, M, S>(
                self.client,
                dims.cube_count(),
                dims.cube_dim(),
                chunk.vector_size,
                arg(self.k),
                arg(self.v),
                arg(self.slopes),
                table.seq_starts.arg(),
                table.block_offsets.arg(),
                table.initial_slots.arg(),
                table.final_slots.arg(),
                table.chunk_walks.arg(),
                initial,
                self.block_states_arg(),
                arg(self.states),
                self.heads as u32,
                self.layout.head_stride,
                self.layout.token_stride,
                if segment_states.is_some() {
                    1.0
                } else {
                    variant.initial_scale
                },
                variant.final_scale,
                self.key_dim,
                self.value_dim,
                self.config.block,
                chunk.stage,
                chunk.key_tile,
                chunk.value_tile,
                chunk.units,
                plan.plane_size,
                chunk.tensor_cores,
                // A segment's incoming state is read as is.
                self.initial.is_none() && segment_states.is_none(),
                variant.transpose_initial && segment_states.is_none(),
                variant.advance_initial && segment_states.is_none(),
                variant.retreat_final,
                variant.reversed,
                segment_states.is_some(),
                chunk.split,
            )
        }
    }
}
