//! Sequence parallelism on in-process ranks (threads sharing the device):
//! each rank's segment of the forward and backward passes, put back together,
//! against the f64 reference of the whole sequence.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::reference::{Dims, backward as reference_backward, recurrence};
use lightning_attention::sequence_parallel::{self, SegmentOutput, StateComm, run_in_process};
use lightning_attention::{
    BackwardInputs, DType, DeviceTensor, LightningError, PrefillConfig, PrefillInputs, Routines,
};

use crate::common::*;

const B: usize = 2;
const H: usize = 3;
const D: usize = 8;
const E: usize = 12;

/// A problem of `lengths.iter().sum()` tokens, split into segments of `lengths`.
struct Problem {
    lengths: Vec<usize>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_out: Vec<f32>,
    slopes: Vec<f32>,
    initial: Option<Vec<f32>>,
    d_final: Option<Vec<f32>>,
    scale: Option<f32>,
}

impl Problem {
    fn new(lengths: &[usize], initial: bool, d_final: bool, scale: Option<f32>, seed: u64) -> Self {
        let n: usize = lengths.iter().sum();
        let mut rng = SeededRng::new(seed);
        let f32s = DType::F32;
        Self {
            lengths: lengths.to_vec(),
            q: rng.values(B * H * n * D, f32s),
            k: rng.values(B * H * n * D, f32s),
            v: rng.values(B * H * n * E, f32s),
            d_out: rng.values(B * H * n * E, f32s),
            // The first head decays slowly, so that the states crossing
            // between ranks weigh on every output.
            slopes: rng
                .slopes(H)
                .into_iter()
                .enumerate()
                .map(|(i, s)| if i == 0 { s * 0.05 } else { s })
                .collect(),
            initial: initial.then(|| rng.values(B * H * D * E, f32s)),
            d_final: d_final.then(|| rng.values(B * H * D * E, f32s)),
            scale,
        }
    }

    fn n(&self) -> usize {
        self.lengths.iter().sum()
    }

    fn dims(&self) -> Dims {
        Dims {
            batch: B,
            heads: H,
            seq_len: self.n(),
            key_dim: D,
            value_dim: E,
        }
    }

    fn config(&self, routines: Routines) -> PrefillConfig {
        let mut config = PrefillConfig::new(16, 8).with_routines(routines);
        config.scale = self.scale;
        config
    }
}

/// Tokens `[start, start + len)` of a `[B, H, n, width]` tensor.
fn segment(x: &[f32], n: usize, width: usize, start: usize, len: usize) -> Vec<f32> {
    x.chunks(n * width)
        .flat_map(|row| &row[start * width..(start + len) * width])
        .copied()
        .collect()
}

/// Segments `[B, H, n_r, width]` put back into `[B, H, n, width]`.
fn concat(parts: &[Vec<f64>], lengths: &[usize], width: usize) -> Vec<f64> {
    (0..B * H)
        .flat_map(|row| {
            parts.iter().zip(lengths).flat_map(move |(part, &len)| {
                part[row * len * width..(row + 1) * len * width].iter().copied()
            })
        })
        .collect()
}

/// Each rank's uploaded segment.
struct Segment {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    d_out: DeviceTensor,
}

fn segments(client: &Client, p: &Problem) -> Vec<Segment> {
    let n = p.n();
    let mut start = 0;
    p.lengths
        .iter()
        .map(|&len| {
            let up = |x: &[f32], width| {
                upload(
                    client,
                    &segment(x, n, width, start, len),
                    &[B, H, len, width],
                    DType::F32,
                )
            };
            let s = Segment {
                q: up(&p.q, D),
                k: up(&p.k, D),
                v: up(&p.v, E),
                d_out: up(&p.d_out, E),
            };
            start += len;
            s
        })
        .collect()
}

fn check(name: &str, actual: &[f64], expected: &[f64], magnitude: &[f64], case: &str) {
    let err = bounded_error(actual, expected, magnitude);
    assert!(err < 1e-4, "{name}: error {err:e} of its magnitude for {case}");
}

