//! kv-reduce: the prefix over blocks.
//!
//! Walks a sequence's blocks in order with the running state (its initial
//! state, or zeros): each block's slot of the per-block buffer, which held that
//! block's `K^T V` from kv-parallel, is replaced by the state entering the
//! block, and the running state becomes `exp(-s len) state + KV_blk`. The state
//! after the last block is written to slot `final_slots[seq]` of `states`
//! (nowhere if it is negative: a padding sequence). Each
//! element of `d x e` is independent.
//!
//! Where the initial state comes from is per sequence: `initial_slots[seq]` is
//! a slot index, or negative for zeros (a new request that starts clean without
//! anyone clearing its slot). The slot indexes `initial` for a dense batch
//! (`initial_in_states = false`: the caller's initial-state tensor), or `states`
//! itself for a slot cache (`initial_in_states = true`: read and written in
//! place by the same unit, so no other binding aliases the cache).
//!
//! For the backward pass (which runs the forward kernels on transformed
//! operands) the initial state may be read transposed (`transpose_initial`:
//! stored `[e, d]` for a `d x e` state), multiplied by `initial_scale` and, with
//! `advance_initial`, by `exp(s)` (it then enters one decay step late); the
//! final state is multiplied by `final_scale` and, with `retreat_final`, by
//! `exp(-s)`. The forward uses none of these (scales 1).
//!
//! Geometry: cube x runs over `ceil(d * e / (N * units))` chunks of the state,
//! y over the `h` heads, z over the `sequences` to reduce, `work[i]` naming
//! each: with `strided`, cube z takes entries `z, z + cubes along z, ...`, so
//! that a call of more sequences than a grid holds along z (65535 on CUDA and
//! wgpu: a packed batch of many short documents) runs in one launch; without
//! it, cube z takes entry z alone (the loop, compiled in, made ptxas park
//! 16 bytes of every variant in local memory);
//! one unit per vector of `N` elements (the host picks `N` dividing `d * e`;
//! wide loads for a kernel that only streams states), which loads the states
//! of 8 blocks at a time before it stores theirs. `block_offsets[seq]` is the sequence's first block in
//! `block_states` (`[total_blocks, h, d, e]`); states are `[slots, h, d, e]`.

use cubecl::prelude::*;

/// Blocks whose per-block states one unit loads before storing any of them.
const LOADS_IN_FLIGHT: usize = 8;

/// The initial state's vector `at` (in vectors of the flat `d x e` state of
/// one slot and head, starting at vector `base`), read from `src` as stored, or, with
/// `transposed`, gathered from a `[e, d]` copy one element at a time.
#[cube]
fn initial_vector<N: Size>(
    src: &[Vector<f32, N>],
    base: usize,
    at: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] transposed: bool,
) -> Vector<f32, N> {
    let lanes = N::value();
    let mut value = Vector::<f32, N>::empty();
    if comptime!(transposed) {
        #[unroll]
        for x in 0..lanes {
            let scalar = at * lanes + x;
            let from = (scalar % value_dim) * key_dim + scalar / value_dim;
            value.insert(x, src[base + from / lanes].extract_dynamic(from % lanes));
        }
    } else {
        value = src[base + at];
    }
    value
}

/// What the initial state is multiplied by: `initial_scale`, and `exp(s)`
/// with `advance` (it then enters one decay step late).
#[cube]
pub fn initial_factor(initial_scale: f32, neg_slope: f32, #[comptime] advance: bool) -> f32 {
    let mut factor = initial_scale;
    if comptime!(advance) {
        factor *= f32::exp(-neg_slope);
    }
    factor
}

/// What the final state is multiplied by: `final_scale`, and `exp(-s)` with
/// `retreat` (it is decayed one more step).
#[cube]
pub fn final_factor(final_scale: f32, neg_slope: f32, #[comptime] retreat: bool) -> f32 {
    let mut factor = final_scale;
    if comptime!(retreat) {
        factor *= f32::exp(neg_slope);
    }
    factor
}

/// Vector `at` of the initial state in slot `slot` (of `heads` heads, this
/// one `head`), times `factor`: read from `states` itself with `in_states`
/// (a slot cache), else from `initial`, as `initial_vector` reads it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn initial_state<N: Size>(
    initial: &[Vector<f32, N>],
    states: &[Vector<f32, N>],
    slot: usize,
    head: usize,
    heads: usize,
    at: usize,
    factor: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] in_states: bool,
    #[comptime] transposed: bool,
) -> Vector<f32, N> {
    let lanes = N::value();
    let base = (slot * heads + head) * comptime!(key_dim * value_dim / lanes);
    let value = if comptime!(in_states) {
        initial_vector::<N>(states, base, at, key_dim, value_dim, transposed)
    } else {
        initial_vector::<N>(initial, base, at, key_dim, value_dim, transposed)
    };
    value * Vector::new(factor)
}

