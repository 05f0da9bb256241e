//! The backward pass against the f64 reference backward (itself checked by
//! finite differences in the reference crate), across block sizes.

use lightning_attention::reference::{Dims, backward as reference_backward};
use lightning_attention::{
    BackwardInputs, DType, LightningError, Precision, PrefillConfig, Routines, Tuning, backward,
};
use proptest::prelude::*;

use crate::common::*;

#[derive(Clone, Debug)]
pub struct Case {
    pub block: usize,
    pub sub_block: usize,
    pub batch: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub initial: bool,
    pub d_final: bool,
    pub scale: Option<f32>,
    pub dtype: DType,
    /// ChunkRecurrent runs the reverse sweep (and the dq pass) through the
    /// chunk-recurrent state pass, portable where tensor cores are absent.
    pub routines: Routines,
    /// How f32 products are taken (16-bit inputs ignore it).
    pub precision: Precision,
    /// The measuring knobs (the fused backward's tests force its walks).
    pub tuning: Tuning,
    pub seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![(16, 16), (32, 16), (64, 32), (128, 64), (256, 32)]),
        1usize..=2,
        1usize..=2,
        // (20, 12) and (15, 7): kv-reduce's transposed initial state gathered
        // into 4-lane and 1-lane vectors.
        prop::sample::select(vec![
            (32, 32),
            (64, 128),
            (24, 40),
            (16, 8),
            (128, 64),
            (20, 12),
            (15, 7),
        ]),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![None, Some(0.125f32), Some(-2.0)]),
        prop::sample::select(input_dtypes()),
        prop::sample::select(vec![Routines::Auto, Routines::ChunkRecurrent, Routines::Fused]),
        prop::sample::select(precisions()),
        any::<u64>(),
    )
        .prop_flat_map(
            |(
                (block, sub_block),
                batch,
                heads,
                (key_dim, value_dim),
                initial,
                d_final,
                scale,
                dtype,
                routines,
                precision,
                seed,
            )| {
                (1..=2 * block + 9).prop_map(move |seq_len| Case {
                    block,
                    sub_block,
                    batch,
                    heads,
                    seq_len,
                    key_dim,
                    value_dim,
                    initial,
                    d_final,
                    scale,
                    dtype,
                    routines,
                    precision,
                    tuning: tuning(),
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(40), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_reference(case in case()) {
        gradients_match_reference(&case)?;
    }
}

/// Runs `case`'s backward on fresh random inputs and checks each gradient
/// against the f64 reference backward.
pub fn gradients_match_reference(case: &Case) -> Result<(), TestCaseError> {
    let client = client();
    let Case {
        batch: b,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
        dtype,
        ..
    } = *case;
    let mut rng = SeededRng::new(case.seed);
    let q = rng.values(b * h * n * d, dtype);
    let k = rng.values(b * h * n * d, dtype);
    let v = rng.values(b * h * n * e, dtype);
    let d_out = rng.values(b * h * n * e, dtype);
    let slopes = rng.slopes(h);
    let initial = rng.values(b * h * d * e, DType::F32);
    let d_final = rng.values(b * h * d * e, DType::F32);

    let up = |x: &[f32], shape: &[usize], dtype| upload(&client, x, shape, dtype);
    let (q_t, k_t, v_t) = (
        up(&q, &[b, h, n, d], dtype),
        up(&k, &[b, h, n, d], dtype),
        up(&v, &[b, h, n, e], dtype),
    );
    let d_out_t = up(&d_out, &[b, h, n, e], dtype);
    let s_t = up(&slopes, &[h], DType::F32);
    let initial_t = up(&initial, &[b, h, d, e], DType::F32);
    let d_final_t = up(&d_final, &[b, h, d, e], DType::F32);
    let inputs = BackwardInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        initial_state: case.initial.then_some(&initial_t),
        d_out: &d_out_t,
        d_final_state: case.d_final.then_some(&d_final_t),
    };
    let mut config = PrefillConfig::new(case.block, case.sub_block)
        .with_routines(case.routines)
        .with_precision(case.precision)
        .with_tuning(case.tuning);
    config.scale = case.scale;
    let grads = backward(&client, &inputs, &config).expect("a valid backward pass");

    let dims = Dims {
        batch: b,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    };
    let reference = |q: &[f64], k: &[f64], v: &[f64], d_out: &[f64], initial: &[f64], d_final: &[f64]| {
        reference_backward(
            dims,
            q,
            k,
            v,
            &f64s(&slopes),
            case.initial.then_some(initial),
            case.scale.map(f64::from),
            d_out,
            case.d_final.then_some(d_final),
        )
    };
    let expected = reference(
        &f64s(&q),
        &f64s(&k),
        &f64s(&v),
        &f64s(&d_out),
        &f64s(&initial),
        &f64s(&d_final),
    );
    // The same on magnitudes: what each gradient sums before cancellation,
    // the scale its rounding errors are relative to (a short sequence's
    // gradient can cancel to almost nothing).
    let abs = |x: &[f32]| x.iter().map(|v| f64::from(v.abs())).collect::<Vec<_>>();
    let magnitude = reference(
        &abs(&q),
        &abs(&k),
        &abs(&v),
        &abs(&d_out),
        &abs(&initial),
        &abs(&d_final),
    );
    let tol = tolerance_for(dtype, case.precision);
    for (name, actual, expected, magnitude) in [
        ("dq", &grads.dq, &expected.dq, &magnitude.dq),
        ("dk", &grads.dk, &expected.dk, &magnitude.dk),
        ("dv", &grads.dv, &expected.dv, &magnitude.dv),
        (
            "d_initial_state",
            &grads.d_initial_state,
            &expected.d_initial_state,
            &magnitude.d_initial_state,
        ),
    ] {
        let err = bounded_error(&read(&client, actual), expected, magnitude);
        prop_assert!(err < tol, "{name}: error {err:e} of its magnitude for {case:?}");
    }
    Ok(())
}

#[test]
fn backward_refuses_bad_gradients_and_a_zero_scale() {
    let client = client();
    let t = |shape: &[usize], dtype| poisoned(&client, shape, dtype);
    let (q, k, v) = (
        t(&[1, 2, 20, 8], DType::F32),
        t(&[1, 2, 20, 8], DType::F32),
        t(&[1, 2, 20, 4], DType::F32),
    );
    let slopes = t(&[2], DType::F32);
    let d_out = t(&[1, 2, 20, 4], DType::F32);
    let bad_out = t(&[1, 2, 19, 4], DType::F32);
    let d_final = t(&[1, 2, 8, 4], DType::F16);
    let inputs = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: None,
        d_out: &d_out,
        d_final_state: None,
    };
    let config = PrefillConfig::new(16, 8);
    let err = backward(
        &client,
        &BackwardInputs {
            d_out: &bad_out,
            ..inputs
        },
        &config,
    )
    .unwrap_err();
    assert!(
        matches!(err, LightningError::Shape { tensor: "d_out", .. }),
        "{err}"
    );
    let err = backward(
        &client,
        &BackwardInputs {
            d_final_state: Some(&d_final),
            ..inputs
        },
        &config,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::DType {
                tensor: "d_final_state",
                ..
            }
        ),
        "{err}"
    );
    let err = backward(&client, &inputs, &config.with_scale(0.0)).unwrap_err();
    assert!(matches!(err, LightningError::UnsupportedScale { .. }), "{err}");
}

