//! Every public entry point reports a badly shaped tensor as the caller gave
//! it: the caller's tensor name, the shape exactly as passed, the expected
//! shape in the same axis order and the layout that entry point documents
//! (issue 18). Nothing launches: these are refused before.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::{
    BackendConfig, BackwardInputs, DType, DecodeInputs, DeviceTensor, LightningBackend, LightningError,
    PrefillConfig, PrefillInputs, SplitCache, VarlenBatch, VarlenInputs, backward, decode, decode_into,
    decode_split, decode_split_into, plan_decode_step, plan_prefill, plan_varlen, prefill, prefill_into,
    prefill_varlen, prefill_varlen_into,
};

use crate::common::*;

/// A tensor whose values no check reads: only its shape and dtype matter.
fn t(client: &Client, shape: &[usize]) -> DeviceTensor {
    DeviceTensor::empty(client, shape, DType::F32)
}

/// The shape error `tensor: expected shape {expected} ({layout}), got {actual}`.
fn shape_error(
    tensor: &'static str,
    expected: &[usize],
    layout: &'static str,
    actual: &[usize],
) -> LightningError {
    LightningError::Shape {
        tensor,
        expected: expected.to_vec(),
        layout,
        actual: actual.to_vec(),
    }
}

fn config() -> PrefillConfig {
    PrefillConfig::new(16, 8)
}

/// A dense problem (b=2, h=3, n=40, d=8, e=12) with k's head dim 6.
struct Dense {
    q: DeviceTensor,
    k: DeviceTensor,
    bad_k: DeviceTensor,
    v: DeviceTensor,
    slopes: DeviceTensor,
}

fn dense(client: &Client) -> Dense {
    Dense {
        q: t(client, &[2, 3, 40, 8]),
        k: t(client, &[2, 3, 40, 8]),
        bad_k: t(client, &[2, 3, 40, 6]),
        v: t(client, &[2, 3, 40, 12]),
        slopes: t(client, &[3]),
    }
}

impl Dense {
    fn inputs(&self, bad_k: bool) -> PrefillInputs<'_> {
        PrefillInputs {
            q: &self.q,
            k: if bad_k { &self.bad_k } else { &self.k },
            v: &self.v,
            slopes: &self.slopes,
            initial_state: None,
        }
    }
}

/// What `prefill`, `prefill_into` and `plan_prefill` say of k `[2, 3, 40, 6]`.
fn bad_k() -> LightningError {
    shape_error("k", &[2, 3, 40, 8], "[b, h, n, d]", &[2, 3, 40, 6])
}

#[test]
fn prefill_reports_the_callers_shape() {
    let client = client();
    let p = dense(&client);
    let err = prefill(&client, &p.inputs(true), &config()).unwrap_err();
    assert_eq!(err, bad_k(), "{err}");
}

#[test]
fn plan_prefill_reports_the_callers_shape() {
    let client = client();
    let p = dense(&client);
    let err = plan_prefill(&client, &p.inputs(true), &config()).unwrap_err();
    assert_eq!(err, bad_k(), "{err}");
}

#[test]
fn prefill_into_reports_the_callers_shape() {
    let client = client();
    let p = dense(&client);
    let (out, state) = (t(&client, &[2, 3, 40, 12]), t(&client, &[2, 3, 8, 12]));
    let err = prefill_into(&client, &p.inputs(true), &config(), &out, &state).unwrap_err();
    assert_eq!(err, bad_k(), "{err}");
    let bad_out = t(&client, &[2, 40, 3, 12]);
    let err = prefill_into(&client, &p.inputs(false), &config(), &bad_out, &state).unwrap_err();
    assert_eq!(
        err,
        shape_error("out", &[2, 3, 40, 12], "[b, h, n, e]", &[2, 40, 3, 12]),
        "{err}"
    );
    let bad_state = t(&client, &[2, 3, 12, 8]);
    let err = prefill_into(&client, &p.inputs(false), &config(), &out, &bad_state).unwrap_err();
    assert_eq!(
        err,
        shape_error("final_state", &[2, 3, 8, 12], "[b, h, d, e]", &[2, 3, 12, 8]),
        "{err}"
    );
}

