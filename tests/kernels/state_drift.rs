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

/// Per state dtype: the measured state errors after each of [`STEPS`]
/// (strongest decay, weakest decay), then after the schedule, times 2.
fn bounds(state_dtype: DType) -> ([[f64; 2]; 3], [f64; 2]) {
    match state_dtype {
        DType::BF16 => ([[1e-2, 1e-2], [1e-2, 1e-2], [1e-2, 1e-1]], [1e-2, 1e-1]),
        _ => ([[1e-5, 1e-5], [1e-5, 1e-5], [1e-5, 1e-5]], [1e-5, 1e-5]),
    }
}

#[test]
fn state_drift_stays_within_its_measured_bounds() {
    let client = client();
    for state_dtype in [DType::F32, DType::BF16] {
        let (step_bounds, schedule_bound) = bounds(state_dtype);
        let rows = drift::decode_drift(&client, state_dtype, 32, 64, &STEPS, 7).expect("decode drift");
        let schedule = drift::schedule_drift(&client, state_dtype, 32, (3, 64, 32), 7).expect("schedule drift");
        for row in rows.iter().chain([&schedule]) {
            println!(
                "{state_dtype:?} after {:>5} steps: state {:.2e} {:.2e}, out {:.2e} {:.2e}",
                row.steps, row.state_error[0], row.state_error[1], row.out_error[0], row.out_error[1]
            );
        }
        for (row, bound) in rows.iter().zip(step_bounds).chain([(&schedule, schedule_bound)]) {
            for head in 0..2 {
                let err = row.state_error[head];
                assert!(
                    err <= bound[head],
                    "{state_dtype:?}, {}, after {} steps: state error {err:e} over {:e}",
                    drift::HEADS[head],
                    row.steps,
                    bound[head]
                );
            }
        }
    }
}
