//! backward-non-diag: the key and value gradients from the gradient state that
//! enters each block, added to [`crate::backward_diag`]'s output.
//!
//! Backwards in time (`reversed` addressing), the reverse sweep ([`crate::kv_parallel`]
//! and [`crate::kv_reduce`] on `q^T dO`) leaves the state `G` (`d x e`) that
//! enters each block: the decayed sum of `q_i^T do_i` over every later token
//! outside the block (and the final-state gradient). For the key at offset
//! `c` inside its reversed block, with `decay = scale * exp(-s (c + 1))`:
//!
//! - `dv_t += decay * k_t G`
//! - `dk_t += decay * v_t G^T`
//!
//! Both read the same state, so one cube adds both; the separate passes of the
//! forward kernels would each have built their own copy of it.
//!
//! Geometry: cube x runs over the work list of `(sequence, first token of the
//! sub-block)` pairs, y over the `h` heads, z over `ceil(max(d, e) /
//! column_tile)` column tiles (`column_tile = 16 * cols_per_unit`; tile `z`
//! holds columns `z * column_tile..` of dv where `< e` and of dk where `< d`).
//! 256 units in a 16 x 16 grid, each with `rows_per_unit x cols_per_unit`
//! outputs of each gradient. The rows and the state are staged in chunks of
//! `key_chunk`: `sub_block * (key_chunk + 1) + key_chunk * column_tile` f32.

use cubecl::prelude::*;

use crate::layout::first_row;
use crate::tiles::{add_decayed, times_state};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc after the reverse sweep;
/// always reads sequences back to front. `block_offsets[i]` is the index of
/// sequence `i`'s first block in `block_states` (`[blocks, h, d, e]`).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn backward_non_diag<F: Float>(
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    work: &[u32],
    block_states: &[f32],
    dk: &mut [F],
    dv: &mut [F],
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
) {
    let column_tile = comptime!(SIDE * cols_per_unit);
    let item = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let seq = work[2 * item] as usize;
    let row_start = work[2 * item + 1] as usize;
    let seq_start = seq_starts[seq] as usize;
    let row0 = first_row(seq_start, head, heads as usize, head_stride as usize);
    let n = seq_starts[seq + 1] as usize - seq_start;
    let step = token_stride as usize;
    let blk = row_start / block;
    let state_base = ((block_offsets[seq] as usize + blk) * heads as usize + head) * key_dim * value_dim;
    let col0 = CUBE_POS_Z as usize * column_tile;

    let mut row_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut state_tile = Shared::<[f32]>::new_slice(key_chunk * column_tile);
    let mut acc = Array::<f32>::new(rows_per_unit * cols_per_unit);

    // dv_t += decay * k_t G: contract over d, columns of e.
    times_state::<F>(
        k,
        block_states,
        &mut row_tile,
        &mut state_tile,
        &mut acc,
        row0,
        n,
        step,
        row_start,
        state_base,
        col0,
        key_dim,
        value_dim,
        false,
        sub_block,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
        true,
    );
    add_decayed::<F>(
        &acc,
        dv,
        row0,
        n,
        step,
        row_start,
        blk * block,
        -slopes[head],
        scale,
        col0,
        value_dim,
        sub_block,
        rows_per_unit,
        cols_per_unit,
        true,
    );
    // dk_t += decay * v_t G^T: contract over e, columns of d.
    times_state::<F>(
        v,
        block_states,
        &mut row_tile,
        &mut state_tile,
        &mut acc,
        row0,
        n,
        step,
        row_start,
        state_base,
        col0,
        value_dim,
        key_dim,
        true,
        sub_block,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
        true,
    );
    add_decayed::<F>(
        &acc,
        dk,
        row0,
        n,
        step,
        row_start,
        blk * block,
        -slopes[head],
        scale,
        col0,
        key_dim,
        sub_block,
        rows_per_unit,
        cols_per_unit,
        true,
    );
}