#[test]
fn backward_reports_the_callers_shape() {
    let client = client();
    let p = dense(&client);
    let d_out = t(&client, &[2, 3, 40, 11]);
    let inputs = BackwardInputs {
        q: &p.q,
        k: &p.k,
        v: &p.v,
        slopes: &p.slopes,
        initial_state: None,
        d_out: &d_out,
        d_final_state: None,
    };
    let err = backward(&client, &inputs, &config()).unwrap_err();
    assert_eq!(
        err,
        shape_error("d_out", &[2, 3, 40, 12], "[b, h, n, e]", &[2, 3, 40, 11]),
        "{err}"
    );
    let bad_k = t(&client, &[2, 3, 40, 6]);
    let err = backward(&client, &BackwardInputs { k: &bad_k, ..inputs }, &config()).unwrap_err();
    assert_eq!(err, self::bad_k(), "{err}");
}

/// A decode step (b=3, h=2, d=8, e=4) against 5 slots.
struct Step {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    cache: DeviceTensor,
    slopes: DeviceTensor,
}

fn step(client: &Client) -> Step {
    Step {
        q: t(client, &[3, 2, 1, 8]),
        k: t(client, &[3, 2, 1, 8]),
        v: t(client, &[3, 2, 1, 4]),
        cache: t(client, &[5, 2, 8, 4]),
        slopes: t(client, &[2]),
    }
}

const SLOTS: [i32; 3] = [4, -1, 0];

impl Step {
    fn inputs(&self) -> DecodeInputs<'_> {
        DecodeInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            cache: &self.cache,
            slopes: &self.slopes,
            slots: &SLOTS,
            scale: None,
            rows_in_flight: decode_rows_in_flight(),
        }
    }
}

#[test]
fn decode_reports_the_callers_shape() {
    let client = client();
    let p = step(&client);
    // A token axis of 0 is a shape error against `[b, h, 1, d]`, not an
    // empty dimension `n` that layout does not name.
    let q0 = t(&client, &[3, 2, 0, 8]);
    let err = decode(&client, &DecodeInputs { q: &q0, ..p.inputs() }).unwrap_err();
    assert_eq!(
        err,
        shape_error("q", &[3, 2, 1, 8], "[b, h, 1, d]", &[3, 2, 0, 8]),
        "{err}"
    );
    let k0 = t(&client, &[3, 2, 0, 8]);
    let err = decode(&client, &DecodeInputs { k: &k0, ..p.inputs() }).unwrap_err();
    assert_eq!(
        err,
        shape_error("k", &[3, 2, 1, 8], "[b, h, 1, d]", &[3, 2, 0, 8]),
        "{err}"
    );
    let v0 = t(&client, &[3, 2, 1, 0]);
    let err = decode(&client, &DecodeInputs { v: &v0, ..p.inputs() }).unwrap_err();
    assert_eq!(
        err,
        LightningError::EmptyDimension {
            tensor: "v",
            dim: "e",
            shape: vec![3, 2, 1, 0]
        },
        "{err}"
    );
}

#[test]
fn plan_decode_step_reports_the_callers_shape() {
    let client = client();
    let p = step(&client);
    let bad_k = t(&client, &[3, 2, 1, 6]);
    let err = plan_decode_step(
        &client,
        &DecodeInputs {
            k: &bad_k,
            ..p.inputs()
        },
    )
    .unwrap_err();
    assert_eq!(
        err,
        shape_error("k", &[3, 2, 1, 8], "[b, h, 1, d]", &[3, 2, 1, 6]),
        "{err}"
    );
}

#[test]
fn decode_into_reports_the_callers_shape() {
    let client = client();
    let p = step(&client);
    let out = t(&client, &[3, 2, 4]);
    let err = decode_into(&client, &p.inputs(), &out).unwrap_err();
    assert!(
        matches!(
            &err,
            LightningError::Rank { tensor: "out", expected: 4, layout: "[b, h, 1, e]", actual: 3, shape }
                if shape == &[3, 2, 4]
        ),
        "{err}"
    );
    let out = t(&client, &[3, 2, 1, 5]);
    let err = decode_into(&client, &p.inputs(), &out).unwrap_err();
    assert_eq!(
        err,
        shape_error("out", &[3, 2, 1, 4], "[b, h, 1, e]", &[3, 2, 1, 5]),
        "{err}"
    );
}

