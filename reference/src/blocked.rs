//! The blocked algorithm of the prefill kernels, in plain Rust.
//!
//! It mirrors the five-kernel split exactly (diag, kv-parallel, kv-reduce,
//! non-diag) so that the algorithm is proven equal to [`crate::recurrence`]
//! before any GPU is involved. For the query at offset `c` inside its block the
//! incoming state is decayed by `exp(-s (c + 1))`: one step more than vLLM's
//! Triton `_fwd_none_diag_kernel` uses, which is the step the recurrence takes.

use crate::recurrence::{check_lengths, starting_state};
use crate::{Dims, Prefill};

/// Computes the prefill with blocks of `block` tokens (the last may be shorter).
pub fn blocked(
    dims: Dims,
    block: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
) -> Prefill {
    blocked_with_query_decay(dims, block, q, k, v, slopes, initial, |c| c + 1)
}

/// [`blocked`] with vLLM's Triton off-by-one: the incoming state decayed by
/// `exp(-s c)` instead of `exp(-s (c + 1))`. Wrong on purpose: tests use it to
/// prove that their tolerance would catch that bug.
pub fn blocked_vllm_off_by_one(
    dims: Dims,
    block: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
) -> Prefill {
    blocked_with_query_decay(dims, block, q, k, v, slopes, initial, |c| c)
}

/// The blocked algorithm with the number of decay steps applied to the
/// incoming state for the query at offset `c` of its block.
#[allow(clippy::too_many_arguments)]
fn blocked_with_query_decay(
    dims: Dims,
    block: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
    query_decay_steps: impl Fn(usize) -> usize,
) -> Prefill {
    assert!(block > 0, "block must be positive");
    check_lengths(dims, q, k, v, slopes, initial);
    let Dims {
        batch,
        heads,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = dims;
    let num_blocks = n.div_ceil(block);
    let mut out = vec![0.0; dims.v_len()];
    let mut state = starting_state(dims, initial);
    for bh in 0..batch * heads {
        let s = slopes[bh % heads];
        let q = &q[bh * n * d..][..n * d];
        let k = &k[bh * n * d..][..n * d];
        let v = &v[bh * n * e..][..n * e];
        let out = &mut out[bh * n * e..][..n * e];

        // kv-parallel: each block's decayed K^T V.
        let block_kv: Vec<Vec<f64>> = (0..num_blocks)
            .map(|blk| {
                let (start, len) = (blk * block, block.min(n - blk * block));
                let mut kv = vec![0.0; d * e];
                for c in 0..len {
                    let w = (-s * (len - 1 - c) as f64).exp();
                    for i in 0..d {
                        for j in 0..e {
                            kv[i * e + j] += w * k[(start + c) * d + i] * v[(start + c) * e + j];
                        }
                    }
                }
                kv
            })
            .collect();

        // kv-reduce: the state entering each block, and the final state.
        let kv = &mut state[bh * d * e..][..d * e];
        let mut incoming = Vec::with_capacity(num_blocks);
        for (blk, contribution) in block_kv.iter().enumerate() {
            incoming.push(kv.to_vec());
            let len = block.min(n - blk * block);
            let block_decay = (-s * len as f64).exp();
            for (x, c) in kv.iter_mut().zip(contribution) {
                *x = block_decay * *x + c;
            }
        }

        for (blk, state_in) in incoming.iter().enumerate() {
            let (start, len) = (blk * block, block.min(n - blk * block));
            for c in 0..len {
                let t = start + c;
                for j in 0..e {
                    // diag: causal attention inside the block.
                    let mut acc = 0.0;
                    for c2 in 0..=c {
                        let score: f64 = (0..d).map(|i| q[t * d + i] * k[(start + c2) * d + i]).sum();
                        acc += (-s * (c - c2) as f64).exp() * score * v[(start + c2) * e + j];
                    }
                    // non-diag: the query against the incoming state.
                    let inter: f64 = (0..d).map(|i| q[t * d + i] * state_in[i * e + j]).sum();
                    out[t * e + j] = acc + (-s * query_decay_steps(c) as f64).exp() * inter;
                }
            }
        }
    }
    Prefill { out, state }
}
