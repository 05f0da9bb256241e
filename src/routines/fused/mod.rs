//! The fused routine: the whole prefill in one pass per sequence
//! (`kernels::fused`), the running state kept on the chip, in place of the
//! five kernels or the chunk-recurrent routine. Its plan and its launch.

pub(crate) mod launch;
pub(crate) mod plan;
