//! kv-parallel: each block's decayed `K^T V`.
//!
//! For block `[start, start + len)`: `KV_blk = sum_j exp(-s (start + len - 1 - j)) k_j^T v_j`,
//! written to the per-block buffer `[b, h, num_blocks, d, e]` (f32). The last
//! block may be shorter than `block`.
//!
//! Geometry: one cube per (block, `b * h`, `d x e` tile); cube x runs over the
//! blocks, y over `b * h`, z over `ceil(d / key_tile) * ceil(e / value_tile)`
//! tiles. The cube has exactly `key_tile * value_tile` units, one per element of
//! the tile. The block is walked in sub-blocks of `sub_block` tokens staged in
//! shared memory: `sub_block * (key_tile + value_tile)` f32.

use cubecl::prelude::*;

/// Launched with the geometry in the module doc.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn kv_parallel<F: Float>(
    k: &[F],
    v: &[F],
    slopes: &[f32],
    block_states: &mut [f32],
    seq_len: u32,
    heads: u32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
) {
    let n = seq_len as usize;
    let bh = CUBE_POS_Y as usize;
    let neg_slope = -slopes[bh % heads as usize];
    let blk = CUBE_POS_X as usize;
    let num_blocks = n.div_ceil(block);
    let start = blk * block;
    let len = min(block, n - start);
    let end = start + len;
    let value_tiles = value_dim.div_ceil(value_tile);
    let d0 = (CUBE_POS_Z as usize / value_tiles) * key_tile;
    let e0 = (CUBE_POS_Z as usize % value_tiles) * value_tile;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let row = unit / value_tile;
    let col = unit % value_tile;

    let mut k_tile = Shared::<[f32]>::new_slice(sub_block * key_tile);
    let mut v_tile = Shared::<[f32]>::new_slice(sub_block * value_tile);
    let mut acc = 0.0f32;
    let sub_blocks = len.div_ceil(sub_block);
    for sb in 0..sub_blocks {
        let s0 = start + sb * sub_block;
        sync_cube();
        for idx in range_stepped(unit, sub_block * key_tile, units) {
            let t = s0 + idx / key_tile;
            let i = d0 + idx % key_tile;
            let mut value = 0.0f32;
            if t < end && i < key_dim {
                // The decay to the end of the block is folded into k once here.
                value = f32::cast_from(k[(bh * n + t) * key_dim + i])
                    * f32::exp(neg_slope * f32::cast_from((end - 1 - t) as u32));
            }
            k_tile[idx] = value;
        }
        for idx in range_stepped(unit, sub_block * value_tile, units) {
            let t = s0 + idx / value_tile;
            let j = e0 + idx % value_tile;
            let mut value = 0.0f32;
            if t < end && j < value_dim {
                value = f32::cast_from(v[(bh * n + t) * value_dim + j]);
            }
            v_tile[idx] = value;
        }
        sync_cube();
        for c in 0..sub_block {
            acc += k_tile[c * key_tile + row] * v_tile[c * value_tile + col];
        }
    }

    let i = d0 + row;
    let j = e0 + col;
    if i < key_dim && j < value_dim {
        block_states[((bh * num_blocks + blk) * key_dim + i) * value_dim + j] = acc;
    }
}
