//! The fused forward on tensor cores: the walk of [`crate::fused`] with every
//! product an `mma.m16n8k16` of register fragments ([`crate::fragments`]),
//! and the running state held in registers as accumulator fragments.
//!
//! One cube of `planes` planes walks one (sequence or segment, head, value
//! tile of `16 * planes` columns of `e`); plane `w` owns the value columns
//! `16 w .. 16 w + 16` of the tile. Per chunk of `C` tokens from `c0` (`len`
//! of them, the last chunk may be short):
//!
//! ```text
//! P   = scale * (Q K^T ⊙ D)          D_ij = exp(-s (i - j)) for j <= i, else 0
//! O^T = diag(scale * λ) applied to (S^T Q^T)  +  V^T P^T      λ_i = exp(-s (i + 1))
//! S^T = exp(-s len) S^T + V^T (K ⊙ κ)                         κ_j = exp(-s (len - 1 - j))
//! ```
//!
//! Why this orientation (SPEED_NOTES.md, "the fragment plan"): with
//! `mma.m16n8k16` an accumulator tile's elements are where an `A` operand's
//! are (two 16 x 8 accumulator tiles side by side are one 16 x 16 `A`), so
//! a matrix the walk feeds back into a product must be a left operand. The
//! state is held transposed, `S^T` (`e x d`, rows: value columns), as f32
//! accumulators: `S^T Q^T` takes it as `A` straight from registers (rounded
//! to the operand type), and its update `S^T += V^T (K ⊙ κ)` accumulates into
//! it in place, the decay `exp(-s len)` multiplying each element where it is.
//! The intra-chunk part is then `V^T P^T`, with `P^T` a right operand: each
//! plane computes a share of `P` once per chunk (rows: queries) and writes
//! it to shared memory in the operand type; every plane reads it back as `B`.
//! That is the one trip through shared memory per chunk (`C x C` elements),
//! where the state (`d x e`) never leaves the registers.
//!
//! Shared memory, in `F` (on tensor cores each row padded by [`ROW_PAD`]
//! scalars, so that the rows a fragment reads together fall in different
//! banks, and 16-byte aligned for `ldmatrix` and `stmatrix`): `Q` and `K`
//! of the chunk (`C x d16`, `d16` the key dim rounded up to 16, zero beyond
//! `d` and past `len`), `V` (`C x 16 planes`, read as the left operand `V^T`
//! with `.trans`), `P` (`C x C`), the chunk's output `O` (`C x 16 planes`,
//! stored from the planes' accumulators with `stmatrix.trans`, then to HBM
//! in whole vectors); in f32 the decay tables (masks and scale folded in)
//! and, when `emulated`, the fragments' scratch. Fragments move between
//! shared memory and registers through [`crate::fragment_loads`]; the
//! products are real (`mma.sync`, CUDA) or emulated through shared memory on
//! any runtime ([`crate::fragments::mma_at()`]): the same code around them
//! either way.
//!
//! Geometry, tables and the initial and final states are the portable
//! twin's ([`crate::fused`]): cube x over value tiles, y over heads, z over
//! walks (`work[3z .. 3z + 3]`); the cube is `32 * planes` units in one
//! dimension. Requires `chunk` a multiple of 16 and at most 64, and
//! `planes >= chunk / 16` (each plane's share of `P` lies in one row block).
//! The states travel as vectors of one scalar (`N = 1`); q, k, v and out as
//! vectors of `NV` scalars, which divides `d` and `e`.

use cubecl::frontend::barrier::{Barrier, copy_async};
use cubecl::prelude::*;

use crate::fragment_loads::{
    a_lane_offset, a_lane_offset_trans, b_lane_offset, load_a, load_b, mma_pair, store_c_pair,
};
use crate::fragments::{
    A_ELEMS, B_ELEMS, C_ELEMS, PLANE, SCRATCH, a_col_offset, c_col, c_col_offset, c_row, c_row_offset, mma_at,
};
use crate::fused::{walk_slots, walk_tokens};
use crate::kv_reduce::{final_factor, initial_element, initial_factor};
use crate::layout::{first_row, token_row};
use crate::staging::ROW_PAD;

