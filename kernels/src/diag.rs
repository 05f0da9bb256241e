//! diag: the intra-block causal part of the prefill.
//!
//! For the query at position `t` in block `[start, start + block)`:
//! `o_t = scale * sum_{start <= j <= t} exp(-s (t - j)) (q_t . k_j) v_j`.
//! The output is overwritten (non-diag adds to it afterwards).
//!
//! Geometry: one cube per (query sub-block, `b * h`, value tile); cube x runs
//! over the `ceil(n / sub_block)` query sub-blocks of the whole sequence, y over
//! `b * h`, z over `ceil(e / value_tile)` tiles of the value dimension. Any 1-D
//! cube size works; units stride over the tiles.
//!
//! The scores `Q K^T` of a (query, key) sub-block pair are accumulated over
//! chunks of `key_chunk` columns of `d`, each chunk of Q and K staged in shared
//! memory with rows padded by one float so that units reading different rows of
//! the same column hit different banks. Shared memory, in f32:
//! `sub_block^2 + sub_block * value_tile + 2 * sub_block * (key_chunk + 1)`.

use cubecl::prelude::*;

/// Launched with the geometry in the module doc.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn diag<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    slopes: &[f32],
    out: &mut [F],
    seq_len: u32,
    heads: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] value_tile: usize,
    #[comptime] key_chunk: usize,
) {
    let n = seq_len as usize;
    let bh = CUBE_POS_Y as usize;
    let neg_slope = -slopes[bh % heads as usize];
    let q_start = CUBE_POS_X as usize * sub_block;
    let block_start = (q_start / block) * block;
    let e0 = CUBE_POS_Z as usize * value_tile;
    let qk_base = bh * n * key_dim;
    let v_base = bh * n * value_dim;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let row_stride = key_chunk + 1;

    let mut scores = Shared::<[f32]>::new_slice(sub_block * sub_block);
    let mut acc = Shared::<[f32]>::new_slice(sub_block * value_tile);
    let mut q_tile = Shared::<[f32]>::new_slice(sub_block * row_stride);
    let mut k_tile = Shared::<[f32]>::new_slice(sub_block * row_stride);
    // Each unit owns the same score and accumulator slots throughout; only the
    // staged tiles and the finished scores are exchanged between units.
    for idx in range_stepped(unit, sub_block * value_tile, units) {
        acc[idx] = 0.0f32;
    }

    let key_sub_blocks = (q_start - block_start) / sub_block + 1;
    for ks in 0..key_sub_blocks {
        let k_start = block_start + ks * sub_block;
        sync_cube();
        for idx in range_stepped(unit, sub_block * sub_block, units) {
            scores[idx] = 0.0f32;
        }
        for c0 in range_stepped(0, key_dim, key_chunk) {
            sync_cube();
            for idx in range_stepped(unit, sub_block * key_chunk, units) {
                let r = idx / key_chunk;
                let i = c0 + idx % key_chunk;
                let tq = q_start + r;
                let tk = k_start + r;
                let mut qv = 0.0f32;
                let mut kv = 0.0f32;
                if i < key_dim {
                    if tq < n {
                        qv = f32::cast_from(q[qk_base + tq * key_dim + i]);
                    }
                    if tk < n {
                        kv = f32::cast_from(k[qk_base + tk * key_dim + i]);
                    }
                }
                q_tile[r * row_stride + idx % key_chunk] = qv;
                k_tile[r * row_stride + idx % key_chunk] = kv;
            }
            sync_cube();
            for idx in range_stepped(unit, sub_block * sub_block, units) {
                let q_row = (idx / sub_block) * row_stride;
                let k_row = (idx % sub_block) * row_stride;
                let mut dot = 0.0f32;
                for i in 0..key_chunk {
                    dot += q_tile[q_row + i] * k_tile[k_row + i];
                }
                scores[idx] += dot;
            }
        }
        for idx in range_stepped(unit, sub_block * sub_block, units) {
            let tq = q_start + idx / sub_block;
            let tk = k_start + idx % sub_block;
            // Masked before the exponential: exp(+x) of a future key could overflow.
            let mut weight = 0.0f32;
            if tk <= tq && tq < n {
                weight = scale * f32::exp(neg_slope * f32::cast_from((tq - tk) as u32));
            }
            scores[idx] *= weight;
        }
        sync_cube();
        for idx in range_stepped(unit, sub_block * value_tile, units) {
            let row = idx / value_tile;
            let col = e0 + idx % value_tile;
            if col < value_dim {
                let mut sum = 0.0f32;
                for c in 0..sub_block {
                    let tk = k_start + c;
                    if tk < n {
                        sum += scores[row * sub_block + c] * f32::cast_from(v[v_base + tk * value_dim + col]);
                    }
                }
                acc[idx] += sum;
            }
        }
    }

    for idx in range_stepped(unit, sub_block * value_tile, units) {
        let tq = q_start + idx / value_tile;
        let col = e0 + idx % value_tile;
        if tq < n && col < value_dim {
            out[v_base + tq * value_dim + col] = F::cast_from(acc[idx]);
        }
    }
}
