//! kv-parallel on tensor cores: the accelerated routine of
//! [`crate::kv_parallel`], for f16 and bf16 inputs on devices whose runtime
//! reports a 16 x 16 x 16 `cmma` with f32 accumulators (CUDA).
//!
//! The math is the same: for block `[start, start + len)`,
//! `KV_blk = sum_j exp(-s (start + len - 1 - j)) k_j^T v_j`, written in f32 to
//! the per-block buffer `[total_blocks, h, d, e]`.
//!
//! Geometry: one cube per (block, head, `key_tile x value_tile` tile of the
//! state), as in [`crate::kv_parallel`] (x over the block work list, y over
//! heads, z over `ceil(d / key_tile) * ceil(e / value_tile)` tiles). The cube
//! holds `key_tile / 16` planes; plane `p` owns rows `16p .. 16p + 16` of the
//! tile, `value_tile / 16` accumulators. The block is walked `stage` tokens at
//! a time: K with the decay folded in (computed in f32, rounded to the input
//! dtype) and V are staged in shared memory, and each plane multiplies
//! `K_stage^T V_stage` into its accumulators. Shared memory, bytes:
//! `elem * stage * (key_tile + value_tile + 16) + 4 * 16 * 20 * planes` (each
//! row padded by 16 bytes, see [`crate::staging`]).
//!
//! k, v and the block states travel as vectors of `N` scalars along their rows (see
//! [`crate::staging`]); the host picks `N` dividing `d` and `e`.
//!
//! K and V are staged as `M`: the input dtype, or bf16 for f32 inputs (rounded,
//! or with `split` as high and low parts, three products: [`crate::staging`]'s
//! split operands, which double the staged tiles and `elem`).

use cubecl::prelude::*;

use crate::layout::first_row;
use crate::staging::{F32_ROW_PAD, ROW_PAD, TILE, split_product, stage_rows, store_tile, zero_accumulator};

/// Alignment of the shared tiles, bytes (wmma loads need 32).
const ALIGN: usize = 128;

/// Launched with the geometry in the module doc and `key_tile / 16` planes of
/// `plane_size` units (the device's fixed plane size); `stage` is a multiple of 16; `reversed` reads
/// every sequence back to front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn kv_parallel_cmma<F: Float, M: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    slopes: &[f32],
    seq_starts: &[u32],
    work: &[u32],
    block_states: &mut [Vector<f32, N>],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] stage: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] plane_size: usize,
    #[comptime] reversed: bool,
    #[comptime] split: bool,
) {
    let lanes_v = N::value();
    // Row strides of the shared tiles, padded (see crate::staging), in
    // scalars, and the staged tiles' lengths in vectors of N.
    let k_stride = comptime!(key_tile + ROW_PAD);
    let v_stride = comptime!(value_tile + ROW_PAD);
    let out_stride = comptime!(TILE + F32_ROW_PAD);
    let k_len = comptime!(stage * k_stride / lanes_v);
    let v_len = comptime!(stage * v_stride / lanes_v);
    let out_len = comptime!(key_tile * out_stride);
    let value_tiles = comptime!(value_tile / TILE);
    let stage_tiles = comptime!(stage / TILE);
    let planes = comptime!(key_tile / TILE);
    let units = comptime!(planes * plane_size);
    // Where the staged tiles' low parts start (0: no split).
    let parts = comptime!(if split { 2 } else { 1 });
    let k_lo = comptime!(if split { k_len } else { 0 });
    let v_lo = comptime!(if split { v_len } else { 0 });

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
    let tiles_along_e = value_dim.div_ceil(value_tile);
    let d0 = (CUBE_POS_Z as usize / tiles_along_e) * key_tile;
    let e0 = (CUBE_POS_Z as usize % tiles_along_e) * value_tile;
    let unit = UNIT_POS as usize;
    let plane = unit / plane_size;

    let mut k_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * k_len), ALIGN);
    let mut v_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * v_len), ALIGN);
    let mut out_s = Shared::<[f32]>::new_aligned_slice(out_len, ALIGN);

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..value_tiles {
        acc.push(zero_accumulator());
    }

    for s0 in range_stepped(start, end, stage) {
        sync_cube();
        // K_stage stored token-major, `[stage, key_tile]`, with each token's
        // decay to the block's end folded in: read column-major it is the
        // `key_tile x stage` operand K^T.
        stage_rows::<F, M, N>(
            k, &mut k_s, row0, n, row_step, s0, end, d0, neg_slope, stage, key_tile, k_stride, key_dim,
            units, true, reversed, k_lo,
        );
        stage_rows::<F, M, N>(
            v, &mut v_s, row0, n, row_step, s0, end, e0, neg_slope, stage, value_tile, v_stride, value_dim,
            units, false, reversed, v_lo,
        );
        sync_cube();
        #[unroll]
        for jt in 0..value_tiles {
            #[unroll]
            for kk in 0..stage_tiles {
                split_product::<M, N>(
                    &k_s,
                    (kk * TILE * k_stride + plane * TILE) / lanes_v,
                    cmma::MatrixLayout::ColMajor,
                    k_stride,
                    k_lo,
                    &v_s,
                    (kk * TILE * v_stride + jt * TILE) / lanes_v,
                    cmma::MatrixLayout::RowMajor,
                    v_stride,
                    v_lo,
                    acc.index(jt),
                    split,
                );
            }
        }
    }

    // Each tile goes through the plane's own 16 x 16 staging area, then to
    // rows d0 + 16 plane .. of the block's state (as if they were tokens of a
    // sequence of key_dim rows, one apart).
    let staging = plane * TILE * out_stride;
    let state_row0 = (global_block * heads as usize + head) * key_dim;
    #[unroll]
    for jt in 0..value_tiles {
        sync_plane();
        cmma::store(
            &mut out_s[staging..out_len],
            acc.index(jt),
            out_stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        store_tile::<f32, N>(
            &out_s,
            staging,
            block_states,
            state_row0,
            key_dim,
            1,
            d0 + plane * TILE,
            key_dim,
            e0 + jt * TILE,
            out_stride,
            value_dim,
            plane_size,
            false,
        );
    }
}