/// Launched with the geometry in the module doc; the arguments are the
/// portable twin's ([`crate::fused::fused()`]), with `planes` for its
/// `rows_per_unit`, `cols_per_unit` and `key_chunk`, and `emulated` choosing
/// how the products run.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn fused_fragments<F: Float, N: Size, NV: Size>(
    q: &[Vector<F, NV>],
    k: &[Vector<F, NV>],
    v: &[Vector<F, NV>],
    slopes: &[f32],
    seq_starts: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    work: &[u32],
    initial: &[Vector<f32, N>],
    states: &mut [Vector<f32, N>],
    out: &mut [Vector<F, NV>],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    scale: f32,
    initial_scale: f32,
    final_scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] chunk: usize,
    #[comptime] planes: usize,
    #[comptime] initial_in_states: bool,
    #[comptime] transpose_initial: bool,
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
    #[comptime] reversed: bool,
    #[comptime] segmented: bool,
    #[comptime] emulated: bool,
    #[comptime] stages: usize,
) {
    let key_pad = comptime!(key_dim.div_ceil(16) * 16);
    let key_steps = comptime!(key_pad / 16);
    let key_tiles = comptime!(key_pad / 8);
    // Row strides of the shared tiles, padded by ROW_PAD scalars on tensor
    // cores: rows a fragment reads together then start in different banks
    // (the emulation has no banks to spare, and less shared memory).
    let pad = comptime!(if emulated { 0 } else { ROW_PAD });
    let key_stride = comptime!(key_pad + pad);
    let chunk_stride = comptime!(chunk + pad);
    let value_stride = comptime!(planes * 16 + pad);
    let value_tile = comptime!(planes * 16);
    let chunk_steps = comptime!(chunk / 16);
    let chunk_tiles = comptime!(chunk / 8);
    let score_tiles = comptime!(chunk_steps * chunk_tiles);
    let tiles_per_plane = comptime!(score_tiles.div_ceil(planes));
    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let walk = CUBE_POS_Z as usize;
    let (seq, seq_start, n, first_token, end_token) = walk_tokens(seq_starts, work, walk, block);
    let (initial_slot, final_slot) = walk_slots(initial_slots, final_slots, seq, walk, segmented);
    let row0 = first_row(seq_start, head, h, head_stride as usize);
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let e0 = CUBE_POS_X as usize * value_tile;
    let unit = UNIT_POS as usize;
    let lane = unit % PLANE;
    let plane = unit / PLANE;
    // The value columns of this plane's state rows and output rows.
    let plane_e = plane * 16;

    // 16-byte aligned: `ldmatrix` reads 16-byte rows (`fragment_loads`).
    // The ring (variant 24): two sets of `Q`, `K`, `V`, the next chunk's
    // copied in while this chunk's products run; on tensor cores only (WGSL
    // has no asynchronous copy), and where no key column is padding.
    let ring = comptime!(!emulated && stages == 2 && key_pad == key_dim);
    let sets = comptime!(if ring { 2 } else { 1 });
    let key_set = comptime!(chunk * key_stride);
    let value_set = comptime!(chunk * value_stride);
    let mut q_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * key_set), 16usize);
    let mut k_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * key_set), 16usize);
    let mut v_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * value_set), 16usize);
    let mut p_s = Shared::<[F]>::new_aligned_slice(comptime!(chunk * chunk_stride), 16usize);
    let mut o_s = Shared::<[F]>::new_aligned_slice(comptime!(chunk * value_stride), 16usize);
    // The decays, as tables a lane reads at its base plus a constant, with
    // the masks and the scale in them (no compare, branch or product per
    // element: variant 23): `zeroed[x]` is `exp(-s (x - C))` for `x >= C`, else
    // 0 (`x` in `0 ..= 2C`: κ and the chunk's decay); `scores_table[x]` the
    // same times `scale` (`x` in `0 .. 2C`: `D` of `P` at `x = i - j + C`);
    // `lambdas[i]` is `scale exp(-s (i + 1))` (`O`'s inter-chunk factor).
    let mut tables = Shared::<[f32]>::new_slice(comptime!(5 * chunk + 1));
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(if emulated { planes * SCRATCH } else { 1 }));

    decay_tables(&mut tables, neg_slope, scale, chunk);
    let scores_table = comptime!(2 * chunk + 1);
    let lambdas = comptime!(4 * chunk + 1);

    // The state tile `S^T`, this plane's 16 rows: accumulator tile `x` holds
    // key columns `8 x .. 8 x + 8`.
    let mut st = Array::<f32>::new(comptime!(key_tiles * C_ELEMS));
    load_state::<N>(
        initial,
        &states[0..],
        &mut st,
        initial_slot,
        head,
        h,
        e0 + plane_e,
        initial_factor(initial_scale, neg_slope, advance_initial),
        key_dim,
        value_dim,
        initial_in_states,
        transpose_initial,
        emulated,
    );

    // This plane's share of the chunk's scores: `tiles_per_plane` 16 x 8
    // tiles of one row block (planes past the last tile compute a copy of
    // the last row block's and keep nothing: every plane takes part in every
    // product, as the emulation needs).
    let first_tile = plane * tiles_per_plane;
    let score_block = min(first_tile / chunk_tiles, chunk_steps - 1);

    // Each fragment's shared address is a tile offset (a constant where the
    // loops unroll on tensor cores) plus a lane's part, computed once here:
    // the lane arithmetic stays out of the loop (`fragment_loads`).
    let g = lane / 4;
    let t2 = (lane % 4) * 2;
    let score_col = (first_tile % chunk_tiles) * 8 + t2;
    let score_row = score_block * 16 + g;
    // Q as `A` (rows: this plane's row block of queries), and as `B^T` rows
    // of `S^T Q^T`; K as `B^T` rows of `Q K^T`, and as `B` (tokens down the
    // rows) of the update; V^T as `A`; P as `B^T` rows of `V^T P^T`.
    let q_a = score_block * 16 * key_stride;
    let k_b = (score_col - t2) * key_stride;
    let a_key = a_lane_offset(lane, key_stride);
    let b_key = b_lane_offset(lane, key_stride, false);
    let b_key_one = b_lane_offset(lane % 16, key_stride, false);
    let b_update = b_lane_offset(lane, key_stride, true);
    let a_value = a_lane_offset_trans(lane, value_stride);
    let a_chunk = a_lane_offset(lane, chunk_stride);
    let b_chunk = b_lane_offset(lane, chunk_stride, false);
    let mask_at = score_row + chunk - score_col;
    // This plane's score tiles in `P` (row-major), from their first column.
    let p_at = score_block * 16 * chunk_stride + (first_tile % chunk_tiles) * 8;
    let score_pairs = comptime!(tiles_per_plane / 2);

    let chunks = (end_token - first_token).div_ceil(chunk);
    if comptime!(ring) {
        let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
        let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
        copy_chunk::<F, NV>(
            q,
            k,
            v,
            &mut q_s,
            &mut k_s,
            &mut v_s,
            0usize,
            0usize,
            row0,
            n,
            step,
            first_token,
            min(chunk, end_token - first_token),
            e0,
            key_dim,
            value_dim,
            key_stride,
            chunk,
            value_stride,
            value_tile,
            comptime!(planes * PLANE),
            reversed,
        );
        bar0.commit_copy_async();
        for c in 0..chunks {
            let c0 = first_token + c * chunk;
            let len = min(chunk, end_token - c0);
            // Every plane is done with the previous chunk's tiles: its set
            // takes the next chunk.
            sync_cube();
            let next = c + 1;
            if next < chunks {
                let next0 = c0 + chunk;
                copy_chunk::<F, NV>(
                    q,
                    k,
                    v,
                    &mut q_s,
                    &mut k_s,
                    &mut v_s,
                    (next % 2) * key_set,
                    (next % 2) * value_set,
                    row0,
                    n,
                    step,
                    next0,
                    min(chunk, end_token - next0),
                    e0,
                    key_dim,
                    value_dim,
                    key_stride,
                    chunk,
                    value_stride,
                    value_tile,
                    comptime!(planes * PLANE),
                    reversed,
                );
                if next % 2 == 0 {
                    bar0.commit_copy_async();
                } else {
                    bar1.commit_copy_async();
                }
            }
            if c % 2 == 0 {
                bar0.arrive_and_wait();
            } else {
                bar1.arrive_and_wait();
            }
            let set_key = (c % 2) * key_set;
            let set_value = (c % 2) * value_set;
            chunk_products::<F, NV>(
                &q_s,
                &k_s,
                &v_s,
                &mut p_s,
                &mut o_s,
                &tables,
                &mut scratch,
                &mut st,
                out,
                set_key,
                set_value,
                len,
                c0,
                row0,
                n,
                step,
                e0,
                q_a,
                k_b,
                a_key,
                b_key,
                b_key_one,
                b_update,
                a_value,
                a_chunk,
                b_chunk,
                mask_at,
                p_at,
                first_tile,
                score_row,
                score_col,
                t2,
                plane_e,
                key_steps,
                key_tiles,
                key_stride,
                chunk,
                chunk_steps,
                chunk_tiles,
                chunk_stride,
                value_stride,
                value_tile,
                value_dim,
                planes,
                tiles_per_plane,
                score_pairs,
                score_tiles,
                scores_table,
                lambdas,
                reversed,
                emulated,
            );
        }
    } else {
        for c in 0..chunks {
            let c0 = first_token + c * chunk;
            let len = min(chunk, end_token - c0);
            // Every plane is done with the previous chunk's tiles.
            sync_cube();
            stage_chunk::<F, NV>(
                q,
                k,
                v,
                &mut q_s,
                &mut k_s,
                &mut v_s,
                row0,
                n,
                step,
                c0,
                len,
                e0,
                key_dim,
                value_dim,
                key_pad,
                key_stride,
                chunk,
                value_stride,
                value_tile,
                comptime!(planes * PLANE),
                reversed,
                emulated,
            );
            sync_cube();

            let set_key = 0usize;
            let set_value = 0usize;
            chunk_products::<F, NV>(
                &q_s,
                &k_s,
                &v_s,
                &mut p_s,
                &mut o_s,
                &tables,
                &mut scratch,
                &mut st,
                out,
                set_key,
                set_value,
                len,
                c0,
                row0,
                n,
                step,
                e0,
                q_a,
                k_b,
                a_key,
                b_key,
                b_key_one,
                b_update,
                a_value,
                a_chunk,
                b_chunk,
                mask_at,
                p_at,
                first_tile,
                score_row,
                score_col,
                t2,
                plane_e,
                key_steps,
                key_tiles,
                key_stride,
                chunk,
                chunk_steps,
                chunk_tiles,
                chunk_stride,
                value_stride,
                value_tile,
                value_dim,
                planes,
                tiles_per_plane,
                score_pairs,
                score_tiles,
                scores_table,
                lambdas,
                reversed,
                emulated,
            );
        }
    }

    store_state::<N>(
        states,
        &st,
        final_slot,
        head,
        h,
        e0 + plane_e,
        final_factor(final_scale, neg_slope, retreat_final),
        key_dim,
        value_dim,
        emulated,
    );
}

