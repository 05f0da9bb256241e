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

use crate::layout::first_row;
use crate::tiles::{apply_scores, masked_scores, store_rows};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc; always reads sequences
/// back to front.
#[cube(launch_unchecked, create_dummy_kernel)]
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
            true,
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
            true,
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
            true,
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
            true,
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
            true,
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
            true,
        );
    }
}
