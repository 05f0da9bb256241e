//! Prefill against the reference across block sizes, shapes, dtypes and initial states.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::plan::{self, DiagRoutine, KvParallelRoutine, PrefillPlan, Products, TensorCores};
use lightning_attention::reference::{Dims, Prefill, blocked_vllm_off_by_one, recurrence};
use lightning_attention::{
    DType, DeviceTensor, Precision, PrefillConfig, PrefillInputs, Routines, Tuning, plan_prefill,
    prefill_into, profile_prefill_into,
};
use proptest::prelude::*;

use crate::common::*;

/// One prefill problem; `seed` makes its inputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub block: usize,
    pub sub_block: usize,
    pub dims: Dims,
    pub with_state: bool,
    pub dtype: DType,
    /// Auto takes the tensor-core routines where the device has them.
    pub routines: Routines,
    /// How f32 products are taken (16-bit inputs ignore it).
    pub precision: Precision,
    /// The measuring knobs: how the fused routine multiplies, and its tile.
    pub tuning: Tuning,
    pub seed: u64,
}

/// Sub-blocks tried per block: powers of two from `block / 16` (at least 4) to 64.
fn sub_blocks(block: usize) -> Vec<usize> {
    (2..=6)
        .map(|p| 1usize << p)
        .filter(|&cb| cb <= block && cb * 16 >= block)
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    // (20, 12) and (15, 7): dims that are not multiples of 8 (the portable
    // routines even where tensor cores are), and kv-reduce's 4- and 1-lane
    // vectors (d * e not a multiple of 4).
    let head_dims = vec![
        (64, 128),
        (128, 64),
        (128, 128),
        (32, 32),
        (24, 40),
        (16, 8),
        (20, 12),
        (15, 7),
    ];
    (
        prop::sample::select(vec![16usize, 32, 64, 128, 256]),
        prop::sample::select(head_dims),
        1usize..=2,
        1usize..=3,
        any::<bool>(),
        prop::sample::select(input_dtypes()),
        prop::sample::select(vec![
            Routines::Auto,
            Routines::ChunkRecurrent,
            Routines::Portable,
            Routines::Fused,
        ]),
        prop::sample::select(precisions()),
        fused_tuning(),
        any::<u64>(),
    )
        .prop_flat_map(
            |(block, (d, e), b, h, with_state, dtype, routines, precision, tuning, seed)| {
                (prop::sample::select(sub_blocks(block)), 1usize..=3 * block + 17).prop_map(
                    move |(sub_block, n)| Case {
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
                        routines,
                        precision,
                        tuning,
                        seed,
                    },
                )
            },
        )
}

/// Runs `case` on the device and returns (relative error of out, of the final state),
/// plus the error the vLLM off-by-one would have against the same reference.
pub fn run(case: &Case) -> (f64, f64, f64) {
    run_with(case, true)
}

