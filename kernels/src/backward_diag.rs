//! backward-diag: the intra-block part of the key and value gradients.
//!
//! The backward pass runs backwards in time (`reversed` addressing, see
//! [`crate::layout`]): in the reversed order, key `j` receives the gradient of
//! every query `i` at or before it in its block. With `w(j, i) = scale *
//! exp(-s (j - i))` for `i <= j` (reversed positions, same block):
//!
//! - `dv_j = sum_i w(j, i) (k_j . q_i) do_i`
//! - `dk_j = sum_i w(j, i) (v_j . do_i) q_i`
//!
//! Both are written (overwritten); [`crate::backward_non_diag`] adds the part
//! that crosses blocks afterwards. The two share the block's rows of q and
//! d_out, so one cube computes both: the scores `K Q^T` (over `d`) are formed and
//! applied to `dO`, then the scores `V dO^T` (over `e`) to `Q`.
//!
//! Geometry: as [`crate::diag`], one cube of 256 units (a 16 x 16 grid) per
//! (sub-block of the work list, head, column tile), except that z runs over
//! `ceil(max(d, e) / column_tile)` tiles with `column_tile = 16 * cols_per_unit`:
//! tile `z` holds columns `z * column_tile..` of dv (where `< e`) and of dk
//! (where `< d`). Shared memory, in f32: `sub_block^2 + 2 * sub_block *
//! (key_chunk + 1)`, the same as diag.

use cubecl::prelude::*;

use crate::layout::{first_row, token_row};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc; always reads sequences
/// back to front.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn backward_diag<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    d_out: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    work: &[u32],
    dk: &mut [F],
    dv: &mut [F],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] key_chunk: usize,
    #[comptime] rows_per_unit: usize,
    #[comptime] cols_per_unit: usize,
) {
    let column_tile = comptime!(SIDE * cols_per_unit);
    let item = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let seq = work[2 * item] as usize;
    let row_start = work[2 * item + 1] as usize;
    let seq_start = seq_starts[seq] as usize;
    let row0 = first_row(seq_start, head, heads as usize, head_stride as usize);
    let n = seq_starts[seq + 1] as usize - seq_start;
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let block_start = (row_start / block) * block;
    let col0 = CUBE_POS_Z as usize * column_tile;
    let unit_row = UNIT_POS as usize / SIDE;

    let mut scores = Shared::<[f32]>::new_slice(sub_block * sub_block);
    let mut row_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut col_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut acc_dv = Array::<f32>::new(rows_per_unit * cols_per_unit);
    let mut acc_dk = Array::<f32>::new(rows_per_unit * cols_per_unit);
    // Local arrays are not zeroed on every target (CUDA).
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc_dv[x] = 0.0f32;
        acc_dk[x] = 0.0f32;
    }

    let key_sub_blocks = (row_start - block_start) / sub_block + 1;
    for ks in 0..key_sub_blocks {
        let key_start = block_start + ks * sub_block;
        // dv += (w . K Q^T) dO
        masked_scores::<F>(
            k,
            q,
            &mut scores,
            &mut row_tile,
            &mut col_tile,
            row0,
            n,
            step,
            row_start,
            key_start,
            neg_slope,
            scale,
            key_dim,
            sub_block,
            key_chunk,
            rows_per_unit,
        );
        sync_cube();
        apply_scores::<F>(
            &scores,
            d_out,
            &mut acc_dv,
            row0,
            n,
            step,
            key_start,
            col0,
            value_dim,
            sub_block,
            rows_per_unit,
            cols_per_unit,
        );
        // dk += (w . V dO^T) Q; masked_scores starts with a barrier, so no
        // unit overwrites the scores above while another still reads them.
        masked_scores::<F>(
            v,
            d_out,
            &mut scores,
            &mut row_tile,
            &mut col_tile,
            row0,
            n,
            step,
            row_start,
            key_start,
            neg_slope,
            scale,
            value_dim,
            sub_block,
            key_chunk,
            rows_per_unit,
        );
        sync_cube();
        apply_scores::<F>(
            &scores,
            q,
            &mut acc_dk,
            row0,
            n,
            step,
            key_start,
            col0,
            key_dim,
            sub_block,
            rows_per_unit,
            cols_per_unit,
        );
    }

    if unit_row < sub_block {
        store_rows::<F>(
            &acc_dv,
            dv,
            row0,
            n,
            step,
            row_start,
            col0,
            value_dim,
            rows_per_unit,
            cols_per_unit,
        );
        store_rows::<F>(
            &acc_dk,
            dk,
            row0,
            n,
            step,
            row_start,
            col0,
            key_dim,
            rows_per_unit,
            cols_per_unit,
        );
    }
}

/// Reads element `x` of the reversed token `t` of a row-major operand `width` wide,
/// as f32 (zero past the sequence or the width).
#[cube]
fn load<F: Float>(
    src: &[F],
    row0: usize,
    n: usize,
    step: usize,
    t: usize,
    x: usize,
    #[comptime] width: usize,
) -> f32 {
    let mut value = 0.0f32;
    if t < n && x < width {
        value = f32::cast_from(src[token_row(row0, t, n, step, true) * width + x]);
    }
    value
}

/// Writes `scores[r * sub_block + c] = w(row_start + r, key_start + c) *
/// (rows_src_{row_start + r} . cols_src_{key_start + c})`, the dot product over
/// `width`, masked to the causal part (zero elsewhere and past the sequence).
#[cube]
#[allow(clippy::too_many_arguments)]
fn masked_scores<F: Float>(
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
                load::<F>(rows_src, row0, n, step, row_start + r, x, width);
            col_tile[r * stride + idx % key_chunk] =
                load::<F>(cols_src, row0, n, step, key_start + r, x, width);
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
fn apply_scores<F: Float>(
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
                    let value = load::<F>(src, row0, n, step, tc, col0 + j * SIDE + unit_col, width);
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
fn store_rows<F: Float>(
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
                dst[token_row(row0, t, n, step, true) * width + col] =
                    F::cast_from(acc[m * cols_per_unit + j]);
            }
        }
    }
}
