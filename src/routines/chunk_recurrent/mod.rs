//! The chunk-recurrent routine: one walk over each sequence's blocks
//! (`kernels::chunk_state`) in place of kv-parallel and kv-reduce, so that
//! the per-block states cross HBM once; diag (with non-diag fused, or
//! non-diag after it) reads the states it leaves. Its plan and its launch.

pub(crate) mod launch;
pub(crate) mod plan;
