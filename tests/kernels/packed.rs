//! Packed training (`prefill_packed`, `backward_packed`) against the f64
//! reference run on each document alone: random packings of 1 to 40
//! documents (some of one token, some exactly a block), with and without
//! initial states, final states and their gradients, padding rows past the
//! last document (zeros in every output), many short documents, the plan's
//! grid at 100 000 documents on CUDA's limits, and the typed errors.

use lightning_attention::plan::plan_packed_limits;
use lightning_attention::reference::{Dims, backward as reference_backward, recurrence};
use lightning_attention::testing::{PackedKnobs, backward_packed_into_with, prefill_packed_into_with};
use lightning_attention::{
    DType, DeviceTensor, FusedProducts, LightningError, PackedBackwardInputs, PackedGradients, PackedInputs,
    PrefillConfig, Routines, VarlenShape, backward_packed, backward_packed_into, prefill_packed,
    prefill_packed_into,
};
use proptest::prelude::*;

use crate::common::*;

#[derive(Clone, Debug)]
struct Case {
    block: usize,
    sub_block: usize,
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    lengths: Vec<usize>,
    padding: usize,
    initial: bool,
    final_states: bool,
    d_final: bool,
    scale: Option<f32>,
    dtype: DType,
    routines: Routines,
    /// The fused routine's tensor-core walks with emulated products (the
    /// forward walk, and the backward's dk and dv walk where it fits).
    emulated: bool,
    /// Narrower limits: small launch groups, few cubes along z.
    knobs: PackedKnobs,
    seed: u64,
}

/// Knobs of the property test: none, launch groups of a few blocks' workspace
/// (`heads * d * e` elements a block), or two cubes along z (kv-reduce loops).
fn knobs() -> impl Strategy<Value = (Option<u64>, Option<u32>)> {
    prop_oneof![
        2 => Just((None, None)),
        1 => (1u64..=4).prop_map(|blocks| (Some(blocks), None)),
        1 => Just((None, Some(2u32))),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![(16, 16), (32, 16), (64, 32)]),
        1usize..=2,
        prop::sample::select(vec![(16, 16), (32, 16), (16, 8), (24, 40)]),
        0usize..=3,
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::sample::select(vec![None, Some(0.125f32)]),
        prop::sample::select(input_dtypes()),
        prop::sample::select(vec![Routines::Auto, Routines::ChunkRecurrent, Routines::Fused]),
        (knobs(), any::<u64>(), any::<bool>()),
    )
        .prop_flat_map(
            |(
                (block, sub_block),
                heads,
                (key_dim, value_dim),
                padding,
                (initial, final_states, d_final),
                scale,
                dtype,
                routines,
                ((group_blocks, max_z), seed, emulated),
            )| {
                // Empty, one token, exactly a block, or up to three blocks and a tail.
                let length = prop_oneof![
                    1 => Just(0usize),
                    2 => Just(1usize),
                    2 => Just(block),
                    4 => 1..=3 * block + 5,
                ];
                prop::collection::vec(length, 1..=40).prop_map(move |lengths| Case {
                    block,
                    sub_block,
                    heads,
                    key_dim,
                    value_dim,
                    lengths,
                    padding,
                    initial,
                    final_states,
                    d_final,
                    scale,
                    dtype,
                    routines,
                    emulated: emulated && routines == Routines::Fused,
                    knobs: PackedKnobs {
                        // The chunk-recurrent and fused walks run along z and
                        // need it; `Auto` takes kv-reduce instead, which loops.
                        max_cube_count: max_z
                            .filter(|_| routines == Routines::Auto)
                            .map(|z| (u32::MAX, u32::MAX, z)),
                        group_workspace: group_blocks
                            .map(|blocks| blocks * (heads * key_dim * value_dim) as u64),
                    },
                    seed,
                })
            },
        )
}

