//! The reference judged on its own: hand-worked cases, published slopes, and
//! the blocked algorithm against the step recurrence, the backward pass against
//! finite differences.

use proptest::prelude::*;

use crate::random::SeededRng;
use crate::slopes::{base_slopes, layer_factor, layer_slopes};
use crate::{
    Dims, VarlenProblem, backward, blocked, blocked_vllm_off_by_one, decode, recurrence, relative_error,
    varlen,
};

fn dims(batch: usize, heads: usize, seq_len: usize, key_dim: usize, value_dim: usize) -> Dims {
    Dims {
        batch,
        heads,
        seq_len,
        key_dim,
        value_dim,
    }
}

#[test]
fn scalar_recurrence_by_hand() {
    // decay 1/2, all ones: kv = 1, 1.5, 1.75, and o = kv.
    let d = dims(1, 1, 3, 1, 1);
    let ones = [1.0; 3];
    let r = recurrence(d, &ones, &ones, &ones, &[std::f64::consts::LN_2], None);
    assert_eq!(r.out, vec![1.0, 1.5, 1.75]);
    assert_eq!(r.state, vec![1.75]);
    // From state 2: 0.5 * 2 + 1 = 2 at every step.
    let r = recurrence(d, &ones, &ones, &ones, &[std::f64::consts::LN_2], Some(&[2.0]));
    assert_eq!(r.out, vec![2.0, 2.0, 2.0]);
}

#[test]
fn two_by_two_recurrence_by_hand() {
    // d = 2, e = 1, no decay (s = 0): kv accumulates k^T v exactly.
    let d = dims(1, 1, 2, 2, 1);
    let q = [1.0, 0.0, 0.0, 1.0];
    let k = [1.0, 2.0, 3.0, 4.0];
    let v = [10.0, 100.0];
    let r = recurrence(d, &q, &k, &v, &[0.0], None);
    // t=0: kv = [10, 20], o = q0 . kv = 10. t=1: kv = [310, 420], o = 420.
    assert_eq!(r.out, vec![10.0, 420.0]);
    assert_eq!(r.state, vec![310.0, 420.0]);
}

#[test]
fn slopes_for_eight_heads_are_powers_of_two() {
    let expected: Vec<f64> = (1..=8).map(|i| 0.5f64.powi(i)).collect();
    assert_eq!(base_slopes(8), expected);
}

#[test]
fn slopes_for_sixty_four_heads_match_published_values() {
    let s = base_slopes(64);
    assert_eq!(s.len(), 64);
    assert!((s[0] - 0.917_004_043_204_671_2).abs() < 1e-15);
    assert!((s[1] - 0.840_896_415_253_714_6).abs() < 1e-15);
    assert!((s[7] - 0.5).abs() < 1e-15);
    assert!((s[63] - 0.003_906_25).abs() < 1e-15);
}

#[test]
fn slopes_for_forty_eight_heads_interleave() {
    let s = base_slopes(48);
    assert_eq!(s.len(), 48);
    // The 32-head ladder first: 2^(-(h+1)/4).
    assert!((s[0] - 0.840_896_415_253_714_6).abs() < 1e-15);
    assert!((s[31] - 0.003_906_25).abs() < 1e-15);
    // Then every other slope of the 64-head ladder: 2^-0.125, 2^-0.375, ...
    assert!((s[32] - 0.917_004_043_204_671_2).abs() < 1e-15);
    assert!((s[33] - 0.771_105_412_703_970_4).abs() < 1e-15);
    assert!((s[47] - 2f64.powf(-0.125 * 31.0)).abs() < 1e-15);
}

#[test]
fn layer_factor_runs_from_one_to_almost_zero() {
    assert!((layer_factor(0, 80) - 1.00001).abs() < 1e-15);
    assert!((layer_factor(79, 80) - 1e-5).abs() < 1e-15);
    let s = layer_slopes(8, 1, 3);
    assert!((s[0] - 0.5 * (0.5 + 1e-5)).abs() < 1e-15);
}

#[test]
fn fla_slopes_are_a_linear_ladder_from_zero() {
    // fla/ops/lightning_attn: g_gamma = -(8 / H) (1 - layer / L) h.
    assert_eq!(
        crate::slopes::fla_slopes(8, 12, 24),
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    );
    assert_eq!(crate::slopes::fla_slopes(4, 0, 1), [0.0, 2.0, 4.0, 6.0]);
}

