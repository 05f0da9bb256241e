//! Trains a small model built on MiniMax's linear-attention layer
//! ([`lightning_attention::burn::MiniMaxLinearAttention`], lightning attention on Burn tensors)
//! to recall a token seen earlier in the sequence, and prints the loss falling.
//!
//! `cargo run --release -p lightning-attention-burn-examples --example minimax_layer [-- --steps N --seed S --lr LR]`
//!
//! Runs on the wgpu device Burn picks by default (a GPU, or lavapipe on the CPU).

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use lightning_attention::reference::random::uniform_f32;
use lightning_attention_burn_examples::recall::{RecallConfig, chunked_vs_whole, initial_and_final, train};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let defaults = RecallConfig::new();
    let config = RecallConfig::new()
        .with_steps(arg("--steps", defaults.steps))
        .with_seed(arg("--seed", defaults.seed))
        .with_lr(arg("--lr", defaults.lr));
    println!(
        "task: {} random tokens of {}; every position after position {} names the token seen there",
        config.seq_len, config.vocab, config.recall_at
    );
    println!(
        "model: embedding -> {} x MiniMaxLinearAttention ({} heads of {}, hidden {}, BLOCK/CBLOCK {}/{}) with residuals -> head",
        config.layers, config.heads, config.head_dim, config.hidden, config.block, config.sub_block
    );
    println!(
        "AdamW lr {}, batch {}, {} steps; chance is ln {} = {:.3}",
        config.lr,
        config.batch,
        config.steps,
        config.vocab,
        (config.vocab as f64).ln()
    );
    let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
    let start = std::time::Instant::now();
    let (model, steps) = train(&config, &device, |s| {
        if s.step % 10 == 0 || s.step + 1 == config.steps {
            println!(
                "step {:>4}  loss {:.4}  accuracy {:.2}",
                s.step, s.loss, s.accuracy
            );
        }
    })?;
    let (initial, last) = initial_and_final(&steps, 10);
    println!(
        "initial loss {initial:.4}, final loss {last:.4} (mean of the last 10 steps), {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Chunked inference: the first layer over a sequence at once, and in two
    // chunks with the state carried between them, agree.
    let x = Tensor::<3>::from_data(
        TensorData::new(uniform_f32(2 * 48 * config.hidden, 7), [2, 48, config.hidden]),
        &device,
    );
    let difference = chunked_vs_whole(&model.layers[0], x, 20)?;
    println!("layer 0 over 48 tokens in chunks of 20 + 28 vs at once: relative difference {difference:.1e}");
    Ok(())
}
