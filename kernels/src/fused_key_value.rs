//! The backward's gradients of k and v in one reverse walk on tensor cores:
//! the fused forward's walk ([`crate::fused_fragments`]) as the dv pass runs
//! it, with the dk pass folded in, so that the gradient state is carried
//! once and both gradients come from it.
//!
//! With scale `c`, the backward's dv pass is a forward walk backwards in time
//! with `q' = k`, `k' = q`, `v' = do`, whose state `S` (`d x e`) is the
//! gradient state `G / c`; the dk pass is the same walk with `q'' = v`,
//! `k'' = do`, `v'' = q`, whose state is `S^T` (the host's backward module
//! doc derives both). So per chunk of `C` tokens (walk order, `len` of them),
//! with `D`, `λ` and `κ` the forward's decays:
//!
//! ```text
//! P   = c (K Q^T ⊙ D)       P'  = c (V DO^T ⊙ D)
//! dV^T = diag(λ) applied to (S^T K^T)  +  DO^T P^T
//! dK^T = diag(λ) applied to (S V^T)    +  Q^T P'^T
//! S^T = exp(-s len) S^T + DO^T (Q ⊙ κ)
//! ```
//!
//! `S^T` lives in registers as in the forward (plane `w` holds value columns
//! `16 w .. 16 w + 16`), and the dv half is the forward's chunk exactly
//! (`fused_fragments::outputs_and_update`). The dk half needs `S`
//! with `d` along its rows, the other way round from the registers, and sums
//! over all of `e`: each plane stores its rows of `S^T` to shared memory once
//! per chunk (before the update), and every plane then reads `S` back as a
//! left operand (`ldmatrix.trans`) for its row blocks of `d`. So one cube
//! holds all of `e` (`planes = ceil(e / 16)`), and `P'` sums over all of it.
//!
//! Shared memory, in `F` (rows padded by [`ROW_PAD`] on tensor cores): `K`,
//! `Q` (`C x d16`), `DO`, `V` (`C x 16 planes`), per set (two with the ring,
//! whose asynchronous copies need every column real: `d` and `e` multiples of
//! 16); `P`, `P'` (`C x C`); `S^T` (`16 planes x d16`); the chunk's `dV` and
//! `dK` tiles; in f32 the decay tables and the emulation's scratch.
//!
//! Geometry, tables, segments and the states are the forward walk's: one cube
//! per (walk, head), cube y over heads, z over walks, `32 * planes` units.
//! The states are the dv pass's: the initial state is `dF` (its slot, scaled
//! and advanced as the host's variant says; with segments, each segment's
//! incoming gradient state from kv-parallel and kv-reduce), the final state
//! `d_initial`. Requires `chunk` a multiple of 16, at most 64 and at most
//! `16 * planes`; `d` and `e` at most 128.

use cubecl::frontend::barrier::Barrier;
use cubecl::prelude::*;

use crate::fragment_loads::{
    a_lane_offset, a_lane_offset_trans, b_lane_offset, load_a, mma_pair, store_c_pair,
};
use crate::fragments::{A_ELEMS, C_ELEMS, PLANE, SCRATCH, c_col_offset};
use crate::fused::{walk_slots, walk_tokens};
use crate::fused_fragments::{
    copy_chunk, copy_value_rows, decay_tables, load_state, load_value_rows, outputs_and_update, scores_into,
    stage_chunk, store_chunk, store_state, store_value_rows, value_share,
};
use crate::kv_reduce::{final_factor, initial_factor};
use crate::layout::first_row;
use crate::staging::ROW_PAD;

