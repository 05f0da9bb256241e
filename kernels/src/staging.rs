//! Global-to-shared staging and fragment loads for the tensor-core kernels
//! ([`crate::diag_cmma`], [`crate::kv_parallel_cmma`], [`crate::chunk_state`]).
//!
//! Operands travel as vectors of `N` scalars along their rows (`N` = 8 for
//! 16-bit inputs: 16-byte loads), picked by the host to divide `d` and `e`.
//! One scalar load per element left those kernels issuing eight times the
//! instructions and holding eight times the addresses for the same bytes
//! (SPEED_NOTES.md, "Global accesses are 2-byte scalars").
//!
//! A staged tile is row-major in shared memory, `cols` scalars per row; a
//! fragment's stride is given in scalars, its start in vectors.
//!
//! **Split operands** (f32 inputs at f32 accuracy on 16-bit tensor cores): with
//! `lo_at > 0`, a staged value `x` is stored as two parts, `hi = x` rounded to
//! the bf16 grid ([`bf16_grid`](fn@bf16_grid)) at `at` and `lo = x - hi` at `lo_at + at` of
//! the same shared allocation (the low tile sits `lo_at` vectors after the
//! high one). A product `x y` is then `hi_x hi_y + hi_x lo_y + lo_x hi_y`
//! ([`split_product`](fn@split_product)): with bf16 parts, 16 significant bits of each operand,
//! the dropped `lo_x lo_y` and the rounding of `lo` to bf16 leave about
//! `2^-17` of each product. With `lo_at = 0` the value is stored once,
//! converted to the tile's dtype.

use cubecl::prelude::*;

use crate::layout::token_row;

/// Side of one tensor-core tile (`m = n = k = 16`).
pub const TILE: usize = 16;
/// Padding of a staged 16-bit tile's rows, in scalars (16 bytes). Rows of
/// 128 or 64 scalars start in the same banks, so a fragment's 16 rows
/// conflicted; Nsight Compute put diag_cmma's shared-memory pipe at 82% with
/// DRAM at 14% (SPEED_NOTES.md, variant 8).
pub const ROW_PAD: usize = 8;
/// Padding of a staged f32 tile's rows, in scalars (16 bytes).
pub const F32_ROW_PAD: usize = 4;
/// Vector loads each unit issues before storing them to shared memory: with
/// one at a time, each load's latency was paid in full.
const BATCH: usize = 8;

/// Slots of a `[rows, cols]` tile (in vectors of `lanes`) each of `units`
/// units holds when the tile is split evenly between them: the length of the
/// register arrays of [`load_share`](fn@load_share) and [`store_share`](fn@store_share).
pub fn share_len(rows: usize, cols: usize, lanes: usize, units: usize) -> usize {
    (rows * (cols / lanes)).div_ceil(units)
}

/// Copies rows `first .. first + rows` of a row-major operand into `dst` as a
/// `[rows, cols]` tile of the columns `col0 .. col0 + cols`, converted to `F`,
/// its rows `stride` scalars apart.
///
/// Rows are tokens addressed as [`crate::layout`] says (`row0`, `n`, `step`,
/// `reversed`); a source row is `width` scalars. Rows from `end` on and
/// columns from `width` on are zero. With `decayed`, row `t` is scaled by
/// `exp(neg_slope * (end - 1 - t))` in f32 before rounding to `F` (the decay
/// to the end of a block). `units` units of the cube share the copy; `col0`,
/// `cols`, `stride` and `width` are multiples of `N`. The loads go
/// `BATCH` at a time through registers ([`load_share`](fn@load_share) and [`store_share`](fn@store_share)
/// split the same copy in two, for a caller that overlaps it with other work).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn stage_rows<S: Float, F: Float, N: Size>(
    src: &[Vector<S, N>],
    dst: &mut Shared<[Vector<F, N>]>,
    row0: usize,
    n: usize,
    step: usize,
    first: usize,
    end: usize,
    col0: usize,
    neg_slope: f32,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] stride: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] decayed: bool,
    #[comptime] reversed: bool,
    #[comptime] lo_at: usize,
) {
    let lanes = N::value();
    let per_unit = comptime!(share_len(rows, cols, lanes, units));
    let batch = comptime!(per_unit.min(BATCH));
    let batches = comptime!(per_unit.div_ceil(batch));
    #[unroll]
    for b in 0..batches {
        // The last batch may be short.
        let count = comptime!(batch.min(per_unit - b * batch));
        let mut regs = Array::<Vector<S, N>>::new(count);
        load_slots::<S, N>(
            src,
            &mut regs,
            row0,
            n,
            step,
            first,
            end,
            col0,
            comptime!(b * batch),
            count,
            rows,
            cols,
            width,
            units,
            reversed,
        );
        store_slots::<S, F, N>(
            &regs,
            dst,
            first,
            end,
            neg_slope,
            comptime!(b * batch),
            count,
            rows,
            cols,
            stride,
            units,
            decayed,
            lo_at,
        );
    }
}

