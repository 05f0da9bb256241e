//! The fused forward, portable routine: the whole prefill in one pass per
//! (sequence, head, value tile), the running state kept on the chip.
//!
//! The five kernels and the chunk-recurrent routine write every block's
//! state to HBM and read it back; here one cube walks a sequence's chunks in
//! order with the state tile in shared memory, and writes each output once
//! and the final state once:
//!
//! ```text
//! S = initial (or zeros)
//! for each chunk [c0, c0 + L) of the sequence:
//!     o_t = scale * (sum_{c0 <= j <= t} exp(-s (t - j)) (q_t . k_j) v_j
//!                    + exp(-s (t - c0 + 1)) q_t S)
//!     S = exp(-s L) S + sum_{c0 <= j < c0 + L} exp(-s (c0 + L - 1 - j)) k_j^T v_j
//! states[final slot] = S
//! ```
//!
//! This is the twin of the tensor-core fused routine (issue 28): the same
//! walk, with its products on CUDA cores in f32 and its loads synchronous, so
//! that it runs on every runtime (lavapipe in CI). The intra-chunk part is
//! diag's ([`crate::tiles::masked_scores()`], [`crate::tiles::apply_scores()`]);
//! the initial and final states are handled as [`crate::kv_reduce`] handles
//! them (slots per sequence, the backward pass's transposed, scaled, advanced
//! and retreated variants), through the same helpers.
//!
//! Geometry: cube x runs over the `ceil(e / value_tile)` value tiles
//! (`value_tile = 16 * cols_per_unit`), y over the `h` heads, z over the
//! walks: `work[3z .. 3z + 3]` is `(sequence, first block, blocks)`, the
//! chunk-recurrent routine's walk list. Without `segmented` a walk is a whole
//! sequence; with it (few, long sequences), a segment of whole blocks whose
//! incoming state is slot `z` of `initial` (kv-parallel and kv-reduce over
//! the segments computed it, and the final states), read as is; the walk then
//! writes no final state. The cube
//! has 256 units in a 16 x 16 grid; each holds `rows_per_unit x cols_per_unit`
//! outputs (`rows_per_unit = max(1, chunk / 16)`). Shared memory, in f32:
//! `chunk^2 + 2 * chunk * (key_chunk + 1) + chunk * value_tile + d * value_tile`.
//! The states travel as vectors of `N` scalars (the host launches `N = 1`).

use cubecl::prelude::*;

