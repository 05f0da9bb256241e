//! The kernels agree with each other: prefill + decode, split prefills, padding.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, PADDING_SLOT, PrefillConfig, PrefillInputs, decode, prefill,
};

use crate::common::*;

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    slopes: Vec<f32>,
}

const H: usize = 3;
const D: usize = 32;
const E: usize = 48;

fn inputs(n: usize, seed: u64) -> Inputs {
    let mut rng = SeededRng::new(seed);
    Inputs {
        q: rng.values(H * n * D, DType::F32),
        k: rng.values(H * n * D, DType::F32),
        v: rng.values(H * n * E, DType::F32),
        slopes: rng.slopes(H),
    }
}

/// Tokens `from..to` of every head of a `[1, H, n, w]` tensor.
fn tokens(x: &[f32], n: usize, w: usize, from: usize, to: usize) -> Vec<f32> {
    x.chunks(n * w)
        .flat_map(|head| head[from * w..to * w].to_vec())
        .collect()
}

fn run_prefill(
    client: &Client,
    x: &Inputs,
    n: usize,
    from: usize,
    to: usize,
    state: Option<&DeviceTensor>,
) -> (Vec<f64>, DeviceTensor) {
    let len = to - from;
    let q = upload(client, &tokens(&x.q, n, D, from, to), &[1, H, len, D], DType::F32);
    let k = upload(client, &tokens(&x.k, n, D, from, to), &[1, H, len, D], DType::F32);
    let v = upload(client, &tokens(&x.v, n, E, from, to), &[1, H, len, E], DType::F32);
    let s = upload(client, &x.slopes, &[H], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: state,
    };
    let result = prefill(client, &inputs, &PrefillConfig::new(32, 16)).expect("prefill");
    (read(client, &result.out), result.final_state)
}

#[test]
fn prefill_then_decode_equals_one_prefill() {
    let client = client();
    for n in [2usize, 33, 65, 100] {
        let x = inputs(n, n as u64);
        let (full_out, full_state) = run_prefill(&client, &x, n, 0, n, None);
        let (_, prefix_state) = run_prefill(&client, &x, n, 0, n - 1, None);
        // The cache holds the prefix state in slot 1 of 2.
        let mut cache = vec![0.5f32; H * D * E];
        cache.extend(prefix_state.to_f32_vec(&client).unwrap());
        let cache = upload(&client, &cache, &[2, H, D, E], DType::F32);
        let q = upload(&client, &tokens(&x.q, n, D, n - 1, n), &[1, H, 1, D], DType::F32);
        let k = upload(&client, &tokens(&x.k, n, D, n - 1, n), &[1, H, 1, D], DType::F32);
        let v = upload(&client, &tokens(&x.v, n, E, n - 1, n), &[1, H, 1, E], DType::F32);
        let s = upload(&client, &x.slopes, &[H], DType::F32);
        let inputs = DecodeInputs {
            q: &q,
            k: &k,
            v: &v,
            cache: &cache,
            slopes: &s,
            slots: &[1],
            scale: None,
            rows_in_flight: decode_rows_in_flight(),
        };
        let out = read(&client, &decode(&client, &inputs).unwrap());
        let last: Vec<f64> = full_out
            .chunks(n * E)
            .flat_map(|head| head[(n - 1) * E..].to_vec())
            .collect();
        let err = relative_error(&out, &last);
        assert!(
            err < 1e-4,
            "n = {n}: decode output differs from prefill by {err:e}"
        );
        let cache = read(&client, &cache);
        let err = relative_error(&cache[H * D * E..], &read(&client, &full_state));
        assert!(
            err < 1e-4,
            "n = {n}: decoded state differs from prefill by {err:e}"
        );
    }
}

#[test]
fn split_prefill_equals_one_prefill() {
    let client = client();
    for (n, split) in [(100usize, 1usize), (100, 32), (100, 45), (129, 128)] {
        let x = inputs(n, 1000 + split as u64);
        let (full_out, full_state) = run_prefill(&client, &x, n, 0, n, None);
        let (head_out, head_state) = run_prefill(&client, &x, n, 0, split, None);
        let (tail_out, tail_state) = run_prefill(&client, &x, n, split, n, Some(&head_state));
        let joined: Vec<f64> = head_out
            .chunks(split * E)
            .zip(tail_out.chunks((n - split) * E))
            .flat_map(|(a, b)| a.iter().chain(b).copied().collect::<Vec<_>>())
            .collect();
        let err = relative_error(&joined, &full_out);
        assert!(err < 1e-4, "split {split} of {n}: outputs differ by {err:e}");
        let err = relative_error(&read(&client, &tail_state), &read(&client, &full_state));
        assert!(err < 1e-4, "split {split} of {n}: states differ by {err:e}");
    }
}

#[test]
fn padding_slot_is_left_byte_identical() {
    let client = client();
    let mut rng = SeededRng::new(99);
    let cache = rng.values(3 * H * D * E, DType::F32);
    let cache_t = upload(&client, &cache, &[3, H, D, E], DType::F32);
    let before = cache_t.to_bytes(&client).unwrap();
    let q = upload(
        &client,
        &rng.values(2 * H * D, DType::F32),
        &[2, H, 1, D],
        DType::F32,
    );
    let k = upload(
        &client,
        &rng.values(2 * H * D, DType::F32),
        &[2, H, 1, D],
        DType::F32,
    );
    let v = upload(
        &client,
        &rng.values(2 * H * E, DType::F32),
        &[2, H, 1, E],
        DType::F32,
    );
    let s = upload(&client, &rng.slopes(H), &[H], DType::F32);
    let inputs = DecodeInputs {
        q: &q,
        k: &k,
        v: &v,
        cache: &cache_t,
        slopes: &s,
        slots: &[PADDING_SLOT, 2],
        scale: None,
        rows_in_flight: decode_rows_in_flight(),
    };
    let out = read(&client, &decode(&client, &inputs).unwrap());
    let after = cache_t.to_bytes(&client).unwrap();
    let slot = H * D * E * 4;
    assert_eq!(
        before[..2 * slot],
        after[..2 * slot],
        "slots 0 and 1 are not in the batch"
    );
    assert_ne!(before[2 * slot..], after[2 * slot..], "slot 2 was decoded");
    assert!(
        out[..H * E].iter().all(|&x| x == 0.0),
        "the padding row's output is zero"
    );
    assert!(out[H * E..].iter().any(|&x| x != 0.0));
}
