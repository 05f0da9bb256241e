//! What a planned prefill call allocates around the caller's tensors, for the
//! memory check before any allocation.

use crate::DType;
use crate::device::memory::Buffer;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::table::SequenceTable;

/// What a call of `plan` allocates around the caller's tensors, in order:
/// the work lists of `table`, the per-block state workspace, the f32 copies
/// of 16-bit inputs where the plan runs on them (`copies`: the name and
/// elements of q, k, v and out), and the segment states of the
/// chunk-recurrent routine's segmented walk.
pub(crate) fn launch_buffers(
    plan: &PrefillPlan,
    table: &SequenceTable,
    [heads, key_dim, value_dim]: [usize; 3],
    copies: &[(&'static str, usize)],
) -> Vec<Buffer> {
    let (table_bytes, segments) = table.device_bytes(plan.chunk_walk());
    let mut buffers = vec![
        Buffer::new("work lists of the call", table_bytes),
        Buffer::elements(
            "per-block state workspace [blocks, h, d, e] f32",
            plan.block_states_len.max(1),
            DType::F32,
        ),
    ];
    if plan.widened {
        buffers.extend(
            copies
                .iter()
                .map(|&(name, elements)| Buffer::elements(name, elements, DType::F32)),
        );
    }
    if plan.chunk_walk().is_some_and(|(_, segments)| segments.is_some()) {
        buffers.push(Buffer::elements(
            "segment states [segments, h, d, e] f32",
            (segments * heads * key_dim * value_dim).max(1),
            DType::F32,
        ));
    }
    buffers
}
