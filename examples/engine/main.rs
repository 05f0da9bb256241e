//! Plays an inference engine against the serving backend: requests arrive and
//! finish over many steps, prefills and decodes share steps, and every layer's
//! output and every live state is checked against the f64 reference.
//!
//! `cargo run --release --example engine [-- --steps N --heads H --dim D --layers L --slots S --bf16-cache]`

mod simulation;

use lightning_attention::{DType, runtime};
use simulation::{EngineConfig, run};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = runtime::best_client();
    println!("device: {}", runtime::describe(&client));
    let config = EngineConfig {
        heads: arg("--heads", 4),
        dim: arg("--dim", 64),
        layers: arg("--layers", 2),
        slots: arg("--slots", 8),
        steps: arg("--steps", 24),
        max_prompt: arg("--max-prompt", 300),
        seed: arg("--seed", 1) as u64,
        state_dtype: if std::env::args().any(|a| a == "--bf16-cache") {
            DType::BF16
        } else {
            DType::F32
        },
    };
    println!("{config:?}");
    let worst = run(&client, config, |r| {
        println!(
            "step {:>3} {:<6} prefills {:?} + {} decodes ({} reused slots): worst relative error {:.1e}",
            r.step, r.kind, r.prefills, r.decodes, r.reused_slots, r.worst_error
        );
    })?;
    println!("worst relative error over all steps: {worst:.1e}");
    // NaN is no pass: only a finite error under the bound is. A bf16 cache is
    // judged against a reference rounded as it is (see the simulation's doc),
    // to the bound the test suite holds it to.
    let bound = if config.state_dtype == DType::BF16 {
        simulation::BF16_CACHE_BOUND
    } else {
        1e-4
    };
    if worst.is_nan() || worst >= bound {
        return Err(format!("outputs or states differ from the reference: {worst:e}").into());
    }
    println!("every step matches the reference");
    Ok(())
}
