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

/// `out[i] = 0` for `first <= i < len`: the rows of a packed tensor past its
/// last sequence (elements of any float type the runtime stores as they are).
/// Geometry as [`fill_words()`], over `len - first` elements.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn zero_tail<F: Float>(out: &mut [F], first: u32, len: u32) {
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = first as usize + ABSOLUTE_POS;
    while i < len as usize {
        out[i] = F::new(0.0);
        i += units;
    }
}

/// [`zero_tail()`] for a 16-bit tensor bound as the 32-bit words that hold
/// its elements in pairs (element `2w` in the low half of word `w`): a word
/// that holds an element before `first` keeps it, and with `len` odd the high
/// half of the last word (outside the tensor) is kept.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn zero_tail_words(out: &mut [u32], first: u32, len: u32) {
    let (first, len) = (first as usize, len as usize);
    let words = len.div_ceil(2);
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut w = first / 2 + ABSOLUTE_POS;
    while w < words {
        let mut keep = 0u32;
        if 2 * w < first {
            keep = 0xffffu32;
        }
        if 2 * w + 1 >= len {
            keep |= 0xffff_0000u32;
        }
        out[w] &= keep;
        w += units;
    }
}

/// `dst[i] = src[i]` for `first <= i < end`: rows of a per-document state
/// tensor passed through unchanged (an empty document's final state is its
/// initial state). Geometry as [`fill_words()`], over `end - first` elements.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn copy_span(src: &[f32], dst: &mut [f32], first: u32, end: u32) {
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = first as usize + ABSOLUTE_POS;
    while i < end as usize {
        dst[i] = src[i];
        i += units;
    }
}