/// This plane's 16 rows of the state tile `S^T` (value columns from
/// `col0`; accumulator tile `x` holds key columns `8 x .. 8 x + 8`) from the
/// initial state in `slot` times `factor` (`kv_reduce::initial_element`),
/// zero where `slot` is negative and past `d` and `e`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_state<N: Size>(
    initial: &[Vector<f32, N>],
    states: &[Vector<f32, N>],
    st: &mut Array<f32>,
    slot: i32,
    head: usize,
    heads: usize,
    col0: usize,
    factor: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] in_states: bool,
    #[comptime] transposed: bool,
    #[comptime] emulated: bool,
) {
    let lane = UNIT_POS as usize % PLANE;
    let key_tiles = comptime!(key_dim.div_ceil(16) * 2);
    #[unroll(!emulated)]
    for x in 0..key_tiles {
        #[unroll]
        for nth in 0..C_ELEMS {
            let col = col0 + c_row(lane, nth);
            let key = x * 8 + c_col(lane, nth);
            let mut value = 0.0f32;
            if slot >= 0 && key < key_dim && col < value_dim {
                value = initial_element::<N>(
                    initial,
                    states,
                    slot as usize,
                    head,
                    heads,
                    key * value_dim + col,
                    factor,
                    key_dim,
                    value_dim,
                    in_states,
                    transposed,
                );
            }
            st[x * C_ELEMS + nth] = value;
        }
    }
}

