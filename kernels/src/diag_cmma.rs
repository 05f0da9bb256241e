//! diag on tensor cores: the accelerated routine of [`crate::diag`], for f16
//! and bf16 inputs (and f32 inputs as bf16 parts, see below) on devices whose
//! runtime reports a 16 x 16 x 16 `cmma` with f32 accumulators (CUDA). The host picks it from the device's features; the
//! portable [`crate::diag`] stays the routine everywhere else.
//!
//! The math is the same: for the query at `t` in block `[start, start + block)`,
//! `o_t = scale * sum_{start <= j <= t} exp(-s (t - j)) (q_t . k_j) v_j`, and the
//! output is overwritten (non-diag adds to it afterwards).
//!
//! Geometry: one cube per (query sub-block, head, value tile), as in
//! [`crate::diag`] (cube x over the work list, y over heads, z over tiles of
//! `value_tile` columns of `e`). The cube holds `sub_block / 16` planes; plane
//! `p` owns query rows `16p .. 16p + 16` of the sub-block. For each key
//! sub-block up to the query's own:
//! 1. the cube stages K (`sub_block x d`) and V (`sub_block x value_tile`) in
//!    shared memory, in the input dtype (Q was staged once);
//! 2. each plane computes its 16-row strip of `Q K^T` on tensor cores, f32
//!    accumulators, and stores it to shared memory;
//! 3. the plane's lanes mask and decay the strip (`scale * exp(-s (t - j))`,
//!    zero for a future key) and store it back in the input dtype;
//! 4. each plane multiplies its strip by V into its `16 x value_tile` output
//!    accumulators, which stay in registers across key sub-blocks.
//!
//! With `with_state` (bf16), the cube also adds the non-diag part, each query
//! against its block's incoming state (stored as `S`: f32 from kv-reduce, or
//! the input dtype from [`crate::chunk_state`]; rounded to the input dtype
//! either way before its product), into the same
//! accumulators: it then runs after kv-reduce and replaces non-diag, which
//! saves a pass over Q and the output. Without it (f16, whose range a long
//! sequence's state can exceed), non-diag runs after it as usual.
//!
//! The decayed scores are rounded to `M` (or split) before `(Q K^T) V`, as in
//! flash-linear-attention's chunk kernels; everything accumulates in f32.
//! Shared memory, bytes: `elem * sub_block * (2 * (d16 + 8) + (value_tile + 8) +
//! (sub_block + 8)) + 4 * sub_block * (sub_block + 4)`, with `elem` 2 (4 for
//! split operands: two bf16 parts), `d16` = d rounded
//! up to 16 (tails are zero-padded, so any `d` and `e` work) and each row
//! padded by 16 bytes (see [`crate::staging`]).
//!
//! q, k, v, out and the block states travel as vectors of `N` scalars along
//! their rows (see [`crate::staging`]); the host picks `N` dividing `d` and `e`.
//!
//! Operands are staged in shared memory as `M`, the tensor cores' dtype: the
//! input dtype for f16 and bf16; bf16 for f32 inputs, either rounded to it
//! (one product: bf16's accuracy) or, with `split`, as high and low bf16
//! parts (three products, about f32's accuracy: [`crate::staging`]'s split
//! operands). A split doubles every staged operand tile (the same bytes as
//! f32 tiles); the scores and the incoming state are split as well.

use cubecl::prelude::*;

use crate::layout::first_row;
use crate::staging::{
    F32_ROW_PAD, ROW_PAD, TILE, bf16_grid, fragment, get, put, split_product, stage_rows, store_tile,
    zero_accumulator,
};

/// Alignment of the shared tiles, bytes (wmma loads need 32).
const ALIGN: usize = 128;