/// Rows `first..first + n` of a packed `[T, h, x]` tensor as a dense `[1, h, n, x]` one.
fn gather(packed: &[f64], heads: usize, width: usize, first: usize, n: usize) -> Vec<f64> {
    let mut dense = Vec::with_capacity(heads * n * width);
    for head in 0..heads {
        for t in 0..n {
            let row = ((first + t) * heads + head) * width;
            dense.extend_from_slice(&packed[row..row + width]);
        }
    }
    dense
}

/// What one case checks, and how: the bound and the label of the failure.
struct Check<'a> {
    case: &'a Case,
    tol: f64,
}

impl Check<'_> {
    fn close(
        &self,
        what: &str,
        doc: usize,
        actual: &[f64],
        expected: &[f64],
        magnitude: &[f64],
    ) -> Result<(), TestCaseError> {
        let err = bounded_error(actual, expected, magnitude);
        prop_assert!(
            err < self.tol,
            "{what} of document {doc}: error {err:e} of its magnitude for {:?}",
            self.case
        );
        Ok(())
    }

    /// Elements `first..` of a packed tensor are exactly zero.
    fn zeros(&self, what: &str, values: &[f64], first: usize) -> Result<(), TestCaseError> {
        let bad = values[first..].iter().position(|&x| x != 0.0);
        prop_assert!(
            bad.is_none(),
            "{what}: padding element {} is {} for {:?}",
            first + bad.unwrap_or(0),
            values[first + bad.unwrap_or(0)],
            self.case
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn packed_training_matches_each_document_alone(case in case()) {
        run_case(&case)?;
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let client = client();
    let (h, d, e, dtype) = (case.heads, case.key_dim, case.value_dim, case.dtype);
    let docs = case.lengths.len();
    let mut cu = vec![0u32];
    for &len in &case.lengths {
        cu.push(cu.last().unwrap() + len as u32);
    }
    let used = *cu.last().unwrap() as usize;
    let total = used + case.padding;
    let mut rng = SeededRng::new(case.seed);
    // The padding rows are NaN: a kernel that reads one fails the case.
    let padded = |mut x: Vec<f32>, row: usize| {
        x[used * h * row..].fill(f32::NAN);
        x
    };
    let q = padded(rng.values(total * h * d, dtype), d);
    let k = padded(rng.values(total * h * d, dtype), d);
    let v = padded(rng.values(total * h * e, dtype), e);
    let d_out = padded(rng.values(total * h * e, dtype), e);
    let slopes = rng.slopes(h);
    let initial = rng.values(docs * h * d * e, DType::F32);
    let d_final = rng.values(docs * h * d * e, DType::F32);

    let up = |x: &[f32], shape: &[usize], dtype| upload(&client, x, shape, dtype);
    let (q_t, k_t, v_t) = (
        up(&q, &[total, h, d], dtype),
        up(&k, &[total, h, d], dtype),
        up(&v, &[total, h, e], dtype),
    );
    let d_out_t = up(&d_out, &[total, h, e], dtype);
    let s_t = up(&slopes, &[h], DType::F32);
    let states = [docs, h, d, e];
    let initial_t = up(&initial, &states, DType::F32);
    let d_final_t = up(&d_final, &states, DType::F32);
    let inputs = PackedInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        cu_seqlens: &cu,
        initial_states: case.initial.then_some(&initial_t),
    };
    let mut config = PrefillConfig::new(case.block, case.sub_block).with_routines(case.routines);
    config.tuning = tuning();
    if case.emulated {
        config.tuning.fused_products = FusedProducts::Emulated;
    }
    config.scale = case.scale;

    // Every output poisoned: an element no kernel writes fails.
    let out = poisoned(&client, &[total, h, e], dtype);
    let finals = poisoned(&client, &states, DType::F32);
    prefill_packed_into_with(
        &client,
        &inputs,
        &config,
        (&out, case.final_states.then_some(&finals)),
        &case.knobs,
    )
    .expect("a valid packed forward");
    let grads = PackedGradients {
        dq: poisoned(&client, &[total, h, d], dtype),
        dk: poisoned(&client, &[total, h, d], dtype),
        dv: poisoned(&client, &[total, h, e], dtype),
        d_initial_states: case.initial.then(|| poisoned(&client, &states, DType::F32)),
    };
    let backward_inputs = PackedBackwardInputs {
        forward: inputs,
        d_out: &d_out_t,
        d_final_states: case.d_final.then_some(&d_final_t),
    };
    backward_packed_into_with(&client, &backward_inputs, &config, &grads, &case.knobs)
        .expect("a valid packed backward");

    let (out_r, finals_r) = (read(&client, &out), read(&client, &finals));
    let (dq_r, dk_r, dv_r) = (
        read(&client, &grads.dq),
        read(&client, &grads.dk),
        read(&client, &grads.dv),
    );
    let d_initial_r = grads.d_initial_states.as_ref().map(|t| read(&client, t));
    let check = Check {
        case,
        tol: tolerance(dtype),
    };
    for (what, values, row) in [
        ("out", &out_r, e),
        ("dq", &dq_r, d),
        ("dk", &dk_r, d),
        ("dv", &dv_r, e),
    ] {
        check.zeros(what, values, used * h * row)?;
    }

    let scale = case.scale.map_or(1.0, f64::from);
    let abs = |x: &[f32]| x.iter().map(|v| f64::from(v.abs())).collect::<Vec<_>>();
    let inputs_of = |values: &dyn Fn(&[f32]) -> Vec<f64>| {
        [
            values(&q),
            values(&k),
            values(&v),
            values(&d_out),
            values(&initial),
            values(&d_final),
        ]
    };
    let (signed, magnitudes) = (inputs_of(&|x| f64s(x)), inputs_of(&abs));
    let sf = f64s(&slopes);
    let state_len = h * d * e;
    for (doc, &n) in case.lengths.iter().enumerate() {
        let first = cu[doc] as usize;
        let dims = Dims {
            batch: 1,
            heads: h,
            seq_len: n,
            key_dim: d,
            value_dim: e,
        };
        let reference = |[q, k, v, d_out, initial, d_final]: &[Vec<f64>; 6]| {
            let (q, k) = (gather(q, h, d, first, n), gather(k, h, d, first, n));
            let (v, d_out) = (gather(v, h, e, first, n), gather(d_out, h, e, first, n));
            let initial = &initial[doc * state_len..(doc + 1) * state_len];
            let d_final = &d_final[doc * state_len..(doc + 1) * state_len];
            let forward = recurrence(dims, &q, &k, &v, &sf, case.initial.then_some(initial));
            let grads = reference_backward(
                dims,
                &q,
                &k,
                &v,
                &sf,
                case.initial.then_some(initial),
                case.scale.map(f64::from),
                &d_out,
                case.d_final.then_some(d_final),
            );
            (forward, grads)
        };
        let ((forward, expected), (forward_mag, magnitude)) = (reference(&signed), reference(&magnitudes));
        let scaled = |x: &[f64]| x.iter().map(|o| o * scale).collect::<Vec<_>>();
        check.close(
            "out",
            doc,
            &gather(&out_r, h, e, first, n),
            &scaled(&forward.out),
            &scaled(&forward_mag.out),
        )?;
        if case.final_states {
            let actual = &finals_r[doc * state_len..(doc + 1) * state_len];
            check.close("final state", doc, actual, &forward.state, &forward_mag.state)?;
        }
        check.close(
            "dq",
            doc,
            &gather(&dq_r, h, d, first, n),
            &expected.dq,
            &magnitude.dq,
        )?;
        check.close(
            "dk",
            doc,
            &gather(&dk_r, h, d, first, n),
            &expected.dk,
            &magnitude.dk,
        )?;
        check.close(
            "dv",
            doc,
            &gather(&dv_r, h, e, first, n),
            &expected.dv,
            &magnitude.dv,
        )?;
        if let Some(d_initial) = &d_initial_r {
            let actual = &d_initial[doc * state_len..(doc + 1) * state_len];
            check.close(
                "d_initial_state",
                doc,
                actual,
                &expected.d_initial_state,
                &magnitude.d_initial_state,
            )?;
        }
    }
    Ok(())
}

/// Thousands of documents of 1 to 3 tokens, each against the reference,
/// through the allocating entry points, with padding rows.
#[test]
fn many_short_documents_match_the_reference() {
    let client = client();
    let (h, d, e, docs, padding) = (2, 16, 8, 3000, 5);
    let lengths: Vec<usize> = (0..docs).map(|i| 1 + (i * 7 + i / 5) % 3).collect();
    let mut cu = vec![0u32];
    for &len in &lengths {
        cu.push(cu.last().unwrap() + len as u32);
    }
    let used = *cu.last().unwrap() as usize;
    let total = used + padding;
    let mut rng = SeededRng::new(29);
    // The padding rows are NaN: a kernel that reads one fails the test.
    let padded = |mut x: Vec<f32>, row: usize| {
        x[used * h * row..].fill(f32::NAN);
        x
    };
    let (q, k, v) = (
        padded(rng.values(total * h * d, DType::F32), d),
        padded(rng.values(total * h * d, DType::F32), d),
        padded(rng.values(total * h * e, DType::F32), e),
    );
    let d_out = padded(rng.values(total * h * e, DType::F32), e);
    let slopes = rng.slopes(h);
    let initial = rng.values(docs * h * d * e, DType::F32);
    let d_final = rng.values(docs * h * d * e, DType::F32);
    let up = |x: &[f32], shape: &[usize]| upload(&client, x, shape, DType::F32);
    let (q_t, k_t, v_t, d_out_t) = (
        up(&q, &[total, h, d]),
        up(&k, &[total, h, d]),
        up(&v, &[total, h, e]),
        up(&d_out, &[total, h, e]),
    );
    let s_t = up(&slopes, &[h]);
    let (initial_t, d_final_t) = (up(&initial, &[docs, h, d, e]), up(&d_final, &[docs, h, d, e]));
    let inputs = PackedInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        cu_seqlens: &cu,
        initial_states: Some(&initial_t),
    };
    let config = PrefillConfig::new(16, 16);
    let forward = prefill_packed(&client, &inputs, &config, true).expect("a valid packed forward");
    let grads = backward_packed(
        &client,
        &PackedBackwardInputs {
            forward: inputs,
            d_out: &d_out_t,
            d_final_states: Some(&d_final_t),
        },
        &config,
    )
    .expect("a valid packed backward");
    let out = read(&client, &forward.out);
    let finals = read(
        &client,
        forward.final_states.as_ref().expect("final states asked for"),
    );
    let (dq, dk, dv) = (
        read(&client, &grads.dq),
        read(&client, &grads.dk),
        read(&client, &grads.dv),
    );
    let d_initial = read(
        &client,
        grads.d_initial_states.as_ref().expect("initial states given"),
    );
    for (what, values, row) in [("out", &out, e), ("dq", &dq, d), ("dk", &dk, d), ("dv", &dv, e)] {
        assert!(
            values[used * h * row..].iter().all(|&x| x == 0.0),
            "{what}: padding not zero"
        );
    }
    let (qf, kf, vf, df, sf) = (f64s(&q), f64s(&k), f64s(&v), f64s(&d_out), f64s(&slopes));
    let (initial, d_final) = (f64s(&initial), f64s(&d_final));
    let state_len = h * d * e;
    let (mut actual, mut expected) = (Vec::new(), Vec::new());
    for (doc, &n) in lengths.iter().enumerate() {
        let first = cu[doc] as usize;
        let dims = Dims {
            batch: 1,
            heads: h,
            seq_len: n,
            key_dim: d,
            value_dim: e,
        };
        let (dq_in, dk_in) = (gather(&qf, h, d, first, n), gather(&kf, h, d, first, n));
        let (v_in, d_out_in) = (gather(&vf, h, e, first, n), gather(&df, h, e, first, n));
        let states = doc * state_len..(doc + 1) * state_len;
        let reference = recurrence(dims, &dq_in, &dk_in, &v_in, &sf, Some(&initial[states.clone()]));
        let reference_grads = reference_backward(
            dims,
            &dq_in,
            &dk_in,
            &v_in,
            &sf,
            Some(&initial[states.clone()]),
            None,
            &d_out_in,
            Some(&d_final[states.clone()]),
        );
        for (got, want) in [
            (gather(&out, h, e, first, n), reference.out),
            (finals[states.clone()].to_vec(), reference.state),
            (gather(&dq, h, d, first, n), reference_grads.dq),
            (gather(&dk, h, d, first, n), reference_grads.dk),
            (gather(&dv, h, e, first, n), reference_grads.dv),
            (
                d_initial[states.clone()].to_vec(),
                reference_grads.d_initial_state,
            ),
        ] {
            let err = relative_error(&got, &want);
            assert!(
                err < tolerance(DType::F32),
                "document {doc} (of {n} tokens): error {err:e}"
            );
            actual.extend(got);
            expected.extend(want);
        }
    }
    let err = relative_error(&actual, &expected);
    assert!(err < 1e-5, "all documents: error {err:e}");
}

