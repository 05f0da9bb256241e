//! Register fragments of the tensor-core product `mma.m16n8k16`, and the
//! product itself, real or emulated: the one interface the fused routine's
//! tensor-core products go through (issue 28).
//!
//! A plane of 32 units multiplies a 16 x 16 `A` by a 16 x 8 `B` into a 16 x
//! 8 f32 accumulator `C`; each unit (lane) holds 8 elements of `A`, 4 of `B`
//! and 4 of `C`, placed as the PTX ISA lays out `mma.m16n8k16` for 16-bit
//! operands ([`a_position()`], [`b_position()`], [`c_position()`]). Holding the
//! state as accumulator fragments is what lets a walk keep it in registers:
//! a decay multiplies each element where it is, and the accumulator's layout
//! is the next product's operand layout (no trip through shared memory).
//!
//! [`mma()`] has two implementations behind one call, chosen at compile time:
//! - real: cubecl's register-fragment MMA (`MmaDefinition::execute`, one
//!   `HMMA` on CUDA), whose fragment order cubecl reports through
//!   `position_of_nth`; a CUDA test checks that it is the order here;
//! - emulated (any runtime, lavapipe in CI): each plane writes its `A` and `B`
//!   fragments to shared memory at their positions, and each lane computes
//!   its `C` elements from the rows and columns there, in f32.
//!
//! So the code around a product (which element is which row and column,
//! what the decay of each accumulator element is, how an accumulator becomes
//! an operand) runs the same on lavapipe as on the GPU, and the property
//! tests check it there.
//!
//! Units are grouped into planes of [`PLANE`] by `UNIT_POS` (the emulation
//! does not need the hardware's planes: lavapipe reports none of a fixed
//! size). Every unit of the cube calls [`mma()`] together: the emulation
//! synchronizes the cube.

use cubecl::cmma::MatrixIdent;
use cubecl::prelude::*;

/// Units per plane of the product.
pub const PLANE: usize = 32;
/// Rows of `A` and `C`.
pub const M: usize = 16;
/// Columns of `B` and `C`.
pub const N: usize = 8;
/// Columns of `A`, rows of `B`.
pub const K: usize = 16;
/// Elements of `A` each lane holds.
pub const A_ELEMS: usize = 8;
/// Elements of `B` each lane holds.
pub const B_ELEMS: usize = 4;
/// Elements of `C` each lane holds.
pub const C_ELEMS: usize = 4;
/// Shared memory the emulation takes per plane, in f32: one `A` and one `B`.
pub const SCRATCH: usize = M * K + K * N;

/// The part of [`a_row()`] that does not depend on the lane: a walk adds
/// it, a constant where its loops unroll, to a lane's base address computed
/// once (per-element lane arithmetic in the loops cost more issue slots than
/// the loads and products together: SPEED_NOTES.md, variant 20).
pub const fn a_row_offset(nth: usize) -> usize {
    ((nth / 2) % 2) * 8
}

/// The part of [`a_col()`] that does not depend on the lane (its lane part is
/// `2 * (lane % 4)`).
pub const fn a_col_offset(nth: usize) -> usize {
    nth % 2 + (nth / 4) * 8
}

/// The part of [`b_row()`] that does not depend on the lane (its lane part is
/// `2 * (lane % 4)`; [`b_col()`] is `lane / 4`).
pub const fn b_row_offset(nth: usize) -> usize {
    nth % 2 + (nth / 2) * 8
}

/// The part of [`c_row()`] that does not depend on the lane (its lane part is
/// `lane / 4`).
pub const fn c_row_offset(nth: usize) -> usize {
    (nth / 2) * 8
}

/// The part of [`c_col()`] that does not depend on the lane (its lane part is
/// `2 * (lane % 4)`).
pub const fn c_col_offset(nth: usize) -> usize {
    nth % 2
}

/// Row of element `nth` of `A` held by `lane`: `groupID` (lane / 4), plus 8
/// for elements 2, 3, 6, 7.
#[cube]
pub fn a_row(lane: usize, nth: usize) -> usize {
    lane / 4 + ((nth / 2) % 2) * 8
}

/// Column of element `nth` of `A` held by `lane`: `2 * (lane % 4)` plus
/// `nth % 2`, plus 8 for elements 4 to 7.
#[cube]
pub fn a_col(lane: usize, nth: usize) -> usize {
    (lane % 4) * 2 + nth % 2 + (nth / 4) * 8
}

/// Row (along `K`) of element `nth` of `B` held by `lane`.
#[cube]
pub fn b_row(lane: usize, nth: usize) -> usize {
    (lane % 4) * 2 + nth % 2 + (nth / 2) * 8
}

/// Column of element `nth` of `B` held by `lane`.
#[cube]
pub fn b_col(lane: usize, _nth: usize) -> usize {
    lane / 4
}

