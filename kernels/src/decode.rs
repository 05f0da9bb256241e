//! decode: one token per sequence against a slot-indexed f32 state cache, in place.
//!
//! For row `b` with slot `slot = slots[b] >= 0` and head `h`:
//! `S = exp(-s) S + k^T v` in `cache[slot, h]`, then `o = scale * q S`. A negative slot
//! (padding) leaves the cache untouched and writes zeros to that output row.
//!
//! Geometry: cube x runs over `ceil(e / units)` chunks of the value dimension,
//! y over `b * h`; one unit per value column, walking the `d` rows of its column.

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
) {
    let h = heads as usize;
    let bh = CUBE_POS_Y as usize;
    let head = bh % h;
    let col = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
    if col < value_dim {
        let slot = slots[bh / h];
        if slot < 0 {
            out[bh * value_dim + col] = F::cast_from(0.0f32);
        } else {
            let decay = f32::exp(-slopes[head]);
            let base = (slot as usize * h + head) * key_dim * value_dim + col;
            let vj = f32::cast_from(v[bh * value_dim + col]);
            let mut acc = 0.0f32;
            for i in 0..key_dim {
                let idx = base + i * value_dim;
                let updated = decay * cache[idx] + f32::cast_from(k[bh * key_dim + i]) * vj;
                cache[idx] = updated;
                acc += f32::cast_from(q[bh * key_dim + i]) * updated;
            }
            out[bh * value_dim + col] = F::cast_from(scale * acc);
        }
    }
}