/// [`run`], with heads that do not decay among the slopes or not.
fn run_with(case: &Case, zero_slopes: bool) -> (f64, f64, f64) {
    let client = client();
    let Case { dims, dtype, .. } = *case;
    let mut rng = SeededRng::new(case.seed);
    let q = rng.values(dims.qk_len(), dtype);
    let k = rng.values(dims.qk_len(), dtype);
    let v = rng.values(dims.v_len(), dtype);
    let slopes = if zero_slopes {
        rng.slopes(dims.heads)
    } else {
        rng.decaying_slopes(dims.heads)
    };
    let state = case.with_state.then(|| rng.values(dims.state_len(), DType::F32));
    let (b, h, n, d, e) = (dims.batch, dims.heads, dims.seq_len, dims.key_dim, dims.value_dim);

    let q_t = upload(&client, &q, &[b, h, n, d], dtype);
    let k_t = upload(&client, &k, &[b, h, n, d], dtype);
    let v_t = upload(&client, &v, &[b, h, n, e], dtype);
    let s_t = upload(&client, &slopes, &[h], DType::F32);
    let state_t = state
        .as_ref()
        .map(|s| upload(&client, s, &[b, h, d, e], DType::F32));
    let out = poisoned(&client, &[b, h, n, e], dtype);
    let final_state = poisoned(&client, &[b, h, d, e], DType::F32);
    let inputs = PrefillInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        initial_state: state_t.as_ref(),
    };
    prefill_into(
        &client,
        &inputs,
        &PrefillConfig::new(case.block, case.sub_block)
            .with_routines(case.routines)
            .with_precision(case.precision)
            .with_tuning(case.tuning),
        &out,
        &final_state,
    )
    .expect("a valid prefill");

    let (q, k, v, slopes) = (f64s(&q), f64s(&k), f64s(&v), f64s(&slopes));
    let state = state.map(|s| f64s(&s));
    let exact = recurrence(dims, &q, &k, &v, &slopes, state.as_deref());
    let buggy = blocked_vllm_off_by_one(dims, case.block, &q, &k, &v, &slopes, state.as_deref());
    (
        relative_error(&read(&client, &out), &exact.out),
        relative_error(&read(&client, &final_state), &exact.state),
        relative_error(&buggy.out, &exact.out),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prefill_matches_reference(case in case()) {
        let (out_err, state_err, bug_err) = run(&case);
        let tol = tolerance_for(case.dtype, case.precision);
        prop_assert!(out_err < tol, "output error {out_err:e} >= {tol:e} for {case:?}");
        prop_assert!(state_err < tol, "state error {state_err:e} >= {tol:e} for {case:?}");
        prop_assert!(bug_err.is_finite());
    }
}

/// vLLM's Triton non-diag decays the incoming state one step short. On the
/// same inputs that the kernels pass, that off-by-one lands outside the bound:
/// the property test above would catch a port of it.
#[test]
fn vllm_off_by_one_would_fail_the_bound() {
    for (i, (block, dtype)) in [
        (16, DType::F32),
        (64, DType::F32),
        (32, DType::F16),
        (128, DType::F16),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            block,
            sub_block: 16.min(block),
            dims: Dims {
                batch: 1,
                heads: 4,
                seq_len: 2 * block + 5,
                key_dim: 32,
                value_dim: 64,
            },
            with_state: i % 2 == 0,
            dtype,
            routines: Routines::Auto,
            precision: Precision::Split,
            tuning: tuning(),
            seed: 42 + i as u64,
        };
        // Every head decays: where one does not, the off-by-one changes nothing.
        let (out_err, _, bug_err) = run_with(&case, false);
        let tol = tolerance(dtype);
        assert!(out_err < tol, "kernel error {out_err:e} for {case:?}");
        assert!(
            bug_err > tol,
            "the off-by-one would pass ({bug_err:e}) for {case:?}"
        );
    }
}

/// An f32 prefill problem without an initial state: host inputs, their
/// uploads, and poisoned outputs.
struct F32Problem {
    dims: Dims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    slopes: Vec<f32>,
    tensors: [DeviceTensor; 4],
    out: DeviceTensor,
    state: DeviceTensor,
}

impl F32Problem {
    fn new(client: &Client, dims: Dims, seed: u64) -> Self {
        let Dims {
            batch: b,
            heads: h,
            seq_len: n,
            key_dim: d,
            value_dim: e,
        } = dims;
        let mut rng = SeededRng::new(seed);
        let q = rng.values(dims.qk_len(), DType::F32);
        let k = rng.values(dims.qk_len(), DType::F32);
        let v = rng.values(dims.v_len(), DType::F32);
        let slopes = rng.slopes(h);
        let tensors = [
            upload(client, &q, &[b, h, n, d], DType::F32),
            upload(client, &k, &[b, h, n, d], DType::F32),
            upload(client, &v, &[b, h, n, e], DType::F32),
            upload(client, &slopes, &[h], DType::F32),
        ];
        let out = poisoned(client, &[b, h, n, e], DType::F32);
        let state = poisoned(client, &[b, h, d, e], DType::F32);
        Self {
            dims,
            q,
            k,
            v,
            slopes,
            tensors,
            out,
            state,
        }
    }

