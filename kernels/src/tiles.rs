//! The register-tile steps the portable intra-block kernels share: diag and
//! backward-diag (masked, decayed scores of two row sets, applied to a third
//! operand), non-diag and backward-non-diag (rows times a block's state).
//!
//! Every kernel runs 256 units as a 16 x 16 grid; a unit holds
//! `rows_per_unit` rows and `cols_per_unit` columns, 16 apart, of each tile.
//! Rows are tokens of one sequence and head, addressed as [`crate::layout`]
//! says (`row0`, `n`, `step`, and `reversed` for the backward pass); operands
//! are row-major, `width` wide, read into f32.

use cubecl::prelude::*;

use crate::layout::token_row;

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Reads element `x` of token `t` (the kernel's order, see [`crate::layout`]) of a row-major operand `width` wide,
/// as f32 (zero past the sequence or the width).
#[cube]
pub fn load<F: Float>(
    src: &[F],
    row0: usize,
    n: usize,
    step: usize,
    t: usize,
    x: usize,
    #[comptime] width: usize,
    #[comptime] reversed: bool,
) -> f32 {
    let mut value = 0.0f32;
    if t < n && x < width {
        value = f32::cast_from(src[token_row(row0, t, n, step, reversed) * width + x]);
    }
    value
}

/// Writes `scores[r * sub_block + c] = w(row_start + r, key_start + c) *
/// (rows_src_{row_start + r} . cols_src_{key_start + c})`, the dot product over
/// `width`, masked to the causal part (zero elsewhere and past the sequence).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn masked_scores<F: Float>(
    rows_src: &[F],
    cols_src: &[F],
    scores: &mut Shared<[f32]>,
    row_tile: &mut Shared<[f32]>,
    col_tile: &mut Shared<[f32]>,
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    key_start: usize,
    neg_slope: f32,
    scale: f32,
    #[comptime] width: usize,
    #[comptime] sub_block: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] reversed: bool,
) {
    // Rows padded by one float: units reading one column of different rows hit different banks.
    let stride = key_chunk + 1;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let unit_col = unit % SIDE;
    let mut dots = Array::<f32>::new(rows_per_unit * rows_per_unit);
    #[unroll]
    for x in 0..rows_per_unit * rows_per_unit {
        dots[x] = 0.0f32;
    }
    for c0 in range_stepped(0, width, key_chunk) {
        sync_cube();
        for idx in range_stepped(unit, sub_block * key_chunk, units) {
            let r = idx / key_chunk;
            let x = c0 + idx % key_chunk;
            row_tile[r * stride + idx % key_chunk] =
                load::<F>(rows_src, row0, n, step, row_start + r, x, width, reversed);
            col_tile[r * stride + idx % key_chunk] =
                load::<F>(cols_src, row0, n, step, key_start + r, x, width, reversed);
        }
        sync_cube();
        if unit_row < sub_block && unit_col < sub_block {
            for x in 0..key_chunk {
                let mut rs = Array::<f32>::new(rows_per_unit);
                #[unroll]
                for m in 0..rows_per_unit {
                    rs[m] = row_tile[(m * SIDE + unit_row) * stride + x];
                }
                #[unroll]
                for j in 0..rows_per_unit {
                    let cj = col_tile[(j * SIDE + unit_col) * stride + x];
                    #[unroll]
                    for m in 0..rows_per_unit {
                        dots[m * rows_per_unit + j] += rs[m] * cj;
                    }
                }
            }
        }
    }
    if unit_row < sub_block && unit_col < sub_block {
        #[unroll]
        for m in 0..rows_per_unit {
            let r = m * SIDE + unit_row;
            #[unroll]
            for j in 0..rows_per_unit {
                let c = j * SIDE + unit_col;
                let tr = row_start + r;
                let tc = key_start + c;
                // Masked before the exponential: exp(+x) of a later token could overflow.
                let mut weight = 0.0f32;
                if tc <= tr && tr < n {
                    weight = scale * f32::exp(neg_slope * f32::cast_from((tr - tc) as u32));
                }
                scores[r * sub_block + c] = weight * dots[m * rows_per_unit + j];
            }
        }
    }
}

/// `acc[m, j] += sum_c scores[row(m), c] * src[key_start + c, col0 + col(j)]`,
/// rows and columns 16 apart from the unit's place in the grid.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn apply_scores<F: Float>(
    scores: &Shared<[f32]>,
    src: &[F],
    acc: &mut Array<f32>,
    row0: usize,
    n: usize,
    step: usize,
    key_start: usize,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] sub_block: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let unit_row = UNIT_POS as usize / SIDE;
    let unit_col = UNIT_POS as usize % SIDE;
    if unit_row < sub_block {
        for c in 0..sub_block {
            let tc = key_start + c;
            if tc < n {
                let mut ss = Array::<f32>::new(rows_per_unit);
                #[unroll]
                for m in 0..rows_per_unit {
                    ss[m] = scores[(m * SIDE + unit_row) * sub_block + c];
                }
                #[unroll]
                for j in 0..cols_per_unit {
                    let value = load::<F>(
                        src,
                        row0,
                        n,
                        step,
                        tc,
                        col0 + j * SIDE + unit_col,
                        width,
                        reversed,
                    );
                    #[unroll]
                    for m in 0..rows_per_unit {
                        acc[m * cols_per_unit + j] += ss[m] * value;
                    }
                }
            }
        }
    }
}