use crate::kv_reduce::{final_factor, initial_element, initial_factor};
use crate::layout::first_row;
use crate::tiles::{apply_scores, load, masked_scores, store_rows};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc. `initial` is read only when
/// `initial_in_states` is false and some sequence has an initial slot (any
/// buffer may be bound otherwise); `reversed` reads every sequence back to
/// front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn fused<F: Float, N: Size>(
    q: &[F],
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    work: &[u32],
    initial: &[Vector<f32, N>],
    states: &mut [Vector<f32, N>],
    out: &mut [F],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    scale: f32,
    initial_scale: f32,
    final_scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] chunk: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] initial_in_states: bool,
    #[comptime] transpose_initial: bool,
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
    #[comptime] reversed: bool,
    #[comptime] segmented: bool,
) {
    let lanes = N::value();
    let value_tile = comptime!(SIDE * cols_per_unit);
    let stride = comptime!(key_chunk + 1);
    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let walk = CUBE_POS_Z as usize;
    let (seq, seq_start, n, first_token, end_token) = walk_tokens(seq_starts, work, walk, block);
    let (initial_slot, final_slot) = walk_slots(initial_slots, final_slots, seq, walk, segmented);
    let row0 = first_row(seq_start, head, h, head_stride as usize);
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let e0 = CUBE_POS_X as usize * value_tile;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let state_len = comptime!(key_dim * value_dim / lanes);

    let mut scores = Shared::<[f32]>::new_slice(chunk * chunk);
    let mut q_tile = Shared::<[f32]>::new_slice(chunk * stride);
    let mut k_tile = Shared::<[f32]>::new_slice(chunk * stride);
    let mut v_tile = Shared::<[f32]>::new_slice(chunk * value_tile);
    let mut state_s = Shared::<[f32]>::new_slice(key_dim * value_tile);

    // The initial state's tile, or zeros.
    let factor = initial_factor(initial_scale, neg_slope, advance_initial);
    for idx in range_stepped(unit, key_dim * value_tile, units) {
        let row = idx / value_tile;
        let col = e0 + idx % value_tile;
        let mut value = 0.0f32;
        if initial_slot >= 0 && col < value_dim {
            value = initial_element::<N>(
                initial,
                &states[0..],
                initial_slot as usize,
                head,
                h,
                row * value_dim + col,
                factor,
                key_dim,
                value_dim,
                initial_in_states,
                transpose_initial,
            );
        }
        state_s[idx] = value;
    }

    let mut acc = Array::<f32>::new(rows_per_unit * cols_per_unit);
    let mut inter = Array::<f32>::new(rows_per_unit * cols_per_unit);
    let chunks = (end_token - first_token).div_ceil(chunk);
    for c in 0..chunks {
        let c0 = first_token + c * chunk;
        let len = min(chunk, end_token - c0);
        // The intra-chunk part, diag's steps (masked_scores opens with a
        // barrier: the previous chunk's state update is done).
        #[unroll]
        for x in 0..rows_per_unit * cols_per_unit {
            acc[x] = 0.0f32;
        }
        masked_scores::<F>(
            q,
            k,
            &mut scores,
            &mut q_tile,
            &mut k_tile,
            row0,
            n,
            step,
            c0,
            c0,
            neg_slope,
            scale,
            key_dim,
            chunk,
            key_chunk,
            rows_per_unit,
            reversed,
        );
        sync_cube();
        apply_scores::<F>(
            &scores,
            v,
            &mut acc,
            row0,
            n,
            step,
            c0,
            e0,
            value_dim,
            chunk,
            rows_per_unit,
            cols_per_unit,
            reversed,
        );
        // The state entering the chunk: `q_t S`, decayed by its offset + 1.
        times_state::<F>(
            q,
            &state_s,
            &mut q_tile,
            &mut inter,
            row0,
            n,
            step,
            c0,
            key_dim,
            chunk,
            key_chunk,
            value_tile,
            rows_per_unit,
            cols_per_unit,
            reversed,
        );
        #[unroll]
        for m in 0..rows_per_unit {
            let row = m * SIDE + unit_row;
            let decay = scale * f32::exp(neg_slope * f32::cast_from((row + 1) as u32));
            #[unroll]
            for j in 0..cols_per_unit {
                acc[m * cols_per_unit + j] += decay * inter[m * cols_per_unit + j];
            }
        }
        if unit_row < chunk {
            store_rows::<F>(
                &acc,
                out,
                row0,
                n,
                step,
                c0,
                e0,
                value_dim,
                rows_per_unit,
                cols_per_unit,
                reversed,
            );
        }
        update_state::<F>(
            k,
            v,
            &mut state_s,
            &mut k_tile,
            &mut v_tile,
            row0,
            n,
            step,
            c0,
            len,
            e0,
            neg_slope,
            key_dim,
            value_dim,
            chunk,
            key_chunk,
            value_tile,
            reversed,
        );
    }

    sync_cube();
    if final_slot >= 0 {
        let factor = final_factor(final_scale, neg_slope, retreat_final);
        let base = (final_slot as usize * h + head) * state_len;
        // Whole vectors of the state row, each written by one unit.
        let tile_vectors = comptime!(key_dim * value_tile / lanes);
        for idx in range_stepped(unit, tile_vectors, units) {
            let row = idx / comptime!(value_tile / lanes);
            let cv = idx % comptime!(value_tile / lanes);
            let col = e0 + cv * lanes;
            if col < value_dim {
                let mut value = Vector::<f32, N>::empty();
                #[unroll]
                for x in 0..lanes {
                    value.insert(x, state_s[row * value_tile + cv * lanes + x] * factor);
                }
                states[base + (row * value_dim + col) / lanes] = value;
            }
        }
    }
}

/// Walk `walk` of the work list (`work[3 walk .. 3 walk + 3]`: sequence,
/// first block, blocks): `(sequence, its first token's index in the packed
/// rows, its length, first_token, end_token)`, where tokens `first_token ..
/// end_token` of the sequence are the walk's: all of them, or a segment's
/// whole blocks. Both fused walks read their work this way.
#[cube]
pub fn walk_tokens(
    seq_starts: &[u32],
    work: &[u32],
    walk: usize,
    #[comptime] block: usize,
) -> (usize, usize, usize, usize, usize) {
    let seq = work[3 * walk] as usize;
    let seq_start = seq_starts[seq] as usize;
    let n = seq_starts[seq + 1] as usize - seq_start;
    let first_token = work[3 * walk + 1] as usize * block;
    let end_token = min(first_token + work[3 * walk + 2] as usize * block, n);
    (seq, seq_start, n, first_token, end_token)
}