    fn inputs(&self) -> PrefillInputs<'_> {
        let [q, k, v, slopes] = &self.tensors;
        PrefillInputs {
            q,
            k,
            v,
            slopes,
            initial_state: None,
        }
    }

    fn exact(&self) -> Prefill {
        recurrence(
            self.dims,
            &f64s(&self.q),
            &f64s(&self.k),
            &f64s(&self.v),
            &f64s(&self.slopes),
            None,
        )
    }
}

#[test]
fn scale_multiplies_the_output() {
    let client = client();
    let dims = Dims {
        batch: 1,
        heads: 2,
        seq_len: 50,
        key_dim: 16,
        value_dim: 24,
    };
    let p = F32Problem::new(&client, dims, 7);
    let config = PrefillConfig::new(16, 8).with_scale(0.125);
    prefill_into(&client, &p.inputs(), &config, &p.out, &p.state).unwrap();
    let exact = p.exact();
    let scaled: Vec<f64> = exact.out.iter().map(|x| x * 0.125).collect();
    assert!(relative_error(&read(&client, &p.out), &scaled) < 1e-4);
    // The state does not see the scale.
    assert!(relative_error(&read(&client, &p.state), &exact.state) < 1e-4);
}

/// The profiled prefill computes the same thing and reports a time for each kernel.
#[test]
fn profiled_prefill_matches_reference_and_times_each_kernel() {
    let client = client();
    let dims = Dims {
        batch: 2,
        heads: 2,
        seq_len: 70,
        key_dim: 16,
        value_dim: 32,
    };
    let p = F32Problem::new(&client, dims, 21);
    // The five kernels, each timed (f32 takes the chunk-recurrent routine on
    // tensor cores otherwise).
    let times = profile_prefill_into(
        &client,
        &p.inputs(),
        &PrefillConfig::new(32, 16).with_routines(Routines::Portable),
        &p.out,
        &p.state,
    )
    .expect("profiling works on this runtime");
    let exact = p.exact();
    assert!(relative_error(&read(&client, &p.out), &exact.out) < 1e-4);
    assert!(relative_error(&read(&client, &p.state), &exact.state) < 1e-4);
    for (name, time) in [
        ("diag", times.diag),
        ("kv-parallel", times.kv_parallel),
        ("kv-reduce", times.kv_reduce),
        ("non-diag", times.non_diag),
    ] {
        assert!(!time.is_zero(), "{name} measured no time");
    }
    assert_eq!(
        times.total(),
        times.diag + times.kv_parallel + times.kv_reduce + times.non_diag
    );
}

/// The per-device config plans and computes correctly on the device under test.
#[test]
fn device_config_matches_reference() {
    let client = client();
    let dims = Dims {
        batch: 1,
        heads: 2,
        seq_len: 300,
        key_dim: 128,
        value_dim: 128,
    };
    let p = F32Problem::new(&client, dims, 33);
    prefill_into(
        &client,
        &p.inputs(),
        &PrefillConfig::for_client(&client),
        &p.out,
        &p.state,
    )
    .expect("the device's own config fits the device");
    let exact = p.exact();
    assert!(relative_error(&read(&client, &p.out), &exact.out) < 1e-4);
    assert!(relative_error(&read(&client, &p.state), &exact.state) < 1e-4);
}

