//! kv-snapshot: the state after chosen tokens, for speculative decoding.
//!
//! A verifier that runs `K` draft tokens through a prefill needs the state after
//! each of them, to roll back to whichever prefix it accepts. For token `p` of a
//! sequence (0-based) in block `[start, start + block)`, the state after it is
//! `exp(-s (p - start + 1)) S_in + sum_{start <= j <= p} exp(-s (p - j)) k_j^T v_j`,
//! with `S_in` the state entering the block, which kv-reduce leaves in the
//! per-block buffer. Each snapshot costs at most `block` rank-1 updates per
//! element, cheap next to the prefill for the few tokens a verifier drafts.
//!
//! Geometry: cube x runs over `ceil(d * e / units)` chunks of the state, y over
//! the `h` heads, z over the snapshots, `work[3 z..3 z + 3]` holding
//! `(sequence, token p, slot)`; one unit per element. The snapshot is written to
//! `states[slot, head]` (`[slots, h, d, e]`). Token addressing as in
//! [`crate::layout`].

use cubecl::prelude::*;

use crate::layout::first_row;

/// Launched with the geometry in the module doc, after kv-reduce.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn kv_snapshot<F: Float>(
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    work: &[u32],
    block_states: &[f32],
    states: &mut [f32],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
) {
    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let snapshot = CUBE_POS_Z as usize;
    let seq = work[3 * snapshot] as usize;
    let token = work[3 * snapshot + 1] as usize;
    let slot = work[3 * snapshot + 2] as usize;
    let row0 = first_row(seq_starts[seq] as usize, head, h, head_stride as usize);
    let row_step = token_stride as usize;
    let neg_slope = -slopes[head];
    let state_len = key_dim * value_dim;
    let elem = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
    if elem < state_len {
        let i = elem / value_dim;
        let col = elem % value_dim;
        let blk = token / block;
        let start = blk * block;
        let incoming = block_states[((block_offsets[seq] as usize + blk) * h + head) * state_len + elem];
        let mut state = f32::exp(neg_slope * f32::cast_from((token - start + 1) as u32)) * incoming;
        for j in start..token + 1 {
            let row = row0 + j * row_step;
            state += f32::exp(neg_slope * f32::cast_from((token - j) as u32))
                * f32::cast_from(k[row * key_dim + i])
                * f32::cast_from(v[row * value_dim + col]);
        }
        states[(slot * h + head) * state_len + elem] = state;
    }
}
