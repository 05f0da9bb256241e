//! The fused routine's tensor-core walk (`kernels::fused_fragments`) with its
//! products emulated: the code that runs on tensor cores, run here on any
//! device, against the f64 reference. The plan is asserted to have taken
//! the walk, so a case cannot pass on the portable walk instead.

use lightning_attention::reference::Dims;
use lightning_attention::{
    DType, DeviceTensor, FusedProducts, PrefillConfig, PrefillInputs, Routines, Tuning, plan_prefill,
};
use proptest::prelude::*;

use crate::common::*;
use crate::prefill::{Case, run};

/// Whether `case`'s plan walks on register fragments, and emulated ones.
fn planned_walk(case: &Case) -> Option<bool> {
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
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: None,
    };
    let config = PrefillConfig::new(case.block, case.sub_block)
        .with_routines(case.routines)
        .with_tuning(case.tuning);
    let (_, plan) = plan_prefill(&client, &inputs, &config).expect("a valid prefill");
    plan.fused
        .expect("the fused routine")
        .fragments
        .map(|walk| walk.emulated)
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
            prop::sample::select(vec![None, Some(2)]),
        ),
        any::<u64>(),
    )
        .prop_flat_map(
            move |(sub_block, blocks, (d, e), b, h, with_state, dtype, (tile, stages), seed)| {
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
                        // The ring (variant 24) where the plan can take it:
                        // the real walk with 16-byte rows; ignored elsewhere.
                        fused_stages: stages,
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
/// `Auto` plans on a device without register fragments for the dtype.
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
    // f32 inputs never take the tensor-core walk.
    assert_eq!(planned_walk(&case), None);
    case.dtype = DType::BF16;
    let fragments = lightning_attention::plan::TensorCores::fragments_of(&client).supports(DType::BF16);
    assert_eq!(planned_walk(&case), fragments.then_some(false));
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