#[test]
fn no_decay_is_a_plain_running_sum() {
    // Slope 0: kv_t = kv_{t-1} + k_t^T v_t, so the last output is q_n (sum_j k_j^T v_j).
    let d = dims(1, 1, 3, 1, 1);
    let (q, k, v) = ([1.0, 2.0, 0.5], [1.0, -1.0, 2.0], [3.0, 4.0, 5.0]);
    let out = recurrence(d, &q, &k, &v, &[0.0], None).out;
    assert_eq!(out, [3.0, 2.0 * (3.0 - 4.0), 0.5 * (3.0 - 4.0 + 10.0)]);
}

#[test]
fn decode_step_is_one_step_of_the_recurrence() {
    let d = dims(1, 2, 3, 2, 3);
    let q: Vec<f64> = (0..12).map(|i| (i as f64 * 0.37).sin()).collect();
    let k: Vec<f64> = (0..12).map(|i| (i as f64 * 0.91).cos()).collect();
    let v: Vec<f64> = (0..18).map(|i| (i as f64 * 0.53).sin()).collect();
    let slopes = [0.3, 0.7];
    let full = recurrence(d, &q, &k, &v, &slopes, None);
    let prefix = recurrence(
        dims(1, 2, 2, 2, 3),
        &take(&q, 2, 3, 2),
        &take(&k, 2, 3, 2),
        &take(&v, 2, 3, 3),
        &slopes,
        None,
    );
    // Cache with two slots; the sequence lives in slot 1, slot 0 must not move.
    let mut cache = vec![7.0; 2 * 2 * 2 * 3];
    cache[12..].copy_from_slice(&prefix.state);
    let out = decode(
        2,
        2,
        3,
        &last(&q, 3, 2),
        &last(&k, 3, 2),
        &last(&v, 3, 3),
        &mut cache,
        &slopes,
        &[1],
    );
    assert!(relative_error(&out, &last(&full.out, 3, 3)) < 1e-14);
    assert!(relative_error(&cache[12..], &full.state) < 1e-14);
    assert!(cache[..12].iter().all(|&x| x == 7.0));
    let padded = decode(
        2,
        2,
        3,
        &last(&q, 3, 2),
        &last(&k, 3, 2),
        &last(&v, 3, 3),
        &mut cache,
        &slopes,
        &[-1],
    );
    assert!(padded.iter().all(|&x| x == 0.0));
}

/// The first `keep` tokens of each head of a `[1, h, n, w]` tensor.
fn take(x: &[f64], keep: usize, n: usize, w: usize) -> Vec<f64> {
    x.chunks(n * w)
        .flat_map(|head| head[..keep * w].to_vec())
        .collect()
}

/// The last token of each head of a `[1, h, n, w]` tensor.
fn last(x: &[f64], n: usize, w: usize) -> Vec<f64> {
    x.chunks(n * w)
        .flat_map(|head| head[(n - 1) * w..].to_vec())
        .collect()
}

fn values(len: usize, seed: u64) -> Vec<f64> {
    SeededRng::new(seed).values(len)
}

proptest! {
    #[test]
    fn blocked_equals_recurrence(
        block in 1usize..=9,
        seq_len in 1usize..=30,
        heads in 1usize..=2,
        key_dim in 1usize..=4,
        value_dim in 1usize..=4,
        with_state: bool,
        seed: u64,
    ) {
        let d = dims(1, heads, seq_len, key_dim, value_dim);
        let q = values(d.qk_len(), seed);
        let k = values(d.qk_len(), seed ^ 1);
        let v = values(d.v_len(), seed ^ 2);
        let slopes: Vec<f64> = values(heads, seed ^ 3).iter().map(|x| x.abs() * 0.92).collect();
        let init = with_state.then(|| values(d.state_len(), seed ^ 4));
        let exact = recurrence(d, &q, &k, &v, &slopes, init.as_deref());
        let tiled = blocked(d, block, &q, &k, &v, &slopes, init.as_deref());
        prop_assert!(relative_error(&tiled.out, &exact.out) < 1e-12);
        prop_assert!(relative_error(&tiled.state, &exact.state) < 1e-12);
    }
}