/// This plane's rows of `st` (as [`load_state`] holds them) times `factor`
/// into slot `slot` of `states`, where `slot` is not negative (a segment's
/// state goes nowhere: `walk_slots`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_state<N: Size>(
    states: &mut [Vector<f32, N>],
    st: &Array<f32>,
    slot: i32,
    head: usize,
    heads: usize,
    col0: usize,
    factor: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] emulated: bool,
) {
    let lane = UNIT_POS as usize % PLANE;
    let key_tiles = comptime!(key_dim.div_ceil(16) * 2);
    if slot >= 0 {
        let base = (slot as usize * heads + head) * comptime!(key_dim * value_dim);
        #[unroll(!emulated)]
        for x in 0..key_tiles {
            #[unroll]
            for nth in 0..C_ELEMS {
                let col = col0 + c_row(lane, nth);
                let key = x * 8 + c_col(lane, nth);
                if key < key_dim && col < value_dim {
                    states[base + key * value_dim + col] = Vector::new(st[x * C_ELEMS + nth] * factor);
                }
            }
        }
    }
}

/// Fills the decay tables (the layout above: `zeroed`, `scores_table`,
/// `lambdas`, `5 chunk + 1` f32), every unit of the cube a share.
#[cube]
pub(crate) fn decay_tables(tables: &mut Shared<[f32]>, neg_slope: f32, scale: f32, #[comptime] chunk: usize) {
    for m in range_stepped(UNIT_POS as usize, comptime!(5 * chunk + 1), CUBE_DIM as usize) {
        let mut value = 0.0f32;
        if m < comptime!(4 * chunk + 1) {
            // `zeroed` then `scores_table`: the same shape, from `2C + 1`.
            let mut x = m;
            let mut factor = 1.0f32;
            if m > comptime!(2 * chunk) {
                x = m - comptime!(2 * chunk + 1);
                factor = scale;
            }
            if x >= chunk {
                value = factor * f32::exp(neg_slope * f32::cast_from((x - chunk) as u32));
            }
        } else {
            let i = m - comptime!(4 * chunk + 1);
            value = scale * f32::exp(neg_slope * f32::cast_from((i + 1) as u32));
        }
        tables[m] = value;
    }
}

/// One chunk's products and stores, after its `Q`, `K`, `V` are staged in
/// the set at `set_key` (`Q` and `K`) and `set_value` (`V`): the scores into
/// `P`, the output through `O` to `out`, the state update in `st`. The
/// synchronous walk and the ring (variant 24) both call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_products<F: Float, NV: Size>(
    q_s: &Shared<[F]>,
    k_s: &Shared<[F]>,
    v_s: &Shared<[F]>,
    p_s: &mut Shared<[F]>,
    o_s: &mut Shared<[F]>,
    tables: &Shared<[f32]>,
    scratch: &mut Shared<[f32]>,
    st: &mut Array<f32>,
    out: &mut [Vector<F, NV>],
    set_key: usize,
    set_value: usize,
    len: usize,
    c0: usize,
    row0: usize,
    n: usize,
    step: usize,
    e0: usize,
    q_a: usize,
    k_b: usize,
    a_key: usize,
    b_key: usize,
    b_key_one: usize,
    b_update: usize,
    a_value: usize,
    a_chunk: usize,
    b_chunk: usize,
    mask_at: usize,
    p_at: usize,
    first_tile: usize,
    score_row: usize,
    score_col: usize,
    t2: usize,
    plane_e: usize,
    #[comptime] key_steps: usize,
    #[comptime] key_tiles: usize,
    #[comptime] key_stride: usize,
    #[comptime] chunk: usize,
    #[comptime] chunk_steps: usize,
    #[comptime] chunk_tiles: usize,
    #[comptime] chunk_stride: usize,
    #[comptime] value_stride: usize,
    #[comptime] value_tile: usize,
    #[comptime] value_dim: usize,
    #[comptime] planes: usize,
    #[comptime] tiles_per_plane: usize,
    #[comptime] score_pairs: usize,
    #[comptime] score_tiles: usize,
    #[comptime] scores_table: usize,
    #[comptime] lambdas: usize,
    #[comptime] reversed: bool,
    #[comptime] emulated: bool,
) {
    scores_into::<F>(
        q_s,
        k_s,
        p_s,
        tables,
        scratch,
        set_key,
        q_a,
        k_b,
        a_key,
        b_key,
        b_key_one,
        a_chunk,
        mask_at,
        p_at,
        first_tile,
        score_row,
        score_col,
        key_steps,
        key_stride,
        chunk_stride,
        tiles_per_plane,
        score_pairs,
        score_tiles,
        scores_table,
        emulated,
    );
    sync_cube();
    let mut acc = Array::<f32>::new(comptime!(chunk_tiles * C_ELEMS));
    outputs_and_update::<F>(
        q_s,
        k_s,
        v_s,
        p_s,
        tables,
        scratch,
        st,
        &mut acc,
        set_key,
        set_value,
        len,
        b_key,
        b_update,
        a_value,
        b_chunk,
        t2,
        plane_e,
        key_steps,
        key_tiles,
        key_stride,
        chunk,
        chunk_steps,
        chunk_tiles,
        chunk_stride,
        value_stride,
        lambdas,
        emulated,
    );

    // The outputs: element (value column, query) of each accumulator
    // into the chunk's output tile, then whole rows of it to `out`.
    #[unroll(!emulated)]
    for pair in 0..comptime!(chunk_tiles / 2) {
        let at = pair * comptime!(16 * value_stride) + plane_e;
        store_c_pair::<F>(
            o_s,
            at,
            at + a_value,
            &acc,
            2 * pair * C_ELEMS,
            value_stride,
            true,
            emulated,
        );
    }
    sync_cube();
    store_chunk::<F, NV>(
        &*o_s,
        out,
        row0,
        n,
        step,
        c0,
        len,
        e0,
        value_dim,
        chunk,
        value_tile,
        value_stride,
        comptime!(planes * PLANE),
        reversed,
    );
}

