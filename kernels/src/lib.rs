//! The `#[cube]` kernels of lightning-attention, written once for every CubeCL runtime.
//!
//! Prefill is blocked by `block` tokens with sub-blocks of `sub_block`:
//! [`diag`] (the intra-block causal part), [`kv_parallel`] (each block's decayed
//! `K^T V`), [`kv_reduce`] (prefix over blocks: carries the incoming state in,
//! leaves each block's incoming state in place, writes the final state) and
//! [`non_diag`] (each query against its block's incoming state, added to the
//! output of `diag`). [`decode`] is one token per sequence against a
//! slot-indexed state cache, updated in place.
//!
//! Each of these kernels is the portable routine: no plane (subgroup) operations
//! and no `cmma`, so it runs on every runtime. Inputs of any float type are
//! loaded, converted to f32, computed in f32 and converted on store; the state
//! is f32 (the decode kernel also streams a bf16 state cache as words).
//! Accelerated routines sit beside them and are chosen by the host from
//! what the device reports: [`diag_cmma`] and [`kv_parallel_cmma`] (tensor
//! cores, f16/bf16 inputs), which share [`staging`] (wide loads into shared
//! memory, fragment loads). The chunk-recurrent routine replaces kv-parallel
//! and kv-reduce by one walk over each sequence's blocks, [`chunk_state`]
//! (tensor-core and portable variants), so that the per-block states cross
//! HBM once.
//!
//! [`fragments`] is the register-fragment product (`mma.m16n8k16`) the fused
//! routine's tensor-core products go through, real or emulated.
//! [`fused`] is the whole prefill in one pass per sequence with the state on
//! the chip (its portable routine; the tensor-core one is issue 28's).
//!
//! [`kv_snapshot`] (speculative decoding) writes the state after chosen tokens.
//! [`decayed_sum`] sums decayed states (sequence parallelism: the state
//! entering a rank's segment, the gradient leaving it).
//! [`state_words`] gathers a bf16 state cache's slots into an f32 scratch of
//! states and rounds them back (prefills against a bf16 cache).
//! [`fill`] sets a buffer to one value on the device (zeroed caches, poisoned outputs).
//! [`finite`] counts the non-finite elements of a tensor (the host's opt-in checks).
//! [`widen`] widens 16-bit inputs to f32 for the portable routines (bf16 from
//! its 32-bit words where the runtime has no bf16 type) and rounds f32 back.
//!
//! The backward pass: the gradient of q is a forward pass on other operands;
//! those of k and v are [`backward_diag`] (their intra-block parts, together)
//! and [`backward_non_diag`] (their parts from the gradient state entering each
//! block), around a reverse sweep of [`kv_parallel`] and [`kv_reduce`] that
//! carries that state (dKV) back to front.
//!
//! Layouts (row-major, contiguous): q, k `[b, h, n, d]` or packed
//! `[total_tokens, h, d]`; v, out likewise with `e` (see [`layout`]: the prefill
//! kernels take a table of sequences and a work list, so one kernel serves both);
//! per-block states `[total_blocks, h, d, e]`; states `[slots, h, d, e]` (the
//! final states of a dense batch are slots `0..b`). Launch geometry is
//! documented on each kernel and planned by the host crate, which validates
//! every size and every table before launching.

// No `missing_docs` lint here: `#[cube]` generates undocumented launch items;
// each kernel function and module is documented by hand.

pub mod backward_diag;
pub mod backward_non_diag;
pub mod chunk_state;
pub mod decayed_sum;
pub mod decode;
pub mod diag;
pub mod diag_cmma;
pub mod fill;
pub mod finite;
pub mod fragment_loads;
pub mod fragments;
pub mod fused;
pub mod fused_fragments;
pub mod fused_key_value;
pub mod kv_parallel;
pub mod kv_parallel_cmma;
pub mod kv_reduce;
pub mod kv_snapshot;
pub mod layout;
pub mod non_diag;
pub mod staging;
pub mod state_words;
pub mod tiles;
pub mod widen;
