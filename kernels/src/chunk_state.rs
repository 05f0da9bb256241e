//! The state pass of the chunk-recurrent routine: kv-parallel and kv-reduce
//! in one walk, so that the per-block states cross HBM once.
//!
//! The five-kernel design writes each block's `K^T V` (kv-parallel), reads and
//! rewrites it as the state entering the block (kv-reduce), and reads it again
//! in diag or non-diag: four trips of an f32 `[blocks, h, d, e]` buffer
//! (SPEED_NOTES.md, "The two numbers"). Here one cube walks one sequence's
//! blocks in order for one tile of the state, with the running state in shared
//! memory, and writes each block's incoming state once:
//!
//! ```text
//! state = initial (or zeros)
//! for each block [start, end) of the sequence:
//!     block_states[block] = state
//!     state = exp(-s (end - start)) state + sum_j exp(-s (end - 1 - j)) k_j^T v_j
//! states[final slot] = state
//! ```
//!
//! which is what kv-parallel followed by kv-reduce leave behind, bit for bit
//! up to the order of the f32 sums, and stored as `S`: f32, or the input dtype
//! where the one reader rounds them to it anyway (bf16 diag with non-diag
//! fused), which halves their bytes at no cost in accuracy. The running state
//! stays f32. The initial and final states are handled as
//! [`crate::kv_reduce`] handles them (slots per sequence, the backward pass's
//! transposed, scaled, advanced and retreated variants), through the same
//! [`crate::kv_reduce::initial_state`](fn@crate::kv_reduce::initial_state).
//!
//! The block is walked `stage` tokens at a time (a divisor of `block`). The next
//! stage's K and V are loaded into registers ([`crate::staging::load_share`](fn@crate::staging::load_share))
//! before the current one is multiplied, so their global loads overlap the
//! products; K is decayed to its block's end on the way into shared memory.
//! The product `state += K_stage^T V_stage` has two variants, chosen at compile
//! time, with the same walk, staging and state handling around them:
//! - `tensor_cores`: plane `p` owns rows `16p .. 16p + 16` of the state tile,
//!   loads them from shared memory into `value_tile / 16` f32 accumulators,
//!   multiplies on tensor cores (16-bit operands, `cmma`) and stores them back;
//! - portable (every runtime; what CI runs on lavapipe): each unit owns
//!   vectors of the tile and accumulates them in f32 on CUDA cores.
//!
//! A cube walks a run of blocks: `work[3z .. 3z + 3]` is `(sequence, first
//! block, blocks)`. Without `segmented`, each run is a whole sequence, read
//! from and written to the per-sequence slots as above. With `segmented`
//! (few, long sequences: one walk per sequence would leave most SMs idle),
//! each run is a segment of a sequence, and the host runs three launches:
//! kv-parallel with a segment as its block (each segment's decayed `K^T V`),
//! kv-reduce over segments (each segment's incoming state, and the final
//! states, with every variant above), then this kernel, which starts walk `z`
//! from slot `z` of `initial` (that incoming state, as is) and writes no final
//! state. The segments are walked in parallel; the scan between them is short.
//!
//! Geometry: cube x runs over the `ceil(d / key_tile) * ceil(e / value_tile)`
//! tiles of the state, y over the `h` heads, z over the runs. `units` units
//! per cube (`key_tile / 16` planes of `plane_size` with tensor cores). Shared
//! memory, bytes:
//! `elem * stage * (key_tile + value_tile + 16) + 4 * key_tile * (value_tile + 4)`
//! (`elem` the bytes of a staged element, both parts of a split)
//! (rows padded by 16 bytes, see [`crate::staging`]). k, v and every state
//! travel as vectors of `N` scalars (the host picks `N` dividing `d` and `e`;
//! `key_tile` and `value_tile` are multiples of it).
//!
//! K and V are staged as `M`: the input dtype, or for f32 inputs bf16 on
//! tensor cores (rounded, or with `split` as high and low parts, three
//! products: [`crate::staging`]'s split operands, which double the staged
//! tiles). The portable variant runs the split too (with `M` = f32 parts on
//! the bf16 grid), so that CI checks its staging and products on lavapipe.

use cubecl::prelude::*;

use crate::kv_reduce::{final_factor, initial_factor, initial_state};
use crate::layout::first_row;
use crate::staging::{F32_ROW_PAD, ROW_PAD, TILE, load_share, share_len, split_product, store_share};

/// Alignment of the shared tiles, bytes (wmma loads need 32).
const ALIGN: usize = 128;