/// Row of element `nth` of `C` held by `lane`.
#[cube]
pub fn c_row(lane: usize, nth: usize) -> usize {
    lane / 4 + (nth / 2) * 8
}

/// Column of element `nth` of `C` held by `lane`.
#[cube]
pub fn c_col(lane: usize, nth: usize) -> usize {
    (lane % 4) * 2 + nth % 2
}

/// `(row, column)` of element `nth` of `A` (kept for symmetry with cubecl's
/// `position_of_nth`, which returns the pair).
#[cube]
pub fn a_position(lane: usize, nth: usize) -> (usize, usize) {
    (a_row(lane, nth), a_col(lane, nth))
}

/// `(row, column)` of element `nth` of `B`.
#[cube]
pub fn b_position(lane: usize, nth: usize) -> (usize, usize) {
    (b_row(lane, nth), b_col(lane, nth))
}

/// `(row, column)` of element `nth` of `C`.
#[cube]
pub fn c_position(lane: usize, nth: usize) -> (usize, usize) {
    (c_row(lane, nth), c_col(lane, nth))
}

/// `c += a b` for this unit's plane: `a`, `b`, `c` are the lane's fragments
/// ([`A_ELEMS`], [`B_ELEMS`], [`C_ELEMS`] elements, in the order of the
/// positions above). `E` is the operands' type: f16 or bf16 for the real
/// product; the emulation takes any float (it multiplies in f32). `scratch`
/// holds at least `planes * SCRATCH` f32 (the emulation's; the real product
/// leaves it alone). Every unit of the cube calls it together.
#[cube]
pub fn mma<E: Float>(
    a: &Array<E>,
    b: &Array<E>,
    c: &mut Array<f32>,
    scratch: &mut Shared<[f32]>,
    #[comptime] emulated: bool,
) {
    mma_at::<E>(a, b, c, 0usize, scratch, emulated);
}

/// [`mma()`] into the accumulator fragment at `c[at .. at + C_ELEMS]`: a
/// walk holds many accumulator tiles in one register array (`at` is a
/// constant where the caller's loops unroll, as they must on tensor cores
/// for the array to live in registers).
#[cube]
pub fn mma_at<E: Float>(
    a: &Array<E>,
    b: &Array<E>,
    c: &mut Array<f32>,
    at: usize,
    scratch: &mut Shared<[f32]>,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        mma_emulated::<E>(a, b, c, at, scratch);
    } else {
        mma_real::<E>(a, b, c, at);
    }
}

/// The product through shared memory: this plane's `A` and `B` written at
/// their positions, each lane's `C` elements computed from them in f32.
#[cube]
fn mma_emulated<E: Float>(
    a: &Array<E>,
    b: &Array<E>,
    c: &mut Array<f32>,
    at: usize,
    scratch: &mut Shared<[f32]>,
) {
    let lane = UNIT_POS as usize % PLANE;
    let base = (UNIT_POS as usize / PLANE) * SCRATCH;
    let b_base = base + M * K;
    // Another product's reads of this plane's scratch are done.
    sync_cube();
    #[unroll]
    for nth in 0..A_ELEMS {
        scratch[base + a_row(lane, nth) * K + a_col(lane, nth)] = f32::cast_from(a[nth]);
    }
    #[unroll]
    for nth in 0..B_ELEMS {
        scratch[b_base + b_row(lane, nth) * N + b_col(lane, nth)] = f32::cast_from(b[nth]);
    }
    sync_cube();
    #[unroll]
    for nth in 0..C_ELEMS {
        let row = c_row(lane, nth);
        let col = c_col(lane, nth);
        let mut sum = c[at + nth];
        #[unroll]
        for x in 0..K {
            sum += scratch[base + row * K + x] * scratch[b_base + x * N + col];
        }
        c[at + nth] = sum;
    }
}

