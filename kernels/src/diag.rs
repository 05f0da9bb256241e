//! diag: the intra-block causal part of the prefill.
//!
//! For the query at position `t` in block `[start, start + block)`:
//! `o_t = scale * sum_{start <= j <= t} exp(-s (t - j)) (q_t . k_j) v_j`.
//! The output is overwritten (non-diag adds to it afterwards).
//!
//! Geometry: one cube per (query sub-block, head, value tile); cube x runs over
//! the work list `work` (pairs `(sequence, first token of the sub-block)`, every
//! sub-block of every sequence, a sub-block never straddling two blocks), y over
//! the `h` heads, z over `ceil(e / value_tile)` tiles of the value dimension,
//! with `value_tile = 16 * cols_per_unit`. Sequence `i` holds tokens
//! `seq_starts[i]..seq_starts[i + 1]` (see [`crate::layout`] for the
//! addressing). The cube has 256 units in a 16 x 16 grid.
//!
//! For each key sub-block up to the query's own (the steps are in
//! [`crate::tiles`]), the scores `Q K^T` are accumulated in registers (each unit `rows_per_unit^2` of them, at rows and
//! columns 16 apart, `rows_per_unit = max(1, sub_block / 16)`) over chunks of
//! `key_chunk` columns of `d`, each chunk of Q and K staged in shared memory
//! with rows padded by one float so that units reading different rows of the
//! same column hit different banks. The masked, decayed scores then go through
//! shared memory to the `(Q K^T) V` step, whose `rows_per_unit x cols_per_unit`
//! outputs per unit stay in registers across key sub-blocks. Shared memory, in
//! f32: `sub_block^2 + 2 * sub_block * (key_chunk + 1)`.

use cubecl::prelude::*;

use crate::layout::first_row;
use crate::tiles::{apply_scores, masked_scores, store_rows};

/// Units along each side of the cube's 16 x 16 grid.
const SIDE: usize = 16;

/// Launched with the geometry in the module doc; `reversed` reads every
/// sequence back to front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn diag<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    work: &[u32],
    out: &mut [F],
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
    #[comptime] reversed: bool,
) {
    let value_tile = comptime!(SIDE * cols_per_unit);
    let item = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let seq = work[2 * item] as usize;
    let q_start = work[2 * item + 1] as usize;
    let seq_start = seq_starts[seq] as usize;
    let n = seq_starts[seq + 1] as usize - seq_start;
    let row0 = first_row(seq_start, head, heads as usize, head_stride as usize);
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let block_start = (q_start / block) * block;
    let e0 = CUBE_POS_Z as usize * value_tile;
    let unit_row = UNIT_POS as usize / SIDE;

    let mut scores = Shared::<[f32]>::new_slice(sub_block * sub_block);
    let mut q_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut k_tile = Shared::<[f32]>::new_slice(sub_block * (key_chunk + 1));
    let mut acc = Array::<f32>::new(rows_per_unit * cols_per_unit);
    // Local arrays are not zeroed on every target (CUDA).
    #[unroll]
    for x in 0..rows_per_unit * cols_per_unit {
        acc[x] = 0.0f32;
    }

    let key_sub_blocks = (q_start - block_start) / sub_block + 1;
    for ks in 0..key_sub_blocks {
        let k_start = block_start + ks * sub_block;
        // masked_scores starts with a barrier, so no unit overwrites the
        // scores of the previous key sub-block while another still reads them.
        masked_scores::<F>(
            q,
            k,
            &mut scores,
            &mut q_tile,
            &mut k_tile,
            row0,
            n,
            step,
            q_start,
            k_start,
            neg_slope,
            scale,
            key_dim,
            sub_block,
            key_chunk,
            rows_per_unit,
            reversed,
        );
        sync_cube();
        apply_scores::<F>(
            &scores,
            v,
            &mut acc,
            row0,
            n,
            step,
            k_start,
            e0,
            value_dim,
            sub_block,
            rows_per_unit,
            cols_per_unit,
            reversed,
        );
    }

    if unit_row < sub_block {
        store_rows::<F>(
            &acc,
            out,
            row0,
            n,
            step,
            q_start,
            e0,
            value_dim,
            rows_per_unit,
            cols_per_unit,
            reversed,
        );
    }
}