/// 5 slots of h=2, d=8, e=4 in parts of 2, 2 and 1.
fn split(client: &Client) -> SplitCache {
    SplitCache::zeros_in_parts(client, 5, 2, 2, 8, 4).expect("valid parts")
}

/// q and k of head dim 6 against a cache of 8: the error is the cache's, told
/// of the whole cache `[5, 2, 8, 4]` (the caller's tensor), not of its first
/// part `[2, 2, 8, 4]`.
fn split_mismatch(client: &Client) -> (DeviceTensor, DeviceTensor, LightningError) {
    let (q, k) = (t(client, &[3, 2, 1, 6]), t(client, &[3, 2, 1, 6]));
    let expected = shape_error("cache", &[5, 2, 6, 4], "[slots, h, d, e]", &[5, 2, 8, 4]);
    (q, k, expected)
}

#[test]
fn decode_split_reports_the_callers_shape() {
    let client = client();
    let (p, cache) = (step(&client), split(&client));
    let (q, k, expected) = split_mismatch(&client);
    let err = decode_split(
        &client,
        &DecodeInputs {
            q: &q,
            k: &k,
            ..p.inputs()
        },
        &cache,
    )
    .unwrap_err();
    assert_eq!(err, expected, "{err}");
}

#[test]
fn decode_split_into_reports_the_callers_shape() {
    let client = client();
    let (p, cache) = (step(&client), split(&client));
    let (q, k, expected) = split_mismatch(&client);
    let out = t(&client, &[3, 2, 1, 4]);
    let err = decode_split_into(
        &client,
        &DecodeInputs {
            q: &q,
            k: &k,
            ..p.inputs()
        },
        &cache,
        &out,
    )
    .unwrap_err();
    assert_eq!(err, expected, "{err}");
    let bad_out = t(&client, &[3, 2, 1, 5]);
    let err = decode_split_into(&client, &p.inputs(), &cache, &bad_out).unwrap_err();
    assert_eq!(
        err,
        shape_error("out", &[3, 2, 1, 4], "[b, h, 1, e]", &[3, 2, 1, 5]),
        "{err}"
    );
}

/// A packed call: 2 sequences (5 and 2 tokens), h=2, d=8, e=4, 4 slots.
struct Packed {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    slopes: DeviceTensor,
    cache: DeviceTensor,
}

fn packed(client: &Client) -> Packed {
    Packed {
        q: t(client, &[7, 2, 8]),
        k: t(client, &[7, 2, 8]),
        v: t(client, &[7, 2, 4]),
        slopes: t(client, &[2]),
        cache: t(client, &[4, 2, 8, 4]),
    }
}

const BATCH: VarlenBatch<'static> = VarlenBatch {
    cu_seqlens: &[0, 5, 7],
    slots: &[0, 1],
    has_initial_state: &[false, true],
    snapshots: None,
};

impl Packed {
    fn inputs(&self) -> VarlenInputs<'_> {
        VarlenInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            slopes: &self.slopes,
            cache: &self.cache,
            batch: BATCH,
        }
    }
}

/// What the packed entry points say of v `[7, 2, 4]` given as `[7, 3, 4]`.
fn bad_v(client: &Client) -> (DeviceTensor, LightningError) {
    let v = t(client, &[7, 3, 4]);
    (v, shape_error("v", &[7, 2, 4], "[T, h, e]", &[7, 3, 4]))
}

#[test]
fn prefill_varlen_reports_the_callers_shape() {
    let client = client();
    let p = packed(&client);
    let (v, expected) = bad_v(&client);
    let err = prefill_varlen(&client, &VarlenInputs { v: &v, ..p.inputs() }, &config()).unwrap_err();
    assert_eq!(err, expected, "{err}");
}