/// The vectors the tensor-core routines and kv-reduce move rows in divide the
/// head dims (16 bytes of 16-bit inputs at most; 4 f32 for kv-reduce).
#[test]
fn vector_sizes_divide_the_head_dims() {
    for ((d, e), cmma, reduce) in [
        ((128, 128), 8, 4),
        ((24, 40), 8, 4),
        ((20, 12), 4, 4),
        ((12, 6), 2, 4),
        ((15, 7), 1, 1),
        ((6, 3), 1, 1),
    ] {
        assert_eq!(
            plan::cmma_vector_size(d, e),
            cmma,
            "cmma vector for d = {d}, e = {e}"
        );
        assert_eq!(
            plan::kv_reduce_vector_size(d, e),
            reduce,
            "kv-reduce vector for d = {d}, e = {e}"
        );
    }
}

/// The plan of a prefill of random `[1, 2, 100, d]` q and k and
/// `[1, 2, 100, e]` v of `dtype` under `config`.
fn plan_for(client: &Client, dtype: DType, d: usize, e: usize, config: &PrefillConfig) -> PrefillPlan {
    let mut rng = SeededRng::new(7);
    let q = upload(client, &rng.values(2 * 100 * d, dtype), &[1, 2, 100, d], dtype);
    let v = upload(client, &rng.values(2 * 100 * e, dtype), &[1, 2, 100, e], dtype);
    let slopes = upload(client, &rng.slopes(2), &[2], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &q,
        v: &v,
        slopes: &slopes,
        initial_state: None,
    };
    plan_prefill(client, &inputs, config).expect("a valid prefill").1
}

/// Where the device reports tensor cores for a dtype, the plan takes the
/// tensor-core diag and the chunk-recurrent state pass (so the property tests
/// run them on such devices) for head dims that are multiples of 8, or the
/// fused walk where it runs the dtype natively, and
/// `Routines::Portable` keeps the portable ones.
#[test]
fn tensor_core_routines_are_chosen_where_the_device_has_them() {
    let client = client();
    let cores = TensorCores::of(&client);
    let config = PrefillConfig::new(64, 32);
    for dtype in input_dtypes() {
        let auto = plan_for(&client, dtype, 64, 64, &config);
        let portable = plan_for(&client, dtype, 64, 64, &config.with_routines(Routines::Portable));
        assert_eq!(portable.diag.routine, DiagRoutine::Portable);
        assert_eq!(portable.kv_parallel.routine, KvParallelRoutine::Portable);
        // f32 inputs take the tensor-core routines as bf16 parts
        // (Precision::Split, the default).
        let expected_tensor_cores = cores.supports(dtype) || (dtype == DType::F32 && cores.bf16);
        assert_eq!(
            matches!(auto.kv_parallel.routine, KvParallelRoutine::TensorCores { .. }),
            expected_tensor_cores,
            "{dtype}: {:?} with {cores:?}",
            auto.kv_parallel.routine
        );
        assert_eq!(
            matches!(auto.diag.routine, DiagRoutine::TensorCores { .. }),
            expected_tensor_cores,
            "{dtype}: {:?} with {cores:?}",
            auto.diag.routine
        );

        // Auto takes the fused routine's tensor-core walk where it runs the
        // dtype natively (CUDA, 16-bit: `default_routine.rs` holds the rule).
        let walks = TensorCores::fragments_of(&client).supports(dtype);
        assert_eq!(
            auto.fused.and_then(|fused| fused.fragments).is_some(),
            walks,
            "{dtype}: {:?}",
            auto.fused
        );
        // The chunk-recurrent state pass: Auto takes it with the tensor
        // cores where it takes no fused walk, ChunkRecurrent everywhere (its
        // portable variant without them), Portable never.
        assert_eq!(
            auto.chunk_state.map(|chunk| chunk.tensor_cores),
            (expected_tensor_cores && !walks).then_some(true),
            "{dtype}: {:?} with {cores:?}",
            auto.chunk_state
        );
        assert_eq!(portable.chunk_state, None);
        // Per-block states in the input dtype only where their one reader,
        // diag with non-diag fused (bf16), rounds them to it anyway.
        if let Some(chunk) = auto.chunk_state {
            assert_eq!(
                chunk.states_in_input_dtype,
                auto.diag.routine.fuses_non_diag(),
                "{dtype}: {chunk:?}"
            );
        }
        let chunk = plan_for(
            &client,
            dtype,
            64,
            64,
            &config.with_routines(Routines::ChunkRecurrent),
        );
        let chunk_state = chunk.chunk_state.expect("ChunkRecurrent plans the state pass");
        assert_eq!(chunk_state.tensor_cores, expected_tensor_cores, "{dtype}");
        assert!(config.block.is_multiple_of(chunk_state.stage), "{chunk_state:?}");

        // d = 20, e = 12: not multiples of 8, so the portable routines.
        let narrow = plan_for(&client, dtype, 20, 12, &config);
        assert_eq!(
            narrow.diag.routine,
            DiagRoutine::Portable,
            "{dtype}, d = 20, e = 12"
        );
        assert_eq!(
            narrow.kv_parallel.routine,
            KvParallelRoutine::Portable,
            "{dtype}, d = 20, e = 12"
        );
        assert_eq!(narrow.chunk_state, None, "{dtype}, d = 20, e = 12");
    }
}