/// Element `flat` (the row-major `[d, e]` index) of the initial state, one
/// scalar of the vector [`initial_state()`] reads: for the walks that place
/// the state element by element (the fused routines).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn initial_element<N: Size>(
    initial: &[Vector<f32, N>],
    states: &[Vector<f32, N>],
    slot: usize,
    head: usize,
    heads: usize,
    flat: usize,
    factor: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] in_states: bool,
    #[comptime] transposed: bool,
) -> f32 {
    let lanes = N::value();
    initial_state::<N>(
        initial,
        states,
        slot,
        head,
        heads,
        flat / lanes,
        factor,
        key_dim,
        value_dim,
        in_states,
        transposed,
    )
    .extract_dynamic(flat % lanes)
}

/// Launched with the geometry in the module doc. `initial` is read only when
/// `initial_in_states` is false and some sequence has an initial slot (any
/// buffer may be bound otherwise).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn kv_reduce<N: Size>(
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    work: &[u32],
    sequences: u32,
    initial: &[Vector<f32, N>],
    block_states: &mut [Vector<f32, N>],
    states: &mut [Vector<f32, N>],
    heads: u32,
    initial_scale: f32,
    final_scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] initial_in_states: bool,
    #[comptime] transpose_initial: bool,
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
    #[comptime] strided: bool,
) {
    if comptime!(strided) {
        let mut entry = CUBE_POS_Z as usize;
        while entry < sequences as usize {
            reduce_sequence::<N>(
                slopes,
                seq_starts,
                block_offsets,
                initial_slots,
                final_slots,
                work[entry] as usize,
                initial,
                block_states,
                states,
                heads,
                initial_scale,
                final_scale,
                key_dim,
                value_dim,
                block,
                initial_in_states,
                transpose_initial,
                advance_initial,
                retreat_final,
            );
            entry += CUBE_COUNT_Z as usize;
        }
    } else {
        reduce_sequence::<N>(
            slopes,
            seq_starts,
            block_offsets,
            initial_slots,
            final_slots,
            work[CUBE_POS_Z as usize] as usize,
            initial,
            block_states,
            states,
            heads,
            initial_scale,
            final_scale,
            key_dim,
            value_dim,
            block,
            initial_in_states,
            transpose_initial,
            advance_initial,
            retreat_final,
        );
    }
}

/// kv-reduce of one sequence, `seq`, for this cube's head and chunk of the state.
#[cube]
#[allow(clippy::too_many_arguments)]
fn reduce_sequence<N: Size>(
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    seq: usize,
    initial: &[Vector<f32, N>],
    block_states: &mut [Vector<f32, N>],
    states: &mut [Vector<f32, N>],
    heads: u32,
    initial_scale: f32,
    final_scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] initial_in_states: bool,
    #[comptime] transpose_initial: bool,
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
) {
    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let n = (seq_starts[seq + 1] - seq_starts[seq]) as usize;
    let first_block = block_offsets[seq] as usize;
    let neg_slope = -slopes[head];
    // The flat d x e state of one (slot or block, head), in vectors.
    let lanes = N::value();
    let state_len = comptime!(key_dim * value_dim / lanes);
    let elem = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
    if elem < state_len {
        let num_blocks = n.div_ceil(block);
        let mut state = Vector::<f32, N>::new(0.0f32);
        let initial_slot = initial_slots[seq];
        if initial_slot >= 0 {
            let factor = initial_factor(initial_scale, neg_slope, advance_initial);
            state = initial_state::<N>(
                initial,
                &states[0..],
                initial_slot as usize,
                head,
                h,
                elem,
                factor,
                key_dim,
                value_dim,
                initial_in_states,
                transpose_initial,
            );
        }
        // The loads of a group of blocks are issued before any of its stores:
        // one load at a time, each behind the previous store to the same
        // buffer, left the walk bound by memory latency.
        for group in range_stepped(0, num_blocks, LOADS_IN_FLIGHT) {
            let mut contributions = Array::<Vector<f32, N>>::new(LOADS_IN_FLIGHT);
            #[unroll]
            for g in 0..LOADS_IN_FLIGHT {
                let blk = group + g;
                let mut contribution = Vector::<f32, N>::new(0.0f32);
                if blk < num_blocks {
                    contribution = block_states[((first_block + blk) * h + head) * state_len + elem];
                }
                contributions[g] = contribution;
            }
            #[unroll]
            for g in 0..LOADS_IN_FLIGHT {
                let blk = group + g;
                if blk < num_blocks {
                    block_states[((first_block + blk) * h + head) * state_len + elem] = state;
                    let len = min(block, n - blk * block);
                    let decay = f32::exp(neg_slope * f32::cast_from(len as u32));
                    state = Vector::<f32, N>::new(decay) * state + contributions[g];
                }
            }
        }
        let final_slot = final_slots[seq];
        if final_slot >= 0 {
            let factor = final_factor(final_scale, neg_slope, retreat_final);
            states[(final_slot as usize * h + head) * state_len + elem] = state * Vector::new(factor);
        }
    }
}
