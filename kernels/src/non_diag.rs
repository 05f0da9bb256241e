//! non-diag: each query against the state entering its block, added to diag's output.
//!
//! For the query at offset `c` inside its block, `o_t += scale * exp(-s (c + 1)) q_t KV_in`.
//! The factor is `c + 1` decay steps, as the recurrence takes; vLLM's Triton
//! `_fwd_none_diag_kernel` uses `c`, one step short, which is wrong whenever the
//! incoming state is not zero.
//!
//! Geometry: cube x runs over the `ceil(n / sub_block)` query sub-blocks, y over
//! `b * h`, z over `ceil(e / value_tile)` value tiles; units stride over the
//! `sub_block x value_tile` outputs of the cube.

use cubecl::prelude::*;

/// Launched with the geometry in the module doc, after kv-reduce.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn non_diag<F: Float>(
    q: &[F],
    slopes: &[f32],
    block_states: &[f32],
    out: &mut [F],
    seq_len: u32,
    heads: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] value_tile: usize,
) {
    let n = seq_len as usize;
    let bh = CUBE_POS_Y as usize;
    let neg_slope = -slopes[bh % heads as usize];
    let num_blocks = n.div_ceil(block);
    let q_start = CUBE_POS_X as usize * sub_block;
    let e0 = CUBE_POS_Z as usize * value_tile;
    let state_len = key_dim * value_dim;
    for idx in range_stepped(UNIT_POS as usize, sub_block * value_tile, CUBE_DIM as usize) {
        let t = q_start + idx / value_tile;
        let col = e0 + idx % value_tile;
        if t < n && col < value_dim {
            let blk = t / block;
            let offset = t - blk * block;
            let state_base = (bh * num_blocks + blk) * state_len;
            let mut dot = 0.0f32;
            for i in 0..key_dim {
                dot += f32::cast_from(q[(bh * n + t) * key_dim + i])
                    * block_states[state_base + i * value_dim + col];
            }
            let o = (bh * n + t) * value_dim + col;
            let decay = scale * f32::exp(neg_slope * f32::cast_from((offset + 1) as u32));
            out[o] = F::cast_from(f32::cast_from(out[o]) + decay * dot);
        }
    }
}
