//! Loads of `mma.m16n8k16` operand fragments ([`crate::fragments`]) from
//! shared memory: on tensor cores one `ldmatrix.x4` per call (four 8 x 8
//! matrices: one `A` fragment, or two `B` fragments side by side), emulated
//! as one load per element at the same positions on any runtime.
//!
//! Why (SPEED_NOTES.md, variant 22): loading fragments element by element,
//! the fused walk spent more issue slots on loads, repacking and addresses
//! than on its products, and a right operand stored with `K` along its rows
//! (the state update's `K ⊙ κ`, tokens down the rows) took a 16-bit load
//! and a repack per element. `ldmatrix` moves four registers per instruction,
//! and its `.trans` form reads such an operand in the layout the product
//! wants.
//!
//! Each lane of a plane gives the address of one 16-byte row of one of the
//! four matrices ([`a_lane_offset()`], [`b_lane_offset()`]: computed once,
//! added to each call's tile offset). The tile's rows must be 16-byte
//! aligned on tensor cores (shared tiles made with `new_aligned_slice(_, 16)`,
//! row strides a multiple of 8 scalars).

use cubecl::cmma::MatrixIdent;
use cubecl::prelude::*;

use crate::fragments::{
    A_ELEMS, B_ELEMS, C_ELEMS, K, M, N, a_col, a_row, b_col, b_row, c_col, c_row, mma_at,
};

/// Scalars of one `ldmatrix` row (16 bytes of a 16-bit type).
const ROW: usize = 8;

/// The lane part of an `A` fragment's `ldmatrix` address, the tile stored
/// row-major (rows along `M`, `stride` scalars apart): lanes 0-7 give rows
/// 0-7 and lanes 8-15 rows 8-15 of columns 0-7, lanes 16-31 the same rows
/// of columns 8-15 (the order of `A`'s four registers).
#[cube]
pub fn a_lane_offset(lane: usize, #[comptime] stride: usize) -> usize {
    (((lane / 8) % 2) * 8 + lane % 8) * stride + (lane / 16) * 8
}

/// The lane part of a pair of `B` fragments' `ldmatrix` address (columns
/// `0..8` and `8..16` of a 16 x 16 block of `B`). `k_major`: the tile holds
/// `B` with `K` down its rows (element `(k, n)` at `k * stride + n`, read
/// with `.trans`); else with `N` down its rows (`(k, n)` at `n * stride + k`,
/// `B^T` row-major). Either way matrix `i` of lanes `8 i .. 8 i + 8` is
/// rows `8 (i % 2)` of `K` and columns `8 (i / 2)` of `N`: the registers of
/// the first fragment, then the second. For one fragment ([`load_b()`]),
/// pass `lane % 16`.
#[cube]
pub fn b_lane_offset(lane: usize, #[comptime] stride: usize, #[comptime] k_major: bool) -> usize {
    let k = ((lane / 8) % 2) * 8;
    let n = (lane / 16) * 8;
    let mut at = (n + lane % 8) * stride + k;
    if comptime!(k_major) {
        at = (k + lane % 8) * stride + n;
    }
    at
}

/// The lane part of an `A` fragment's `.trans` address, the tile holding
/// `A^T` row-major (element `(m, k)` at `k * stride + m`): matrix `i` of
/// lanes `8 i .. 8 i + 8` is rows `8 (i / 2)` of `K` and columns `8 (i % 2)`
/// of `M`. The same addresses place a pair of accumulator tiles stored
/// transposed ([`store_c_pair()`]).
#[cube]
pub fn a_lane_offset_trans(lane: usize, #[comptime] stride: usize) -> usize {
    ((lane / 16) * 8 + lane % 8) * stride + ((lane / 8) % 2) * 8
}

/// This lane's `A` fragment of the 16 x 16 block at `at` of `tile` into
/// `a[..A_ELEMS]`: the tile row-major (rows along `M`, `stride` scalars
/// apart; `lane_at` is `at` plus [`a_lane_offset()`]), or `transposed`,
/// holding `A^T` row-major (rows along `K`: the staged `V` rows as the left
/// operand `V^T`, read with `ldmatrix.trans`; `lane_at` is `at` plus
/// [`a_lane_offset_trans()`]). `lane_at` is the real load's address; the
/// emulation computes each element's.
#[cube]
pub fn load_a<E: Float>(
    tile: &Shared<[E]>,
    at: usize,
    lane_at: usize,
    a: &mut Array<E>,
    #[comptime] stride: usize,
    #[comptime] transposed: bool,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        let lane = UNIT_POS as usize % 32;
        #[unroll]
        for nth in 0..A_ELEMS {
            let mut offset = a_row(lane, nth) * stride + a_col(lane, nth);
            if comptime!(transposed) {
                offset = a_col(lane, nth) * stride + a_row(lane, nth);
            }
            a[nth] = tile[at + offset];
        }
    } else {
        let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
        let size_a = def.vector_size(MatrixIdent::A);
        let size!(NA) = size_a;
        let regs =
            def.load_matrix::<E, NA>(&tile[lane_at..lane_at + ROW], MatrixIdent::A, 4usize, transposed);
        #[unroll]
        for i in 0..comptime!(A_ELEMS / size_a) {
            #[unroll]
            for j in 0..size_a {
                a[i * size_a + j] = regs[i].extract(j);
            }
        }
    }
}

