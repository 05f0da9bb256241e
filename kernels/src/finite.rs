//! finite: counts the elements of a tensor that are not finite (±inf or NaN)
//! and finds the first of them, for the host's opt-in checks.
//!
//! Every float width is read as `u32` words and tested on its bits: an element
//! is not finite exactly when all its exponent bits are set (IEEE 754: ±inf
//! has a zero mantissa, NaN any other), so one integer test catches both, for
//! f32 (one element a word), f16 and bf16 (two elements a word, element `2w`
//! in the low half of word `w`, little-endian as every GPU runtime stores it).
//! No float compare is involved (a compiler may assume NaN away), no 16-bit
//! type is needed (WGSL has no bf16), and no plane operation (lavapipe has
//! none).
//!
//! `report` is two `u32` the host initialises to `[0, u32::MAX]`: the count of
//! non-finite elements is added to `report[0]`, and `report[1]` becomes the
//! smallest flat index of one. Each unit counts in registers and touches the
//! atomics once, at its end, and only if it found one: a finite tensor costs
//! one read of its words and no atomic traffic.
//!
//! Geometry: 1-D, any number of cubes; each unit takes words `ABSOLUTE_POS,
//! ABSOLUTE_POS + units, ...` (units = all units of the grid), so a grid of
//! capped size covers a tensor of any length.

use cubecl::prelude::*;

/// Counts the non-finite elements among the first `len` held by `words`
/// (`word_count` words) into `report` (see the module doc). `exponent` is the
/// mask of an element's exponent bits within its 16 or 32 bits; with `pairs`
/// each word holds two elements, and the high half of the last word is not
/// an element when `len` is odd.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn count_non_finite(
    words: &[u32],
    report: &mut [Atomic<u32>],
    len: u32,
    word_count: u32,
    exponent: u32,
    #[comptime] pairs: bool,
) {
    let len = len as usize;
    let word_count = word_count as usize;
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut count = 0u32;
    // Each unit walks its words in increasing order, so its first find is its smallest index.
    let mut first = 0u32;
    let mut w = ABSOLUTE_POS;
    while w < word_count {
        let word = words[w];
        if comptime!(pairs) {
            if (word & exponent) == exponent {
                if count == 0u32 {
                    first = (2 * w) as u32;
                }
                count += 1u32;
            }
            // With `len` odd, the high half of the last word is not an element.
            if 2 * w + 1 < len && ((word >> 16u32) & exponent) == exponent {
                if count == 0u32 {
                    first = (2 * w + 1) as u32;
                }
                count += 1u32;
            }
        } else if (word & exponent) == exponent {
            if count == 0u32 {
                first = w as u32;
            }
            count += 1u32;
        }
        w += units;
    }
    if count > 0u32 {
        report[0].fetch_add(count);
        report[1].fetch_min(first);
    }
}
