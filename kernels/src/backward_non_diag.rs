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

use crate::layout::{first_row, token_row};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc after the reverse sweep;
/// always reads sequences back to front. `block_offsets[i]` is the index of
/// sequence `i`'s first block in `block_states` (`[blocks, h, d, e]`).
#[cube(launch_unchecked)]
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
    );
}

/// `acc = rows x state` for the unit's rows and columns: `rows` are the
/// sub-block's tokens of `src` (`inner` wide), `state` is `G` (`d x e`, at
/// `state_base`) or, with `transposed`, `G^T`; `cols` is the width of the result.
#[cube]
#[allow(clippy::too_many_arguments)]
fn times_state<F: Float>(
    src: &[F],
    block_states: &[f32],
    row_tile: &mut Shared<[f32]>,
    state_tile: &mut Shared<[f32]>,
    acc: &mut Array<f32>,
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    state_base: usize,
    col0: usize,
    #[comptime] inner: usize,
    #[comptime] cols: usize,
    #[comptime] transposed: bool,
    #[comptime] sub_block: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
) {
    let column_tile = comptime!(SIDE * cols_per_unit);
    let stride = key_chunk + 1;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let unit_col = unit % SIDE;
    // Local arrays are not zeroed on every target (CUDA).
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc[x] = 0.0f32;
    }
    for c0 in range_stepped(0, inner, key_chunk) {
        // Also keeps the tiles of a previous call from being overwritten while read.
        sync_cube();
        for idx in range_stepped(unit, sub_block * key_chunk, units) {
            let t = row_start + idx / key_chunk;
            let x = c0 + idx % key_chunk;
            let mut value = 0.0f32;
            if t < n && x < inner {
                value = f32::cast_from(src[token_row(row0, t, n, step, true) * inner + x]);
            }
            row_tile[(idx / key_chunk) * stride + idx % key_chunk] = value;
        }
        for idx in range_stepped(unit, key_chunk * column_tile, units) {
            let x = c0 + idx / column_tile;
            let col = col0 + idx % column_tile;
            let mut value = 0.0f32;
            if x < inner && col < cols {
                // G is stored [d, e]: row-major in (x, col) as is, in (col, x) transposed.
                let mut offset = x * cols + col;
                if comptime!(transposed) {
                    offset = col * inner + x;
                }
                value = block_states[state_base + offset];
            }
            state_tile[idx] = value;
        }
        sync_cube();
        for x in 0..key_chunk {
            let mut rs = Array::<f32>::new(rows_per_unit);
            #[unroll]
            for m in 0..rows_per_unit {
                let row = m * SIDE + unit_row;
                let mut value = 0.0f32;
                if row < sub_block {
                    value = row_tile[row * stride + x];
                }
                rs[m] = value;
            }
            #[unroll]
            for j in 0..cols_per_unit {
                let s = state_tile[x * column_tile + j * SIDE + unit_col];
                #[unroll]
                for m in 0..rows_per_unit {
                    acc[m * cols_per_unit + j] += rs[m] * s;
                }
            }
        }
    }
}

/// `dst[t, col] += scale * exp(-s (t - block_start + 1)) * acc` for the unit's
/// rows and columns inside the sequence and the width.
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_decayed<F: Float>(
    acc: &Array<f32>,
    dst: &mut [F],
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    block_start: usize,
    neg_slope: f32,
    scale: f32,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] sub_block: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
) {
    let unit_row = UNIT_POS as usize / SIDE;
    let unit_col = UNIT_POS as usize % SIDE;
    #[unroll]
    for m in 0..rows_per_unit {
        let row = m * SIDE + unit_row;
        let t = row_start + row;
        if row < sub_block && t < n {
            let decay = scale * f32::exp(neg_slope * f32::cast_from((t - block_start + 1) as u32));
            #[unroll]
            for j in 0..cols_per_unit {
                let col = col0 + j * SIDE + unit_col;
                if col < width {
                    let o = token_row(row0, t, n, step, true) * width + col;
                    dst[o] = F::cast_from(f32::cast_from(dst[o]) + decay * acc[m * cols_per_unit + j]);
                }
            }
        }
    }
}