/// Stores a unit's `rows_per_unit x cols_per_unit` accumulators into `dst`
/// (`width` wide), skipping rows past the sequence and columns past the width.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_rows<F: Float>(
    acc: &Array<f32>,
    dst: &mut [F],
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let unit_row = UNIT_POS as usize / SIDE;
    let unit_col = UNIT_POS as usize % SIDE;
    #[unroll]
    for m in 0..rows_per_unit {
        let t = row_start + m * SIDE + unit_row;
        #[unroll]
        for j in 0..cols_per_unit {
            let col = col0 + j * SIDE + unit_col;
            if t < n && col < width {
                dst[token_row(row0, t, n, step, reversed) * width + col] =
                    F::cast_from(acc[m * cols_per_unit + j]);
            }
        }
    }
}

/// `acc = rows x state` for the unit's rows and columns: `rows` are the
/// sub-block's tokens of `src` (`inner` wide), `state` is `G` (`d x e`, at
/// `state_base`) or, with `transposed`, `G^T`; `cols` is the width of the result.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn times_state<F: Float>(
    src: &[F],
    block_states: &[f32],
    row_tile: &mut Shared<[f32]>,
    state_tile: &mut Shared<[f32]>,
    acc: &mut Array<f32>,
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    state_base: usize,
    col0: usize,
    #[comptime] inner: usize,
    #[comptime] cols: usize,
    #[comptime] transposed: bool,
    #[comptime] sub_block: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let column_tile = comptime!(SIDE * cols_per_unit);
    let stride = key_chunk + 1;
    let unit = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let unit_row = unit / SIDE;
    let unit_col = unit % SIDE;
    // Local arrays are not zeroed on every target (CUDA).
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc[x] = 0.0f32;
    }
    for c0 in range_stepped(0, inner, key_chunk) {
        // Also keeps the tiles of a previous call from being overwritten while read.
        sync_cube();
        for idx in range_stepped(unit, sub_block * key_chunk, units) {
            let t = row_start + idx / key_chunk;
            let x = c0 + idx % key_chunk;
            let mut value = 0.0f32;
            if t < n && x < inner {
                value = f32::cast_from(src[token_row(row0, t, n, step, reversed) * inner + x]);
            }
            row_tile[(idx / key_chunk) * stride + idx % key_chunk] = value;
        }
        for idx in range_stepped(unit, key_chunk * column_tile, units) {
            let x = c0 + idx / column_tile;
            let col = col0 + idx % column_tile;
            let mut value = 0.0f32;
            if x < inner && col < cols {
                // G is stored [d, e]: row-major in (x, col) as is, in (col, x) transposed.
                let mut offset = x * cols + col;
                if comptime!(transposed) {
                    offset = col * inner + x;
                }
                value = block_states[state_base + offset];
            }
            state_tile[idx] = value;
        }
        sync_cube();
        for x in 0..key_chunk {
            let mut rs = Array::<f32>::new(rows_per_unit);
            #[unroll]
            for m in 0..rows_per_unit {
                let row = m * SIDE + unit_row;
                let mut value = 0.0f32;
                if row < sub_block {
                    value = row_tile[row * stride + x];
                }
                rs[m] = value;
            }
            #[unroll]
            for j in 0..cols_per_unit {
                let s = state_tile[x * column_tile + j * SIDE + unit_col];
                #[unroll]
                for m in 0..rows_per_unit {
                    acc[m * cols_per_unit + j] += rs[m] * s;
                }
            }
        }
    }
}

/// `dst[t, col] += scale * exp(-s (t - block_start + 1)) * acc` for the unit's
/// rows and columns inside the sequence and the width.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn add_decayed<F: Float>(
    acc: &Array<f32>,
    dst: &mut [F],
    row0: usize,
    n: usize,
    step: usize,
    row_start: usize,
    block_start: usize,
    neg_slope: f32,
    scale: f32,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] sub_block: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
    #[comptime] reversed: bool,
) {
    let unit_row = UNIT_POS as usize / SIDE;
    let unit_col = UNIT_POS as usize % SIDE;
    #[unroll]
    for m in 0..rows_per_unit {
        let row = m * SIDE + unit_row;
        let t = row_start + row;
        if row < sub_block && t < n {
            let decay = scale * f32::exp(neg_slope * f32::cast_from((t - block_start + 1) as u32));
            #[unroll]
            for j in 0..cols_per_unit {
                let col = col0 + j * SIDE + unit_col;
                if col < width {
                    let o = token_row(row0, t, n, step, reversed) * width + col;
                    dst[o] = F::cast_from(f32::cast_from(dst[o]) + decay * acc[m * cols_per_unit + j]);
                }
            }
        }
    }
}