/// Launched with the geometry in the module doc. `initial` is read only when
/// `initial_in_states` is false and some sequence has an initial slot (any
/// buffer may be bound otherwise); `reversed` reads every sequence back to
/// front (see [`crate::layout`]).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_state<F: Float, M: Float, S: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    slopes: &[f32],
    seq_starts: &[u32],
    block_offsets: &[u32],
    initial_slots: &[i32],
    final_slots: &[i32],
    work: &[u32],
    initial: &[Vector<f32, N>],
    block_states: &mut [Vector<S, N>],
    states: &mut [Vector<f32, N>],
    heads: u32,
    head_stride: u32,
    token_stride: u32,
    initial_scale: f32,
    final_scale: f32,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] block: usize,
    #[comptime] stage: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] plane_size: usize,
    #[comptime] tensor_cores: bool,
    #[comptime] initial_in_states: bool,
    #[comptime] transpose_initial: bool,
    #[comptime] advance_initial: bool,
    #[comptime] retreat_final: bool,
    #[comptime] reversed: bool,
    #[comptime] segmented: bool,
    #[comptime] split: bool,
) {
    let lanes = N::value();
    let k_stride = comptime!(key_tile + ROW_PAD);
    let v_stride = comptime!(value_tile + ROW_PAD);
    let s_stride = comptime!(value_tile + F32_ROW_PAD);
    let k_len = comptime!(stage * k_stride / lanes);
    let v_len = comptime!(stage * v_stride / lanes);
    let s_len = comptime!(key_tile * s_stride);
    let k_share = comptime!(share_len(stage, key_tile, lanes, units));
    let v_share = comptime!(share_len(stage, value_tile, lanes, units));
    let tiles_along_e = comptime!(value_dim.div_ceil(value_tile));
    // Where the staged tiles' low parts start (0: no split).
    let parts = comptime!(if split { 2 } else { 1 });
    let k_lo = comptime!(if split { k_len } else { 0 });
    let v_lo = comptime!(if split { v_len } else { 0 });

    let h = heads as usize;
    let head = CUBE_POS_Y as usize;
    let walk = CUBE_POS_Z as usize;
    let seq = work[3 * walk] as usize;
    let walk_first_block = work[3 * walk + 1] as usize;
    let walk_blocks = work[3 * walk + 2] as usize;
    let seq_start = seq_starts[seq] as usize;
    let n = seq_starts[seq + 1] as usize - seq_start;
    let first_block = block_offsets[seq] as usize;
    let row0 = first_row(seq_start, head, h, head_stride as usize);
    let step = token_stride as usize;
    let neg_slope = -slopes[head];
    let d0 = (CUBE_POS_X as usize / tiles_along_e) * key_tile;
    let e0 = (CUBE_POS_X as usize % tiles_along_e) * value_tile;

    let mut k_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * k_len), ALIGN);
    let mut v_s = Shared::<[Vector<M, N>]>::new_aligned_slice(comptime!(parts * v_len), ALIGN);
    let mut state_s = Shared::<[f32]>::new_aligned_slice(s_len, ALIGN);

    // The initial state, or zeros.
    // A segment's incoming state is slot `walk` of `initial` (see the module doc).
    let mut initial_slot = initial_slots[seq];
    if comptime!(segmented) {
        initial_slot = walk as i32;
    }
    let factor = initial_factor(initial_scale, neg_slope, advance_initial);
    let row_vectors = comptime!(value_tile / lanes);
    let value_vectors = comptime!(value_dim / lanes);
    let state_len = comptime!(key_dim * value_dim / lanes);
    let tile_vectors = comptime!(key_tile * row_vectors);
    let unit = UNIT_POS as usize;
    // Each unit owns the same vectors of the state tile in every loop over it
    // below (vector `cv` of tile row `r`, at `at` in the flat state).
    for idx in range_stepped(unit, tile_vectors, units) {
        let r = idx / row_vectors;
        let cv = idx % row_vectors;
        let row = d0 + r;
        let col = e0 / lanes + cv;
        let mut value = Vector::<f32, N>::new(0.0f32);
        if initial_slot >= 0 && row < key_dim && col < value_vectors {
            value = initial_state::<N>(
                initial,
                &states[0..],
                initial_slot as usize,
                head,
                h,
                row * value_vectors + col,
                factor,
                key_dim,
                value_dim,
                initial_in_states,
                transpose_initial,
            );
        }
        write_shared::<N>(&mut state_s, r * s_stride + cv * lanes, value);
    }

    // Tokens `first_token .. end_token` of the sequence.
    let first_token = walk_first_block * block;
    let end_token = min(first_token + walk_blocks * block, n);
    let stages = (end_token - first_token).div_ceil(stage);
    let mut k_regs = Array::<Vector<F, N>>::new(k_share);
    let mut v_regs = Array::<Vector<F, N>>::new(v_share);
    if stages > 0 {
        load_stage::<F, N>(
            k,
            v,
            &mut k_regs,
            &mut v_regs,
            row0,
            n,
            step,
            first_token,
            end_token,
            d0,
            e0,
            key_dim,
            value_dim,
            stage,
            key_tile,
            value_tile,
            units,
            reversed,
        );
    }
    for g in 0..stages {
        let s0 = first_token + g * stage;
        let blk = s0 / block;
        let blk_start = blk * block;
        let blk_end = min(blk_start + block, n);
        // The previous stage's products are done with k_s, v_s and state_s.
        sync_cube();
        store_share::<F, M, N>(
            &k_regs, &mut k_s, s0, blk_end, neg_slope, stage, key_tile, k_stride, units, true, k_lo,
        );
        store_share::<F, M, N>(
            &v_regs, &mut v_s, s0, blk_end, neg_slope, stage, value_tile, v_stride, units, false, v_lo,
        );
        if s0 == blk_start {
            // The state entering the block goes out once, then decays over it.
            let decay = f32::exp(neg_slope * f32::cast_from((blk_end - blk_start) as u32));
            let slot = ((first_block + blk) * h + head) * state_len;
            for idx in range_stepped(unit, tile_vectors, units) {
                let r = idx / row_vectors;
                let cv = idx % row_vectors;
                let row = d0 + r;
                let col = e0 / lanes + cv;
                let value = read_shared::<N>(&state_s, r * s_stride + cv * lanes);
                if row < key_dim && col < value_vectors {
                    block_states[slot + row * value_vectors + col] = Vector::cast_from(value);
                }
                write_shared::<N>(
                    &mut state_s,
                    r * s_stride + cv * lanes,
                    value * Vector::new(decay),
                );
            }
        }
        if g + 1 < stages {
            // The next stage's loads fly while this one is multiplied.
            load_stage::<F, N>(
                k,
                v,
                &mut k_regs,
                &mut v_regs,
                row0,
                n,
                step,
                s0 + stage,
                end_token,
                d0,
                e0,
                key_dim,
                value_dim,
                stage,
                key_tile,
                value_tile,
                units,
                reversed,
            );
        }
        sync_cube();
        if comptime!(tensor_cores) {
            product_on_tensor_cores::<M, N>(
                &k_s,
                &v_s,
                &mut state_s,
                stage,
                key_tile,
                value_tile,
                k_stride,
                v_stride,
                s_stride,
                plane_size,
                k_lo,
                v_lo,
            );
        } else {
            product_portable::<M, N>(
                &k_s,
                &v_s,
                &mut state_s,
                stage,
                key_tile,
                value_tile,
                k_stride,
                v_stride,
                s_stride,
                units,
                k_lo,
                v_lo,
            );
        }
    }

    sync_cube();
    let mut final_slot = final_slots[seq];
    if comptime!(segmented) {
        final_slot = -1i32;
    }
    if final_slot >= 0 {
        let factor = final_factor(final_scale, neg_slope, retreat_final);
        let base = (final_slot as usize * h + head) * state_len;
        for idx in range_stepped(unit, tile_vectors, units) {
            let r = idx / row_vectors;
            let cv = idx % row_vectors;
            let row = d0 + r;
            let col = e0 / lanes + cv;
            if row < key_dim && col < value_vectors {
                states[base + row * value_vectors + col] =
                    read_shared::<N>(&state_s, r * s_stride + cv * lanes) * Vector::new(factor);
            }
        }
    }
}