#[test]
fn the_vllm_off_by_one_is_far_outside_tolerance() {
    let d = dims(1, 2, 40, 8, 8);
    let q = values(d.qk_len(), 11);
    let k = values(d.qk_len(), 12);
    let v = values(d.v_len(), 13);
    let init = values(d.state_len(), 14);
    let slopes = [0.5, 0.05];
    let exact = recurrence(d, &q, &k, &v, &slopes, Some(&init));
    let buggy = blocked_vllm_off_by_one(d, 16, &q, &k, &v, &slopes, Some(&init));
    assert!(relative_error(&buggy.out, &exact.out) > 1e-2);
}

#[test]
fn backward_by_hand() {
    // d = e = 1, n = 2, decay a = 1/2, scale c = 2, S_0 = 4,
    // q = [1, 2], k = [3, 1], v = [1, 2], do = [1, -1], dF = 3.
    // Forward: S_1 = 0.5 * 4 + 3 * 1 = 5, S_2 = 0.5 * 5 + 1 * 2 = 4.5.
    // dq_t = c do_t S_t:    dq = [2 * 1 * 5, 2 * -1 * 4.5] = [10, -9].
    // G_2 = dF + c q_2 do_2 = 3 + 2 * 2 * -1 = -1,
    // G_1 = a G_2 + c q_1 do_1 = -0.5 + 2 = 1.5, dS_0 = a G_1 = 0.75.
    // dk_t = v_t G_t:       dk = [1 * 1.5, 2 * -1] = [1.5, -2].
    // dv_t = k_t G_t:       dv = [3 * 1.5, 1 * -1] = [4.5, -1].
    // (A decay of exp(+s) = 2 would give G_1 = 0 and fail every line below.)
    let g = backward(
        dims(1, 1, 2, 1, 1),
        &[1.0, 2.0],
        &[3.0, 1.0],
        &[1.0, 2.0],
        &[std::f64::consts::LN_2],
        Some(&[4.0]),
        Some(2.0),
        &[1.0, -1.0],
        Some(&[3.0]),
    );
    assert_eq!(g.dq, vec![10.0, -9.0]);
    assert_eq!(g.dk, vec![1.5, -2.0]);
    assert_eq!(g.dv, vec![4.5, -1.0]);
    assert_eq!(g.d_initial_state, vec![0.75]);
}

#[test]
fn backward_of_an_empty_sequence_passes_the_final_gradient_through() {
    // n = 0: S_n is S_0, so dS_0 = dF and there is nothing else.
    let g = backward(
        dims(1, 1, 0, 2, 1),
        &[],
        &[],
        &[],
        &[0.5],
        None,
        None,
        &[],
        Some(&[3.0, -1.0]),
    );
    assert_eq!(g.d_initial_state, vec![3.0, -1.0]);
    assert!(g.dq.is_empty() && g.dk.is_empty() && g.dv.is_empty());
}

/// `L = sum(d_out * scale * o) + sum(d_final * S_n)` from the forward recurrence.
#[allow(clippy::too_many_arguments)]
fn loss(
    d: Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    slopes: &[f64],
    initial: &[f64],
    scale: f64,
    d_out: &[f64],
    d_final: &[f64],
) -> f64 {
    let r = recurrence(d, q, k, v, slopes, Some(initial));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    scale * dot(d_out, &r.out) + dot(d_final, &r.state)
}

/// Central differences of `f` at every entry of `x`. L is affine in each single
/// entry, so these are exact up to rounding.
fn central_differences(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    const EPS: f64 = 1e-6;
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + EPS;
            let up = f(&x);
            x[i] = x0 - EPS;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * EPS)
        })
        .collect()
}

