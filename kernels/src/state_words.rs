//! state-words: a bf16 state cache's chosen slots widened into an f32 scratch
//! of states, and the scratch rounded back into chosen slots.
//!
//! The prefill kernels read and write f32 states. A call against a bf16 cache
//! gathers the states it reads into a scratch `[entries, h, d, e]` f32
//! ([`widen_states`](fn@widen_states)), runs on the scratch, and scatters the states it wrote
//! back ([`narrow_states`](fn@narrow_states)), rounding each element once to the nearest bf16,
//! ties to even, NaN kept (as [`crate::widen`]). The cache is bound as the
//! 32-bit words holding its elements in pairs; a state holds an even number of
//! elements (the host requires an even `e` of a bf16 cache), so no word
//! straddles two slots and each unit owns whole words.
//!
//! Geometry of both: cube y is the scratch entry, x any number of cubes; each
//! unit takes words `w = CUBE_POS_X * CUBE_DIM + UNIT_POS, + units, ...` of the
//! state (units = the x cubes' units), so a capped grid covers a state of any
//! size. An entry whose slot is negative is skipped.

use cubecl::prelude::*;

use crate::widen::{bf16_bits, bf16_half};

/// `scratch[j]` = the state in slot `slots[j]` of `cache` (words), widened,
/// for every entry `j` whose slot is not negative. `state_words` is the words
/// of one state (`h d e / 2`).
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn widen_states(cache: &[u32], slots: &[i32], scratch: &mut [f32], state_words: u32) {
    let entry = CUBE_POS_Y as usize;
    let slot = slots[entry];
    if slot >= 0i32 {
        let len = state_words as usize;
        let src = slot as usize * len;
        let dst = entry * len * 2;
        let units = CUBE_COUNT_X as usize * CUBE_DIM as usize;
        let mut w = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
        while w < len {
            let word = cache[src + w];
            scratch[dst + 2 * w] = bf16_half(word, false);
            scratch[dst + 2 * w + 1] = bf16_half(word, true);
            w += units;
        }
    }
}

/// The state in slot `slots[j]` of `cache` (words) = `scratch[j]` rounded,
/// for every entry `j` whose slot is not negative.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn narrow_states(scratch: &[f32], slots: &[i32], cache: &mut [u32], state_words: u32) {
    let entry = CUBE_POS_Y as usize;
    let slot = slots[entry];
    if slot >= 0i32 {
        let len = state_words as usize;
        let src = entry * len * 2;
        let dst = slot as usize * len;
        let units = CUBE_COUNT_X as usize * CUBE_DIM as usize;
        let mut w = CUBE_POS_X as usize * CUBE_DIM as usize + UNIT_POS as usize;
        while w < len {
            let low = bf16_bits(scratch[src + 2 * w]);
            let high = bf16_bits(scratch[src + 2 * w + 1]);
            cache[dst + w] = (high << 16u32) | low;
            w += units;
        }
    }
}
