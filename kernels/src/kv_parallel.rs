//! kv-parallel: each block's decayed `K^T V`.
//!
//! For block `[start, start + len)`: `KV_blk = sum_j exp(-s (start + len - 1 - j)) k_j^T v_j`,
//! written to the per-block buffer `[total_blocks, h, d, e]` (f32). The last
//! block of a sequence may be shorter than `block`.
//!
//! Geometry: one cube per (block, head, `d x e` tile); cube x runs over the
//! blocks of all sequences in order, `work` holding `(sequence, block index in
//! the sequence)` for each (its index along x is its slot in the per-block
//! buffer), y over the `h` heads, z over `ceil(d / key_tile) * ceil(e / value_tile)`
//! tiles with `key_tile = 16 * rows_per_unit` and `value_tile = 16 * cols_per_unit`.
//! The cube has exactly 256 units in a 16 x 16 grid; each accumulates
//! `rows_per_unit x cols_per_unit` elements in registers, at rows and columns
//! 16 apart so that neighbouring units read neighbouring shared words. The block
//! is walked `stage` tokens at a time, K (decay folded in) and V staged in
//! shared memory: `stage * (key_tile + value_tile)` f32.

use cubecl::prelude::*;

use crate::layout::{first_row, token_row};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc; `reversed` reads every
/// sequence back to front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn kv_parallel<F: Float>(
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    work: &[u32],
    block_states: &mut [f32],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] stage: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let key_tile = comptime!(SIDE * rows_per_unit);
    let value_tile = comptime!(SIDE * cols_per_unit);
    let global_block = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let seq = work[2 * global_block] as usize;
    let blk = work[2 * global_block + 1] as usize;
    let seq_start = seq_starts[seq] as usize;
    let n = seq_starts[seq + 1] as usize - seq_start;
    let row0 = first_row(seq_start, head, heads as usize, head_stride as usize);
    let row_step = token_stride as usize;
    let neg_slope = -slopes[head];
    let start = blk * block;
    let len = min(block, n - start);
    let end = start + len;
    let value_tiles = value_dim.div_ceil(value_tile);
    let d0 = (CUBE_POS_Z as usize / value_tiles) * key_tile;
    let e0 = (CUBE_POS_Z as usize % value_tiles) * value_tile;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let unit_col = unit % SIDE;

    let mut k_tile = Shared::<[f32]>::new_slice(stage * key_tile);
    let mut v_tile = Shared::<[f32]>::new_slice(stage * value_tile);
    let mut acc = Array::<f32>::new(rows_per_unit * cols_per_unit);
    // Local arrays are not zeroed on every target (CUDA).
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc[x] = 0.0f32;
    }
    let steps = len.div_ceil(stage);
    for step in 0..steps {
        let s0 = start + step * stage;
        sync_cube();
        for idx in range_stepped(unit, stage * key_tile, units) {
            let t = s0 + idx / key_tile;
            let i = d0 + idx % key_tile;
            let mut value = 0.0f32;
            if t < end && i < key_dim {
                // The decay to the end of the block is folded into k once here.
                value = f32::cast_from(k[token_row(row0, t, n, row_step, reversed) * key_dim + i])
                    * f32::exp(neg_slope * f32::cast_from((end - 1 - t) as u32));
            }
            k_tile[idx] = value;
        }
        for idx in range_stepped(unit, stage * value_tile, units) {
            let t = s0 + idx / value_tile;
            let j = e0 + idx % value_tile;
            let mut value = 0.0f32;
            if t < end && j < value_dim {
                value = f32::cast_from(v[token_row(row0, t, n, row_step, reversed) * value_dim + j]);
            }
            v_tile[idx] = value;
        }
        sync_cube();
        for c in 0..stage {
            let mut ks = Array::<f32>::new(rows_per_unit);
            #[unroll]
            for m in 0..rows_per_unit {
                ks[m] = k_tile[c * key_tile + m * SIDE + unit_row];
            }
            #[unroll]
            for j in 0..cols_per_unit {
                let vj = v_tile[c * value_tile + j * SIDE + unit_col];
                #[unroll]
                for m in 0..rows_per_unit {
                    acc[m * cols_per_unit + j] += ks[m] * vj;
                }
            }
        }
    }

    // One base index per unit and comptime offsets per element: ptxas then
    // stores through one address with immediate offsets, where sixteen
    // computed addresses kept more values live than the 32 registers it
    // aims for at 8 cubes per SM (it spilled them: the offline compile).
    let slot = (global_block * heads as usize + head) * key_dim * value_dim;
    let base = slot + (d0 + unit_row) * value_dim + e0 + unit_col;
    #[unroll]
    for m in 0..rows_per_unit {
        let i = d0 + m * SIDE + unit_row;
        #[unroll]
        for j in 0..cols_per_unit {
            let col = e0 + j * SIDE + unit_col;
            if i < key_dim && col < value_dim {
                block_states[base + comptime!(m * SIDE * value_dim + j * SIDE)] = acc[m * cols_per_unit + j];
            }
        }
    }
}
