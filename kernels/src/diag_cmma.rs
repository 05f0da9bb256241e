//! diag on tensor cores: the accelerated routine of [`crate::diag`], for f16
//! and bf16 inputs on devices whose runtime reports a 16 x 16 x 16 `cmma` with
//! f32 accumulators (CUDA). The host picks it from the device's features; the
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
//! against its block's incoming state from kv-reduce, into the same
//! accumulators: it then runs after kv-reduce and replaces non-diag, which
//! saves a pass over Q and the output. Without it (f16, whose range a long
//! sequence's state can exceed), non-diag runs after it as usual.
//!
//! The decayed scores are rounded to the input dtype before `(Q K^T) V`, as in
//! flash-linear-attention's chunk kernels; everything accumulates in f32.
//! Shared memory, bytes: `2 * (2 * sub_block * d16 + sub_block * value_tile +
//! sub_block^2) + 4 * sub_block^2`, with `d16` = d rounded up to 16 (tails are
//! zero-padded, so any `d` and `e` work).

use cubecl::prelude::*;

use crate::layout::{first_row, token_row};

/// Side of one tensor-core tile (`m = n = k = 16`).
const TILE: usize = 16;
/// Alignment of the shared tiles, bytes (wmma loads need 32).
const ALIGN: usize = 128;
/// Global loads each unit issues before storing them to shared memory.
const BATCH: usize = 8;

