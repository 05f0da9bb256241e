//! decode: one token per sequence against a slot-indexed state cache, in place.
//!
//! For row `b` with slot `slot = slots[b] >= 0` and head `h`:
//! `S = exp(-s) S + k^T v` in `cache[slot, h]`, then `o = scale * q S`. Slot -1
//! (padding) leaves the cache untouched and writes zeros to that output row; a
//! slot below -1 is an entry this launch does not serve (a cache split over
//! several buffers takes one launch per buffer): nothing is read or written.
//!
//! Rows are dense (`q`, `k` `[b, h, d]`, row `b * h + head`) or, with `indexed`,
//! picked from a packed `[total_tokens, h, d]` batch: entry `b` is token
//! `tokens[b]`, row `tokens[b] * h + head` (the decode rows of a mixed batch,
//! served in place in the packed tensors).
//!
//! v, out and the cache are read and written as vectors of `N` lanes along `e`
//! (wide loads for a kernel that only streams the cache); the host picks `N`
//! dividing `e`. Geometry: cube x runs over `ceil(e / (N * column_tile))`
//! chunks of the value dimension, y over `b * h`. The cube has
//! `column_tile * row_groups` units: unit `(g, c)` updates vector column `c` of
//! the rows `i = g (mod row_groups)`, so each unit walks `d / row_groups` rows
//! instead of all `d` (a short dependency chain at small batch), `rows_in_flight`
//! rows loaded before any is stored (the host picks it per compiler), and the partial
//! dot products meet in shared memory (`column_tile * row_groups` vectors).
//!
//! The cache is f32 (`S = f32`, `W = N`, `state_words` off: read and written
//! as is) or bf16 (`state_words` on): then it is bound as the 32-bit words
//! holding its elements in pairs (`S = u32`, `W = N / 2` words per vector of
//! `N` elements, so a vector's index is the same in either layout), widened
//! exactly by a shift and rounded once per write to the nearest bf16, ties to
//! even, NaN kept ([`bf16_bits`](fn@crate::widen::bf16_bits)). Words on every runtime, CUDA
//! included, rather than a bf16 type where one exists: one code path whose
//! rounding is the same bits everywhere (the lavapipe tests judge the CUDA
//! arithmetic), for a few integer operations per element in a kernel bound by
//! the bytes it moves.

use cubecl::prelude::*;

use crate::widen::{bf16_bits, bf16_half};

