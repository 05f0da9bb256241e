//! Pure-Rust f64 reference for lightning attention: the judge of every kernel.
//!
//! Per head with slope `s` the recurrence is
//! `kv_t = exp(-s) * kv_{t-1} + k_t^T v_t` and `o_t = q_t kv_t`, starting from an
//! initial `d x e` state (zeros if none). [`recurrence`] runs it token by token;
//! [`blocked`] computes the same thing the way the GPU kernels do (intra-block
//! causal part, per-block `K^T V`, a prefix over blocks, queries against the
//! incoming state), so that the algorithm itself is tested apart from any GPU;
//! [`decode`] is one token against a slot-indexed state cache; [`slopes`] is
//! MiniMax's ALiBi-style slope ladder; [`backward`] is the gradient of the
//! recurrence with respect to q, k, v and the initial state; [`varlen`] is a
//! packed batch of sequences of any lengths against a slot-indexed cache.
//!
//! Layouts are row-major: q, k `[b, h, n, d]`, v and out `[b, h, n, e]`, state
//! `[b, h, d, e]`. No GPU dependency.

#![warn(missing_docs)]

mod backward;
mod blocked;
mod decode;
mod dims;
pub mod random;
mod recurrence;
pub mod slopes;
#[cfg(test)]
mod tests;
mod varlen;

pub use backward::{Gradients, backward};
pub use blocked::{blocked, blocked_vllm_off_by_one};
pub use decode::{PADDING_SLOT, decode};
pub use dims::Dims;
pub use recurrence::{Prefill, recurrence};
pub use varlen::{VarlenProblem, varlen};

/// `||a - b|| / ||b||` (Euclidean norms), the measure every kernel is judged by.
///
/// A NaN anywhere in `a` gives NaN, which compares false against any bound, so
/// an unwritten (poisoned) element can never pass. A zero reference with a
/// zero candidate gives 0.
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "relative_error: length mismatch");
    let mut diff = 0.0;
    let mut norm = 0.0;
    for (x, y) in a.iter().zip(b) {
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (diff / norm).sqrt()
}
