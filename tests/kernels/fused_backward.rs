//! The fused backward (issue 31) on its tensor-core walks with the products
//! emulated, the code that runs on tensor cores run here on any device: dq
//! on the fused forward walk, dk and dv together on one reverse walk
//! (`kernels::fused_key_value`), against the f64 reference backward. The
//! plan is asserted to have taken the dk and dv walk (or, where the case
//! asks for them, the two separate walks), so a case cannot pass on another
//! routine instead.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::plan::PrefillPlan;
use lightning_attention::{
    BackwardInputs, DType, DeviceTensor, FusedChoice, FusedProducts, Precision, PrefillConfig, Routines,
    Tuning, plan_backward, tuned_backward_variant,
};
use proptest::prelude::*;

use crate::backward::{Case, gradients_match_reference};
use crate::common::*;

/// `ask` of `case`'s backward on zero inputs (only their shapes and dtypes
/// count): the client, the inputs and the config.
fn on_zero_inputs<T>(
    client: &Client,
    case: &Case,
    ask: impl FnOnce(&BackwardInputs, &PrefillConfig) -> T,
) -> T {
    let (b, h, n, d, e) = (case.batch, case.heads, case.seq_len, case.key_dim, case.value_dim);
    let zeros = |shape: &[usize], dtype| DeviceTensor::filled(client, shape, dtype, 0.0).expect("zeros");
    let (q, k, v, d_out) = (
        zeros(&[b, h, n, d], case.dtype),
        zeros(&[b, h, n, d], case.dtype),
        zeros(&[b, h, n, e], case.dtype),
        zeros(&[b, h, n, e], case.dtype),
    );
    let slopes = zeros(&[h], DType::F32);
    let state = zeros(&[b, h, d, e], DType::F32);
    let inputs = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: case.initial.then_some(&state),
        d_out: &d_out,
        d_final_state: case.d_final.then_some(&state),
    };
    let mut config = PrefillConfig::new(case.block, case.sub_block)
        .with_routines(case.routines)
        .with_tuning(case.tuning);
    config.scale = case.scale;
    ask(&inputs, &config)
}

/// The plans `case`'s backward runs on the test device.
fn planned(client: &Client, case: &Case) -> [PrefillPlan; 2] {
    on_zero_inputs(client, case, |inputs, config| {
        plan_backward(client, inputs, config).expect("a valid backward")
    })
}

/// Whether the dv pass of `plan` is the dk and dv walk; `None` where it is
/// not the tensor-core walk at all.
fn key_value_walk(plan: &PrefillPlan, emulated: bool) -> Option<bool> {
    let walk = plan.fused?.fragments?;
    (walk.emulated == emulated).then_some(walk.key_value)
}

/// Cases of the fused backward with `products`: chunks from `chunks`, up to
/// 4 of them a block, head dims from `dims`, with and without an initial
/// state and a final-state gradient, scales, inputs from `dtypes`, the
/// rule's segments or at least 2 or 4 per sequence, the dk and dv walk or
/// (one case in four) the two separate walks, `n` from 1 to three blocks
/// and a remainder.
fn fused_case(
    chunks: Vec<usize>,
    dims: Vec<(usize, usize)>,
    dtypes: Vec<DType>,
    products: FusedProducts,
) -> impl Strategy<Value = Case> {
    (
        prop::sample::select(chunks),
        prop::sample::select(vec![1usize, 2, 4]),
        1usize..=2,
        1usize..=2,
        prop::sample::select(dims),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![None, Some(0.125f32), Some(-2.0)]),
        prop::sample::select(dtypes),
        prop::sample::select(vec![None, Some(2usize), Some(4)]),
        prop::bool::weighted(0.25),
        any::<u64>(),
    )
        .prop_flat_map(
            move |(
                sub_block,
                blocks,
                batch,
                heads,
                (key_dim, value_dim),
                initial,
                d_final,
                scale,
                dtype,
                split,
                separate,
                seed,
            )| {
                let block = sub_block * blocks;
                (1usize..=3 * block + 17).prop_map(move |seq_len| Case {
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
                    routines: Routines::Fused,
                    precision: Precision::Split,
                    tuning: Tuning {
                        fused_products: products,
                        fused_split: split,
                        fused_separate_key_value: separate,
                        ..tuning()
                    },
                    seed,
                })
            },
        )
}

