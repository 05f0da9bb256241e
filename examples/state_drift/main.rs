//! The README's "bf16 state cache" table: the state's drift from the f64
//! recurrence in an f32 cache and in a bf16 one, after 1, 100, 1 000 and
//! 10 000 decode steps from a prefilled state, for MiniMax's weakest and
//! strongest decay, and after a prefill-then-decode schedule.
//!
//! `cargo run --release --example state_drift [-- --dim D --prompt P --steps 1,100,1000,10000]`

mod drift;

use lightning_attention::{DType, runtime};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = runtime::best_client();
    println!("device: {}", runtime::describe(&client));
    let dim: usize = arg("--dim", "128").parse()?;
    let prompt: usize = arg("--prompt", "1024").parse()?;
    let steps: Vec<usize> = arg("--steps", "1,100,1000,10000")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let schedule = (4, 512, 256);
    println!(
        "2 heads, d = e = {dim}; slopes (strongest, weakest): {:?}",
        drift::extreme_slopes()?
    );
    println!("relative error against the f64 recurrence: state (out of the last step)");
    println!(
        "| cache | after | {} state | {} out | {} state | {} out |",
        drift::HEADS[0],
        drift::HEADS[0],
        drift::HEADS[1],
        drift::HEADS[1]
    );
    println!("|---|---|---|---|---|---|");
    let print = |row: &drift::Drift, label: String| {
        println!(
            "| {:?} | {label} | {:.1e} | {:.1e} | {:.1e} | {:.1e} |",
            row.state_dtype, row.state_error[0], row.out_error[0], row.state_error[1], row.out_error[1]
        );
    };
    for state_dtype in [DType::F32, DType::BF16] {
        for row in drift::decode_drift(&client, state_dtype, dim, prompt, &steps, 7)? {
            print(&row, format!("prefill {prompt} + {} decode steps", row.steps));
        }
        let row = drift::schedule_drift(&client, state_dtype, dim, schedule, 7)?;
        let (rounds, chunk, decodes) = schedule;
        print(&row, format!("{rounds} x (prefill {chunk} + {decodes} decodes)"));
    }
    Ok(())
}
