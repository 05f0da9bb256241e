//! The backward pass of the recurrence, derived by hand and checked against
//! finite differences of [`crate::recurrence`].
//!
//! Per head with decay `a = exp(-s)` and output scale `c` the forward pass is
//! `S_t = a S_{t-1} + k_t^T v_t`, `o_t = c q_t S_t` for `t = 1..n`, from the
//! initial state `S_0` (zeros if none). Given upstream gradients `do_t` for every
//! output and `dF` for the final state `S_n`, the loss is
//! `L = sum_t do_t . o_t + <dF, S_n>`. Writing `G_t = dL/dS_t` for the *total*
//! gradient reaching `S_t` (directly through `o_t`, and through `S_{t+1}` by the
//! decay):
//!
//! - `G_n = dF + c q_n^T do_n` and `G_t = a G_{t+1} + c q_t^T do_t` (reverse sweep);
//! - `dq_t = c do_t S_t^T`: needs the forward states, so a forward sweep first;
//! - `dk_t = v_t G_t^T` and `dv_t = k_t G_t`, since `k_t` and `v_t` enter only
//!   through the outer product added to `S_t`;
//! - `dS_0 = a G_1` (and `dS_0 = dF` when `n = 0`, as then `S_n = S_0`).
//!
//! The slopes are not differentiated: they are fixed per layer (MiniMax's
//! ladder, see [`crate::slopes`]), not trained. The cost is `O(n d e)` per head,
//! with `O(d e)` extra memory: no state is stored per token, the forward sweep is
//! simply run before the reverse one.

use crate::Dims;
use crate::recurrence::{check_lengths, starting_state};

/// The gradients of the loss with respect to every differentiable input of
/// [`crate::recurrence`].
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// `[b, h, n, d]`: `dL/dq`.
    pub dq: Vec<f64>,
    /// `[b, h, n, d]`: `dL/dk`.
    pub dk: Vec<f64>,
    /// `[b, h, n, e]`: `dL/dv`.
    pub dv: Vec<f64>,
    /// `[b, h, d, e]`: `dL/dS_0`. Always returned: the gradient at the zero
    /// state is well-defined when the forward pass started from zeros.
    pub d_initial_state: Vec<f64>,
}

/// The backward pass of [`crate::recurrence`] with its outputs multiplied by
/// `scale` (`o_t = scale * q_t kv_t`, `None` for 1, as the kernels' config does).
///
/// The first six arguments are those of [`crate::recurrence`]; `d_out` is the
/// upstream gradient of the output, `[b, h, n, e]`, and `d_final_state` that of
/// the final state, `[b, h, d, e]` or `None` for zeros (the state not used
/// downstream). Slopes get no gradient: they are fixed per layer.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dims: Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
    scale: Option<f64>,
    d_out: &[f64],
    d_final_state: Option<&[f64]>,
) -> Gradients {
    let Dims {
        batch,
        heads,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = dims;
    check_lengths(dims, q, k, v, slopes, initial);
    assert_eq!(d_out.len(), dims.v_len(), "d_out length");
    if let Some(g) = d_final_state {
        assert_eq!(g.len(), dims.state_len(), "d_final_state length");
    }
    let c = scale.unwrap_or(1.0);
    let mut dq = vec![0.0; dims.qk_len()];
    let mut dk = vec![0.0; dims.qk_len()];
    let mut dv = vec![0.0; dims.v_len()];
    // The forward state of every head, advanced token by token below.
    let mut state = starting_state(dims, initial);
    // Holds, per head, the gradient flowing into the current state from later
    // tokens: dF before the reverse sweep, `a G_1 = dS_0` after it.
    let mut carry = starting_state(dims, d_final_state);
    for bh in 0..batch * heads {
        let decay = (-slopes[bh % heads]).exp();
        let row = |t: usize, w: usize| (bh * n + t) * w;

        // Forward sweep: dq_t = c do_t S_t^T, (dq_t)_i = c sum_j do_tj S_t[i, j].
        let kv = &mut state[bh * d * e..(bh + 1) * d * e];
        for t in 0..n {
            let kt = &k[row(t, d)..][..d];
            let vt = &v[row(t, e)..][..e];
            for i in 0..d {
                for j in 0..e {
                    kv[i * e + j] = decay * kv[i * e + j] + kt[i] * vt[j];
                }
            }
            let dot = &d_out[row(t, e)..][..e];
            for (i, g) in dq[row(t, d)..][..d].iter_mut().enumerate() {
                *g = c * (0..e).map(|j| dot[j] * kv[i * e + j]).sum::<f64>();
            }
        }

        // Reverse sweep: G_t = carry + c q_t^T do_t, then carry = a G_t for the
        // token before. Reusing `carry` as G_t keeps the memory at one d x e.
        let g = &mut carry[bh * d * e..(bh + 1) * d * e];
        for t in (0..n).rev() {
            let qt = &q[row(t, d)..][..d];
            let kt = &k[row(t, d)..][..d];
            let vt = &v[row(t, e)..][..e];
            let dot = &d_out[row(t, e)..][..e];
            for i in 0..d {
                for j in 0..e {
                    g[i * e + j] += c * qt[i] * dot[j];
                }
            }
            // g now holds G_t. (dk_t)_i = sum_j G_t[i, j] v_tj.
            for (i, out) in dk[row(t, d)..][..d].iter_mut().enumerate() {
                *out = (0..e).map(|j| g[i * e + j] * vt[j]).sum();
            }
            // (dv_t)_j = sum_i k_ti G_t[i, j].
            for (j, out) in dv[row(t, e)..][..e].iter_mut().enumerate() {
                *out = (0..d).map(|i| kt[i] * g[i * e + j]).sum();
            }
            // S_t = a S_{t-1} + ...: the gradient reaching S_{t-1} through S_t.
            for x in g.iter_mut() {
                *x *= decay;
            }
        }
    }
    Gradients {
        dq,
        dk,
        dv,
        d_initial_state: carry,
    }
}
