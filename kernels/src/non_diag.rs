//! non-diag: each query against the state entering its block, added to diag's output.
//!
//! For the query at offset `c` inside its block, `o_t += scale * exp(-s (c + 1)) q_t KV_in`.
//! The factor is `c + 1` decay steps, as the recurrence takes; vLLM's Triton
//! `_fwd_none_diag_kernel` uses `c`, one step short, which is wrong whenever the
//! incoming state is not zero.
//!
//! Geometry: cube x runs over the same work list of `(sequence, first token of
//! the sub-block)` pairs as diag (a sub-block never straddles two blocks), y
//! over the `h` heads, z over
//! `ceil(e / value_tile)` value tiles with `value_tile = 16 * cols_per_unit`.
//! The cube has 256 units in a 16 x 16 grid; each computes
//! `rows_per_unit x cols_per_unit` outputs (`rows_per_unit = max(1, sub_block / 16)`)
//! at rows and columns 16 apart. `Q` and the incoming state are staged in
//! chunks of `key_chunk` rows of `d`: `sub_block * (key_chunk + 1) + key_chunk * value_tile` f32.

use cubecl::prelude::*;

use crate::layout::first_row;
use crate::tiles::{add_decayed, times_state};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc, after kv-reduce; `reversed`
/// reads every sequence back to front (see [`crate::layout`]).
/// `block_offsets[i]` is the index of sequence `i`'s first block in `block_states`.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn non_diag<F: Float>(
    q: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    work: &[u32],
    block_states: &[f32],
    out: &mut [F],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let value_tile = comptime!(SIDE * cols_per_unit);
    let item = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let seq = work[2 * item] as usize;
    let q_start = work[2 * item + 1] as usize;
    let seq_start = seq_starts[seq] as usize;
    let n = seq_starts[seq + 1] as usize - seq_start;
    let row0 = first_row(seq_start, head, heads as usize, head_stride as usize);
    let blk = q_start / block;
    let global_block = block_offsets[seq] as usize + blk;
    let e0 = CUBE_POS_Z as usize * value_tile;
    let state_base = (global_block * heads as usize + head) * key_dim * value_dim;

    let mut q_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut s_tile = Shared::<[f32]>::new_slice(key_chunk * value_tile);
    let mut acc = Array::<f32>::new(rows_per_unit * cols_per_unit);
    times_state::<F>(
        q,
        block_states,
        &mut q_tile,
        &mut s_tile,
        &mut acc,
        row0,
        n,
        token_stride as usize,
        q_start,
        state_base,
        e0,
        key_dim,
        value_dim,
        false,
        sub_block,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
        reversed,
    );
    add_decayed::<F>(
        &acc,
        out,
        row0,
        n,
        token_stride as usize,
        q_start,
        blk * block,
        -slopes[head],
        scale,
        e0,
        value_dim,
        sub_block,
        rows_per_unit,
        cols_per_unit,
        reversed,
    );
}