/// Forward and backward of `p` on `p.lengths.len()` in-process ranks against
/// the reference of the whole sequence.
fn run_case(p: &Problem, routines: Routines) {
    let client = client();
    let client: &Client = &client;
    let case = format!(
        "lengths {:?}, initial {}, d_final {}, scale {:?}, {routines:?}",
        p.lengths,
        p.initial.is_some(),
        p.d_final.is_some(),
        p.scale
    );
    let world = p.lengths.len();
    let config = p.config(routines);
    let segs = segments(client, p);
    let slopes = upload(client, &p.slopes, &[H], DType::F32);
    let state = |x: &Vec<f32>| upload(client, x, &[B, H, D, E], DType::F32);
    let initial = p.initial.as_ref().map(state);
    let d_final = p.d_final.as_ref().map(state);

    let outputs: Vec<SegmentOutput> = run_in_process(world, |comm| {
        let rank = comm.rank();
        let s = &segs[rank];
        let inputs = PrefillInputs {
            q: &s.q,
            k: &s.k,
            v: &s.v,
            slopes: &slopes,
            initial_state: if rank == 0 { initial.as_ref() } else { None },
        };
        sequence_parallel::prefill(client, comm, &inputs, &config).expect("a valid segment")
    });

    // The whole sequence, and the states at every segment boundary.
    let dims = p.dims();
    let (f64_slopes, scale) = (f64s(&p.slopes), f64::from(p.scale.unwrap_or(1.0)));
    let abs = |x: &[f32]| x.iter().map(|v| f64::from(v.abs())).collect::<Vec<_>>();
    let prefix = |x: &[f32], width: usize, len: usize| segment(x, p.n(), width, 0, len);
    let exact = |abs_values: bool, len: usize| {
        let values = |x: &[f32], width| {
            let x = prefix(x, width, len);
            if abs_values { abs(&x) } else { f64s(&x) }
        };
        let initial = p
            .initial
            .as_ref()
            .map(|x| if abs_values { abs(x) } else { f64s(x) });
        let mut result = recurrence(
            Dims { seq_len: len, ..dims },
            &values(&p.q, D),
            &values(&p.k, D),
            &values(&p.v, E),
            &f64_slopes,
            initial.as_deref(),
        );
        result
            .out
            .iter_mut()
            .for_each(|o| *o *= if abs_values { scale.abs() } else { scale });
        result
    };
    let (expected, magnitude) = (exact(false, p.n()), exact(true, p.n()));
    let outs: Vec<Vec<f64>> = outputs.iter().map(|o| read(client, &o.out)).collect();
    check(
        "out",
        &concat(&outs, &p.lengths, E),
        &expected.out,
        &magnitude.out,
        &case,
    );
    let mut end = 0;
    for (rank, output) in outputs.iter().enumerate() {
        let before = |len: usize| {
            if len == 0 {
                let zeros = vec![0.0; B * H * D * E];
                let initial = p.initial.as_ref().map(|x| (f64s(x), abs(x)));
                return initial.unwrap_or((zeros.clone(), zeros));
            }
            (exact(false, len).state, exact(true, len).state)
        };
        let (incoming, incoming_magnitude) = before(end);
        let name = format!("incoming state of rank {rank}");
        check(
            &name,
            &read(client, &output.incoming_state),
            &incoming,
            &incoming_magnitude,
            &case,
        );
        end += p.lengths[rank];
        let (state, state_magnitude) = before(end);
        let name = format!("final state of rank {rank}");
        check(
            &name,
            &read(client, &output.final_state),
            &state,
            &state_magnitude,
            &case,
        );
    }

    let grads = run_in_process(world, |comm| {
        let rank = comm.rank();
        let s = &segs[rank];
        let inputs = BackwardInputs {
            q: &s.q,
            k: &s.k,
            v: &s.v,
            slopes: &slopes,
            initial_state: Some(&outputs[rank].incoming_state),
            d_out: &s.d_out,
            d_final_state: if rank + 1 == world { d_final.as_ref() } else { None },
        };
        sequence_parallel::backward(client, comm, &inputs, &config).expect("a valid segment")
    });
    let reference = |abs_values: bool| {
        let values = |x: &[f32]| if abs_values { abs(x) } else { f64s(x) };
        reference_backward(
            dims,
            &values(&p.q),
            &values(&p.k),
            &values(&p.v),
            &f64_slopes,
            p.initial.as_deref().map(values).as_deref(),
            p.scale.map(|s| {
                if abs_values {
                    f64::from(s.abs())
                } else {
                    f64::from(s)
                }
            }),
            &values(&p.d_out),
            p.d_final.as_deref().map(values).as_deref(),
        )
    };
    let (expected, magnitude) = (reference(false), reference(true));
    let gathered = |pick: fn(&lightning_attention::Gradients) -> &DeviceTensor, width| {
        let parts: Vec<Vec<f64>> = grads.iter().map(|g| read(client, pick(g))).collect();
        concat(&parts, &p.lengths, width)
    };
    check("dq", &gathered(|g| &g.dq, D), &expected.dq, &magnitude.dq, &case);
    check("dk", &gathered(|g| &g.dk, D), &expected.dk, &magnitude.dk, &case);
    check("dv", &gathered(|g| &g.dv, E), &expected.dv, &magnitude.dv, &case);
    check(
        "d_initial_state",
        &read(client, &grads[0].d_initial_state),
        &expected.d_initial_state,
        &magnitude.d_initial_state,
        &case,
    );
}

/// Fresh inputs each run (the seed is printed with a failure).
fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64);
    println!("seed {seed}");
    seed
}

#[test]
fn one_rank_is_the_whole_prefill() {
    let seed = seed();
    run_case(&Problem::new(&[37], false, false, None, seed), Routines::Auto);
    run_case(
        &Problem::new(&[21], true, true, Some(0.5), seed + 1),
        Routines::Auto,
    );
}