/// The walk's `(initial slot, final slot)`, negative for none: the
/// sequence's; with `segmented`, the segment's incoming state (slot `walk`
/// of `initial`) and no final state (kv-reduce over the segments wrote the
/// final states).
#[cube]
pub fn walk_slots(
    initial_slots: &[i32],
    final_slots: &[i32],
    seq: usize,
    walk: usize,
    #[comptime] segmented: bool,
) -> (i32, i32) {
    let mut initial_slot = initial_slots[seq];
    let mut final_slot = final_slots[seq];
    if comptime!(segmented) {
        initial_slot = walk as i32;
        final_slot = -1i32;
    }
    (initial_slot, final_slot)
}

/// `acc = Q_chunk S` for the unit's rows and columns: the chunk's queries
/// from token `row_start`, staged `key_chunk` columns of `d` at a time, times
/// the state tile held in shared memory (`key_dim x value_tile`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn times_state<F: Float>(
    src: &[F],
    state_s: &Shared<[f32]>,
    row_tile: &mut Shared<[f32]>,
    acc: &mut Array<f32>,
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    #[comptime] key_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] key_chunk: usize,
    #[comptime] value_tile: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let stride = comptime!(key_chunk + 1);
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let unit_col = unit % SIDE;
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc[x] = 0.0f32;
    }
    for x0 in range_stepped(0, key_dim, key_chunk) {
        // Also keeps the tile of a previous step from being overwritten while read.
        sync_cube();
        for idx in range_stepped(unit, chunk * key_chunk, units) {
            let t = row_start + idx / key_chunk;
            let x = x0 + idx % key_chunk;
            row_tile[(idx / key_chunk) * stride + idx % key_chunk] =
                load::<F>(src, row0, n, step, t, x, key_dim, reversed);
        }
        sync_cube();
        for xx in 0..key_chunk {
            let x = x0 + xx;
            if x < key_dim {
                let mut rs = Array::<f32>::new(rows_per_unit);
                #[unroll]
                for m in 0..rows_per_unit {
                    let row = m * SIDE + unit_row;
                    let mut value = 0.0f32;
                    if row < chunk {
                        value = row_tile[row * stride + xx];
                    }
                    rs[m] = value;
                }
                #[unroll]
                for j in 0..cols_per_unit {
                    let s = state_s[x * value_tile + j * SIDE + unit_col];
                    #[unroll]
                    for m in 0..rows_per_unit {
                        acc[m * cols_per_unit + j] += rs[m] * s;
                    }
                }
            }
        }
    }
}

/// `S = exp(-s len) S + sum_j exp(-s (len - 1 - j)) k_j^T v_j` over the
/// chunk's `len` tokens from `c0`: V's columns staged once, K's in pieces of
/// `key_chunk` columns of `d` (decayed to the chunk's end on the way in);
/// each unit updates its elements of the state tile.
#[cube]
#[allow(clippy::too_many_arguments)]
fn update_state<F: Float>(
    k: &[F],
    v: &[F],
    state_s: &mut Shared<[f32]>,
    k_tile: &mut Shared<[f32]>,
    v_tile: &mut Shared<[f32]>,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    neg_slope: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] key_chunk: usize,
    #[comptime] value_tile: usize,
    #[comptime] reversed: bool,
) {
    let stride = comptime!(key_chunk + 1);
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let chunk_decay = f32::exp(neg_slope * f32::cast_from(len as u32));
    // Every unit is done reading the state (times_state) and the tiles.
    sync_cube();
    for idx in range_stepped(unit, chunk * value_tile, units) {
        let j = idx / value_tile;
        let mut value = 0.0f32;
        if j < len {
            value = load::<F>(
                v,
                row0,
                n,
                step,
                c0 + j,
                e0 + idx % value_tile,
                value_dim,
                reversed,
            );
        }
        v_tile[idx] = value;
    }
    for x0 in range_stepped(0, key_dim, key_chunk) {
        for idx in range_stepped(unit, chunk * key_chunk, units) {
            let j = idx / key_chunk;
            let mut value = 0.0f32;
            if j < len {
                let decay = f32::exp(neg_slope * f32::cast_from((len - 1 - j) as u32));
                value = decay * load::<F>(k, row0, n, step, c0 + j, x0 + idx % key_chunk, key_dim, reversed);
            }
            k_tile[j * stride + idx % key_chunk] = value;
        }
        sync_cube();
        for idx in range_stepped(unit, key_chunk * value_tile, units) {
            let xx = idx / value_tile;
            let col = idx % value_tile;
            let x = x0 + xx;
            if x < key_dim {
                let mut s = state_s[x * value_tile + col] * chunk_decay;
                for j in 0..len {
                    s += k_tile[j * stride + xx] * v_tile[j * value_tile + col];
                }
                state_s[x * value_tile + col] = s;
            }
        }
        sync_cube();
    }
}
