//! The packed (varlen) reference: many sequences against a slot-indexed cache.
//!
//! Each sequence is an independent recurrence over its own tokens, starting
//! from its slot's stored state or from zeros, writing its final state (and
//! any snapshots after chosen tokens) back to the cache. This is what a
//! serving engine's step means, judged token by token in f64.

use crate::PADDING_SLOT;

/// One packed call: q, k `[T, h, d]`, v `[T, h, e]` (f64, row-major).
#[derive(Clone, Copy, Debug)]
pub struct VarlenProblem<'a> {
    /// `h`.
    pub heads: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// Queries `[T, h, d]`.
    pub q: &'a [f64],
    /// Keys `[T, h, d]`.
    pub k: &'a [f64],
    /// Values `[T, h, e]`.
    pub v: &'a [f64],
    /// One slope per head.
    pub slopes: &'a [f64],
    /// Multiplies the output.
    pub scale: f64,
    /// `N + 1` offsets of the sequences' first tokens.
    pub cu_seqlens: &'a [usize],
    /// Per sequence, its cache slot or [`PADDING_SLOT`] (no state read or written).
    pub slots: &'a [i64],
    /// Per sequence, whether it starts from its slot's state (else zeros).
    pub has_initial_state: &'a [bool],
    /// `K` and `[N, K]` slots receiving the state after each of the last `K`
    /// tokens of each sequence (-1: none).
    pub snapshots: Option<(usize, &'a [i64])>,
}

/// Runs `problem` against `cache` `[slots, h, d, e]`, updating it, and returns
/// the output `[T, h, e]`.
pub fn varlen(problem: &VarlenProblem, cache: &mut [f64]) -> Vec<f64> {
    let VarlenProblem {
        heads: h,
        key_dim: d,
        value_dim: e,
        ..
    } = *problem;
    let total = problem.cu_seqlens[problem.cu_seqlens.len() - 1];
    let mut out = vec![0.0; total * h * e];
    let state_len = d * e;
    for (seq, window) in problem.cu_seqlens.windows(2).enumerate() {
        let (start, end) = (window[0], window[1]);
        let slot = problem.slots[seq];
        for head in 0..h {
            let decay = (-problem.slopes[head]).exp();
            let mut state = vec![0.0; state_len];
            if slot != PADDING_SLOT && problem.has_initial_state[seq] {
                let at = (slot as usize * h + head) * state_len;
                state.copy_from_slice(&cache[at..at + state_len]);
            }
            for t in start..end {
                let (krow, vrow) = ((t * h + head) * d, (t * h + head) * e);
                for i in 0..d {
                    for j in 0..e {
                        state[i * e + j] =
                            decay * state[i * e + j] + problem.k[krow + i] * problem.v[vrow + j];
                    }
                }
                for j in 0..e {
                    out[vrow + j] = problem.scale
                        * (0..d)
                            .map(|i| problem.q[krow + i] * state[i * e + j])
                            .sum::<f64>();
                }
                if let Some((count, snapshot_slots)) = problem.snapshots {
                    // Token t is the (end - t)-th from the end: snapshot K - (end - t).
                    if end - t <= count {
                        let target = snapshot_slots[seq * count + count - (end - t)];
                        if target != PADDING_SLOT {
                            let at = (target as usize * h + head) * state_len;
                            cache[at..at + state_len].copy_from_slice(&state);
                        }
                    }
                }
            }
            if slot != PADDING_SLOT {
                let at = (slot as usize * h + head) * state_len;
                cache[at..at + state_len].copy_from_slice(&state);
            }
        }
    }
    out
}