#[test]
fn two_ranks_with_a_segment_shorter_than_a_block() {
    let seed = seed();
    run_case(&Problem::new(&[5, 40], false, true, None, seed), Routines::Auto);
    run_case(
        &Problem::new(&[33, 7], true, false, Some(-2.0), seed + 1),
        Routines::Auto,
    );
}

#[test]
fn three_ranks_of_unequal_segments() {
    let seed = seed();
    run_case(
        &Problem::new(&[16, 3, 29], true, true, None, seed),
        Routines::Auto,
    );
    run_case(
        &Problem::new(&[9, 20, 1], false, false, Some(0.125), seed + 1),
        Routines::ChunkRecurrent,
    );
}

#[test]
fn five_ranks_of_unequal_segments() {
    let seed = seed();
    run_case(
        &Problem::new(&[7, 33, 1, 16, 20], true, true, None, seed),
        Routines::Auto,
    );
    run_case(
        &Problem::new(&[2, 1, 17, 40, 3], false, false, None, seed + 1),
        Routines::Auto,
    );
    run_case(
        &Problem::new(&[12, 5, 31, 1, 8], true, false, Some(0.5), seed + 2),
        Routines::ChunkRecurrent,
    );
    run_case(
        &Problem::new(&[6, 19, 2, 25, 11], true, true, Some(-2.0), seed + 3),
        Routines::Fused,
    );
}

/// Poisoned `[b, h, n, x]` segments: what the refusals are judged on (no
/// kernel runs).
fn refused_prefill(
    client: &Client,
    heads: &[usize],
    lengths: &[usize],
    initial_on: Option<usize>,
) -> Vec<Result<SegmentOutput, LightningError>> {
    let config = PrefillConfig::new(16, 8);
    let t = |shape: &[usize]| DeviceTensor::empty(client, shape, DType::F32);
    let segs: Vec<_> = heads
        .iter()
        .zip(lengths)
        .map(|(&h, &n)| {
            (
                t(&[B, h, n, D]),
                t(&[B, h, n, D]),
                t(&[B, h, n, E]),
                t(&[h]),
                t(&[B, h, D, E]),
            )
        })
        .collect();
    run_in_process(lengths.len(), |comm| {
        let rank = comm.rank();
        let (q, k, v, slopes, initial) = &segs[rank];
        let inputs = PrefillInputs {
            q,
            k,
            v,
            slopes,
            initial_state: (initial_on == Some(rank)).then_some(initial),
        };
        sequence_parallel::prefill(client, comm, &inputs, &config)
    })
}

#[test]
fn ranks_that_disagree_on_heads_all_refuse() {
    let client = client();
    let results = refused_prefill(&client, &[H, H, H + 1], &[4, 20, 9], None);
    for result in results {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                LightningError::SequenceParallelMismatch {
                    what: "heads",
                    rank: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn an_initial_state_past_rank_0_or_an_empty_segment_stops_every_rank() {
    let client = client();
    let results = refused_prefill(&client, &[H, H], &[8, 8], Some(1));
    let err = results[1].as_ref().unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::SequenceParallelArgument {
                what: "initial_state",
                rank: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = results[0].as_ref().unwrap_err();
    assert!(
        matches!(err, LightningError::SequenceParallelPeer { rank: 1 }),
        "{err}"
    );

    let results = refused_prefill(&client, &[H, H, H], &[8, 5, 0], None);
    let err = results[2].as_ref().unwrap_err();
    assert!(
        matches!(err, LightningError::EmptyDimension { dim: "n", .. }),
        "{err}"
    );
    for result in &results[..2] {
        let err = result.as_ref().unwrap_err();
        assert!(
            matches!(err, LightningError::SequenceParallelPeer { rank: 2 }),
            "{err}"
        );
    }
}

#[test]
fn a_final_state_gradient_before_the_last_rank_stops_every_rank() {
    let client = client();
    let client: &Client = &client;
    let config = PrefillConfig::new(16, 8);
    let t = |shape: &[usize]| DeviceTensor::empty(client, shape, DType::F32);
    let (q, k, v, d_out) = (
        t(&[B, H, 8, D]),
        t(&[B, H, 8, D]),
        t(&[B, H, 8, E]),
        t(&[B, H, 8, E]),
    );
    let (slopes, d_final) = (t(&[H]), t(&[B, H, D, E]));
    let results = run_in_process(2, |comm| {
        let inputs = BackwardInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &slopes,
            initial_state: None,
            d_out: &d_out,
            d_final_state: (comm.rank() == 0).then_some(&d_final),
        };
        sequence_parallel::backward(client, comm, &inputs, &config)
    });
    let err = results[0].as_ref().unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::SequenceParallelArgument {
                what: "d_final_state",
                rank: 0,
                ..
            }
        ),
        "{err}"
    );
    let err = results[1].as_ref().unwrap_err();
    assert!(
        matches!(err, LightningError::SequenceParallelPeer { rank: 0 }),
        "{err}"
    );
}
