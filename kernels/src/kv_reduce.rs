//! kv-reduce: the prefix over blocks.
//!
//! Walks the blocks in order with the running state (the initial state, or
//! zeros): each block's slot of the per-block buffer, which held that block's
//! `K^T V` from kv-parallel, is replaced by the state entering the block, and the
//! running state becomes `exp(-s len) state + KV_blk`. The state after the last
//! block is written to `final_state`. Each element of `d x e` is independent.
//!
//! Geometry: cube x runs over `ceil(d * e / units)` chunks of the state, y over
//! `b * h`; one unit per element.

use cubecl::prelude::*;

/// Launched with the geometry in the module doc. `initial_state` is read only
/// when `has_initial_state` is set (any buffer may be bound otherwise).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn kv_reduce(
    slopes: &[f32],
    initial_state: &[f32],
    block_states: &mut [f32],
    final_state: &mut [f32],
    seq_len: u32,
    heads: u32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] has_initial_state: bool,
) {
    let n = seq_len as usize;
    let bh = CUBE_POS_Y as usize;
    let neg_slope = -slopes[bh % heads as usize];
    let state_len = key_dim * value_dim;
    let elem = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
    if elem < state_len {
        let num_blocks = n.div_ceil(block);
        let mut state = 0.0f32;
        if comptime!(has_initial_state) {
            state = initial_state[bh * state_len + elem];
        }
        for blk in 0..num_blocks {
            let idx = (bh * num_blocks + blk) * state_len + elem;
            let contribution = block_states[idx];
            block_states[idx] = state;
            let len = min(block, n - blk * block);
            state = f32::exp(neg_slope * f32::cast_from(len as u32)) * state + contribution;
        }
        final_state[bh * state_len + elem] = state;
    }
}