/// Runs `case` and checks that its dv pass took the walk it asks for (the
/// dk and dv walk, or the separate ones), `emulated` or real, and its
/// gradients against the f64 reference.
fn fused_backward_matches_reference(case: &Case, emulated: bool) -> Result<(), TestCaseError> {
    let client = client();
    let [dv_plan, _] = planned(&client, case);
    let separate = case.tuning.fused_separate_key_value;
    prop_assert_eq!(
        key_value_walk(&dv_plan, emulated),
        Some(!separate),
        "the planned dv pass was not the {} walk asked for: {:?}",
        if separate { "separate" } else { "dk and dv" },
        case
    );
    gradients_match_reference(case)
}

/// Emulated cases small enough for every device's shared memory (lavapipe
/// has 32 KiB, and the emulation stages f32): chunks of 16, head dims to 64.
fn emulated_case() -> impl Strategy<Value = Case> {
    fused_case(
        vec![16],
        vec![
            (16, 16),
            (32, 32),
            (24, 40),
            (16, 8),
            (20, 12),
            (8, 48),
            (40, 24),
            (64, 16),
        ],
        input_dtypes(),
        FusedProducts::Emulated,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn emulated_fused_backward_matches_reference(case in emulated_case()) {
        fused_backward_matches_reference(&case, true)?;
    }
}

/// With the autotuner's choice (the default of `Routines::Fused`): the
/// first backward of a bucket times the variants that apply, keeps one,
/// and its gradients match the reference.
#[test]
fn tuned_backward_keeps_a_variant_and_matches_reference() {
    let case = Case {
        block: 64,
        sub_block: 16,
        // Enough cubes (8, lavapipe's assumed multiprocessors) that the rule
        // leaves the sequences whole, so that two segments per sequence are a
        // variant of their own.
        batch: 2,
        heads: 4,
        seq_len: 150,
        key_dim: 16,
        value_dim: 32,
        initial: true,
        d_final: true,
        scale: None,
        dtype: DType::F32,
        routines: Routines::Fused,
        precision: Precision::Split,
        tuning: Tuning {
            fused_products: FusedProducts::Emulated,
            fused_choice: FusedChoice::Tuned,
            ..tuning()
        },
        seed: 31,
    };
    let client = client();
    let before = on_zero_inputs(&client, &case, |inputs, config| {
        tuned_backward_variant(&client, inputs, config).expect("a valid backward")
    });
    assert_eq!(before, None, "nothing is settled before the bucket's first call");
    gradients_match_reference(&case).expect("the tuned backward matches the reference");
    let kept = on_zero_inputs(&client, &case, |inputs, config| {
        tuned_backward_variant(&client, inputs, config).expect("a valid backward")
    });
    let variant = kept.expect("the tuner kept a variant for the bucket");
    assert!([32, 64].contains(&variant.chunk), "a tuned chunk: {variant}");
}

/// On CUDA: the real walks (`ldmatrix`, `mma.sync`, the ring where it
/// applies), chunks of 16, 32 and 64, head dims to 128.
#[cfg(feature = "cuda")]
fn real_case() -> impl Strategy<Value = Case> {
    fused_case(
        vec![16, 32, 64],
        vec![(128, 128), (64, 64), (32, 64), (96, 96), (128, 64), (64, 128)],
        vec![DType::F16, DType::BF16],
        FusedProducts::Auto,
    )
}

#[cfg(feature = "cuda")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn real_fused_backward_matches_reference_on_cuda(case in real_case()) {
        fused_backward_matches_reference(&case, false)?;
    }
}