/// FLA's varlen kernels failed to launch past 65535 documents x heads
/// (fla-org/flash-linear-attention#1239): 100 000 documents of 1 to 3 tokens
/// at h = 64, d = e = 128 plan forward and backward on CUDA's limits, in
/// every dtype and routine. Each document's block takes `h * d * e = 2^20`
/// f32 of workspace, so the call runs in launch groups of at most 4095
/// blocks (32-bit indices): at least 25 of them.
#[test]
fn a_hundred_thousand_short_documents_plan_on_cuda_limits() {
    let docs = 100_000usize;
    let mut cu = vec![0u32];
    for i in 0..docs {
        cu.push(cu.last().unwrap() + 1 + (i % 3) as u32);
    }
    let total = *cu.last().unwrap() as usize;
    for dtype in input_dtypes() {
        for routines in [
            Routines::Auto,
            Routines::Portable,
            Routines::ChunkRecurrent,
            Routines::Fused,
        ] {
            let shape = VarlenShape {
                total_tokens: total,
                sequences: 0,
                heads: 64,
                key_dim: 128,
                value_dim: 128,
                slots: 0,
                dtype,
                state_dtype: DType::F32,
            };
            let config = PrefillConfig::new(64, 32).with_routines(routines);
            for with_initial in [false, true] {
                let planned = plan_packed_limits(&cuda_like_limits(), &shape, &cu, with_initial, &config)
                    .unwrap_or_else(|err| panic!("{dtype:?} {routines:?}: {err}"));
                assert_eq!(planned.shape.sequences, docs);
                for groups in [planned.forward_groups, planned.backward_groups] {
                    assert!(
                        (25..=100).contains(&groups),
                        "{dtype:?} {routines:?}: {groups} groups"
                    );
                }
            }
        }
    }
}

