//! The fused routine's tensor-core walk (`kernels::fused_fragments`) with its
//! products emulated: the code that runs on tensor cores, run here on any
//! device, against the f64 reference. The plan is asserted to have taken
//! the walk, so a case cannot pass on the portable walk instead.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::plan::FusedVariant;
use lightning_attention::reference::Dims;
use lightning_attention::{
    DType, DeviceTensor, FusedChoice, FusedProducts, PrefillConfig, PrefillInputs, Routines, Tuning,
    plan_prefill, tuned_fused_variant,
};
use proptest::prelude::*;

use crate::common::*;
use crate::prefill::{Case, run};

/// `ask` of `case`'s call on zero inputs (only their shapes and dtypes
/// count): the client, the inputs and the config.
fn on_zero_inputs<T>(case: &Case, ask: impl FnOnce(&Client, &PrefillInputs, &PrefillConfig) -> T) -> T {
    let client = client();
    let Dims {
        batch: b,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = case.dims;
    let zeros = |shape: &[usize], dtype| DeviceTensor::filled(&client, shape, dtype, 0.0).expect("zeros");
    let (q, k, v, slopes) = (
        zeros(&[b, h, n, d], case.dtype),
        zeros(&[b, h, n, d], case.dtype),
        zeros(&[b, h, n, e], case.dtype),
        zeros(&[h], DType::F32),
    );
    let state = case.with_state.then(|| zeros(&[b, h, d, e], DType::F32));
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: state.as_ref(),
    };
    let config = PrefillConfig::new(case.block, case.sub_block)
        .with_routines(case.routines)
        .with_tuning(case.tuning);
    ask(&client, &inputs, &config)
}

/// Whether `case`'s plan takes the fused routine (`None`: the
/// chunk-recurrent routine in its place), on register fragments, and
/// emulated ones.
fn fused_walk(case: &Case) -> Option<Option<bool>> {
    on_zero_inputs(case, |client, inputs, config| {
        let (_, plan) = plan_prefill(client, inputs, config).expect("a valid prefill");
        plan.fused.map(|fused| fused.fragments.map(|walk| walk.emulated))
    })
}

/// Whether `case`'s fused plan walks on register fragments, and emulated ones.
fn planned_walk(case: &Case) -> Option<bool> {
    fused_walk(case).expect("the fused routine")
}

/// Cases of the fused routine's tensor-core walk taken with `products`:
/// chunks from `chunks`, up to `max_blocks` of them a block (rounded up to a
/// power of two), head dims from `dims`, inputs from `dtypes`, value tiles
/// left to the plan or forced to 16 or 32 (the plan widens a forced tile to
/// the chunk), one set of tiles or the two-set ring, `n` from 1 to three
/// blocks and a remainder.
fn walk_case(
    chunks: Vec<usize>,
    max_blocks: usize,
    dims: Vec<(usize, usize)>,
    dtypes: Vec<DType>,
    products: FusedProducts,
) -> impl Strategy<Value = Case> {
    (
        prop::sample::select(chunks),
        1usize..=max_blocks,
        prop::sample::select(dims),
        1usize..=2,
        1usize..=3,
        any::<bool>(),
        prop::sample::select(dtypes),
        (
            prop::sample::select(vec![None, Some(16), Some(32)]),
            prop::sample::select(vec![None, Some(1), Some(2)]),
            prop::sample::select(vec![None, Some(2), Some(4)]),
        ),
        any::<u64>(),
    )
        .prop_flat_map(
            move |(sub_block, blocks, (d, e), b, h, with_state, dtype, (tile, stages, split), seed)| {
                let block = sub_block * blocks.next_power_of_two();
                (1usize..=3 * block + 17).prop_map(move |n| Case {
                    block,
                    sub_block,
                    dims: Dims {
                        batch: b,
                        heads: h,
                        seq_len: n,
                        key_dim: d,
                        value_dim: e,
                    },
                    with_state,
                    dtype,
                    routines: Routines::Fused,
                    precision: Default::default(),
                    tuning: Tuning {
                        fused_products: products,
                        fused_value_tile: tile,
                        // One set, or the ring (variant 24, also the default)
                        // where the plan can take it: the real walk with
                        // 16-byte rows; ignored elsewhere.
                        fused_stages: stages,
                        // The rule's segments, or at least 2 or 4 per
                        // sequence (segments of whole blocks, their states
                        // carried by kv-parallel and kv-reduce).
                        fused_split: split,
                        ..tuning()
                    },
                    seed,
                })
            },
        )
}

/// Emulated cases small enough for every device's shared memory (lavapipe
/// has 32 KiB): chunks of 16 and 32, key dims to 64, narrow value tiles.
fn emulated_case() -> impl Strategy<Value = Case> {
    walk_case(
        vec![16, 32],
        4,
        vec![
            (16, 16),
            (32, 32),
            (64, 32),
            (24, 40),
            (16, 8),
            (20, 12),
            (32, 64),
            (8, 48),
        ],
        input_dtypes(),
        FusedProducts::Emulated,
    )
}