/// Launched with the geometry in the module doc and `sub_block / 16` planes of
/// `plane_size` units (the device's fixed plane size); `reversed` reads every sequence back to front (see
/// [`crate::layout`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn diag_cmma<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    work: &[u32],
    block_states: &[f32],
    out: &mut [F],
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
) {
    let key_pad = comptime!(key_dim.div_ceil(TILE) * TILE);
    let key_tiles = comptime!(key_pad / TILE);
    let row_tiles = comptime!(sub_block / TILE);
    let value_tiles = comptime!(value_tile / TILE);
    let qk_len = comptime!(sub_block * key_pad);
    let v_len = comptime!(sub_block * value_tile);
    let s_len = comptime!(sub_block * sub_block);
    // Known at compile time so that the staging loops unroll and keep BATCH
    // loads in flight per unit (one at a time, the loads' latency dominated).
    let units = comptime!(sub_block / TILE * plane_size);
    let qk_batches = comptime!(qk_len.div_ceil(units * BATCH));
    let v_batches = comptime!(v_len.div_ceil(units * BATCH));

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

    let mut q_s = Shared::<[F]>::new_aligned_slice(qk_len, ALIGN);
    let mut k_s = Shared::<[F]>::new_aligned_slice(qk_len, ALIGN);
    let mut v_s = Shared::<[F]>::new_aligned_slice(v_len, ALIGN);
    let mut s_f = Shared::<[f32]>::new_aligned_slice(s_len, ALIGN);
    let mut s_h = Shared::<[F]>::new_aligned_slice(s_len, ALIGN);

    #[unroll]
    for b in 0..qk_batches {
        let mut regs = Array::<F>::new(BATCH);
        #[unroll]
        for x in 0..BATCH {
            let idx = (b * BATCH + x) * units + unit;
            let tq = q_start + idx / key_pad;
            let i = idx % key_pad;
            let mut val = F::cast_from(0.0f32);
            if idx < qk_len && i < key_dim && tq < n {
                val = q[token_row(row0, tq, n, step, reversed) * key_dim + i];
            }
            regs[x] = val;
        }
        #[unroll]
        for x in 0..BATCH {
            let idx = (b * BATCH + x) * units + unit;
            if idx < qk_len {
                q_s[idx] = regs[x];
            }
        }
    }

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..value_tiles {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            TILE,
            TILE,
            TILE,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ));
    }

    let key_sub_blocks = (q_start - block_start) / sub_block + 1;
    for ks in 0..key_sub_blocks {
        let k_start = block_start + ks * sub_block;
        // The previous step's readers of k_s, v_s and s_h are done.
        sync_cube();
        #[unroll]
        for b in 0..qk_batches {
            let mut regs = Array::<F>::new(BATCH);
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                let tk = k_start + idx / key_pad;
                let i = idx % key_pad;
                let mut val = F::cast_from(0.0f32);
                if idx < qk_len && i < key_dim && tk < n {
                    val = k[token_row(row0, tk, n, step, reversed) * key_dim + i];
                }
                regs[x] = val;
            }
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                if idx < qk_len {
                    k_s[idx] = regs[x];
                }
            }
        }
        #[unroll]
        for b in 0..v_batches {
            let mut regs = Array::<F>::new(BATCH);
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                let tk = k_start + idx / value_tile;
                let col = e0 + idx % value_tile;
                let mut val = F::cast_from(0.0f32);
                if idx < v_len && col < value_dim && tk < n {
                    val = v[token_row(row0, tk, n, step, reversed) * value_dim + col];
                }
                regs[x] = val;
            }
            #[unroll]
            for x in 0..BATCH {
                let idx = (b * BATCH + x) * units + unit;
                if idx < v_len {
                    v_s[idx] = regs[x];
                }
            }
        }
        sync_cube();

        // 2. This plane's strip of Q K^T: A = Q rows (row-major), B = K^T (K
        // read column-major), one 16 x 16 score tile per key tile.
        #[unroll]
        for j in 0..row_tiles {
            let scores = cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                TILE,
                TILE,
                TILE,
                cmma::MatrixLayout::Undefined,
                0.0f32,
            );
            #[unroll]
            for kk in 0..key_tiles {
                let a = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::A,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::RowMajor,
                    &q_s[strip * key_pad + kk * TILE..qk_len],
                    key_pad as u32,
                );
                let b = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::ColMajor,
                    &k_s[j * TILE * key_pad + kk * TILE..qk_len],
                    key_pad as u32,
                );
                cmma::execute(&a, &b, &scores, &scores);
            }
            cmma::store(
                &mut s_f[strip * sub_block + j * TILE..s_len],
                &scores,
                sub_block as u32,
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
                w = scale * f32::exp(neg_slope * f32::cast_from((tq - tk) as u32)) * s_f[r * sub_block + c];
            }
            s_h[r * sub_block + c] = F::cast_from(w);
        }
        sync_plane();

        // 4. The strip times V into the plane's output accumulators.
        #[unroll]
        for jt in 0..value_tiles {
            #[unroll]
            for kk in 0..row_tiles {
                let a = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::A,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::RowMajor,
                    &s_h[strip * sub_block + kk * TILE..s_len],
                    sub_block as u32,
                );
                let b = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::B,
                    TILE,
                    TILE,
                    TILE,
                    cmma::MatrixLayout::RowMajor,
                    &v_s[kk * TILE * value_tile + jt * TILE..v_len],
                    value_tile as u32,
                );
                let o = acc.index(jt);
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
        let state_base = (global_block * heads as usize + head) * key_dim * value_dim;
        sync_cube();
        for idx in range_stepped(unit, qk_len, units) {
            let offset = q_start + idx / key_pad - block_start;
            let decay = scale * f32::exp(neg_slope * f32::cast_from((offset + 1) as u32));
            q_s[idx] = F::cast_from(f32::cast_from(q_s[idx]) * decay);
        }
        for c0 in range_stepped(0, key_pad, sub_block) {
            sync_cube();
            #[unroll]
            for b in 0..v_batches {
                let mut regs = Array::<f32>::new(BATCH);
                #[unroll]
                for x in 0..BATCH {
                    let idx = (b * BATCH + x) * units + unit;
                    let i = c0 + idx / value_tile;
                    let col = e0 + idx % value_tile;
                    let mut val = 0.0f32;
                    if idx < v_len && i < key_dim && col < value_dim {
                        val = block_states[state_base + i * value_dim + col];
                    }
                    regs[x] = val;
                }
                #[unroll]
                for x in 0..BATCH {
                    let idx = (b * BATCH + x) * units + unit;
                    if idx < v_len {
                        v_s[idx] = F::cast_from(regs[x]);
                    }
                }
            }
            sync_cube();
            #[unroll]
            for jt in 0..value_tiles {
                #[unroll]
                for kk in 0..row_tiles {
                    // The last chunk of a `d` that is not a multiple of sub_block is short.
                    if c0 + kk * TILE < key_pad {
                        let a = cmma::Matrix::<F>::from_slice(
                            cmma::MatrixIdent::A,
                            TILE,
                            TILE,
                            TILE,
                            cmma::MatrixLayout::RowMajor,
                            &q_s[strip * key_pad + c0 + kk * TILE..qk_len],
                            key_pad as u32,
                        );
                        let b = cmma::Matrix::<F>::from_slice(
                            cmma::MatrixIdent::B,
                            TILE,
                            TILE,
                            TILE,
                            cmma::MatrixLayout::RowMajor,
                            &v_s[kk * TILE * value_tile + jt * TILE..v_len],
                            value_tile as u32,
                        );
                        let o = acc.index(jt);
                        cmma::execute(&a, &b, o, o);
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
            &mut s_f[strip * sub_block..s_len],
            acc.index(jt),
            sub_block as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        for idx in range_stepped(lane, TILE * TILE, lanes) {
            let r = idx / TILE;
            let tq = q_start + strip + r;
            let col = e0 + jt * TILE + idx % TILE;
            if tq < n && col < value_dim {
                out[token_row(row0, tq, n, step, reversed) * value_dim + col] =
                    F::cast_from(s_f[(strip + r) * sub_block + idx % TILE]);
            }
        }
    }
}