/// This plane's share of one chunk's scores `P = scale * (A B^T ⊙ D)` into
/// `p_s` (row-major, `chunk_stride` apart), in the operand type: `A` and `B`
/// the staged rows of `a_s` and `b_s` in the set at `set_key` (`key_steps` steps
/// of 16 columns, `key_stride` apart), `D` the decay from the tables with the
/// mask and the scale in it. The forward's `Q K^T`; the backward's dk and dv
/// walk also takes `V DO^T` through it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_into<F: Float>(
    a_s: &Shared<[F]>,
    b_s: &Shared<[F]>,
    p_s: &mut Shared<[F]>,
    tables: &Shared<[f32]>,
    scratch: &mut Shared<[f32]>,
    set_key: usize,
    q_a: usize,
    k_b: usize,
    a_key: usize,
    b_key: usize,
    b_key_one: usize,
    a_chunk: usize,
    mask_at: usize,
    p_at: usize,
    first_tile: usize,
    score_row: usize,
    score_col: usize,
    #[comptime] key_steps: usize,
    #[comptime] key_stride: usize,
    #[comptime] chunk_stride: usize,
    #[comptime] tiles_per_plane: usize,
    #[comptime] score_pairs: usize,
    #[comptime] score_tiles: usize,
    #[comptime] scores_table: usize,
    #[comptime] emulated: bool,
) {
    // P = scale * (A B^T ⊙ D), this plane's tiles, into shared memory.
    let mut scores = Array::<f32>::new(comptime!(tiles_per_plane * C_ELEMS));
    #[unroll(!emulated)]
    for x in 0..tiles_per_plane * C_ELEMS {
        scores[x] = 0.0f32;
    }
    #[unroll(!emulated)]
    for ks in 0..key_steps {
        let mut a = Array::<F>::new(A_ELEMS);
        let at = set_key + q_a + ks * 16;
        load_a::<F>(a_s, at, at + a_key, &mut a, key_stride, false, emulated);
        #[unroll(!emulated)]
        for pair in 0..score_pairs {
            let at = set_key + k_b + pair * comptime!(16 * key_stride) + ks * 16;
            mma_pair::<F>(
                &a,
                b_s,
                at,
                at + b_key,
                &mut scores,
                2 * pair * C_ELEMS,
                scratch,
                key_stride,
                false,
                emulated,
            );
        }
        if comptime!(tiles_per_plane % 2 == 1) {
            let mut b = Array::<F>::new(B_ELEMS);
            let at = set_key + k_b + comptime!(2 * score_pairs * 8 * key_stride) + ks * 16;
            load_b::<F>(b_s, at, at + b_key_one, &mut b, key_stride, false, emulated);
            mma_at::<F>(
                &a,
                &b,
                &mut scores,
                comptime!(2 * score_pairs * C_ELEMS),
                scratch,
                emulated,
            );
        }
    }
    #[unroll(!emulated)]
    for m in 0..tiles_per_plane {
        #[unroll]
        for nth in 0..C_ELEMS {
            // `i - j + C` of the element, at least 1 (`j < C`).
            let x = mask_at + comptime!(c_row_offset(nth)) - comptime!(c_col_offset(nth)) - m * 8;
            scores[m * C_ELEMS + nth] *= tables[scores_table + x];
        }
    }
    // Planes past the last score tile hold a copy and store none.
    if first_tile < score_tiles {
        #[unroll(!emulated)]
        for pair in 0..score_pairs {
            let at = p_at + pair * 16;
            store_c_pair::<F>(
                p_s,
                at,
                at + a_chunk,
                &scores,
                2 * pair * C_ELEMS,
                chunk_stride,
                false,
                emulated,
            );
        }
        if comptime!(tiles_per_plane % 2 == 1) {
            #[unroll]
            for nth in 0..C_ELEMS {
                // From this plane's first tile at `p_at` (`score_row % 16`
                // and `score_col % 8` are the lane's row and column in it).
                let i = score_row % 16 + comptime!(c_row_offset(nth));
                let j = score_col % 8 + comptime!(2 * score_pairs * 8 + c_col_offset(nth));
                p_s[p_at + i * chunk_stride + j] =
                    F::cast_from(scores[comptime!(2 * score_pairs * C_ELEMS) + nth]);
            }
        }
    }
}

