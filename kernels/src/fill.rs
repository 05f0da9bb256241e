//! fill: every 32-bit word of a buffer set to one pattern, on the device.
//!
//! A tensor of equal elements (a zeroed state cache, a NaN-poisoned output) is
//! written here instead of built on the host and uploaded: a serving cache of
//! 70 layers can hold tens of GiB, which an upload takes seconds to move and the
//! host as much memory again to stage. The pattern is the element's bits (f32)
//! or the element's 16 bits twice (f16, bf16).
//!
//! Geometry: 1-D, any number of cubes; each unit takes words `ABSOLUTE_POS,
//! ABSOLUTE_POS + units, ...` (units = all units of the grid), so a grid of
//! capped size covers a buffer of any length.

use cubecl::prelude::*;

/// `out[w] = pattern` for `w < words`.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn fill_words(out: &mut [u32], pattern: u32, words: u32) {
    let words = words as usize;
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut w = ABSOLUTE_POS;
    while w < words {
        out[w] = pattern;
        w += units;
    }
}