/// A base case for the targeted tests below: f32, 2 heads, d = 16, e = 8,
/// blocks of 16, everything asked for.
fn base_case(lengths: Vec<usize>, routines: Routines, knobs: PackedKnobs, seed: u64) -> Case {
    Case {
        block: 16,
        sub_block: 16,
        heads: 2,
        key_dim: 16,
        value_dim: 8,
        lengths,
        padding: 3,
        initial: true,
        final_states: true,
        d_final: true,
        scale: Some(0.125),
        dtype: DType::F32,
        routines,
        emulated: false,
        knobs,
        seed,
    }
}

/// The launch groups run for real: a group workspace of three blocks splits
/// 23 documents of 1 to 40 tokens (1 to 3 blocks) into many groups, in f32
/// and in bf16 (on f32 copies made once for all the groups), every document
/// against the reference.
#[test]
fn launch_groups_match_the_reference() {
    let lengths: Vec<usize> = (0..23).map(|i| [1, 16, 40, 7, 33, 2, 17][i % 7]).collect();
    let knobs = PackedKnobs {
        group_workspace: Some(3 * 2 * 16 * 8),
        ..PackedKnobs::default()
    };
    for (dtype, routines) in [
        (DType::F32, Routines::Auto),
        (DType::F32, Routines::Portable),
        (DType::BF16, Routines::Auto),
        (DType::F16, Routines::ChunkRecurrent),
        (DType::F32, Routines::Fused),
    ] {
        let case = Case {
            dtype,
            ..base_case(lengths.clone(), routines, knobs, 290)
        };
        run_case(&case).unwrap_or_else(|err| panic!("{err}"));
    }
    // The fused routine's tensor-core walks, emulated: the forward walk, and
    // the backward's dq walk and dk and dv walk, over the groups.
    let case = Case {
        emulated: true,
        ..base_case(lengths, Routines::Fused, knobs, 291)
    };
    run_case(&case).unwrap_or_else(|err| panic!("{err}"));
}