/// Launched with the geometry in the module doc: `q`, `k`, `v` the
/// forward's inputs, `d_out` the output's gradient, `dk` and `dv` the
/// gradients written (every row of the walk's tokens); the states and
/// scalars are the dv pass's (the fused forward's arguments, always
/// reversed in time).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn fused_key_value<F: Float, N: Size, NV: Size>(
    q: &[Vector<F, NV>],
    k: &[Vector<F, NV>],
    v: &[Vector<F, NV>],
    d_out: &[Vector<F, NV>],
    slopes: &[f32],
    seq_starts: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    work: &[u32],
    initial: &[Vector<f32, N>],
    states: &mut [Vector<f32, N>],
    dk: &mut [Vector<F, NV>],
    dv: &mut [Vector<F, NV>],
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
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
    #[comptime] segmented: bool,
    #[comptime] emulated: bool,
    #[comptime] stages: usize,
) {
    let key_pad = comptime!(key_dim.div_ceil(16) * 16);
    let value_tile = comptime!(planes * 16);
    let pad = comptime!(if emulated { 0 } else { ROW_PAD });
    let key_stride = comptime!(key_pad + pad);
    let value_stride = comptime!(value_tile + pad);
    let chunk_stride = comptime!(chunk + pad);
    let units = comptime!(planes * PLANE);
    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let walk = CUBE_POS_Z as usize;
    let (seq, seq_start, n, first_token, end_token) = walk_tokens(seq_starts, work, walk, block);
    let (initial_slot, final_slot) = walk_slots(initial_slots, final_slots, seq, walk, segmented);
    let row0 = first_row(seq_start, head, h, head_stride as usize);
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let unit = UNIT_POS as usize;
    let plane = unit / PLANE;

    // The ring needs every staged column real (16-byte copies, no zero
    // padding): `d` and `e` multiples of 16.
    let ring = comptime!(!emulated && stages == 2 && key_pad == key_dim && value_tile == value_dim);
    let sets = comptime!(if ring { 2 } else { 1 });
    let key_set = comptime!(chunk * key_stride);
    let value_set = comptime!(chunk * value_stride);
    let mut k_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * key_set), 16usize);
    let mut q_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * key_set), 16usize);
    let mut do_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * value_set), 16usize);
    let mut v_s = Shared::<[F]>::new_aligned_slice(comptime!(sets * value_set), 16usize);
    let mut p_s = Shared::<[F]>::new_aligned_slice(comptime!(2 * chunk * chunk_stride), 16usize);
    let mut g_s = Shared::<[F]>::new_aligned_slice(comptime!(value_tile * key_stride), 16usize);
    let mut dv_s = Shared::<[F]>::new_aligned_slice(comptime!(chunk * value_stride), 16usize);
    let mut dk_s = Shared::<[F]>::new_aligned_slice(comptime!(chunk * key_stride), 16usize);
    // The forward's decay tables (`fused_fragments`): `zeroed`, then
    // `scores_table` (scale and mask in it), then `lambdas`.
    let mut tables = Shared::<[f32]>::new_slice(comptime!(5 * chunk + 1));
    let mut scratch = Shared::<[f32]>::new_slice(comptime!(if emulated { planes * SCRATCH } else { 1 }));
    decay_tables(&mut tables, neg_slope, scale, chunk);

    let mut st = Array::<f32>::new(comptime!(key_pad / 8 * C_ELEMS));
    load_state::<N>(
        initial,
        &states[0..],
        &mut st,
        initial_slot,
        head,
        h,
        plane * 16,
        initial_factor(initial_scale, neg_slope, advance_initial),
        key_dim,
        value_dim,
        initial_in_states,
        false,
        emulated,
    );

    let chunks = (end_token - first_token).div_ceil(chunk);
    if comptime!(ring) {
        let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
        let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
        copy_set::<F, NV>(
            q,
            k,
            v,
            d_out,
            &mut k_s,
            &mut q_s,
            &mut do_s,
            &mut v_s,
            0usize,
            row0,
            n,
            step,
            first_token,
            min(chunk, end_token - first_token),
            key_dim,
            value_dim,
            chunk,
            planes,
        );
        bar0.commit_copy_async();
        for c in 0..chunks {
            let c0 = first_token + c * chunk;
            let len = min(chunk, end_token - c0);
            // Every plane is done with the previous chunk's tiles.
            sync_cube();
            let next = c + 1;
            if next < chunks {
                let next0 = c0 + chunk;
                copy_set::<F, NV>(
                    q,
                    k,
                    v,
                    d_out,
                    &mut k_s,
                    &mut q_s,
                    &mut do_s,
                    &mut v_s,
                    next % 2,
                    row0,
                    n,
                    step,
                    next0,
                    min(chunk, end_token - next0),
                    key_dim,
                    value_dim,
                    chunk,
                    planes,
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
            key_value_chunk::<F, NV>(
                &k_s,
                &q_s,
                &do_s,
                &v_s,
                &mut p_s,
                &mut g_s,
                &mut dv_s,
                &mut dk_s,
                &tables,
                &mut scratch,
                &mut st,
                dk,
                dv,
                c % 2,
                len,
                c0,
                row0,
                n,
                step,
                key_dim,
                value_dim,
                chunk,
                planes,
                emulated,
            );
        }
    } else {
        for c in 0..chunks {
            let c0 = first_token + c * chunk;
            let len = min(chunk, end_token - c0);
            sync_cube();
            stage_chunk::<F, NV>(
                k,
                q,
                d_out,
                &mut k_s,
                &mut q_s,
                &mut do_s,
                row0,
                n,
                step,
                c0,
                len,
                0usize,
                key_dim,
                value_dim,
                key_pad,
                key_stride,
                chunk,
                value_stride,
                value_tile,
                units,
                true,
                emulated,
            );
            let lanes = NV::value();
            let mut v_regs =
                Array::<Vector<F, NV>>::new(comptime!(value_share(chunk, value_tile, lanes, units)));
            load_value_rows::<F, NV>(
                v,
                &mut v_regs,
                row0,
                n,
                step,
                c0,
                len,
                0usize,
                value_dim,
                chunk,
                value_tile,
                units,
                true,
            );
            store_value_rows::<F, NV>(
                &mut v_s,
                &v_regs,
                len,
                0usize,
                value_dim,
                chunk,
                value_stride,
                value_tile,
                units,
                emulated,
            );
            sync_cube();
            key_value_chunk::<F, NV>(
                &k_s,
                &q_s,
                &do_s,
                &v_s,
                &mut p_s,
                &mut g_s,
                &mut dv_s,
                &mut dk_s,
                &tables,
                &mut scratch,
                &mut st,
                dk,
                dv,
                0usize,
                len,
                c0,
                row0,
                n,
                step,
                key_dim,
                value_dim,
                chunk,
                planes,
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
        plane * 16,
        final_factor(final_scale, neg_slope, retreat_final),
        key_dim,
        value_dim,
        emulated,
    );
}

/// Copies a chunk's `K`, `Q`, `DO` and `V` rows into set `set` with
/// asynchronous copies (the ring), to be waited for on the set's barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_set<F: Float, NV: Size>(
    q: &[Vector<F, NV>],
    k: &[Vector<F, NV>],
    v: &[Vector<F, NV>],
    d_out: &[Vector<F, NV>],
    k_s: &mut Shared<[F]>,
    q_s: &mut Shared<[F]>,
    do_s: &mut Shared<[F]>,
    v_s: &mut Shared<[F]>,
    set: usize,
    row0: usize,
    n: usize,
    step: usize,
    c0: usize,
    len: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] planes: usize,
) {
    let key_stride = comptime!(key_dim + ROW_PAD);
    let value_tile = comptime!(planes * 16);
    let value_stride = comptime!(value_tile + ROW_PAD);
    let units = comptime!(planes * PLANE);
    let set_key = set * comptime!(chunk * key_stride);
    let set_value = set * comptime!(chunk * value_stride);
    copy_chunk::<F, NV>(
        k,
        q,
        d_out,
        k_s,
        q_s,
        do_s,
        set_key,
        set_value,
        row0,
        n,
        step,
        c0,
        len,
        0usize,
        key_dim,
        value_dim,
        key_stride,
        chunk,
        value_stride,
        value_tile,
        units,
        true,
    );
    copy_value_rows::<F, NV>(
        v,
        v_s,
        set_value,
        row0,
        n,
        step,
        c0,
        len,
        0usize,
        value_dim,
        chunk,
        value_stride,
        value_tile,
        units,
        true,
    );
}

/// One chunk of the walk (the module doc's products), its tiles staged in
/// set `set`: the scores, `S^T` to shared memory, dv and the update (the
/// forward's chunk), dk, and both gradients' rows to HBM.
#[cube]
#[allow(clippy::too_many_arguments)]
fn key_value_chunk<F: Float, NV: Size>(
    k_s: &Shared<[F]>,
    q_s: &Shared<[F]>,
    do_s: &Shared<[F]>,
    v_s: &Shared<[F]>,
    p_s: &mut Shared<[F]>,
    g_s: &mut Shared<[F]>,
    dv_s: &mut Shared<[F]>,
    dk_s: &mut Shared<[F]>,
    tables: &Shared<[f32]>,
    scratch: &mut Shared<[f32]>,
    st: &mut Array<f32>,
    dk: &mut [Vector<F, NV>],
    dv: &mut [Vector<F, NV>],
    set: usize,
    len: usize,
    c0: usize,
    row0: usize,
    n: usize,
    step: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] chunk: usize,
    #[comptime] planes: usize,
    #[comptime] emulated: bool,
) {
    let key_pad = comptime!(key_dim.div_ceil(16) * 16);
    let key_steps = comptime!(key_pad / 16);
    let key_tiles = comptime!(key_pad / 8);
    let value_tile = comptime!(planes * 16);
    let value_steps = comptime!(planes);
    let pad = comptime!(if emulated { 0 } else { ROW_PAD });
    let key_stride = comptime!(key_pad + pad);
    let value_stride = comptime!(value_tile + pad);
    let chunk_stride = comptime!(chunk + pad);
    let chunk_steps = comptime!(chunk / 16);
    let chunk_tiles = comptime!(chunk / 8);
    let score_tiles = comptime!(chunk_steps * chunk_tiles);
    let tiles_per_plane = comptime!(score_tiles.div_ceil(planes));
    let score_pairs = comptime!(tiles_per_plane / 2);
    let scores_table = comptime!(2 * chunk + 1);
    let lambdas = comptime!(4 * chunk + 1);
    let units = comptime!(planes * PLANE);
    let unit = UNIT_POS as usize;
    let lane = unit % PLANE;
    let plane = unit / PLANE;
    let plane_e = plane * 16;
    let set_key = set * comptime!(chunk * key_stride);
    let set_value = set * comptime!(chunk * value_stride);
    let second = comptime!(chunk * chunk_stride);

    // The scores' tiles of this plane, as in the forward.
    let first_tile = plane * tiles_per_plane;
    let score_block = min(first_tile / chunk_tiles, chunk_steps - 1);
    let g = lane / 4;
    let t2 = (lane % 4) * 2;
    let score_col = (first_tile % chunk_tiles) * 8 + t2;
    let score_row = score_block * 16 + g;
    let mask_at = score_row + chunk - score_col;
    let p_at = score_block * 16 * chunk_stride + (first_tile % chunk_tiles) * 8;
    let a_key = a_lane_offset(lane, key_stride);
    let b_key = b_lane_offset(lane, key_stride, false);
    let b_key_one = b_lane_offset(lane % 16, key_stride, false);
    let b_update = b_lane_offset(lane, key_stride, true);
    let a_key_trans = a_lane_offset_trans(lane, key_stride);
    let a_value = a_lane_offset(lane, value_stride);
    let a_value_trans = a_lane_offset_trans(lane, value_stride);
    let b_value = b_lane_offset(lane, value_stride, false);
    let b_value_one = b_lane_offset(lane % 16, value_stride, false);
    let a_chunk = a_lane_offset(lane, chunk_stride);
    let b_chunk = b_lane_offset(lane, chunk_stride, false);

    // P = c (K Q^T ⊙ D) and P' = c (V DO^T ⊙ D).
    scores_into::<F>(
        k_s,
        q_s,
        p_s,
        tables,
        scratch,
        set_key,
        score_block * 16 * key_stride,
        (score_col - t2) * key_stride,
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
    scores_into::<F>(
        v_s,
        do_s,
        p_s,
        tables,
        scratch,
        set_value,
        score_block * 16 * value_stride,
        (score_col - t2) * value_stride,
        a_value,
        b_value,
        b_value_one,
        a_chunk,
        mask_at,
        second + p_at,
        first_tile,
        score_row,
        score_col,
        value_steps,
        value_stride,
        chunk_stride,
        tiles_per_plane,
        score_pairs,
        score_tiles,
        scores_table,
        emulated,
    );
    // This plane's rows of S^T (value columns), before the update: dk reads
    // S from them.
    #[unroll(!emulated)]
    for pair in 0..comptime!(key_tiles / 2) {
        let at = plane_e * key_stride + pair * 16;
        store_c_pair::<F>(
            g_s,
            at,
            at + a_key,
            &*st,
            2 * pair * C_ELEMS,
            key_stride,
            false,
            emulated,
        );
    }
    sync_cube();

    // dV^T and the update: the forward's chunk with q' = K, k' = Q, v' = DO.
    let mut acc = Array::<f32>::new(comptime!(chunk_tiles * C_ELEMS));
    outputs_and_update::<F>(
        k_s,
        q_s,
        do_s,
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
        a_value_trans,
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
    #[unroll(!emulated)]
    for pair in 0..comptime!(chunk_tiles / 2) {
        let at = pair * comptime!(16 * value_stride) + plane_e;
        store_c_pair::<F>(
            dv_s,
            at,
            at + a_value_trans,
            &acc,
            2 * pair * C_ELEMS,
            value_stride,
            true,
            emulated,
        );
    }

    // dK^T = λ (S V^T) + Q^T P'^T, row blocks of `d` shared out over the
    // planes (planes past the last block compute a copy of it and store
    // none: every plane takes part in every product).
    #[unroll(!emulated)]
    for r in 0..comptime!(key_steps.div_ceil(planes)) {
        let block_at = plane + r * planes;
        let rb = min(block_at, key_steps - 1);
        #[unroll(!emulated)]
        for x in 0..chunk_tiles * C_ELEMS {
            acc[x] = 0.0f32;
        }
        #[unroll(!emulated)]
        for es in 0..value_steps {
            let mut a = Array::<F>::new(A_ELEMS);
            let at = es * comptime!(16 * key_stride) + rb * 16;
            load_a::<F>(&*g_s, at, at + a_key_trans, &mut a, key_stride, true, emulated);
            #[unroll(!emulated)]
            for pair in 0..comptime!(chunk_tiles / 2) {
                let at = set_value + pair * comptime!(16 * value_stride) + es * 16;
                mma_pair::<F>(
                    &a,
                    v_s,
                    at,
                    at + b_value,
                    &mut acc,
                    2 * pair * C_ELEMS,
                    scratch,
                    value_stride,
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
        #[unroll(!emulated)]
        for js in 0..chunk_steps {
            let mut a = Array::<F>::new(A_ELEMS);
            let at = set_key + js * comptime!(16 * key_stride) + rb * 16;
            load_a::<F>(q_s, at, at + a_key_trans, &mut a, key_stride, true, emulated);
            #[unroll(!emulated)]
            for pair in 0..comptime!(chunk_tiles / 2) {
                let at = second + pair * comptime!(16 * chunk_stride) + js * 16;
                mma_pair::<F>(
                    &a,
                    &*p_s,
                    at,
                    at + b_chunk,
                    &mut acc,
                    2 * pair * C_ELEMS,
                    scratch,
                    chunk_stride,
                    false,
                    emulated,
                );
            }
        }
        if block_at < key_steps {
            #[unroll(!emulated)]
            for pair in 0..comptime!(chunk_tiles / 2) {
                let at = pair * comptime!(16 * key_stride) + rb * 16;
                store_c_pair::<F>(
                    dk_s,
                    at,
                    at + a_key_trans,
                    &acc,
                    2 * pair * C_ELEMS,
                    key_stride,
                    true,
                    emulated,
                );
            }
        }
    }
    sync_cube();
    store_chunk::<F, NV>(
        &*dv_s,
        dv,
        row0,
        n,
        step,
        c0,
        len,
        0usize,
        value_dim,
        chunk,
        value_tile,
        value_stride,
        units,
        true,
    );
    store_chunk::<F, NV>(
        &*dk_s, dk, row0, n, step, c0, len, 0usize, key_dim, chunk, key_pad, key_stride, units, true,
    );
}
