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
//! `elem * stage * (key_tile + value_tile) + 4 * 256 * planes`.

use cubecl::prelude::*;

use crate::layout::{first_row, token_row};

/// Side of one tensor-core tile (`m = n = k = 16`).
const TILE: usize = 16;
/// Alignment of the shared tiles, bytes (wmma loads need 32).
const ALIGN: usize = 128;
/// Global loads each unit issues before storing them to shared memory.
const BATCH: usize = 8;

/// Launched with the geometry in the module doc and `key_tile / 16` planes of
/// `plane_size` units (the device's fixed plane size); `stage` is a multiple of 16; `reversed` reads
/// every sequence back to front (see [`crate::layout`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn kv_parallel_cmma<F: Float>(
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
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] plane_size: usize,
    #[comptime] reversed: bool,
) {
    let k_len = comptime!(stage * key_tile);
    let v_len = comptime!(stage * value_tile);
    let value_tiles = comptime!(value_tile / TILE);
    let stage_tiles = comptime!(stage / TILE);
    let planes = comptime!(key_tile / TILE);
    // Known at compile time so that the staging loops unroll and keep BATCH
    // loads in flight per unit.
    let units = comptime!(planes * plane_size);
    let k_batches = comptime!(k_len.div_ceil(units * BATCH));
    let v_batches = comptime!(v_len.div_ceil(units * BATCH));

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
    let lane = UNIT_POS_PLANE as usize;
    let lanes = comptime!(plane_size);
    let plane = unit / lanes;

    let mut k_s = Shared::<[F]>::new_aligned_slice(k_len, ALIGN);
    let mut v_s = Shared::<[F]>::new_aligned_slice(v_len, ALIGN);
    let mut out_s = Shared::<[f32]>::new_aligned_slice(planes * TILE * TILE, ALIGN);

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..value_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            TILE,
            TILE,
            TILE,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ));
    }

    for s0 in range_stepped(start, end, stage) {
        sync_cube();
        // K_stage stored token-major, `[stage, key_tile]`: read column-major it
        // is the `key_tile x stage` operand K^T.
        #[unroll]
        for b in 0..k_batches {
            let mut regs = Array::<F>::new(BATCH);
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                let t = s0 + idx / key_tile;
                let i = d0 + idx % key_tile;
                let mut val = F::cast_from(0.0f32);
                if idx < k_len && t < end && i < key_dim {
                    val = k[token_row(row0, t, n, row_step, reversed) * key_dim + i];
                }
                regs[x] = val;
            }
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                let t = s0 + idx / key_tile;
                if idx < k_len {
                    let mut decay = 0.0f32;
                    if t < end {
                        decay = f32::exp(neg_slope * f32::cast_from((end - 1 - t) as u32));
                    }
                    k_s[idx] = F::cast_from(f32::cast_from(regs[x]) * decay);
                }
            }
        }
        #[unroll]
        for b in 0..v_batches {
            let mut regs = Array::<F>::new(BATCH);
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                let t = s0 + idx / value_tile;
                let col = e0 + idx % value_tile;
                let mut val = F::cast_from(0.0f32);
                if idx < v_len && t < end && col < value_dim {
                    val = v[token_row(row0, t, n, row_step, reversed) * value_dim + col];
                }
                regs[x] = val;
            }
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                if idx < v_len {
                    v_s[idx] = regs[x];
                }
            }
        }
        sync_cube();
        #[unroll]
        for jt in 0..value_tiles {
            #[unroll]
            for kk in 0..stage_tiles {
                let a = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::A,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::ColMajor,
                    &k_s[kk * TILE * key_tile + plane * TILE..k_len],
                    key_tile as u32,
                );
                let b = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::RowMajor,
                    &v_s[kk * TILE * value_tile + jt * TILE..v_len],
                    value_tile as u32,
                );
                let o = acc.index(jt);
                cmma::execute(&a, &b, o, o);
            }
        }
    }

    // Each tile goes through the plane's own 16 x 16 staging area.
    let staging = plane * TILE * TILE;
    let state_base = (global_block * heads as usize + head) * key_dim * value_dim;
    #[unroll]
    for jt in 0..value_tiles {
        sync_plane();
        cmma::store(
            &mut out_s[staging..planes * TILE * TILE],
            acc.index(jt),
            TILE as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        for idx in range_stepped(lane, TILE * TILE, lanes) {
            let i = d0 + plane * TILE + idx / TILE;
            let col = e0 + jt * TILE + idx % TILE;
            if i < key_dim && col < value_dim {
                block_states[state_base + i * value_dim + col] = out_s[staging + idx];
            }
        }
    }
}