/// Empty documents (equal offsets) first, in the middle, in a run, and last:
/// no rows of out, final state = initial state (or zeros), initial state's
/// gradient = final state's (or zeros), under each routine, with and without
/// initial states and final-state gradients, in launch groups too.
#[test]
fn empty_documents_pass_their_states_through() {
    let lengths = vec![0, 5, 0, 0, 17, 1, 0, 33, 0];
    for routines in [Routines::Auto, Routines::ChunkRecurrent, Routines::Fused] {
        for (initial, d_final) in [(true, true), (false, false), (true, false)] {
            for knobs in [
                PackedKnobs::default(),
                PackedKnobs {
                    group_workspace: Some(2 * 2 * 16 * 8),
                    ..PackedKnobs::default()
                },
            ] {
                let case = Case {
                    initial,
                    d_final,
                    ..base_case(lengths.clone(), routines, knobs, 292)
                };
                run_case(&case).unwrap_or_else(|err| panic!("{err}"));
            }
        }
    }
    // Every document empty: nothing launches but the states.
    run_case(&base_case(
        vec![0, 0],
        Routines::Auto,
        PackedKnobs::default(),
        293,
    ))
    .unwrap_or_else(|err| panic!("{err}"));
}

/// kv-reduce's loop over sequences past the grid's z limit: three cubes
/// along z for ten documents of 1 to 5 blocks, through the five kernels
/// (forward, and the backward's reverse sweeps), against the reference.
#[test]
fn kv_reduce_loops_over_sequences_past_the_grid() {
    let lengths = vec![5, 80, 17, 33, 1, 64, 49, 16, 70, 2];
    let knobs = PackedKnobs {
        max_cube_count: Some((u32::MAX, u32::MAX, 3)),
        ..PackedKnobs::default()
    };
    for routines in [Routines::Portable, Routines::Auto] {
        run_case(&base_case(lengths.clone(), routines, knobs, 291)).unwrap_or_else(|err| panic!("{err}"));
    }
}