/// Launched with the geometry in the module doc and `sub_block / 16` planes of
/// `plane_size` units (the device's fixed plane size); `reversed` reads every
/// sequence back to front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn diag_cmma<F: Float, M: Float, S: Float, N: Size>(
    q: &[Vector<F, N>],
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    work: &[u32],
    block_states: &[Vector<S, N>],
    out: &mut [Vector<F, N>],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] sub_block: usize,
    #[comptime] value_tile: usize,
    #[comptime] plane_size: usize,
    #[comptime] with_state: bool,
    #[comptime] reversed: bool,
    #[comptime] split: bool,
) {
    let lanes_v = N::value();
    let key_pad = comptime!(key_dim.div_ceil(TILE) * TILE);
    let key_tiles = comptime!(key_pad / TILE);
    let row_tiles = comptime!(sub_block / TILE);
    let value_tiles = comptime!(value_tile / TILE);
    // Row strides of the shared tiles, padded (see crate::staging), in scalars.
    let qk_stride = comptime!(key_pad + ROW_PAD);
    let v_stride = comptime!(value_tile + ROW_PAD);
    let sf_stride = comptime!(sub_block + F32_ROW_PAD);
    let sh_stride = comptime!(sub_block + ROW_PAD);
    // Their lengths: q_s, k_s and v_s in vectors of N, s_f and s_h in scalars.
    let qk_len = comptime!(sub_block * qk_stride / lanes_v);
    let v_len = comptime!(sub_block * v_stride / lanes_v);
    let sf_len = comptime!(sub_block * sf_stride);
    let sh_len = comptime!(sub_block * sh_stride);
    let units = comptime!(sub_block / TILE * plane_size);
    // Where each tile's low parts start (0: no split), and the allocations.
    let parts = comptime!(if split { 2 } else { 1 });
    let qk_lo = comptime!(if split { qk_len } else { 0 });
    let v_lo = comptime!(if split { v_len } else { 0 });
    let sh_lo = comptime!(if split { sh_len } else { 0 });

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
    let unit = UNIT_POS as usize;
    let lane = UNIT_POS_PLANE as usize;
    let lanes = comptime!(plane_size);
    let plane = unit / lanes;
    // This plane's 16 query rows.
    let strip = plane * TILE;

    let mut q_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * qk_len), ALIGN);
    let mut k_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * qk_len), ALIGN);
    let mut v_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * v_len), ALIGN);
    let mut s_f = Shared::<[f32]>::new_aligned_slice(sf_len, ALIGN);
    let mut s_h = Shared::<[M]>::new_aligned_slice(comptime!(parts * sh_len), ALIGN);

    stage_rows::<F, M, N>(
        q, &mut q_s, row0, n, step, q_start, n, 0, neg_slope, sub_block, key_pad, qk_stride, key_dim, units,
        false, reversed, qk_lo,
    );

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..value_tiles {
        acc.push(zero_accumulator());
    }

    let key_sub_blocks = (q_start - block_start) / sub_block + 1;
    for ks in 0..key_sub_blocks {
        let k_start = block_start + ks * sub_block;
        // The previous step's readers of k_s, v_s and s_h are done.
        sync_cube();
        stage_rows::<F, M, N>(
            k, &mut k_s, row0, n, step, k_start, n, 0, neg_slope, sub_block, key_pad, qk_stride, key_dim,
            units, false, reversed, qk_lo,
        );
        stage_rows::<F, M, N>(
            v, &mut v_s, row0, n, step, k_start, n, e0, neg_slope, sub_block, value_tile, v_stride,
            value_dim, units, false, reversed, v_lo,
        );
        sync_cube();

        // 2. This plane's strip of Q K^T: A = Q rows (row-major), B = K^T (K
        // read column-major), one 16 x 16 score tile per key tile.
        #[unroll]
        for j in 0..row_tiles {
            let scores = zero_accumulator();
            #[unroll]
            for kk in 0..key_tiles {
                split_product::<M, N>(
                    &q_s,
                    (strip * qk_stride + kk * TILE) / lanes_v,
                    cmma::MatrixLayout::RowMajor,
                    qk_stride,
                    qk_lo,
                    &k_s,
                    (j * TILE * qk_stride + kk * TILE) / lanes_v,
                    cmma::MatrixLayout::ColMajor,
                    qk_stride,
                    qk_lo,
                    &scores,
                    split,
                );
            }
            cmma::store(
                &mut s_f[strip * sf_stride + j * TILE..sf_len],
                &scores,
                sf_stride as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_plane();

        // 3. Mask and decay the strip; a future key's weight is zero before the
        // exponential (exp of a positive exponent could overflow).
        for idx in range_stepped(lane, TILE * sub_block, lanes) {
            let r = strip + idx / sub_block;
            let c = idx % sub_block;
            let tq = q_start + r;
            let tk = k_start + c;
            let mut w = 0.0f32;
            if tk <= tq && tq < n {
                w = scale * f32::exp(neg_slope * f32::cast_from((tq - tk) as u32)) * s_f[r * sf_stride + c];
            }
            if comptime!(split) {
                let hi = bf16_grid_scalar(w);
                s_h[r * sh_stride + c] = M::cast_from(hi);
                s_h[sh_lo + r * sh_stride + c] = M::cast_from(w - hi);
            } else {
                s_h[r * sh_stride + c] = M::cast_from(w);
            }
        }
        sync_plane();

        // 4. The strip times V into the plane's output accumulators.
        #[unroll]
        for jt in 0..value_tiles {
            #[unroll]
            for kk in 0..row_tiles {
                let a_at = strip * sh_stride + kk * TILE;
                let b_at = (kk * TILE * v_stride + jt * TILE) / lanes_v;
                let a = scores_fragment::<M>(&s_h, a_at, sh_stride);
                let b = fragment::<M, N>(
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::RowMajor,
                    &v_s[b_at..],
                    v_stride,
                );
                let o = acc.index(jt);
                if comptime!(split) {
                    let a_low = scores_fragment::<M>(&s_h, sh_lo + a_at, sh_stride);
                    cmma::execute(&a_low, &b, o, o);
                    let b_low = fragment::<M, N>(
                        cmma::MatrixIdent::B,
                        cmma::MatrixLayout::RowMajor,
                        &v_s[v_lo + b_at..],
                        v_stride,
                    );
                    cmma::execute(&a, &b_low, o, o);
                }
                cmma::execute(&a, &b, o, o);
            }
        }
    }

    if comptime!(with_state) {
        // 5. non-diag fused in: `+ (scale exp(-s (c + 1)) q_t) KV_in` for the
        // query at offset `c` in its block, with the block's incoming state
        // staged in chunks of `sub_block` rows of `d` through v_s. Q is decayed
        // in f32, then rounded to the input dtype (bf16 keeps f32's exponent
        // range, so nothing overflows or flushes that matters).
        let global_block = block_offsets[seq] as usize + q_start / block;
        let state_row0 = (global_block * heads as usize + head) * key_dim;
        let row_v = comptime!(qk_stride / lanes_v);
        sync_cube();
        for idx in range_stepped(unit, qk_len, units) {
            let offset = q_start + idx / row_v - block_start;
            let decay = scale * f32::exp(neg_slope * f32::cast_from((offset + 1) as u32));
            let value = get::<M, N>(&q_s, idx, qk_lo) * Vector::<f32, N>::new(decay);
            put::<M, N>(&mut q_s, idx, value, qk_lo);
        }
        for c0 in range_stepped(0, key_pad, sub_block) {
            sync_cube();
            // Rows c0 .. c0 + sub_block of the state, as if they were tokens
            // of a sequence of key_dim rows, one apart.
            stage_rows::<S, M, N>(
                block_states,
                &mut v_s,
                state_row0,
                key_dim,
                1,
                c0,
                key_dim,
                e0,
                neg_slope,
                sub_block,
                value_tile,
                v_stride,
                value_dim,
                units,
                false,
                false,
                v_lo,
            );
            sync_cube();
            #[unroll]
            for jt in 0..value_tiles {
                #[unroll]
                for kk in 0..row_tiles {
                    // The last chunk of a `d` that is not a multiple of sub_block is short.
                    if c0 + kk * TILE < key_pad {
                        split_product::<M, N>(
                            &q_s,
                            (strip * qk_stride + c0 + kk * TILE) / lanes_v,
                            cmma::MatrixLayout::RowMajor,
                            qk_stride,
                            qk_lo,
                            &v_s,
                            (kk * TILE * v_stride + jt * TILE) / lanes_v,
                            cmma::MatrixLayout::RowMajor,
                            v_stride,
                            v_lo,
                            acc.index(jt),
                            split,
                        );
                    }
                }
            }
        }
    }

    // Each output tile goes through the plane's own 16 x 16 corner of s_f
    // (only this plane touches its strip), then to memory in the output dtype.
    #[unroll]
    for jt in 0..value_tiles {
        sync_plane();
        cmma::store(
            &mut s_f[strip * sf_stride..sf_len],
            acc.index(jt),
            sf_stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        store_tile::<F, N>(
            &s_f,
            strip * sf_stride,
            out,
            row0,
            n,
            step,
            q_start + strip,
            n,
            e0 + jt * TILE,
            sf_stride,
            value_dim,
            plane_size,
            reversed,
        );
    }
}

/// A 16 x 16 `A` fragment of the decayed scores, rows `stride` scalars apart.
#[cube]
fn scores_fragment<M: Float>(s_h: &Shared<[M]>, at: usize, #[comptime] stride: usize) -> cmma::Matrix<M> {
    cmma::Matrix::<M>::from_slice(
        cmma::MatrixIdent::A,
        TILE,
        TILE,
        TILE,
        cmma::MatrixLayout::RowMajor,
        &s_h[at..],
        stride as u32,
    )
}

/// A scalar rounded to the nearest bf16, kept in f32 (see [`bf16_grid`]).
#[cube]
fn bf16_grid_scalar(x: f32) -> f32 {
    bf16_grid::<Const<1>>(Vector::<f32, Const<1>>::new(x)).extract(0usize)
}
