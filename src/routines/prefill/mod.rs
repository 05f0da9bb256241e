//! A prefill call as a whole: its plan and the one function that chooses its
//! routines (`plan.rs`), the launches of the chosen routines in stream order
//! (`launch.rs`), and what the call allocates (`buffers.rs`). Dense prefill,
//! packed prefill, mixed batches, the backward passes and sequence
//! parallelism all run through it.

pub(crate) mod buffers;
pub(crate) mod launch;
pub(crate) mod plan;
