//! 16-bit inputs widened to f32 before the portable routines, and outputs
//! rounded back after them.
//!
//! Two cases. **bf16 without a bf16 type** (WGSL, SPIR-V): WGSL has no 16-bit
//! integer and no bf16; SPIR-V offers bf16 for storage and conversion only,
//! and a kernel doing bf16 arithmetic there failed to compile (see
//! `../shared/TOOLCHAIN.md`). A bf16 is the top 16 bits of an f32, so a buffer
//! of bf16 elements is read here as `u32` words, two elements each (the
//! element at even index `2w` in the low half of word `w`, little-endian as
//! every GPU runtime stores it), and widened by a shift, exactly
//! ([`widen_bf16`](fn@widen_bf16)). Writing rounds an f32 to the nearest bf16, ties to even,
//! in integer arithmetic ([`narrow_bf16`](fn@narrow_bf16)); NaN stays NaN (a quiet one),
//! overflow goes to infinity as a conversion would. **Any 16-bit type the
//! runtime holds** ([`widen_cast`](fn@widen_cast), [`narrow_cast`](fn@narrow_cast)): a conversion, for the
//! portable routines, which ran f16 at half their f32 speed under WGSL on an
//! H200 (SPEED_NOTES.md, variant 16).
//!
//! Geometry of every kernel here: 1-D, any number of cubes; each unit takes
//! words (or elements) `ABSOLUTE_POS, ABSOLUTE_POS + units, ...` (units = all
//! units of the grid), so a grid of capped size covers a tensor of any length.

use cubecl::prelude::*;

/// The f32 value of the bf16 in the low (`high == false`) or high half of `word`.
#[cube]
pub fn bf16_half(word: u32, #[comptime] high: bool) -> f32 {
    if comptime!(high) {
        f32::reinterpret(word & 0xffff_0000u32)
    } else {
        f32::reinterpret(word << 16u32)
    }
}

/// The bits of `x` rounded to the nearest bf16 (ties to even), in the low 16
/// bits of the result.
#[cube]
pub fn bf16_bits(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let odd = (bits >> 16u32) & 1u32;
    let rounded = (bits + 0x7fffu32 + odd) >> 16u32;
    // A NaN whose payload sits in the low half alone would round to infinity.
    let nan = (bits & 0x7fff_ffffu32) > 0x7f80_0000u32;
    select(nan, (bits >> 16u32) | 0x40u32, rounded)
}

/// `dst[i]` = the bf16 element `i` of `src` (words), for `i < len`.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn widen_bf16(src: &[u32], dst: &mut [f32], len: u32) {
    let len = len as usize;
    let words = len.div_ceil(2);
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut w = ABSOLUTE_POS;
    while w < words {
        let word = src[w];
        dst[2 * w] = bf16_half(word, false);
        if 2 * w + 1 < len {
            dst[2 * w + 1] = bf16_half(word, true);
        }
        w += units;
    }
}

/// The bf16 element `i` of `dst` (words) = `src[i]` rounded, for `i < len`.
/// With `len` odd, the high half of the last word (outside the tensor) is kept.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn narrow_bf16(src: &[f32], dst: &mut [u32], len: u32) {
    let len = len as usize;
    let words = len.div_ceil(2);
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut w = ABSOLUTE_POS;
    while w < words {
        let low = bf16_bits(src[2 * w]);
        let mut high = dst[w] & 0xffff_0000u32;
        if 2 * w + 1 < len {
            high = bf16_bits(src[2 * w + 1]) << 16u32;
        }
        dst[w] = high | low;
        w += units;
    }
}

/// `dst[i]` = `src[i]` as f32, for `i < len`.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn widen_cast<F: Float>(src: &[F], dst: &mut [f32], len: u32) {
    let len = len as usize;
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < len {
        dst[i] = f32::cast_from(src[i]);
        i += units;
    }
}

/// `dst[i]` = `src[i]` converted to `F`, for `i < len`.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn narrow_cast<F: Float>(src: &[f32], dst: &mut [F], len: u32) {
    let len = len as usize;
    let units = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < len {
        dst[i] = F::cast_from(src[i]);
        i += units;
    }
}