#[test]
fn plan_varlen_reports_the_callers_shape() {
    let client = client();
    let p = packed(&client);
    let (v, expected) = bad_v(&client);
    let err = plan_varlen(&client, &VarlenInputs { v: &v, ..p.inputs() }, &config()).unwrap_err();
    assert_eq!(err, expected, "{err}");
    let k = t(&client, &[0, 2, 8]);
    let err = plan_varlen(&client, &VarlenInputs { k: &k, ..p.inputs() }, &config()).unwrap_err();
    assert_eq!(
        err,
        LightningError::EmptyDimension {
            tensor: "k",
            dim: "T",
            shape: vec![0, 2, 8]
        },
        "{err}"
    );
}

#[test]
fn prefill_varlen_into_reports_the_callers_shape() {
    let client = client();
    let p = packed(&client);
    let (v, expected) = bad_v(&client);
    let out = t(&client, &[7, 2, 4]);
    let err =
        prefill_varlen_into(&client, &VarlenInputs { v: &v, ..p.inputs() }, &config(), &out).unwrap_err();
    assert_eq!(err, expected, "{err}");
    let out = t(&client, &[7, 4, 2]);
    let err = prefill_varlen_into(&client, &p.inputs(), &config(), &out).unwrap_err();
    assert_eq!(
        err,
        shape_error("out", &[7, 2, 4], "[T, h, e]", &[7, 4, 2]),
        "{err}"
    );
}

/// A backend of 4 heads over 2 ranks (2 on this one), d=16, e=24.
fn backend(client: &Client) -> LightningBackend {
    let config = BackendConfig {
        heads: 4,
        key_dim: 16,
        value_dim: 24,
        layers: 2,
        slots: 4,
        max_batch: 4,
        tensor_parallel: (0, 2),
        dtype: DType::F32,
        prefill: PrefillConfig::new(16, 16),
        state_dtype: DType::F32,
    };
    LightningBackend::new(client, config).expect("a valid backend")
}

#[test]
fn forward_decode_reports_the_callers_shape() {
    let client = client();
    let mut backend = backend(&client);
    backend.prepare_decode(&[0, 2, -1]).unwrap();
    let (k, v, out) = (
        t(&client, &[3, 2, 16]),
        t(&client, &[3, 2, 24]),
        t(&client, &[3, 2, 24]),
    );
    // Three heads where the rank holds two: q's error, not the backend's slopes'.
    let q = t(&client, &[3, 3, 16]);
    let err = backend.forward_decode(0, &q, &k, &v, &out).unwrap_err();
    assert_eq!(
        err,
        shape_error("q", &[3, 2, 16], "[B, h_rank, d]", &[3, 3, 16]),
        "{err}"
    );
    // A value head dim the backend was not built for: v's error, not the cache's.
    let (q, bad_v) = (t(&client, &[3, 2, 16]), t(&client, &[3, 2, 20]));
    let err = backend.forward_decode(0, &q, &k, &bad_v, &out).unwrap_err();
    assert_eq!(
        err,
        shape_error("v", &[3, 2, 24], "[B, h_rank, e]", &[3, 2, 20]),
        "{err}"
    );
}

#[test]
fn forward_extend_reports_the_callers_shape() {
    let client = client();
    let mut backend = backend(&client);
    backend.prepare_extend(&BATCH).unwrap();
    let (q, v, out) = (
        t(&client, &[7, 2, 16]),
        t(&client, &[7, 2, 24]),
        t(&client, &[7, 2, 24]),
    );
    // A key head dim of 8 where the backend's is 16: k's error, not the cache's.
    let k = t(&client, &[7, 2, 8]);
    let err = backend.forward_extend(0, &q, &k, &v, &out).unwrap_err();
    assert_eq!(
        err,
        shape_error("k", &[7, 2, 16], "[T, h_rank, d]", &[7, 2, 8]),
        "{err}"
    );
    let bad_out = t(&client, &[6, 2, 24]);
    let err = backend
        .forward_extend(0, &q, &t(&client, &[7, 2, 16]), &v, &bad_out)
        .unwrap_err();
    assert_eq!(
        err,
        shape_error("out", &[7, 2, 24], "[T, h_rank, e]", &[6, 2, 24]),
        "{err}"
    );
}
