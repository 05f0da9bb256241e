//! Packed (varlen) calls against the reference: many sequences of any lengths,
//! prefills and decodes mixed in one call, slot-indexed states, new requests
//! that start from zeros, padding, and speculative snapshots.

use lightning_attention::plan::{DeviceLimits, PrefillPlan, PrefillWork};
use lightning_attention::reference::{VarlenProblem, varlen as reference_varlen};
use lightning_attention::{
    DType, FusedProducts, PrefillConfig, Routines, Snapshots, Tuning, VarlenBatch, VarlenInputs,
    prefill_varlen_into,
};
use proptest::prelude::*;

use crate::common::*;

/// One sequence of a case.
#[derive(Clone, Debug)]
struct Sequence {
    len: usize,
    has_initial: bool,
    padding: bool,
    snapshots: bool,
}

#[derive(Clone, Debug)]
struct Case {
    block: usize,
    sub_block: usize,
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    sequences: Vec<Sequence>,
    snapshot_count: usize,
    spare_slots: usize,
    dtype: DType,
    /// ChunkRecurrent walks slot-cache states through the chunk-recurrent
    /// state pass, portable where tensor cores are absent.
    routines: Routines,
    seed: u64,
}

fn sequence(block: usize) -> impl Strategy<Value = Sequence> {
    // A third are decodes (one token), the rest up to three blocks and a tail.
    (
        prop_oneof![Just(1usize), 1..=3 * block + 5],
        prop::bool::weighted(0.6),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(len, has_initial, padding, snapshots)| Sequence {
            len,
            has_initial,
            padding,
            snapshots,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![(16, 16), (32, 16), (32, 32), (64, 16), (64, 32), (128, 64)]),
        1usize..=2,
        prop::sample::select(vec![(32, 32), (64, 128), (24, 40), (16, 8), (128, 64)]),
        0usize..=3,
        0usize..=3,
        prop::sample::select(input_dtypes()),
        prop::sample::select(vec![Routines::Auto, Routines::ChunkRecurrent, Routines::Fused]),
        any::<u64>(),
    )
        .prop_flat_map(
            |(
                (block, sub_block),
                heads,
                (key_dim, value_dim),
                snapshot_count,
                spare_slots,
                dtype,
                routines,
                seed,
            )| {
                prop::collection::vec(sequence(block), 1..=6).prop_map(move |sequences| Case {
                    block,
                    sub_block,
                    heads,
                    key_dim,
                    value_dim,
                    sequences,
                    snapshot_count,
                    spare_slots,
                    dtype,
                    routines,
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn varlen_matches_reference(case in case()) {
        run_case(&case, DType::F32)?;
    }
}

proptest! {
    // Few cases: the prefill kernels are the f32 cache's, on a scratch.
    #![proptest_config(ProptestConfig { cases: cases(8), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn varlen_bf16_cache_matches_rounded_reference(case in case()) {
        run_case(&case, DType::BF16)?;
    }
}

/// The bound on a written bf16 state's error against the rounded reference,
/// relative to its magnitude: the kernels' f32 error moves an element to the
/// neighbouring bf16 (2^-8 to 2^-7 of it) now and then. The worst of 200
/// cases measured on lavapipe was 2.2e-4 (1.7e-4 with f32 inputs); about twice
/// that. (16-bit inputs keep their own, looser bound.)
const BF16_STATE_TOLERANCE: f64 = 5e-4;

/// `case` against a cache of `state_dtype` (every `e` of the cases is even).
/// A bf16 cache is judged against the f64 reference run from the same (bf16)
/// states, with every state it writes rounded to bf16 once, as the kernels do.
fn run_case(case: &Case, state_dtype: DType) -> Result<(), TestCaseError> {
    let client = client();
    let (h, d, e, dtype) = (case.heads, case.key_dim, case.value_dim, case.dtype);
    let n = case.sequences.len();
    let mut rng = SeededRng::new(case.seed);
    let mut cu = vec![0u32];
    for s in &case.sequences {
        cu.push(cu.last().unwrap() + s.len as u32);
    }
    let total = *cu.last().unwrap() as usize;
    // Snapshots only where the sequence is long enough for all K of them.
    let k_snap = case.snapshot_count;
    let takes_snapshots = |s: &Sequence| k_snap > 0 && s.snapshots && s.len >= k_snap;
    let snapshot_rows = case.sequences.iter().filter(|s| takes_snapshots(s)).count();
    let num_slots = n + snapshot_rows * k_snap + case.spare_slots;

    // A shuffled assignment of distinct slots: first the sequences', then the snapshots'.
    let mut order: Vec<i32> = (0..num_slots as i32).collect();
    for i in (1..order.len()).rev() {
        let j = ((rng.unit() * 0.5 + 0.5) * (i + 1) as f32) as usize % (i + 1);
        order.swap(i, j);
    }
    let mut next = order.into_iter();
    let slots: Vec<i32> = case
        .sequences
        .iter()
        .map(|s| {
            let slot = next.next().unwrap();
            if s.padding { -1 } else { slot }
        })
        .collect();
    let has_initial: Vec<bool> = case.sequences.iter().map(|s| s.has_initial).collect();
    let mut snapshot_slots = vec![-1i32; n * k_snap];
    for (seq, s) in case.sequences.iter().enumerate() {
        if takes_snapshots(s) {
            for j in 0..k_snap {
                // Skip one of them now and then: -1 means no snapshot there.
                if j != 1 || rng.unit() > -0.5 {
                    snapshot_slots[seq * k_snap + j] = next.next().unwrap();
                }
            }
        }
    }

    let q = rng.values(total * h * d, dtype);
    let k = rng.values(total * h * d, dtype);
    let v = rng.values(total * h * e, dtype);
    let slopes = rng.slopes(h);
    let cache = rng.values(num_slots * h * d * e, state_dtype);

    let q_t = upload(&client, &q, &[total, h, d], dtype);
    let k_t = upload(&client, &k, &[total, h, d], dtype);
    let v_t = upload(&client, &v, &[total, h, e], dtype);
    let s_t = upload(&client, &slopes, &[h], DType::F32);
    let cache_t = upload(&client, &cache, &[num_slots, h, d, e], state_dtype);
    let before = cache_t.to_bytes(&client).unwrap();
    let out = poisoned(&client, &[total, h, e], dtype);
    let inputs = VarlenInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        cache: &cache_t,
        batch: VarlenBatch {
            cu_seqlens: &cu,
            slots: &slots,
            has_initial_state: &has_initial,
            snapshots: (k_snap > 0).then_some(Snapshots {
                count: k_snap,
                slots: &snapshot_slots,
            }),
        },
    };
    let config = PrefillConfig::new(case.block, case.sub_block).with_routines(case.routines);
    prefill_varlen_into(&client, &inputs, &config, &out).expect("a valid packed call");

    let cu_usize: Vec<usize> = cu.iter().map(|&x| x as usize).collect();
    let slots64: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
    let snapshots64: Vec<i64> = snapshot_slots.iter().map(|&s| s as i64).collect();
    let (qf, kf, vf, sf) = (f64s(&q), f64s(&k), f64s(&v), f64s(&slopes));
    let run_reference = |q: &[f64], k: &[f64], v: &[f64], cache: &mut Vec<f64>| {
        reference_varlen(
            &VarlenProblem {
                heads: h,
                key_dim: d,
                value_dim: e,
                q,
                k,
                v,
                slopes: &sf,
                scale: 1.0,
                cu_seqlens: &cu_usize,
                slots: &slots64,
                has_initial_state: &has_initial,
                snapshots: (k_snap > 0).then_some((k_snap, &snapshots64[..])),
            },
            cache,
        )
    };
    let mut expected_cache = f64s(&cache);
    let expected = run_reference(&qf, &kf, &vf, &mut expected_cache);
    // The same problem on magnitudes: the size of what each output sums before
    // cancellation, the scale rounding errors are relative to.
    let abs = |x: &[f64]| x.iter().map(|v| v.abs()).collect::<Vec<_>>();
    let mut magnitude_cache = abs(&f64s(&cache));
    let magnitude = run_reference(&abs(&qf), &abs(&kf), &abs(&vf), &mut magnitude_cache);

    // The whole output by the usual measure, then each sequence on its own
    // (so that a short one cannot hide behind a long one) against its
    // magnitudes: one token's `q . k` may cancel to almost nothing, and no
    // f32 kernel gets that to 1e-4 of itself.
    let actual = read(&client, &out);
    let tol = tolerance(dtype);
    let err = relative_error(&actual, &expected);
    prop_assert!(err < tol, "output error {err:e} for {case:?}");
    let difference = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm = |a: &[f64]| a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for seq in 0..n {
        let rows = cu_usize[seq] * h * e..cu_usize[seq + 1] * h * e;
        let err = difference(&actual[rows.clone()], &expected[rows.clone()]) / norm(&magnitude[rows]);
        // NaN fails: it is not below anything.
        prop_assert!(
            err < tol,
            "sequence {seq}: output error {err:e} of its magnitude for {case:?}"
        );
    }
    // Every slot: written ones hold the reference state; the rest are byte-identical.
    let after = cache_t.to_bytes(&client).unwrap();
    let actual_cache = read(&client, &cache_t);
    let state_len = h * d * e;
    let written: Vec<i32> = slots
        .iter()
        .chain(&snapshot_slots)
        .copied()
        .filter(|&s| s >= 0)
        .collect();
    let (state_tol, elem_bytes) = match state_dtype {
        DType::BF16 => {
            expected_cache.iter_mut().for_each(|x| *x = round_bf16(*x));
            (tol.max(BF16_STATE_TOLERANCE), 2)
        }
        _ => (tol, 4),
    };
    for slot in 0..num_slots {
        let range = slot * state_len..(slot + 1) * state_len;
        if written.contains(&(slot as i32)) {
            let err = difference(&actual_cache[range.clone()], &expected_cache[range.clone()])
                / norm(&magnitude_cache[range]);
            prop_assert!(
                err < state_tol,
                "slot {slot}: state error {err:e} of its magnitude for {case:?}"
            );
        } else {
            let bytes = range.start * elem_bytes..range.end * elem_bytes;
            prop_assert!(
                before[bytes.clone()] == after[bytes],
                "slot {slot} changed: {case:?}"
            );
        }
    }
    Ok(())
}

/// A whole engine step in one call, with a shape every property case could
/// miss: long prefills, new and continuing, beside a crowd of decodes.
#[test]
fn mixed_engine_step_matches_reference() {
    let mut sequences = vec![
        Sequence {
            len: 300,
            has_initial: false,
            padding: false,
            snapshots: false,
        },
        Sequence {
            len: 77,
            has_initial: true,
            padding: false,
            snapshots: true,
        },
        Sequence {
            len: 129,
            has_initial: true,
            padding: false,
            snapshots: false,
        },
    ];
    for i in 0..12 {
        sequences.push(Sequence {
            len: 1,
            has_initial: i % 5 != 0,
            padding: i == 7,
            snapshots: false,
        });
    }
    let case = Case {
        block: 64,
        sub_block: 32,
        heads: 2,
        key_dim: 64,
        value_dim: 64,
        sequences,
        snapshot_count: 3,
        spare_slots: 2,
        dtype: DType::F32,
        routines: Routines::ChunkRecurrent,
        seed: 7,
    };
    run_case(&case, DType::F32).unwrap();
}

/// The fused routine takes calls with snapshots too: it walks one block per
/// segment, so that kv-parallel and kv-reduce leave every block's incoming
/// state where kv-snapshot reads it. The plan says so, and a mixed step with
/// snapshots in long and short sequences (a block and a tail, under a
/// block, several blocks) matches the reference in f32 and bf16.
#[test]
fn fused_routine_takes_snapshots_on_single_block_segments() {
    let client = client();
    // The portable walk forced: with Auto products, a device with the
    // tensor-core walk runs f32 on the chunk-recurrent routine.
    let config = PrefillConfig::new(32, 16)
        .with_routines(Routines::Fused)
        .with_tuning(Tuning {
            fused_products: FusedProducts::Portable,
            ..tuning()
        });
    let work = PrefillWork {
        dtype: DType::F32,
        heads: 2,
        key_dim: 32,
        value_dim: 32,
        sub_blocks: 12,
        blocks: 6,
        sequences: 3,
        snapshots: 4,
    };
    let plan = PrefillPlan::new(&work, &config, &DeviceLimits::of(&client)).expect("a valid plan");
    let fused = plan.fused.expect("the fused routine with snapshots");
    assert_eq!(fused.segment_blocks, Some(1));
    assert!(plan.chunk_state.is_none());
    let sequences = [
        (45, true, true),
        (20, false, true),
        (100, true, true),
        (1, true, false),
        (70, true, false),
    ]
    .map(|(len, has_initial, snapshots)| Sequence {
        len,
        has_initial,
        padding: false,
        snapshots,
    })
    .to_vec();
    for dtype in [DType::F32, DType::BF16] {
        let case = Case {
            block: 32,
            sub_block: 16,
            heads: 2,
            key_dim: 32,
            value_dim: 32,
            sequences: sequences.clone(),
            snapshot_count: 3,
            spare_slots: 1,
            dtype,
            routines: Routines::Fused,
            seed: 21,
        };
        run_case(&case, DType::F32).unwrap();
    }
}