fn assert_close(name: &str, analytic: &[f64], numeric: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(analytic.len(), numeric.len());
    for (i, (a, b)) in analytic.iter().zip(numeric).enumerate() {
        prop_assert!(
            (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
            "{}[{}]: analytic {} vs finite difference {}",
            name,
            i,
            a,
            b
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn backward_matches_finite_differences(
        batch in 1usize..=2,
        heads in 1usize..=2,
        seq_len in 1usize..=9,
        key_dim in 1usize..=5,
        value_dim in 1usize..=5,
        with_state: bool,
        with_d_final: bool,
        with_scale: bool,
        seed: u64,
    ) {
        let d = dims(batch, heads, seq_len, key_dim, value_dim);
        let q = values(d.qk_len(), seed);
        let k = values(d.qk_len(), seed ^ 1);
        let v = values(d.v_len(), seed ^ 2);
        // Slopes in [0.001, 0.9].
        let slopes: Vec<f64> = values(heads, seed ^ 3)
            .iter()
            .map(|x| 0.001 + (x + 1.0) / 2.0 * 0.899)
            .collect();
        let init = with_state.then(|| values(d.state_len(), seed ^ 4));
        let d_out = values(d.v_len(), seed ^ 5);
        let d_final = with_d_final.then(|| values(d.state_len(), seed ^ 6));
        let scale = with_scale.then_some(0.125 + (seed % 7) as f64 * 0.3);

        let g = backward(
            d, &q, &k, &v, &slopes, init.as_deref(), scale, &d_out, d_final.as_deref(),
        );
        // The loss is always evaluated at an explicit state: zeros stand for
        // `None`, so d_initial_state is checked at the zero state too.
        let s0 = init.unwrap_or_else(|| vec![0.0; d.state_len()]);
        let df = d_final.unwrap_or_else(|| vec![0.0; d.state_len()]);
        let c = scale.unwrap_or(1.0);
        let l = |q: &[f64], k: &[f64], v: &[f64], s0: &[f64]| {
            loss(d, q, k, v, &slopes, s0, c, &d_out, &df)
        };
        assert_close("dq", &g.dq, &central_differences(&q, |x| l(x, &k, &v, &s0)))?;
        assert_close("dk", &g.dk, &central_differences(&k, |x| l(&q, x, &v, &s0)))?;
        assert_close("dv", &g.dv, &central_differences(&v, |x| l(&q, &k, x, &s0)))?;
        assert_close(
            "d_initial_state",
            &g.d_initial_state,
            &central_differences(&s0, |x| l(&q, &k, &v, x)),
        )?;
    }
}

/// Gathers head-major `[1, h, n, w]` rows of one sequence out of packed `[T, h, w]`.
fn gather(packed: &[f64], start: usize, end: usize, h: usize, w: usize) -> Vec<f64> {
    let mut rows = Vec::new();
    for head in 0..h {
        for t in start..end {
            rows.extend_from_slice(&packed[(t * h + head) * w..(t * h + head + 1) * w]);
        }
    }
    rows
}

#[test]
fn varlen_is_an_independent_recurrence_per_sequence() {
    let (h, d, e) = (2, 3, 4);
    let cu = [0usize, 5, 6, 13];
    let total = 13;
    let (q, k, v) = (
        values(total * h * d, 1),
        values(total * h * d, 2),
        values(total * h * e, 3),
    );
    let slopes = [0.3, 0.05];
    let slots = [2i64, 0, 1];
    let has_initial = [true, true, false];
    // Two snapshots of the last sequence, into the spare slot 3 and nowhere.
    let snapshot_slots = [-1i64, -1, -1, -1, 3, -1];
    let before = values(4 * h * d * e, 4);
    let mut cache = before.clone();
    let problem = VarlenProblem {
        heads: h,
        key_dim: d,
        value_dim: e,
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        scale: 1.0,
        cu_seqlens: &cu,
        slots: &slots,
        has_initial_state: &has_initial,
        snapshots: Some((2, &snapshot_slots)),
    };
    let out = varlen(&problem, &mut cache);
    let state_len = h * d * e;
    for seq in 0..3 {
        let (start, end) = (cu[seq], cu[seq + 1]);
        let n = end - start;
        let slot = slots[seq] as usize;
        let initial = &before[slot * state_len..(slot + 1) * state_len];
        let expected = recurrence(
            dims(1, h, n, d, e),
            &gather(&q, start, end, h, d),
            &gather(&k, start, end, h, d),
            &gather(&v, start, end, h, e),
            &slopes,
            has_initial[seq].then_some(initial),
        );
        assert!(relative_error(&gather(&out, start, end, h, e), &expected.out) < 1e-14);
        assert!(relative_error(&cache[slot * state_len..(slot + 1) * state_len], &expected.state) < 1e-14);
    }
    // Slot 3 holds the last sequence's state after its second-to-last token.
    let (start, end) = (cu[2], cu[3] - 1);
    let expected = recurrence(
        dims(1, h, end - start, d, e),
        &gather(&q, start, end, h, d),
        &gather(&k, start, end, h, d),
        &gather(&v, start, end, h, e),
        &slopes,
        None,
    );
    assert!(relative_error(&cache[3 * state_len..], &expected.state) < 1e-14);
}