/// Runs `case` on the walk it must plan (`emulated` or real) and checks
/// the output and final state against the f64 reference.
fn walk_matches_reference(case: &Case, emulated: bool) -> Result<(), TestCaseError> {
    let walk = if emulated { "emulated" } else { "real" };
    prop_assert_eq!(
        planned_walk(case),
        Some(emulated),
        "the {} walk was not planned for {:?}",
        walk,
        case
    );
    let (out_err, state_err, _) = run(case);
    let tol = tolerance_for(case.dtype, case.precision);
    prop_assert!(out_err < tol, "output error {out_err:e} >= {tol:e} for {case:?}");
    prop_assert!(
        state_err < tol,
        "state error {state_err:e} >= {tol:e} for {case:?}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn emulated_fragment_walk_matches_reference(case in emulated_case()) {
        walk_matches_reference(&case, true)?;
    }
}

/// The portable walk is what `FusedProducts::Portable` plans, and what
/// `Auto` plans on a device without register fragments; on a device with
/// them, `Auto` runs f32 inputs on the chunk-recurrent routine (the portable
/// walk there was 5.5x slower).
#[test]
fn portable_walk_where_asked_or_without_fragments() {
    let client = client();
    let mut case = Case {
        block: 64,
        sub_block: 32,
        dims: Dims {
            batch: 1,
            heads: 2,
            seq_len: 100,
            key_dim: 32,
            value_dim: 32,
        },
        with_state: false,
        dtype: DType::F32,
        routines: Routines::Fused,
        precision: Default::default(),
        tuning: Tuning {
            fused_products: FusedProducts::Portable,
            ..tuning()
        },
        seed: 1,
    };
    assert_eq!(planned_walk(&case), None);
    case.tuning.fused_products = FusedProducts::Auto;
    let fragments = lightning_attention::plan::TensorCores::fragments_of(&client).supports(DType::BF16);
    // f32 inputs never take the tensor-core walk, nor the portable one
    // where the device has the tensor-core walk.
    assert_eq!(fused_walk(&case), (!fragments).then_some(None));
    case.dtype = DType::BF16;
    assert_eq!(planned_walk(&case), fragments.then_some(false));
}

/// The autotuner over the emulated walk (`FusedChoice::Tuned`): at
/// `d = 16`, `e = 64` two variants fit every device's shared memory (lavapipe
/// has 32 KiB; chunks of 32 with value tiles of 32 and 64 columns; chunk 64
/// fits larger ones, as on an H100), so the first call times them, keeps one and runs it, and
/// the next call of the bucket (another `n` that rounds up alike, fresh
/// inputs) runs the kept one at once. Both match the f64 reference.
#[test]
fn tuned_walk_keeps_a_variant_and_matches_reference() {
    let mut case = Case {
        block: 64,
        sub_block: 32,
        dims: Dims {
            batch: 1,
            heads: 2,
            seq_len: 150,
            key_dim: 16,
            value_dim: 64,
        },
        with_state: true,
        dtype: DType::F16,
        routines: Routines::Fused,
        precision: Default::default(),
        tuning: Tuning {
            fused_products: FusedProducts::Emulated,
            fused_choice: FusedChoice::Tuned,
            ..tuning()
        },
        seed: 11,
    };
    let settled = |case: &Case| {
        on_zero_inputs(case, |client, inputs, config| {
            tuned_fused_variant(client, inputs, config).expect("a valid prefill")
        })
    };
    assert_eq!(settled(&case), None, "nothing is tuned before the first call");
    let tol = tolerance_for(case.dtype, case.precision);
    for (seq_len, seed) in [(150, 11), (200, 12)] {
        case.dims.seq_len = seq_len;
        case.seed = seed;
        let (out_err, state_err, _) = run(&case);
        assert!(out_err < tol, "output error {out_err:e} >= {tol:e} for {case:?}");
        assert!(
            state_err < tol,
            "state error {state_err:e} >= {tol:e} for {case:?}"
        );
        let kept = settled(&case).expect("the tuner kept a variant");
        // Chunk 32 at both tiles fits every device; chunk 64 at a 64-wide
        // tile fits one with more than lavapipe's 32 KiB (an H100 kept it).
        // No ring (the emulation stages synchronously), no tile past `e`;
        // the rule's segments or two per sequence (three or four blocks of
        // 64 tokens: segments of one block).
        let candidates: Vec<FusedVariant> = [(32, 32), (32, 64), (64, 64)]
            .into_iter()
            .flat_map(|(chunk, value_tile)| {
                [1, 2].map(|split| FusedVariant {
                    chunk,
                    value_tile,
                    stages: 1,
                    split,
                })
            })
            .collect();
        assert!(candidates.contains(&kept), "{kept} is not one of {candidates:?}");
    }
    // The fixed rule tunes nothing.
    case.tuning.fused_choice = FusedChoice::Rule;
    assert_eq!(settled(&case), None);
}

/// On CUDA: the real tensor-core walk (`ldmatrix` loads, `mma.sync`
/// products: what `Auto` plans for f16 and bf16 there) against the f64
/// reference, chunks of 16, 32 and 64, head dims to 128, value tiles from
/// 16 to the default 64, sequences past several chunks.
#[cfg(feature = "cuda")]
fn real_case() -> impl Strategy<Value = Case> {
    walk_case(
        vec![16, 32, 64],
        2,
        vec![
            (128, 128),
            (64, 64),
            (16, 16),
            (32, 64),
            (96, 96),
            (24, 40),
            (128, 64),
        ],
        vec![DType::F16, DType::BF16],
        FusedProducts::Auto,
    )
}

#[cfg(feature = "cuda")]
proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn real_fragment_walk_matches_reference_on_cuda(case in real_case()) {
        walk_matches_reference(&case, false)?;
    }
}