/// One chunk's outputs and state update, after its scores are in `p_s`:
/// `acc` (`chunk_tiles` accumulator tiles, `O^T`, rows this plane's value
/// columns) `= λ (S^T Q^T) + V^T P^T`, and `S^T = exp(-s len) S^T + V^T (K ⊙ κ)`
/// in `st`. `Q`, `K` in the set at `set_key`, `V` at `set_value`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn outputs_and_update<F: Float>(
    q_s: &Shared<[F]>,
    k_s: &Shared<[F]>,
    v_s: &Shared<[F]>,
    p_s: &mut Shared<[F]>,
    tables: &Shared<[f32]>,
    scratch: &mut Shared<[f32]>,
    st: &mut Array<f32>,
    acc: &mut Array<f32>,
    set_key: usize,
    set_value: usize,
    len: usize,
    b_key: usize,
    b_update: usize,
    a_value: usize,
    b_chunk: usize,
    t2: usize,
    plane_e: usize,
    #[comptime] key_steps: usize,
    #[comptime] key_tiles: usize,
    #[comptime] key_stride: usize,
    #[comptime] chunk: usize,
    #[comptime] chunk_steps: usize,
    #[comptime] chunk_tiles: usize,
    #[comptime] chunk_stride: usize,
    #[comptime] value_stride: usize,
    #[comptime] lambdas: usize,
    #[comptime] emulated: bool,
) {
    // O^T = λ (S^T Q^T): the state as the left operand, from registers.
    #[unroll(!emulated)]
    for x in 0..chunk_tiles * C_ELEMS {
        acc[x] = 0.0f32;
    }
    #[unroll(!emulated)]
    for ks in 0..key_steps {
        let mut a = Array::<F>::new(A_ELEMS);
        #[unroll]
        for nth in 0..C_ELEMS {
            a[nth] = F::cast_from(st[2 * ks * C_ELEMS + nth]);
            a[nth + C_ELEMS] = F::cast_from(st[(2 * ks + 1) * C_ELEMS + nth]);
        }
        #[unroll(!emulated)]
        for pair in 0..comptime!(chunk_tiles / 2) {
            let at = set_key + pair * comptime!(16 * key_stride) + ks * 16;
            mma_pair::<F>(
                &a,
                q_s,
                at,
                at + b_key,
                acc,
                2 * pair * C_ELEMS,
                scratch,
                key_stride,
                false,
                emulated,
            );
        }
    }
    #[unroll(!emulated)]
    for tile in 0..chunk_tiles {
        #[unroll]
        for nth in 0..C_ELEMS {
            acc[tile * C_ELEMS + nth] *= tables[lambdas + t2 + tile * 8 + comptime!(c_col_offset(nth))];
        }
    }

    // O^T += V^T P^T, and S^T = exp(-s len) S^T + V^T (K ⊙ κ): both take
    // V^T as the left operand, loaded once per step.
    let chunk_decay = tables[len + chunk];
    // κ_j = zeroed[len - 1 - j + C], zero past `len` (j < C).
    let kappa_at = len + chunk - 1 - t2;
    #[unroll(!emulated)]
    for x in 0..key_tiles * C_ELEMS {
        st[x] *= chunk_decay;
    }
    #[unroll(!emulated)]
    for js in 0..chunk_steps {
        let mut a = Array::<F>::new(A_ELEMS);
        let at = set_value + js * comptime!(16 * value_stride) + plane_e;
        load_a::<F>(v_s, at, at + a_value, &mut a, value_stride, true, emulated);
        #[unroll(!emulated)]
        for pair in 0..comptime!(chunk_tiles / 2) {
            let at = pair * comptime!(16 * chunk_stride) + js * 16;
            mma_pair::<F>(
                &a,
                &*p_s,
                at,
                at + b_chunk,
                acc,
                2 * pair * C_ELEMS,
                scratch,
                chunk_stride,
                false,
                emulated,
            );
        }
        // The update's left operand: V^T with κ on its columns (tokens;
        // zero past `len`), `V^T (K ⊙ κ) = (V^T ⊙ κ) K`: 8 products per
        // step where κ on `K` took one per element of every `B`.
        let mut a_kappa = Array::<F>::new(A_ELEMS);
        #[unroll]
        for nth in 0..A_ELEMS {
            let kappa = tables[kappa_at - js * 16 - comptime!(a_col_offset(nth))];
            a_kappa[nth] = F::cast_from(f32::cast_from(a[nth]) * kappa);
        }
        #[unroll(!emulated)]
        for pair in 0..comptime!(key_tiles / 2) {
            let at = set_key + js * comptime!(16 * key_stride) + pair * 16;
            mma_pair::<F>(
                &a_kappa,
                k_s,
                at,
                at + b_update,
                st,
                2 * pair * C_ELEMS,
                scratch,
                key_stride,
                true,
                emulated,
            );
        }
    }
}