/// The product on tensor cores: the fragments packed into the vectors cubecl's
/// register-fragment MMA takes (element `nth` is lane element `i * size + j`
/// of vector `i`), one `mma.sync`, and the result unpacked.
#[cube]
fn mma_real<E: Float>(a: &Array<E>, b: &Array<E>, c: &mut Array<f32>, at: usize) {
    let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
    let size_a = def.vector_size(MatrixIdent::A);
    let size_b = def.vector_size(MatrixIdent::B);
    let size_c = def.vector_size(MatrixIdent::Accumulator);
    let size!(NA) = size_a;
    let size!(NB) = size_b;
    let size!(NC) = size_c;
    let mut ra = Array::<Vector<E, NA>>::new(comptime!(A_ELEMS / size_a));
    let mut rb = Array::<Vector<E, NB>>::new(comptime!(B_ELEMS / size_b));
    let mut rc = Array::<Vector<f32, NC>>::new(comptime!(C_ELEMS / size_c));
    #[unroll]
    for i in 0..comptime!(A_ELEMS / size_a) {
        let mut reg = Vector::empty();
        #[unroll]
        for j in 0..size_a {
            reg.insert(j, a[i * size_a + j]);
        }
        ra[i] = reg;
    }
    #[unroll]
    for i in 0..comptime!(B_ELEMS / size_b) {
        let mut reg = Vector::empty();
        #[unroll]
        for j in 0..size_b {
            reg.insert(j, b[i * size_b + j]);
        }
        rb[i] = reg;
    }
    #[unroll]
    for i in 0..comptime!(C_ELEMS / size_c) {
        let mut reg = Vector::empty();
        #[unroll]
        for j in 0..size_c {
            reg.insert(j, c[at + i * size_c + j]);
        }
        rc[i] = reg;
    }
    let rd = def.execute(&ra, &rb, &rc);
    #[unroll]
    for i in 0..comptime!(C_ELEMS / size_c) {
        let reg = rd[i];
        #[unroll]
        for j in 0..size_c {
            c[at + i * size_c + j] = reg.extract(j);
        }
    }
}

/// A check of the fragments: plane `p` of the cube computes
/// `out[p] = a[p] b[p] + c[p]` (`a` 16 x 16, `b` 16 x 8, `c` and `out` 16 x 8,
/// row-major, one after another per plane) through [`mma()`], loading and
/// storing each lane's elements at their positions. The tests run it
/// emulated on every runtime and, on CUDA, real, against the f64 product.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn fragment_product<E: Float>(
    a: &[E],
    b: &[E],
    c: &[f32],
    out: &mut [f32],
    #[comptime] planes: usize,
    #[comptime] emulated: bool,
) {
    let lane = UNIT_POS as usize % PLANE;
    let plane = UNIT_POS as usize / PLANE;
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(planes * SCRATCH));
    let mut fa = Array::<E>::new(A_ELEMS);
    let mut fb = Array::<E>::new(B_ELEMS);
    let mut fc = Array::<f32>::new(C_ELEMS);
    #[unroll]
    for nth in 0..A_ELEMS {
        let (row, col) = a_position(lane, nth);
        fa[nth] = a[plane * M * K + row * K + col];
    }
    #[unroll]
    for nth in 0..B_ELEMS {
        let (row, col) = b_position(lane, nth);
        fb[nth] = b[plane * K * N + row * N + col];
    }
    #[unroll]
    for nth in 0..C_ELEMS {
        let (row, col) = c_position(lane, nth);
        fc[nth] = c[plane * M * N + row * N + col];
    }
    mma::<E>(&fa, &fb, &mut fc, &mut scratch, emulated);
    #[unroll]
    for nth in 0..C_ELEMS {
        let (row, col) = c_position(lane, nth);
        out[plane * M * N + row * N + col] = fc[nth];
    }
}

/// For the CUDA test that the positions above are cubecl's: lane `UNIT_POS`
/// writes, for each element of `A`, `B` and `C` (`ident` 0, 1, 2), the
/// `(row, column)` cubecl's `position_of_nth` gives and the one given here:
/// `out[(((ident * PLANE + lane) * A_ELEMS + nth) * 4) ..][..4]`. Launched
/// with one plane.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn fragment_positions<E: Float>(out: &mut [u32]) {
    let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
    let lane = UNIT_POS as usize;
    #[unroll]
    for nth in 0..A_ELEMS {
        let (row, col) = def.position_of_nth(lane as u32, nth as u32, MatrixIdent::A);
        let at = (lane * A_ELEMS + nth) * 4;
        out[at] = row;
        out[at + 1] = col;
        out[at + 2] = a_row(lane, nth) as u32;
        out[at + 3] = a_col(lane, nth) as u32;
    }
    #[unroll]
    for nth in 0..B_ELEMS {
        let (row, col) = def.position_of_nth(lane as u32, nth as u32, MatrixIdent::B);
        let at = ((PLANE + lane) * A_ELEMS + nth) * 4;
        out[at] = row;
        out[at + 1] = col;
        out[at + 2] = b_row(lane, nth) as u32;
        out[at + 3] = b_col(lane, nth) as u32;
    }
    #[unroll]
    for nth in 0..C_ELEMS {
        let (row, col) = def.position_of_nth(lane as u32, nth as u32, MatrixIdent::Accumulator);
        let at = ((2 * PLANE + lane) * A_ELEMS + nth) * 4;
        out[at] = row;
        out[at + 1] = col;
        out[at + 2] = c_row(lane, nth) as u32;
        out[at + 3] = c_col(lane, nth) as u32;
    }
}