/// The same tensor as initial and final states, or as the final states'
/// gradient and the initial states': refused, nothing launched.
#[test]
fn packed_training_refuses_aliased_states() {
    let client = client();
    let t = |shape: &[usize]| poisoned(&client, shape, DType::F32);
    let (q, k, v, d_out) = (t(&[9, 2, 8]), t(&[9, 2, 8]), t(&[9, 2, 4]), t(&[9, 2, 4]));
    let (slopes, states) = (t(&[2]), t(&[2, 2, 8, 4]));
    let config = PrefillConfig::new(16, 16);
    let inputs = PackedInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        cu_seqlens: &[0, 4, 9],
        initial_states: Some(&states),
    };
    let err = prefill_packed_into(&client, &inputs, &config, &d_out, Some(&states.clone())).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::AliasedBuffers {
                first: "initial_states",
                second: "final_states"
            }
        ),
        "{err}"
    );
    let d_final = t(&[2, 2, 8, 4]);
    let grads = PackedGradients {
        dq: t(&[9, 2, 8]),
        dk: t(&[9, 2, 8]),
        dv: t(&[9, 2, 4]),
        d_initial_states: Some(d_final.clone()),
    };
    let err = backward_packed_into(
        &client,
        &PackedBackwardInputs {
            forward: inputs,
            d_out: &d_out,
            d_final_states: Some(&d_final),
        },
        &config,
        &grads,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::AliasedBuffers {
                first: "d_final_states",
                second: "d_initial_states"
            }
        ),
        "{err}"
    );
}