/// Stores two accumulator tiles side by side (`c[c_at ..]`, then the next
/// `C_ELEMS`: a 16 x 16 block), rounded to `E`, into `tile` at `at`: row-major
/// (`(row, col)` at `row * stride + col`, `stmatrix`; `lane_at` is `at` plus
/// [`a_lane_offset()`]), or `transposed` (at `col * stride + row`,
/// `stmatrix.trans`; `lane_at` is `at` plus [`a_lane_offset_trans()`]). One
/// instruction for what took 8 16-bit stores per lane (variant 23).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_c_pair<E: Float>(
    tile: &mut Shared<[E]>,
    at: usize,
    lane_at: usize,
    c: &Array<f32>,
    c_at: usize,
    #[comptime] stride: usize,
    #[comptime] transposed: bool,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        let lane = UNIT_POS as usize % 32;
        #[unroll]
        for half in 0..2usize {
            #[unroll]
            for nth in 0..C_ELEMS {
                let row = c_row(lane, nth);
                let col = c_col(lane, nth) + half * 8;
                let mut offset = row * stride + col;
                if comptime!(transposed) {
                    offset = col * stride + row;
                }
                tile[at + offset] = E::cast_from(c[c_at + half * C_ELEMS + nth]);
            }
        }
    } else {
        let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
        let size_a = def.vector_size(MatrixIdent::A);
        let size!(NA) = size_a;
        // Registers in `A`'s order: rows 0-7 and 8-15 of the first tile,
        // then of the second (two accumulator elements make one register).
        let mut regs = Array::<Vector<E, NA>>::new(4usize);
        #[unroll]
        for r in 0..4usize {
            let mut reg = Vector::empty();
            #[unroll]
            for j in 0..size_a {
                reg.insert(j, E::cast_from(c[c_at + (r / 2) * C_ELEMS + (r % 2) * 2 + j]));
            }
            regs[r] = reg;
        }
        def.store_matrix::<E, NA>(
            &mut tile[lane_at..lane_at + ROW],
            &regs,
            MatrixIdent::A,
            4usize,
            transposed,
        );
    }
}

/// This lane's one `B` fragment of the 16 x 8 block of `B` at `at` of `tile`
/// (`ldmatrix.x2`; lanes 16-31 give the same addresses as lanes 0-15); the
/// layout and `lane_at` as [`load_b_pair()`]'s.
#[cube]
pub fn load_b<E: Float>(
    tile: &Shared<[E]>,
    at: usize,
    lane_at: usize,
    b: &mut Array<E>,
    #[comptime] stride: usize,
    #[comptime] k_major: bool,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        let lane = UNIT_POS as usize % 32;
        #[unroll]
        for nth in 0..B_ELEMS {
            let k = b_row(lane, nth);
            let n = b_col(lane, nth);
            let mut offset = n * stride + k;
            if comptime!(k_major) {
                offset = k * stride + n;
            }
            b[nth] = tile[at + offset];
        }
    } else {
        let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
        let size_b = def.vector_size(MatrixIdent::B);
        let size!(NB) = size_b;
        let regs = def.load_matrix::<E, NB>(&tile[lane_at..lane_at + ROW], MatrixIdent::B, 2usize, k_major);
        #[unroll]
        for i in 0..comptime!(B_ELEMS / size_b) {
            #[unroll]
            for j in 0..size_b {
                b[i * size_b + j] = regs[i].extract(j);
            }
        }
    }
}

/// This lane's two `B` fragments of the 16 x 16 block of `B` at `at` of
/// `tile` (columns `0..8` into `first`, `8..16` into `second`); the layout
/// as [`b_lane_offset()`]'s, and `lane_at` is `at` plus it.
#[cube]
pub fn load_b_pair<E: Float>(
    tile: &Shared<[E]>,
    at: usize,
    lane_at: usize,
    first: &mut Array<E>,
    second: &mut Array<E>,
    #[comptime] stride: usize,
    #[comptime] k_major: bool,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        let lane = UNIT_POS as usize % 32;
        #[unroll]
        for nth in 0..B_ELEMS {
            let k = b_row(lane, nth);
            let n = b_col(lane, nth);
            let mut offset = n * stride + k;
            let mut next = offset + 8 * stride;
            if comptime!(k_major) {
                offset = k * stride + n;
                next = offset + 8;
            }
            first[nth] = tile[at + offset];
            second[nth] = tile[at + next];
        }
    } else {
        let def = cmma::MmaDefinition::<E, E, f32>::new(M, N, K);
        let size_b = def.vector_size(MatrixIdent::B);
        let size!(NB) = size_b;
        let regs = def.load_matrix::<E, NB>(&tile[lane_at..lane_at + ROW], MatrixIdent::B, 4usize, k_major);
        #[unroll]
        for i in 0..comptime!(B_ELEMS / size_b) {
            #[unroll]
            for j in 0..size_b {
                first[i * size_b + j] = regs[i].extract(j);
                second[i * size_b + j] = regs[i + comptime!(B_ELEMS / size_b)].extract(j);
            }
        }
    }
}