/// Launched with the geometry in the module doc. q, k `[b, h, d]`, v, out
/// `[b, h, e]` (or packed, with `indexed`), cache `[slots, h, d, e]`, slots and
/// tokens `[b]` (`tokens` is read only with `indexed`); `value_dim` is `e` in
/// scalars. The cache's element `S` and vector size `W` as in the module doc.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn decode<F: Float, S: Numeric, N: Size, W: Size>(
    q: &[F],
    k: &[F],
    v: &[Vector<F, N>],
    slopes: &[f32],
    slots: &[i32],
    tokens: &[u32],
    cache: &mut [Vector<S, W>],
    out: &mut [Vector<F, N>],
    heads: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] column_tile: usize,
    #[comptime] row_groups: usize,
    #[comptime] rows_in_flight: usize,
    #[comptime] indexed: bool,
    #[comptime] state_words: bool,
) {
    let vector_cols = value_dim / N::value();
    let h = heads as usize;
    let entry = CUBE_POS_Y as usize / h;
    let head = CUBE_POS_Y as usize % h;
    let mut row = CUBE_POS_Y as usize;
    if comptime!(indexed) {
        row = tokens[entry] as usize * h + head;
    }
    let unit = UNIT_POS as usize;
    let group = unit / column_tile;
    let local_col = unit % column_tile;
    let col = CUBE_POS_X as usize * column_tile + local_col;
    let slot = slots[entry];
    // The slot is the same for the whole cube, so these branches are uniform.
    if slot == -1i32 {
        if group == 0 && col < vector_cols {
            out[row * vector_cols + col] = Vector::new(F::cast_from(0.0f32));
        }
    } else if slot >= 0i32 {
        let mut partial = Shared::<[Vector<f32, N>]>::new_slice(column_tile * row_groups);
        let mut acc = Vector::<f32, N>::new(0.0f32);
        if col < vector_cols {
            let decay = Vector::<f32, N>::new(f32::exp(-slopes[head]));
            let base = (slot as usize * h + head) * key_dim * vector_cols + col;
            let vj = Vector::<f32, N>::cast_from(v[row * vector_cols + col]);
            // Row `i = group + m * row_groups` for m = 0, 1, ... With
            // `rows_in_flight > 1` the unit's rows are loaded a group at a time
            // before any is stored back: one row at a time, each load waits
            // behind the previous store to the cache (CUDA). WGSL keeps the
            // plain walk, which measured faster there.
            if comptime!(rows_in_flight == 1) {
                for i in range_stepped(group, key_dim, row_groups) {
                    let idx = base + i * vector_cols;
                    let ki = Vector::<f32, N>::new(f32::cast_from(k[row * key_dim + i]));
                    let updated = decay * load_state::<S, N, W>(cache[idx], state_words) + ki * vj;
                    store_state::<S, N, W>(cache, idx, updated, state_words);
                    acc += Vector::<f32, N>::new(f32::cast_from(q[row * key_dim + i])) * updated;
                }
            } else {
                let rows_per_unit = comptime!(key_dim.div_ceil(row_groups));
                for m0 in range_stepped(0, rows_per_unit, rows_in_flight) {
                    let mut states = Array::<Vector<f32, N>>::new(rows_in_flight);
                    let mut ks = Array::<f32>::new(rows_in_flight);
                    let mut qs = Array::<f32>::new(rows_in_flight);
                    #[unroll]
                    for r in 0..rows_in_flight {
                        let i = group + (m0 + r) * row_groups;
                        if i < key_dim {
                            states[r] = load_state::<S, N, W>(cache[base + i * vector_cols], state_words);
                            ks[r] = f32::cast_from(k[row * key_dim + i]);
                            qs[r] = f32::cast_from(q[row * key_dim + i]);
                        }
                    }
                    #[unroll]
                    for r in 0..rows_in_flight {
                        let i = group + (m0 + r) * row_groups;
                        if i < key_dim {
                            let updated = decay * states[r] + Vector::<f32, N>::new(ks[r]) * vj;
                            store_state::<S, N, W>(cache, base + i * vector_cols, updated, state_words);
                            acc += Vector::<f32, N>::new(qs[r]) * updated;
                        }
                    }
                }
            }
        }
        partial[unit] = acc;
        sync_cube();
        if group == 0 && col < vector_cols {
            let mut sum = Vector::<f32, N>::new(0.0f32);
            for g in 0..row_groups {
                sum += partial[g * column_tile + local_col];
            }
            out[row * vector_cols + col] = Vector::cast_from(Vector::<f32, N>::new(scale) * sum);
        }
    }
}

/// A state vector loaded from the cache, in f32: as is, or widened from its words.
#[cube]
fn load_state<S: Numeric, N: Size, W: Size>(
    loaded: Vector<S, W>,
    #[comptime] state_words: bool,
) -> Vector<f32, N> {
    if comptime!(state_words) {
        // The identity cast: `S` is u32 whenever the cache holds words.
        let words = Vector::<u32, W>::cast_from(loaded);
        let mut state = Vector::<f32, N>::empty();
        #[unroll]
        for lane in 0..state.vector_size() {
            state.insert(
                lane,
                bf16_half(words.extract(comptime!(lane / 2)), comptime!(lane % 2 == 1)),
            );
        }
        state
    } else {
        Vector::<f32, N>::cast_from(loaded)
    }
}

/// Writes the f32 state vector `state` at `idx`: as is, or rounded into words.
#[cube]
fn store_state<S: Numeric, N: Size, W: Size>(
    cache: &mut [Vector<S, W>],
    idx: usize,
    state: Vector<f32, N>,
    #[comptime] state_words: bool,
) {
    if comptime!(state_words) {
        let mut words = Vector::<u32, W>::empty();
        #[unroll]
        for word in 0..words.vector_size() {
            let low = bf16_bits(state.extract(comptime!(2 * word)));
            let high = bf16_bits(state.extract(comptime!(2 * word + 1)));
            words.insert(word, (high << 16u32) | low);
        }
        cache[idx] = Vector::<S, W>::cast_from(words);
    } else {
        cache[idx] = Vector::<S, W>::cast_from(state);
    }
}
