//! decayed_sum: a sum of states, each decayed by its head's slope over a
//! number of tokens, for sequence parallelism.
//!
//! A rank of a sequence split across ranks needs the state entering its
//! segment, `P_r = sum_{j<r} exp(-s gap_j) L_j` (the final states `L_j` of the
//! segments before it, each decayed over the tokens between its end and the
//! rank's start), and in the backward pass the gradient reaching its segment's
//! end, the same sum over the segments after it. One source with gap 0 copies
//! a state into one slot of a larger buffer (a rank's slot of a gather).
//!
//! Geometry: 1-D, any number of cubes; each unit takes elements
//! `ABSOLUTE_POS, ABSOLUTE_POS + units, ...` (units = all units of the grid),
//! so a grid of capped size covers a state of any size.

use cubecl::prelude::*;

/// `out[out_offset + i] = sum_{j in first..end} exp(-slopes[head] gaps[j]) states[j len + i]`
/// for `i < len`, where `states` holds `[sources, b, h, d, e]` f32 (`len`
/// elements per source), `head = (i / head_len) % heads` and `head_len = d e`.
/// An empty range writes zeros.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn decayed_sum(
    states: &[f32],
    slopes: &[f32],
    gaps: &[f32],
    out: &mut [f32],
    first: u32,
    end: u32,
    heads: u32,
    head_len: u32,
    len: u32,
    out_offset: u32,
) {
    let len = len as usize;
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < len {
        let head = (i / head_len as usize) % heads as usize;
        let neg_slope = -slopes[head];
        let mut sum = 0.0f32;
        for j in first..end {
            let decay = f32::exp(neg_slope * gaps[j as usize]);
            sum += decay * states[j as usize * len + i];
        }
        out[out_offset as usize + i] = sum;
        i += units;
    }
}