/// `c[c_at ..] += a B` for a 16 x 16 block of `B` at `at` of `tile` (two
/// fragments, [`load_b_pair()`]): the products of the first fragment into
/// the accumulator tile at `c_at`, of the second into the next one. The
/// walk's every product whose right operand comes from shared memory two
/// tiles at a time.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_pair<E: Float>(
    a: &Array<E>,
    tile: &Shared<[E]>,
    at: usize,
    lane_at: usize,
    c: &mut Array<f32>,
    c_at: usize,
    scratch: &mut Shared<[f32]>,
    #[comptime] stride: usize,
    #[comptime] k_major: bool,
    #[comptime] emulated: bool,
) {
    let mut first = Array::<E>::new(B_ELEMS);
    let mut second = Array::<E>::new(B_ELEMS);
    load_b_pair::<E>(
        tile,
        at,
        lane_at,
        &mut first,
        &mut second,
        stride,
        k_major,
        emulated,
    );
    mma_at::<E>(a, &first, c, c_at, scratch, emulated);
    mma_at::<E>(a, &second, c, c_at + C_ELEMS, scratch, emulated);
}

/// Row stride of the check kernel's tile: not 16, so that a stride mistake
/// shows.
pub const CHECK_STRIDE: usize = 24;
/// Elements the check kernel writes: `A`, the `B` pair read with `N` down the
/// rows, the pair read with `K` down the rows (16 x 16 each), and one `B`
/// (16 x 8), each row-major by (row, column) of the operand.
pub const CHECK_LEN: usize = 3 * 16 * 16 + 16 * 8;
/// Scalars of the check kernel's tile.
const CHECK_TILE: usize = 16 * CHECK_STRIDE;

/// A check of the loads: one plane stages `tile` (16 rows of
/// [`CHECK_STRIDE`]) in shared memory, loads from it each fragment kind at
/// offset 0 and writes every element it holds to `out` at the element's
/// (row, column) of its operand (layout in [`CHECK_LEN`]). The tests run it
/// emulated everywhere and, on CUDA, with `ldmatrix`, against the tile read
/// on the host.
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn fragment_loads_check<E: Float>(tile: &[E], out: &mut [E], #[comptime] emulated: bool) {
    let lane = UNIT_POS as usize;
    let mut staged = Shared::<[E]>::new_aligned_slice(CHECK_TILE, 16usize);
    for i in range_stepped(lane, CHECK_TILE, 32usize) {
        staged[i] = tile[i];
    }
    sync_cube();
    let mut a = Array::<E>::new(A_ELEMS);
    load_a::<E>(
        &staged,
        0usize,
        a_lane_offset(lane, CHECK_STRIDE),
        &mut a,
        CHECK_STRIDE,
        false,
        emulated,
    );
    #[unroll]
    for nth in 0..A_ELEMS {
        out[a_row(lane, nth) * 16 + a_col(lane, nth)] = a[nth];
    }
    check_pair::<E>(&staged, out, lane, 256usize, false, emulated);
    check_pair::<E>(&staged, out, lane, 512usize, true, emulated);
    let mut b = Array::<E>::new(B_ELEMS);
    load_b::<E>(
        &staged,
        0usize,
        b_lane_offset(lane % 16, CHECK_STRIDE, false),
        &mut b,
        CHECK_STRIDE,
        false,
        emulated,
    );
    #[unroll]
    for nth in 0..B_ELEMS {
        out[768usize + b_row(lane, nth) * 8 + b_col(lane, nth)] = b[nth];
    }
}

/// [`fragment_loads_check()`]'s `B` pair, written from `base`.
#[cube]
fn check_pair<E: Float>(
    staged: &Shared<[E]>,
    out: &mut [E],
    lane: usize,
    #[comptime] base: usize,
    #[comptime] k_major: bool,
    #[comptime] emulated: bool,
) {
    let mut first = Array::<E>::new(B_ELEMS);
    let mut second = Array::<E>::new(B_ELEMS);
    let lane_at = b_lane_offset(lane, CHECK_STRIDE, k_major);
    load_b_pair::<E>(
        staged,
        0usize,
        lane_at,
        &mut first,
        &mut second,
        CHECK_STRIDE,
        k_major,
        emulated,
    );
    #[unroll]
    for nth in 0..B_ELEMS {
        let at = base + b_row(lane, nth) * 16 + b_col(lane, nth);
        out[at] = first[nth];
        out[at + 8] = second[nth];
    }
}