/// The global half of [`stage_rows`](fn@stage_rows): loads this unit's whole share of the
/// tile ([`share_len`] vectors) into `regs`, with the same addressing and
/// zeros. The loads are in flight until `regs` is read.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_share<S: Float, N: Size>(
    src: &[Vector<S, N>],
    regs: &mut Array<Vector<S, N>>,
    row0: usize,
    n: usize,
    step: usize,
    first: usize,
    end: usize,
    col0: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = N::value();
    let count = comptime!(share_len(rows, cols, lanes, units));
    load_slots::<S, N>(
        src, regs, row0, n, step, first, end, col0, 0usize, count, rows, cols, width, units, reversed,
    );
}

/// The shared half of [`stage_rows`](fn@stage_rows): stores a share loaded by [`load_share`](fn@load_share)
/// for rows `first ..` into `dst`, decayed to `end` with `decayed`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_share<S: Float, F: Float, N: Size>(
    regs: &Array<Vector<S, N>>,
    dst: &mut Shared<[Vector<F, N>]>,
    first: usize,
    end: usize,
    neg_slope: f32,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] decayed: bool,
    #[comptime] lo_at: usize,
) {
    let lanes = N::value();
    let count = comptime!(share_len(rows, cols, lanes, units));
    store_slots::<S, F, N>(
        regs, dst, first, end, neg_slope, 0usize, count, rows, cols, stride, units, decayed, lo_at,
    );
}

/// Loads slots `first_slot .. first_slot + count` of this unit's share (slot
/// `x` is tile vector `x * units + unit`) into `regs[0 .. count]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_slots<S: Float, N: Size>(
    src: &[Vector<S, N>],
    regs: &mut Array<Vector<S, N>>,
    row0: usize,
    n: usize,
    step: usize,
    first: usize,
    end: usize,
    col0: usize,
    #[comptime] first_slot: usize,
    #[comptime] count: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = N::value();
    let cols_v = comptime!(cols / lanes);
    let width_v = comptime!(width / lanes);
    let len = comptime!(rows * cols_v);
    // Whether some unit's slot can fall past the tile.
    let checked = comptime!((first_slot + count) * units > len);
    let col0_v = col0 / lanes;
    let unit = UNIT_POS as usize;
    #[unroll]
    for x in 0..count {
        let idx = (first_slot + x) * units + unit;
        let t = first + idx / cols_v;
        let c = col0_v + idx % cols_v;
        let mut val = Vector::<S, N>::new(S::cast_from(0.0f32));
        let mut inside = t < end && c < width_v;
        if comptime!(checked) {
            inside = inside && idx < len;
        }
        if inside {
            val = src[token_row(row0, t, n, step, reversed) * width_v + c];
        }
        regs[x] = val;
    }
}

