//! The reference judged on its own: hand-worked cases, published slopes, and
//! the blocked algorithm against the step recurrence.

use proptest::prelude::*;

use crate::random::SeededRng;
use crate::slopes::{base_slopes, layer_factor, layer_slopes};
use crate::{Dims, blocked, blocked_vllm_off_by_one, decode, recurrence, relative_error};

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