#[test]
fn packed_training_refuses_bad_offsets_and_states() {
    let client = client();
    let t = |shape: &[usize], dtype| poisoned(&client, shape, dtype);
    let (q, k, v) = (
        t(&[10, 2, 8], DType::F32),
        t(&[10, 2, 8], DType::F32),
        t(&[10, 2, 4], DType::F32),
    );
    let slopes = t(&[2], DType::F32);
    let three_states = t(&[3, 2, 8, 4], DType::F32);
    let two_states = t(&[2, 2, 8, 4], DType::F32);
    let d_out = t(&[10, 2, 4], DType::F32);
    let config = PrefillConfig::new(16, 16);
    let inputs = |cu: &'static [u32]| PackedInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        cu_seqlens: cu,
        initial_states: None,
    };
    let forward_err = |inputs: PackedInputs| prefill_packed(&client, &inputs, &config, true).unwrap_err();
    let backward_err = |inputs: PackedInputs, d_final: Option<&DeviceTensor>| {
        backward_packed(
            &client,
            &PackedBackwardInputs {
                forward: inputs,
                d_out: &d_out,
                d_final_states: d_final,
            },
            &config,
        )
        .unwrap_err()
    };
    // Decreasing offsets (equal ones are an empty document: valid).
    for err in [
        forward_err(inputs(&[0, 6, 4])),
        backward_err(inputs(&[0, 6, 4]), None),
    ] {
        assert!(
            matches!(err, LightningError::OffsetsDecreasing { index: 2, .. }),
            "{err}"
        );
    }
    for err in [
        forward_err(inputs(&[1, 4, 9])),
        backward_err(inputs(&[1, 4, 9]), None),
    ] {
        assert!(matches!(err, LightningError::FirstOffset { value: 1 }), "{err}");
    }
    for err in [
        forward_err(inputs(&[0, 4, 11])),
        backward_err(inputs(&[0, 4, 11]), None),
    ] {
        assert!(
            matches!(
                err,
                LightningError::OffsetPastEnd {
                    index: 2,
                    value: 11,
                    total_tokens: 10
                }
            ),
            "{err}"
        );
    }
    for err in [forward_err(inputs(&[0])), backward_err(inputs(&[0]), None)] {
        assert!(
            matches!(
                err,
                LightningError::LengthMismatch {
                    what: "cu_seqlens",
                    ..
                }
            ),
            "{err}"
        );
    }
    // Three states for two documents.
    let with_three = PackedInputs {
        initial_states: Some(&three_states),
        ..inputs(&[0, 4, 9])
    };
    for err in [forward_err(with_three), backward_err(with_three, None)] {
        assert!(
            matches!(
                err,
                LightningError::Shape {
                    tensor: "initial_states",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = backward_err(inputs(&[0, 4, 9]), Some(&three_states));
    assert!(
        matches!(
            err,
            LightningError::Shape {
                tensor: "d_final_states",
                ..
            }
        ),
        "{err}"
    );
    let err =
        prefill_packed_into(&client, &inputs(&[0, 4, 9]), &config, &d_out, Some(&three_states)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::Shape {
                tensor: "final_states",
                ..
            }
        ),
        "{err}"
    );
    // A gradient of initial states the forward did not have.
    let grads = PackedGradients {
        dq: t(&[10, 2, 8], DType::F32),
        dk: t(&[10, 2, 8], DType::F32),
        dv: t(&[10, 2, 4], DType::F32),
        d_initial_states: Some(two_states),
    };
    let err = backward_packed_into(
        &client,
        &PackedBackwardInputs {
            forward: inputs(&[0, 4, 9]),
            d_out: &d_out,
            d_final_states: None,
        },
        &config,
        &grads,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::LengthMismatch {
                what: "d_initial_states",
                ..
            }
        ),
        "{err}"
    );
}
