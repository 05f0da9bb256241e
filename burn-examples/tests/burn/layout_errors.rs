//! Every Burn entry point reports a badly shaped tensor as the caller gave it:
//! the caller's tensor name, the shape exactly as passed, the expected shape
//! in the same axis order and the layout that entry point documents (issue
//! 18: the FLA convention's errors spoke of the permuted `[B, H, T, *]` views).
//! On the plain device and under autodiff.

use burn::tensor::{Device, Tensor};
use lightning_attention::burn::{
    MiniMaxLinearAttentionConfig, fla_lightning_attention, lightning_attention,
    lightning_attention_with_config, lightning_decode,
};
use lightning_attention::{LightningError, PrefillConfig};

use super::device;
use super::training::rng_lock;

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

fn zeros<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::zeros(shape, device)
}

fn devices() -> [Device; 2] {
    [device(), device().autodiff()]
}

/// The case: q `[2, 77, 3, 16]` and k `[2, 77, 3, 8]` in the FLA
/// layout, once reported as `k: expected shape [2, 3, 77, 16] ([b, h, n, d]),
/// got [2, 3, 77, 8]`.
#[test]
fn fla_lightning_attention_reports_the_callers_layout() {
    for device in devices() {
        let (b, t, h, d, e) = (2, 77, 3, 16, 12);
        let call = |q: [usize; 4], k: [usize; 4], v: [usize; 4], slopes: usize, state: Option<[usize; 4]>| {
            fla_lightning_attention(
                zeros(q, &device),
                zeros(k, &device),
                zeros(v, &device),
                zeros([slopes], &device),
                state.map(|shape| zeros(shape, &device)),
                true,
                PrefillConfig::new(16, 16),
            )
            .map(|_| ())
        };
        let (qk, ve, state) = ([b, t, h, d], [b, t, h, e], [b, h, d, e]);
        call(qk, qk, ve, h, Some(state)).expect("the baseline is valid");

        let err = call(qk, [b, t, h, 8], ve, h, None).unwrap_err();
        assert_eq!(
            err,
            shape_error("k", &[2, 77, 3, 16], "[B, T, H, D]", &[2, 77, 3, 8]),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "k: expected shape [2, 77, 3, 16] ([B, T, H, D]), got [2, 77, 3, 8]"
        );
        // v of another length: T is the second axis, as given.
        let err = call(qk, qk, [b, t + 1, h, e], h, None).unwrap_err();
        assert_eq!(
            err,
            shape_error("v", &[b, t, h, e], "[B, T, H, E]", &[b, t + 1, h, e]),
            "{err}"
        );
        let err = call(qk, qk, ve, h + 1, None).unwrap_err();
        assert_eq!(err, shape_error("slopes", &[h], "[H]", &[h + 1]), "{err}");
        let err = call(qk, qk, ve, h, Some([b, h, e, d])).unwrap_err();
        assert_eq!(
            err,
            shape_error("initial_state", &[b, h, d, e], "[B, H, D, E]", &[b, h, e, d]),
            "{err}"
        );
        // An empty sequence is named by the caller's axis, T, in the caller's order.
        let err = call([b, 0, h, d], [b, 0, h, d], [b, 0, h, e], h, None).unwrap_err();
        assert_eq!(
            err,
            LightningError::EmptyDimension {
                tensor: "q",
                dim: "T",
                shape: vec![b, 0, h, d]
            },
            "{err}"
        );
    }
}

#[test]
fn lightning_attention_reports_the_callers_layout() {
    for device in devices() {
        let (b, h, n, d, e) = (2, 3, 20, 16, 12);
        let err = lightning_attention(
            zeros([b, h, n, d], &device),
            zeros([b, h, n, 8], &device),
            zeros([b, h, n, e], &device),
            zeros([h], &device),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            shape_error("k", &[b, h, n, d], "[b, h, n, d]", &[b, h, n, 8]),
            "{err}"
        );
    }
}

#[test]
fn lightning_attention_with_config_reports_the_callers_layout() {
    for device in devices() {
        let (b, h, n, d, e) = (2, 3, 20, 16, 12);
        let err = lightning_attention_with_config(
            zeros([b, h, n, d], &device),
            zeros([b, h, n, d], &device),
            zeros([b, h, n, e], &device),
            zeros([h], &device),
            Some(zeros([b, h, e, d], &device)),
            PrefillConfig::new(16, 16),
        )
        .unwrap_err();
        assert_eq!(
            err,
            shape_error("initial_state", &[b, h, d, e], "[b, h, d, e]", &[b, h, e, d]),
            "{err}"
        );
    }
}

#[test]
fn lightning_decode_reports_the_callers_layout() {
    for device in devices() {
        let (b, h, d, e, slots) = (2, 3, 16, 8, 4);
        let step = |q: [usize; 4], k: [usize; 4]| {
            lightning_decode(
                zeros(q, &device),
                zeros(k, &device),
                zeros([b, h, 1, e], &device),
                zeros([slots, h, d, e], &device),
                zeros([h], &device),
                &[0, 3],
                None,
            )
            .map(|_| ())
        };
        let err = step([b, h, 1, d], [b, h, 1, 8]).unwrap_err();
        assert_eq!(
            err,
            shape_error("k", &[b, h, 1, d], "[b, h, 1, d]", &[b, h, 1, 8]),
            "{err}"
        );
        // No token: a shape error against the layout's 1, not an empty `n`.
        let err = step([b, h, 0, d], [b, h, 0, d]).unwrap_err();
        assert_eq!(
            err,
            shape_error("q", &[b, h, 1, d], "[b, h, 1, d]", &[b, h, 0, d]),
            "{err}"
        );
    }
}

/// The layer's state is the FLA call's initial state: its errors name it
/// `state`, in the layer's layout `[batch, h, d, d]`.
#[test]
fn minimax_layer_reports_the_callers_layout() {
    let _rng = rng_lock();
    let device = device();
    let (hidden, heads, head_dim, batch, seq) = (32, 2, 16, 3, 8);
    let layer = MiniMaxLinearAttentionConfig::new(hidden, heads, head_dim, 0, 2)
        .with_block(16)
        .with_sub_block(16)
        .init(&device)
        .expect("a valid config");
    let x = || zeros([batch, seq, hidden], &device);

    let err = layer
        .forward(zeros([batch, seq, hidden + 1], &device))
        .unwrap_err();
    assert_eq!(
        err,
        shape_error(
            "x",
            &[batch, seq, hidden],
            "[batch, seq, hidden]",
            &[batch, seq, hidden + 1]
        ),
        "{err}"
    );
    let state = zeros([batch, heads + 1, head_dim, head_dim], &device);
    let err = layer.forward_with_state(x(), Some(state)).unwrap_err();
    assert_eq!(
        err,
        shape_error(
            "state",
            &[batch, heads, head_dim, head_dim],
            "[batch, h, d, d]",
            &[batch, heads + 1, head_dim, head_dim]
        ),
        "{err}"
    );
    let state = zeros([batch, heads, head_dim, head_dim], &device).cast(burn::tensor::FloatDType::F16);
    let err = layer.forward_with_state(x(), Some(state)).unwrap_err();
    assert_eq!(
        err,
        LightningError::DType {
            tensor: "state",
            expected: lightning_attention::DType::F32,
            actual: lightning_attention::DType::F16
        },
        "{err}"
    );
}