/// Copies the chunk's `len` tokens from `c0` into the set at `set_key`
/// (`Q` and `K` rows) and `set_value` (`V` rows) with 16-byte asynchronous
/// copies (`cp.async`), to be waited for on the set's barrier. Rows past
/// `len` are copies of the last one, not zero: they meet only zero decays
/// (κ, the masked scores) or outputs that are not stored. Value columns
/// past `value_dim` are clamped the same way (their outputs and state are
/// not stored). Requires `key_dim` a multiple of 16 (no padding columns).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_chunk<F: Float, NV: Size>(
    q: &[Vector<F, NV>],
    k: &[Vector<F, NV>],
    v: &[Vector<F, NV>],
    q_s: &mut Shared<[F]>,
    k_s: &mut Shared<[F]>,
    v_s: &mut Shared<[F]>,
    set_key: usize,
    set_value: usize,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] key_stride: usize,
    #[comptime] chunk: usize,
    #[comptime] value_stride: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = NV::value();
    let key_vectors = comptime!(key_dim / lanes);
    let key_share = comptime!((chunk * key_vectors).div_ceil(units));
    let unit = UNIT_POS as usize;
    let last = len - 1;
    let q_view = q_s.as_vectorized_mut().with_vector_size_mut::<NV>();
    let k_view = k_s.as_vectorized_mut().with_vector_size_mut::<NV>();
    #[unroll]
    for x in 0..key_share {
        let idx = x * units + unit;
        if idx < comptime!(chunk * key_vectors) {
            let r = idx / key_vectors;
            let c = idx % key_vectors;
            let from = token_row(row0, c0 + min(r, last), n, step, reversed) * key_vectors + c;
            let to = (set_key + r * key_stride) / lanes + c;
            copy_async::<Vector<F, NV>>(
                &q[from..from + 1],
                &mut q_view[to..to + 1],
                comptime!(lanes as u32),
            );
            copy_async::<Vector<F, NV>>(
                &k[from..from + 1],
                &mut k_view[to..to + 1],
                comptime!(lanes as u32),
            );
        }
    }
    copy_value_rows::<F, NV>(
        v,
        v_s,
        set_value,
        row0,
        n,
        step,
        c0,
        len,
        e0,
        value_dim,
        chunk,
        value_stride,
        value_tile,
        units,
        reversed,
    );
}

/// The `V` part of [`copy_chunk`]: the chunk's rows of `v` (the tile's
/// `value_tile` columns from `e0`) into the set at `set_value` of `v_s`,
/// with 16-byte asynchronous copies, rows past `len` and columns past
/// `value_dim` clamped. The backward's dk and dv walk copies its fourth
/// tensor through it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_value_rows<F: Float, NV: Size>(
    v: &[Vector<F, NV>],
    v_s: &mut Shared<[F]>,
    set_value: usize,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] value_stride: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = NV::value();
    let value_vectors = comptime!(value_tile / lanes);
    let value_share = comptime!((chunk * value_vectors).div_ceil(units));
    let value_width = comptime!(value_dim / lanes);
    let unit = UNIT_POS as usize;
    let last = len - 1;
    let v_view = v_s.as_vectorized_mut().with_vector_size_mut::<NV>();
    #[unroll]
    for x in 0..value_share {
        let idx = x * units + unit;
        if idx < comptime!(chunk * value_vectors) {
            let r = idx / value_vectors;
            let c = idx % value_vectors;
            let col = min(e0 / lanes + c, comptime!(value_width - 1));
            let from = token_row(row0, c0 + min(r, last), n, step, reversed) * value_width + col;
            let to = (set_value + r * value_stride) / lanes + c;
            copy_async::<Vector<F, NV>>(
                &v[from..from + 1],
                &mut v_view[to..to + 1],
                comptime!(lanes as u32),
            );
        }
    }
}

/// Stages the chunk's `len` tokens from `c0`: `Q` and `K` rows (`key_pad`
/// columns, zero beyond `key_dim`) and `V` rows (the tile's `value_tile`
/// columns from `e0`), zero past `len`. Every unit loads its share of all
/// three in vectors of `NV` (which divides `key_dim` and `value_dim`) before
/// it stores any, so that the loads are in flight together.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_chunk<F: Float, NV: Size>(
    q: &[Vector<F, NV>],
    k: &[Vector<F, NV>],
    v: &[Vector<F, NV>],
    q_s: &mut Shared<[F]>,
    k_s: &mut Shared<[F]>,
    v_s: &mut Shared<[F]>,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] key_pad: usize,
    #[comptime] key_stride: usize,
    #[comptime] chunk: usize,
    #[comptime] value_stride: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
    #[comptime] emulated: bool,
) {
    let lanes = NV::value();
    let key_vectors = comptime!(key_pad / lanes);
    let key_share = comptime!((chunk * key_vectors).div_ceil(units));
    let key_width = comptime!(key_dim / lanes);
    let unit = UNIT_POS as usize;
    let zero = Vector::<F, NV>::new(F::cast_from(0.0f32));
    // Every load reads a valid vector (rows past `len` and columns past the
    // dims clamped to the last), and the stores write zero in their place:
    // choosing zero or the load per vector in registers took a byte permute
    // per scalar (variant 22).
    let last = len - 1;
    let mut q_regs = Array::<Vector<F, NV>>::new(key_share);
    let mut k_regs = Array::<Vector<F, NV>>::new(key_share);
    let mut v_regs = Array::<Vector<F, NV>>::new(comptime!(value_share(chunk, value_tile, lanes, units)));
    #[unroll]
    for x in 0..key_share {
        let idx = x * units + unit;
        let r = min(idx / key_vectors, last);
        let c = min(idx % key_vectors, comptime!(key_width - 1));
        let at = token_row(row0, c0 + r, n, step, reversed) * key_width + c;
        q_regs[x] = q[at];
        k_regs[x] = k[at];
    }
    load_value_rows::<F, NV>(
        v,
        &mut v_regs,
        row0,
        n,
        step,
        c0,
        len,
        e0,
        value_dim,
        chunk,
        value_tile,
        units,
        reversed,
    );
    #[unroll]
    for x in 0..key_share {
        let idx = x * units + unit;
        if idx < comptime!(chunk * key_vectors) {
            let at = (idx / key_vectors) * key_stride + (idx % key_vectors) * lanes;
            if idx / key_vectors < len && idx % key_vectors < key_width {
                store_vector::<F, NV>(q_s, at, q_regs[x], emulated);
                store_vector::<F, NV>(k_s, at, k_regs[x], emulated);
            } else {
                store_vector::<F, NV>(q_s, at, zero, emulated);
                store_vector::<F, NV>(k_s, at, zero, emulated);
            }
        }
    }
    store_value_rows::<F, NV>(
        v_s,
        &v_regs,
        len,
        e0,
        value_dim,
        chunk,
        value_stride,
        value_tile,
        units,
        emulated,
    );
}