/// Loads this unit's share of the stage from token `first` on (K's columns
/// from `d0`, V's from `e0`) into registers; the loads fly until stored.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_stage<F: Float, N: Size>(
    k: &[Vector<F, N>],
    v: &[Vector<F, N>],
    k_regs: &mut Array<Vector<F, N>>,
    v_regs: &mut Array<Vector<F, N>>,
    row0: usize,
    n: usize,
    step: usize,
    first: usize,
    end: usize,
    d0: usize,
    e0: usize,
    #[comptime] key_dim: usize,
    #[comptime] value_dim: usize,
    #[comptime] stage: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] units: usize,
    #[comptime] reversed: bool,
) {
    load_share::<F, N>(
        k, k_regs, row0, n, step, first, end, d0, stage, key_tile, key_dim, units, reversed,
    );
    load_share::<F, N>(
        v, v_regs, row0, n, step, first, end, e0, stage, value_tile, value_dim, units, reversed,
    );
}

/// `N` scalars of a shared f32 tile from `at` on, as a vector.
#[cube]
fn read_shared<N: Size>(tile: &Shared<[f32]>, at: usize) -> Vector<f32, N> {
    let lanes = N::value();
    let mut value = Vector::<f32, N>::empty();
    #[unroll]
    for x in 0..lanes {
        value.insert(x, tile[at + x]);
    }
    value
}