/// Stores `regs[0 .. count]`, slots `first_slot ..` of this unit's share
/// loaded by [`load_slots`], into `dst` (see [`stage_rows`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_slots<S: Float, F: Float, N: Size>(
    regs: &Array<Vector<S, N>>,
    dst: &mut Shared<[Vector<F, N>]>,
    first: usize,
    end: usize,
    neg_slope: f32,
    #[comptime] first_slot: usize,
    #[comptime] count: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] stride: usize,
    #[comptime] units: usize,
    #[comptime] decayed: bool,
    #[comptime] lo_at: usize,
) {
    let lanes = N::value();
    let cols_v = comptime!(cols / lanes);
    let stride_v = comptime!(stride / lanes);
    let len = comptime!(rows * cols_v);
    let checked = comptime!((first_slot + count) * units > len);
    let unit = UNIT_POS as usize;
    #[unroll]
    for x in 0..count {
        let idx = (first_slot + x) * units + unit;
        let mut inside = true;
        if comptime!(checked) {
            inside = idx < len;
        }
        if inside {
            let r = idx / cols_v;
            let at = r * stride_v + idx % cols_v;
            if comptime!(decayed) {
                let t = first + r;
                let mut weight = 0.0f32;
                if t < end {
                    weight = f32::exp(neg_slope * f32::cast_from((end - 1 - t) as u32));
                }
                put::<F, N>(
                    dst,
                    at,
                    Vector::<f32, N>::cast_from(regs[x]) * Vector::<f32, N>::new(weight),
                    lo_at,
                );
            } else if comptime!(lo_at > 0) {
                put::<F, N>(dst, at, Vector::<f32, N>::cast_from(regs[x]), lo_at);
            } else {
                dst[at] = Vector::cast_from(regs[x]);
            }
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even), kept in f32: the high part
/// of a split operand. Integer arithmetic on the bits, so that it runs on every
/// runtime (lavapipe has no bf16) and matches the tensor cores' own rounding.
#[cube]
pub fn bf16_grid<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    let bits = Vector::<u32, N>::reinterpret(x);
    let odd = (bits >> Vector::new(16u32)) & Vector::new(1u32);
    let rounded = (bits + Vector::new(0x7fffu32) + odd) & Vector::new(0xffff_0000u32);
    Vector::<f32, N>::reinterpret(rounded)
}

/// Stores `value` at `at` of `dst` in `F`, split into high and low parts
/// (the module doc) when `lo_at > 0`.
#[cube]
pub fn put<F: Float, N: Size>(
    dst: &mut Shared<[Vector<F, N>]>,
    at: usize,
    value: Vector<f32, N>,
    #[comptime] lo_at: usize,
) {
    if comptime!(lo_at > 0) {
        let hi = bf16_grid::<N>(value);
        dst[at] = Vector::cast_from(hi);
        dst[lo_at + at] = Vector::cast_from(value - hi);
    } else {
        dst[at] = Vector::cast_from(value);
    }
}

/// The value stored at `at` of `src` by [`put`](fn@put) (high plus low part when
/// `lo_at > 0`), in f32.
#[cube]
pub fn get<F: Float, N: Size>(
    src: &Shared<[Vector<F, N>]>,
    at: usize,
    #[comptime] lo_at: usize,
) -> Vector<f32, N> {
    let mut value = Vector::<f32, N>::cast_from(src[at]);
    if comptime!(lo_at > 0) {
        value += Vector::<f32, N>::cast_from(src[lo_at + at]);
    }
    value
}

/// `acc += A B` for 16 x 16 fragments of tiles staged by [`put`](fn@put): `a_at` and
/// `b_at` are the fragments' starts (in vectors) in `a_src` and `b_src`, their
/// low parts `a_lo` and `b_lo` vectors further on; with `split`, the three
/// products of the module doc, else the one.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn split_product<F: Float, N: Size>(
    a_src: &Shared<[Vector<F, N>]>,
    a_at: usize,
    #[comptime] a_layout: cmma::MatrixLayout,
    #[comptime] a_stride: usize,
    #[comptime] a_lo: usize,
    b_src: &Shared<[Vector<F, N>]>,
    b_at: usize,
    #[comptime] b_layout: cmma::MatrixLayout,
    #[comptime] b_stride: usize,
    #[comptime] b_lo: usize,
    acc: &cmma::Matrix<f32>,
    #[comptime] split: bool,
) {
    let a = fragment::<F, N>(cmma::MatrixIdent::A, a_layout, &a_src[a_at..], a_stride);
    let b = fragment::<F, N>(cmma::MatrixIdent::B, b_layout, &b_src[b_at..], b_stride);
    if comptime!(split) {
        // The small terms first, into the same f32 accumulator.
        let a_low = fragment::<F, N>(cmma::MatrixIdent::A, a_layout, &a_src[a_lo + a_at..], a_stride);
        cmma::execute(&a_low, &b, acc, acc);
        let b_low = fragment::<F, N>(cmma::MatrixIdent::B, b_layout, &b_src[b_lo + b_at..], b_stride);
        cmma::execute(&a, &b_low, acc, acc);
    }
    cmma::execute(&a, &b, acc, acc);
}

/// A 16 x 16 `A` or `B` fragment loaded from a staged tile: `src` starts at
/// the fragment's first element, rows (or columns, for `ColMajor`) `stride`
/// scalars apart.
#[cube]
pub fn fragment<F: Float, N: Size>(
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] layout: cmma::MatrixLayout,
    src: &[Vector<F, N>],
    #[comptime] stride: usize,
) -> cmma::Matrix<F> {
    // SAFETY: loaded in full on the next line.
    let mut matrix = unsafe { cmma::Matrix::<F>::uninitialized(ident, TILE, TILE, TILE, layout) };
    cmma::load(&mut matrix, src, stride as u32);
    matrix
}

/// A zeroed 16 x 16 f32 accumulator.
#[cube]
pub fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        TILE,
        TILE,
        TILE,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    )
}

/// Writes a plane's 16 x 16 f32 tile, staged row-major in `tile` with rows
/// `tile_stride` scalars apart, to rows `first .. first + 16` (tokens,
/// addressed as in [`stage_rows`](fn@stage_rows); rows from `end` on are skipped) and
/// columns `col0 .. col0 + 16` (those from `width` on are skipped) of `dst`,
/// converted to `F`, one vector per unit.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_tile<F: Float, N: Size>(
    tile: &Shared<[f32]>,
    tile_start: usize,
    dst: &mut [Vector<F, N>],
    row0: usize,
    n: usize,
    step: usize,
    first: usize,
    end: usize,
    col0: usize,
    #[comptime] tile_stride: usize,
    #[comptime] width: usize,
    #[comptime] plane_size: usize,
    #[comptime] reversed: bool,
) {
    let lanes = N::value();
    let row_v = comptime!(TILE / lanes);
    let width_v = comptime!(width / lanes);
    let lane = UNIT_POS_PLANE as usize;
    for idx in range_stepped(lane, TILE * row_v, plane_size) {
        let r = idx / row_v;
        let cv = idx % row_v;
        let t = first + r;
        let c = col0 / lanes + cv;
        if t < end && c < width_v {
            let mut value = Vector::<F, N>::empty();
            #[unroll]
            for x in 0..lanes {
                value.insert(
                    x,
                    F::cast_from(tile[tile_start + r * tile_stride + cv * lanes + x]),
                );
            }
            dst[token_row(row0, t, n, step, reversed) * width_v + c] = value;
        }
    }
}