/// Dense backwards of one `(b, n)` whose passes' work lists differ (an
/// initial state or none, a final-state gradient or none, the block
/// config, the routine's walk), in turn and then again: each pass binds its
/// own lists, kept per device and shape (`routines::dense_tables`, shared
/// with the forward), and every gradient matches the reference each time.
/// Fails where the key drops what a pass's lists depend on.
#[test]
fn repeated_shapes_bind_their_own_work_lists() {
    for round in 0..2u64 {
        for (i, (block, sub_block, initial, d_final, routines)) in [
            (64, 32, false, false, Routines::Auto),
            (64, 32, true, false, Routines::Auto),
            (64, 32, false, true, Routines::Auto),
            (32, 16, true, true, Routines::Auto),
            (64, 32, true, true, Routines::ChunkRecurrent),
            (64, 32, true, false, Routines::Fused),
            (64, 32, false, true, Routines::Portable),
        ]
        .into_iter()
        .enumerate()
        {
            let case = Case {
                block,
                sub_block,
                batch: 2,
                heads: 2,
                seq_len: 150,
                key_dim: 32,
                value_dim: 16,
                initial,
                d_final,
                scale: None,
                dtype: DType::F32,
                routines,
                precision: Precision::Split,
                tuning: tuning(),
                seed: 400 + 10 * round + i as u64,
            };
            gradients_match_reference(&case).unwrap_or_else(|err| panic!("{case:?} (round {round}): {err}"));
        }
    }
}
