//! The README's drift measurement at a small size: the state's error against
//! the f64 recurrence after decode steps from a prefilled state and after a
//! prefill-then-decode schedule, in an f32 cache and a bf16 one, for
//! MiniMax's strongest and weakest decay (`examples/state_drift`).
//!
//! The bounds are the errors this test measured on lavapipe (2 heads, d = e =
//! 32, a 64-token prompt, seed 7; printed by the test) times 2, and no looser:
//! a kernel change that rounds twice, or in the wrong place, moves them by
//! more than that.

#[path = "../../examples/state_drift/drift.rs"]
#[allow(dead_code)]
mod drift;

use lightning_attention::DType;

use crate::common::*;

/// Decode steps measured (the README goes on to 10 000 at d = e = 128).
const STEPS: [usize; 3] = [1, 100, 1000];

/// Per state dtype: the state errors measured after each of [`STEPS`]
/// (strongest decay, weakest decay), then after the schedule, times 2.
/// Measured (lavapipe): f32 (5.3e-8, 1.8e-7), (5.7e-8, 3.7e-6), (5.1e-8,
/// 2.9e-5), schedule (4.4e-8, 3.2e-6); bf16 (1.8e-3, 2.3e-3), (1.8e-3,
/// 1.4e-2), (1.8e-3, 3.7e-2), schedule (1.7e-3, 1.3e-2).
fn bounds(state_dtype: DType) -> ([[f64; 2]; 3], [f64; 2]) {
    match state_dtype {
        DType::BF16 => (
            [[3.6e-3, 4.7e-3], [3.7e-3, 2.8e-2], [3.6e-3, 7.4e-2]],
            [3.5e-3, 2.6e-2],
        ),
        _ => (
            [[1.1e-7, 3.6e-7], [1.2e-7, 7.4e-6], [1.1e-7, 5.8e-5]],
            [9e-8, 6.5e-6],
        ),
    }
}

#[test]
fn state_drift_stays_within_its_measured_bounds() {
    let client = client();
    // Everything measured and printed first, so that a failure shows the whole table.
    let measured: [_; 2] = [DType::F32, DType::BF16].map(|state_dtype| {
        let rows = drift::decode_drift(&client, state_dtype, 32, 64, &STEPS, 7).expect("decode drift");
        let schedule =
            drift::schedule_drift(&client, state_dtype, 32, (3, 64, 32), 7).expect("schedule drift");
        for row in rows.iter().chain([&schedule]) {
            println!(
                "{state_dtype:?} after {:>5} steps: state {:.2e} {:.2e}, out {:.2e} {:.2e}",
                row.steps, row.state_error[0], row.state_error[1], row.out_error[0], row.out_error[1]
            );
        }
        (state_dtype, rows, schedule)
    });
    for (state_dtype, rows, schedule) in measured {
        let (step_bounds, schedule_bound) = bounds(state_dtype);
        for (row, bound) in rows.iter().zip(step_bounds).chain([(&schedule, schedule_bound)]) {
            for ((err, bound), head) in row.state_error.iter().zip(bound).zip(drift::HEADS) {
                assert!(
                    *err <= bound,
                    "{state_dtype:?}, {head}, after {} steps: state error {err:e} over {bound:e}",
                    row.steps,
                );
            }
        }
    }
}