/// The `V` loads of [`stage_chunk`] into `regs` (`value_share` vectors per
/// unit, [`value_share()`]): the chunk's rows of `v`, the tile's columns
/// from `e0`, rows past `len` and columns past `value_dim` clamped.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_value_rows<F: Float, NV: Size>(
    v: &[Vector<F, NV>],
    regs: &mut Array<Vector<F, NV>>,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = NV::value();
    let value_vectors = comptime!(value_tile / lanes);
    let value_width = comptime!(value_dim / lanes);
    let unit = UNIT_POS as usize;
    let last = len - 1;
    #[unroll]
    for x in 0..comptime!(value_share(chunk, value_tile, lanes, units)) {
        let idx = x * units + unit;
        let r = min(idx / value_vectors, last);
        let c = min(e0 / lanes + idx % value_vectors, comptime!(value_width - 1));
        regs[x] = v[token_row(row0, c0 + r, n, step, reversed) * value_width + c];
    }
}

/// The `V` stores of [`stage_chunk`]: `regs` from [`load_value_rows`] into
/// `v_s` (rows `value_stride` apart), zero past `len` and `value_dim`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_value_rows<F: Float, NV: Size>(
    v_s: &mut Shared<[F]>,
    regs: &Array<Vector<F, NV>>,
    len: usize,
    e0: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] value_stride: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] emulated: bool,
) {
    let lanes = NV::value();
    let value_vectors = comptime!(value_tile / lanes);
    let value_width = comptime!(value_dim / lanes);
    let unit = UNIT_POS as usize;
    let zero = Vector::<F, NV>::new(F::cast_from(0.0f32));
    #[unroll]
    for x in 0..comptime!(value_share(chunk, value_tile, lanes, units)) {
        let idx = x * units + unit;
        if idx < comptime!(chunk * value_vectors) {
            let r = idx / value_vectors;
            let at = r * value_stride + (idx % value_vectors) * lanes;
            if r < len && e0 / lanes + idx % value_vectors < value_width {
                store_vector::<F, NV>(v_s, at, regs[x], emulated);
            } else {
                store_vector::<F, NV>(v_s, at, zero, emulated);
            }
        }
    }
}

/// Vectors of a chunk's value tile each unit stages.
pub(crate) const fn value_share(chunk: usize, value_tile: usize, lanes: usize, units: usize) -> usize {
    (chunk * (value_tile / lanes)).div_ceil(units)
}

/// Stores `value` at `tile[at .. at + NV]`: one 16-byte store on tensor
/// cores (`at` a multiple of `NV`, the tile 16-byte aligned), where scalar
/// stores took four 32-bit ones, four-way bank-conflicted (variant 23);
/// scalar stores when emulated (WGSL has no view of shared memory as
/// vectors).
#[cube]
fn store_vector<F: Float, NV: Size>(
    tile: &mut Shared<[F]>,
    at: usize,
    value: Vector<F, NV>,
    #[comptime] emulated: bool,
) {
    if comptime!(emulated) {
        #[unroll]
        for j in 0..NV::value() {
            tile[at + j] = value.extract(j);
        }
    } else {
        let view = tile.as_vectorized_mut().with_vector_size_mut::<NV>();
        view[at / NV::value()] = value;
    }
}

/// Writes the chunk's output tile (`len` rows of `value_tile` columns from
/// `e0`, row-major in `o_s`, rows `value_stride` apart) to `out` in vectors
/// of `NV`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_chunk<F: Float, NV: Size>(
    o_s: &Shared<[F]>,
    out: &mut [Vector<F, NV>],
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    e0: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] value_tile: usize,
    #[comptime] value_stride: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    let lanes = NV::value();
    let value_vectors = comptime!(value_tile / lanes);
    let share = comptime!((chunk * value_vectors).div_ceil(units));
    let value_width = comptime!(value_dim / lanes);
    let unit = UNIT_POS as usize;
    #[unroll]
    for x in 0..share {
        let idx = x * units + unit;
        let r = idx / value_vectors;
        let c = e0 / lanes + idx % value_vectors;
        if r < len && c < value_width {
            let at = r * value_stride + (idx % value_vectors) * lanes;
            let mut value = Vector::<F, NV>::empty();
            #[unroll]
            for j in 0..lanes {
                value.insert(j, o_s[at + j]);
            }
            out[token_row(row0, c0 + r, n, step, reversed) * value_width + c] = value;
        }
    }
}