/// f32 inputs: where the device has bf16 tensor cores, `Split` plans the
/// tensor-core diag and state pass with split operands and `Rounded` without;
/// `Exact`, and every precision on a device without them (lavapipe), falls
/// back to the portable routines, and the plan says so in `products`.
/// `ChunkRecurrent` runs the split in the portable state pass there too.
#[test]
fn f32_precision_picks_the_products() {
    let client = client();
    let bf16_cores = TensorCores::of(&client).bf16;
    let config = PrefillConfig::new(64, 32);
    for precision in precisions() {
        let plan = plan_for(&client, DType::F32, 64, 64, &config.with_precision(precision));
        let expected = match precision {
            Precision::Split if bf16_cores => Products::SplitBf16,
            Precision::Rounded if bf16_cores => Products::RoundedBf16,
            _ => Products::Portable,
        };
        assert_eq!(plan.products, expected, "{precision:?}");
        let on_tensor_cores = expected != Products::Portable;
        assert_eq!(
            matches!(
                plan.diag.routine,
                DiagRoutine::TensorCores {
                    fused_non_diag: true,
                    ..
                }
            ),
            on_tensor_cores,
            "{precision:?}: {:?}",
            plan.diag.routine
        );
        assert_eq!(
            plan.chunk_state.map(|chunk| (chunk.tensor_cores, chunk.split)),
            on_tensor_cores.then_some((true, expected == Products::SplitBf16)),
            "{precision:?}: {:?}",
            plan.chunk_state
        );
        // kv-parallel (segments) likewise.
        assert_eq!(
            matches!(plan.kv_parallel.routine, KvParallelRoutine::TensorCores { .. }),
            on_tensor_cores,
            "{precision:?}: {:?}",
            plan.kv_parallel.routine
        );

        let forced = plan_for(
            &client,
            DType::F32,
            64,
            64,
            &config
                .with_precision(precision)
                .with_routines(Routines::ChunkRecurrent),
        );
        let chunk = forced.chunk_state.expect("ChunkRecurrent plans the state pass");
        assert_eq!(
            chunk.split,
            precision == Precision::Split,
            "{precision:?}: {chunk:?}"
        );
        // 16-bit inputs never split.
        for dtype in input_dtypes().into_iter().filter(|&dtype| dtype != DType::F32) {
            let plan = plan_for(&client, dtype, 64, 64, &config.with_precision(precision));
            assert!(!plan.products.split(), "{dtype}: {:?}", plan.products);
        }
    }
}

