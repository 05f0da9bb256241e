//! The fused routine: the whole prefill in one pass per sequence
//! (`kernels::fused`), the running state kept on the chip, in place of the
//! five kernels or the chunk-recurrent routine. Its plan, its launch, and
//! the variants of its tensor-core walk the autotuner chooses among; and the
//! backward's walk of dk and dv together (`key_value`).

pub(crate) mod key_value;
pub(crate) mod launch;
pub(crate) mod plan;
pub(crate) mod variants;
