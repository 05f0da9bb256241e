//! The step-by-step recurrence: the definition every other computation must match.

use crate::Dims;

/// Output and final state of a prefill.
#[derive(Clone, Debug, PartialEq)]
pub struct Prefill {
    /// `[b, h, n, e]`.
    pub out: Vec<f64>,
    /// `[b, h, d, e]`: the state after the last token.
    pub state: Vec<f64>,
}

/// Runs `kv_t = exp(-s_h) kv_{t-1} + k_t^T v_t`, `o_t = q_t kv_t` token by token.
///
/// `slopes` has one entry per head; `initial` is `[b, h, d, e]` or `None` for zeros.
pub fn recurrence(
    dims: Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
) -> Prefill {
    let Dims {
        batch,
        heads,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = dims;
    check_lengths(dims, q, k, v, slopes, initial);
    let mut out = vec![0.0; dims.v_len()];
    let mut state = starting_state(dims, initial);
    for bh in 0..batch * heads {
        let decay = (-slopes[bh % heads]).exp();
        let kv = &mut state[bh * d * e..(bh + 1) * d * e];
        for t in 0..n {
            let qt = &q[(bh * n + t) * d..][..d];
            let kt = &k[(bh * n + t) * d..][..d];
            let vt = &v[(bh * n + t) * e..][..e];
            for i in 0..d {
                for j in 0..e {
                    kv[i * e + j] = decay * kv[i * e + j] + kt[i] * vt[j];
                }
            }
            let ot = &mut out[(bh * n + t) * e..][..e];
            for (j, o) in ot.iter_mut().enumerate() {
                *o = (0..d).map(|i| qt[i] * kv[i * e + j]).sum();
            }
        }
    }
    Prefill { out, state }
}

pub(crate) fn check_lengths(
    dims: Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: Option<&[f64]>,
) {
    assert_eq!(q.len(), dims.qk_len(), "q length");
    assert_eq!(k.len(), dims.qk_len(), "k length");
    assert_eq!(v.len(), dims.v_len(), "v length");
    assert_eq!(slopes.len(), dims.heads, "one slope per head");
    if let Some(s) = initial {
        assert_eq!(s.len(), dims.state_len(), "initial state length");
    }
}

/// The state before the first token: a copy of `initial`, or zeros.
pub(crate) fn starting_state(dims: Dims, initial: Option<&[f64]>) -> Vec<f64> {
    match initial {
        Some(s) => s.to_vec(),
        None => vec![0.0; dims.state_len()],
    }
}
