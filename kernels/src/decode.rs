//! decode: one token per sequence against a slot-indexed f32 state cache, in place.
//!
//! For row `b` with slot `slot = slots[b] >= 0` and head `h`:
//! `S = exp(-s) S + k^T v` in `cache[slot, h]`, then `o = scale * q S`. A negative
//! slot (padding) leaves the cache untouched and writes zeros to that output row.
//!
//! Geometry: cube x runs over `ceil(e / column_tile)` chunks of the value
//! dimension, y over `b * h`. The cube has `column_tile * row_groups` units:
//! unit `(g, c)` updates column `c` of the rows `i = g (mod row_groups)`, so each
//! unit walks `d / row_groups` rows instead of all `d` (a short dependency chain
//! at small batch), and the partial dot products meet in shared memory
//! (`column_tile * row_groups` f32).

use cubecl::prelude::*;

/// Launched with the geometry in the module doc. q, k `[b, h, d]`, v, out
/// `[b, h, e]`, cache `[slots, h, d, e]`, slots `[b]`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    slopes: &[f32],
    slots: &[i32],
    cache: &mut [f32],
    out: &mut [F],
    heads: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] column_tile: usize,
    #[comptime] row_groups: usize,
) {
    let h = heads as usize;
    let bh = CUBE_POS_Y as usize;
    let head = bh % h;
    let unit = UNIT_POS as usize;
    let group = unit / column_tile;
    let local_col = unit % column_tile;
    let col = CUBE_POS_X as usize * column_tile + local_col;
    let slot = slots[bh / h];
    // The slot is the same for the whole cube, so this branch is uniform.
    if slot < 0 {
        if group == 0 && col < value_dim {
            out[bh * value_dim + col] = F::cast_from(0.0f32);
        }
    } else {
        let mut partial = Shared::<[f32]>::new_slice(column_tile * row_groups);
        let mut acc = 0.0f32;
        if col < value_dim {
            let decay = f32::exp(-slopes[head]);
            let base = (slot as usize * h + head) * key_dim * value_dim + col;
            let vj = f32::cast_from(v[bh * value_dim + col]);
            for i in range_stepped(group, key_dim, row_groups) {
                let idx = base + i * value_dim;
                let updated = decay * cache[idx] + f32::cast_from(k[bh * key_dim + i]) * vj;
                cache[idx] = updated;
                acc += f32::cast_from(q[bh * key_dim + i]) * updated;
            }
        }
        partial[unit] = acc;
        sync_cube();
        if group == 0 && col < value_dim {
            let mut sum = 0.0f32;
            for g in 0..row_groups {
                sum += partial[g * column_tile + local_col];
            }
            out[bh * value_dim + col] = F::cast_from(scale * sum);
        }
    }
}