/// A vector into `N` scalars of a shared f32 tile from `at` on.
#[cube]
fn write_shared<N: Size>(tile: &mut Shared<[f32]>, at: usize, value: Vector<f32, N>) {
    let lanes = N::value();
    #[unroll]
    for x in 0..lanes {
        tile[at + x] = value.extract(x);
    }
}

/// `state += K^T V` on tensor cores: plane `p` owns rows `16p .. 16p + 16`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_on_tensor_cores<F: Float, N: Size>(
    k_s: &Shared<[Vector<F, N>]>,
    v_s: &Shared<[Vector<F, N>]>,
    state_s: &mut Shared<[f32]>,
    #[comptime] stage: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] k_stride: usize,
    #[comptime] v_stride: usize,
    #[comptime] s_stride: usize,
    #[comptime] plane_size: usize,
    #[comptime] k_lo: usize,
    #[comptime] v_lo: usize,
) {
    let lanes = N::value();
    let s_len = comptime!(key_tile * s_stride);
    let value_tiles = comptime!(value_tile / TILE);
    let stage_tiles = comptime!(stage / TILE);
    let plane = UNIT_POS as usize / plane_size;
    let rows = plane * TILE * s_stride;

    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for jt in 0..value_tiles {
        // SAFETY: loaded in full on the next line.
        let mut matrix = unsafe {
            cmma::Matrix::<f32>::uninitialized(
                cmma::MatrixIdent::Accumulator,
                TILE,
                TILE,
                TILE,
                cmma::MatrixLayout::Undefined,
            )
        };
        cmma::load_with_layout(
            &mut matrix,
            &state_s[rows + jt * TILE..s_len],
            s_stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
        acc.push(matrix);
    }
    #[unroll]
    for kk in 0..stage_tiles {
        #[unroll]
        for jt in 0..value_tiles {
            // K_stage is stored token-major: read column-major it is K^T.
            split_product::<F, N>(
                k_s,
                (kk * TILE * k_stride + plane * TILE) / lanes,
                cmma::MatrixLayout::ColMajor,
                k_stride,
                k_lo,
                v_s,
                (kk * TILE * v_stride + jt * TILE) / lanes,
                cmma::MatrixLayout::RowMajor,
                v_stride,
                v_lo,
                acc.index(jt),
                comptime!(k_lo > 0),
            );
        }
    }
    #[unroll]
    for jt in 0..value_tiles {
        cmma::store(
            &mut state_s[rows + jt * TILE..s_len],
            acc.index(jt),
            s_stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// `state += K^T V` on CUDA cores: each unit its own vectors of the tile.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_portable<F: Float, N: Size>(
    k_s: &Shared<[Vector<F, N>]>,
    v_s: &Shared<[Vector<F, N>]>,
    state_s: &mut Shared<[f32]>,
    #[comptime] stage: usize,
    #[comptime] key_tile: usize,
    #[comptime] value_tile: usize,
    #[comptime] k_stride: usize,
    #[comptime] v_stride: usize,
    #[comptime] s_stride: usize,
    #[comptime] units: usize,
    #[comptime] k_lo: usize,
    #[comptime] v_lo: usize,
) {
    let lanes = N::value();
    let row_vectors = comptime!(value_tile / lanes);
    let k_stride_v = comptime!(k_stride / lanes);
    let v_stride_v = comptime!(v_stride / lanes);
    for idx in range_stepped(UNIT_POS as usize, comptime!(key_tile * row_vectors), units) {
        let r = idx / row_vectors;
        let cv = idx % row_vectors;
        let at = r * s_stride + cv * lanes;
        let mut acc = Vector::<f32, N>::empty();
        #[unroll]
        for x in 0..lanes {
            acc.insert(x, state_s[at + x]);
        }
        let r_v = r / lanes;
        let r_lane = r % lanes;
        for t in 0..stage {
            let key = f32::cast_from(k_s[t * k_stride_v + r_v].extract_dynamic(r_lane));
            let value = Vector::<f32, N>::cast_from(v_s[t * v_stride_v + cv]);
            if comptime!(k_lo > 0) {
                // The split's three products, as on tensor cores.
                let key_lo = f32::cast_from(k_s[k_lo + t * k_stride_v + r_v].extract_dynamic(r_lane));
                let value_lo = Vector::<f32, N>::cast_from(v_s[v_lo + t * v_stride_v + cv]);
                acc += value * Vector::new(key_lo) + value_lo * Vector::new(key);
            }
            acc += value * Vector::new(key);
        }
        write_shared::<N>(state_s, at, acc);
    }
}