/// f32 inputs with split operands through the chunk-recurrent routine, forced
/// (on lavapipe: the portable state pass with f32 parts on the bf16 grid; on
/// CUDA: tensor cores), hold f32's bound on fixed shapes that cross several
/// blocks and sub-blocks, with and without an initial state. The property
/// test draws these too; this runs them on every run.
#[test]
fn split_operands_match_reference() {
    for (i, (block, sub_block, n, d, e)) in [
        (64, 32, 200, 64, 64),
        (32, 16, 97, 32, 48),
        (128, 64, 300, 128, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            block,
            sub_block,
            dims: Dims {
                batch: 2,
                heads: 2,
                seq_len: n,
                key_dim: d,
                value_dim: e,
            },
            with_state: i % 2 == 1,
            dtype: DType::F32,
            routines: Routines::ChunkRecurrent,
            precision: Precision::Split,
            tuning: tuning(),
            seed: 77 + i as u64,
        };
        let (out_err, state_err, _) = run(&case);
        let tol = tolerance_for(DType::F32, Precision::Split);
        assert!(
            out_err < tol && state_err < tol,
            "errors {out_err:e}, {state_err:e} for {case:?}"
        );
    }
}

/// The plan of a `[b, h, n, 32]` prefill at 16/16 with the chunk-recurrent routine.
fn chunk_plan_for(client: &Client, [b, h, n]: [usize; 3]) -> PrefillPlan {
    let mut rng = SeededRng::new(9);
    let x = upload(
        client,
        &rng.values(b * h * n * 32, DType::F32),
        &[b, h, n, 32],
        DType::F32,
    );
    let slopes = upload(client, &rng.slopes(h), &[h], DType::F32);
    let inputs = PrefillInputs {
        q: &x,
        k: &x,
        v: &x,
        slopes: &slopes,
        initial_state: None,
    };
    let config = PrefillConfig::new(16, 16).with_routines(Routines::ChunkRecurrent);
    plan_prefill(client, &inputs, &config).expect("a valid prefill").1
}

/// One long sequence of one head would be one walk on one SM: the plan cuts
/// it into segments walked in parallel (so the property tests, whose problems
/// are small, check the segmented walk on every device), and leaves a batch
/// that fills the device whole.
#[test]
fn chunk_state_splits_few_long_sequences_into_segments() {
    let client = client();
    let long = chunk_plan_for(&client, [1, 1, 1000]);
    let chunk = long.chunk_state.expect("ChunkRecurrent plans the state pass");
    let segment = chunk.segment_blocks.expect("one long walk is split");
    assert!(
        segment.is_power_of_two() && segment < 1000usize.div_ceil(16),
        "{chunk:?}"
    );
    let wide = chunk_plan_for(&client, [64, 16, 20]);
    assert_eq!(wide.chunk_state.map(|chunk| chunk.segment_blocks), Some(None));
}

/// Dense calls of one `(b, n)` that differ in what their work lists hold
/// (an initial state or none, the block config, the routine's walk), in
/// turn and then again: each binds its own lists, uploaded once per shape
/// (`routines::dense_tables`), and matches the reference every time.
#[test]
fn repeated_shapes_bind_their_own_work_lists() {
    let tol = tolerance_for(DType::F32, Precision::Split);
    for round in 0..2u64 {
        for (i, (block, sub_block, with_state, routines)) in [
            (64, 32, false, Routines::Auto),
            (64, 32, true, Routines::Auto),
            (32, 16, true, Routines::Auto),
            (64, 32, true, Routines::ChunkRecurrent),
            (64, 32, false, Routines::Fused),
        ]
        .into_iter()
        .enumerate()
        {
            let case = Case {
                block,
                sub_block,
                dims: Dims {
                    batch: 2,
                    heads: 2,
                    seq_len: 150,
                    key_dim: 32,
                    value_dim: 32,
                },
                with_state,
                dtype: DType::F32,
                routines,
                precision: Precision::Split,
                tuning: tuning(),
                seed: 300 + 10 * round + i as u64,
            };
            let (out_err, state_err, _) = run(&case);
            assert!(
                out_err < tol && state_err < tol,
                "errors {out_err:e}, {state_err:e} for {case:?} (round {round})"
            );
        }
    }
}
