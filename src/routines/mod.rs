//! Layer 3, the routines: one folder per routine family, each with its plan
//! beside its launch, and the one function that chooses among them for a
//! call ([`crate::plan::PrefillPlan::new`], in `prefill/plan.rs`).
//!
//! - `five_kernels`: vLLM's five Triton-shaped kernels (diag, kv-parallel,
//!   kv-reduce, non-diag, kv-snapshot) with the tensor-core variants of diag
//!   and kv-parallel;
//! - `chunk_recurrent`: the state pass that walks each sequence's blocks in
//!   place of kv-parallel and kv-reduce;
//! - `fused`: the whole prefill in one pass per sequence, the state on the
//!   chip (opt-in, `Routines::Fused`);
//! - `backward`: the kernels of the key and value gradients;
//! - `decode`: one token per sequence against the state cache;
//! - `widen`: 16-bit inputs on f32 copies;
//! - `state_scratch`: prefills against a bf16 state cache, on f32 copies of
//!   the call's states;
//! - `table`: the sequences and work lists the prefill kernels walk;
//!   `dense_tables`: a dense call's lists, uploaded once per device and shape;
//! - `prefill`: a call as a whole (the choice, the launches in order, the
//!   buffers), above the families;
//! - `common` and `products`: what every launch takes, and how tensor-core
//!   routines take their operands.

pub(crate) mod backward;
pub(crate) mod chunk_recurrent;
pub(crate) mod common;
pub(crate) mod decode;
pub(crate) mod dense_tables;
pub(crate) mod five_kernels;
pub(crate) mod fused;
pub(crate) mod prefill;
pub(crate) mod products;
pub(crate) mod state_scratch;
pub(crate) mod table;
pub(crate) mod widen;
