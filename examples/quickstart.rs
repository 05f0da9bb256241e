//! The main job: prefill and decode on the best device present, each checked
//! against the f64 reference and timed, printed as a short table.
//!
//! `cargo run --release --example quickstart` (or `bash scripts/quickstart.sh`,
//! which picks CUDA when an NVIDIA driver answers). Exits with an error when
//! any result misses its accuracy bound (f32 1e-4, f16 and bf16 1e-2).
//!
//! Times are host wall time around a synchronized call, median of a few runs
//! after one warm-up run (which compiles the kernels): a first look, not a
//! benchmark. `cargo bench --bench lightning` measures device time at sizes
//! that fill a GPU.

use std::time::{Duration, Instant};

use lightning_attention::cubecl::future::block_on;
use lightning_attention::cubecl::prelude::Client;
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{self, Dims, relative_error};
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, PrefillConfig, PrefillInputs, decode, prefill, runtime, slopes,
};

/// Timed runs per row (after one warm-up run).
const RUNS: usize = 5;

/// Random values `k / 128` for integers `-128 <= k < 128`: exact in f32, f16 and
/// bf16 alike, so one f64 reference serves every dtype and the error shown is
/// the kernels' own (their products and the output's rounding).
fn exact_inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..len)
        .map(|_| (rng.unit() * 128.0).floor() as f32 / 128.0)
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Median wall time of `RUNS` synchronized calls of `f`, after one warm-up call.
fn median_time<T>(
    client: &Client,
    mut f: impl FnMut() -> lightning_attention::Result<T>,
) -> Result<(T, Duration), Box<dyn std::error::Error>> {
    let mut last = f()?;
    block_on(client.sync())?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        last = f()?;
        block_on(client.sync())?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok((last, times[RUNS / 2]))
}

/// The accuracy bound of a dtype (the README's standard).
fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

/// Shapes sized for the device: a CPU adapter (lavapipe) gets small ones so
/// that the table prints in seconds.
struct Sizes {
    /// Prefill `(batch, heads, tokens)`.
    prefill: Vec<(usize, usize, usize)>,
    /// Decode batches.
    decode: Vec<usize>,
    /// Head dim `d = e`.
    dim: usize,
}

fn sizes(client: &Client) -> Sizes {
    // The adapter's name: lavapipe reports "llvmpipe (LLVM ...)".
    let name = client.properties().identity.name.to_lowercase();
    if name.contains("llvmpipe") || name.contains("lavapipe") {
        Sizes {
            prefill: vec![(1, 4, 256), (2, 4, 1024)],
            decode: vec![1, 16],
            dim: 64,
        }
    } else {
        Sizes {
            prefill: vec![(1, 16, 2048), (4, 8, 4096)],
            decode: vec![1, 16, 128],
            dim: 128,
        }
    }
}

/// One row of the table, with its verdict.
struct Row {
    text: String,
    error: f64,
    bound: f64,
}

fn prefill_rows(
    client: &Client,
    sizes: &Sizes,
    dtypes: &[DType],
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let d = sizes.dim;
    let mut rows = Vec::new();
    for (seed, &(b, h, n)) in sizes.prefill.iter().enumerate() {
        let dims = Dims {
            batch: b,
            heads: h,
            seq_len: n,
            key_dim: d,
            value_dim: d,
        };
        let seed = 10 * seed as u64;
        let (q, k, v) = (
            exact_inputs(dims.qk_len(), seed + 1),
            exact_inputs(dims.qk_len(), seed + 2),
            exact_inputs(dims.v_len(), seed + 3),
        );
        // MiniMax's slopes of the middle layer of a 32-layer model.
        let slope_values = slopes::layer_slopes(h, 16, 32)?;
        let exact = reference::recurrence(dims, &f64s(&q), &f64s(&k), &f64s(&v), &f64s(&slope_values), None);
        let slopes_t = DeviceTensor::from_f32(client, &slope_values, &[h], DType::F32)?;
        for &dtype in dtypes {
            let upload = |x: &[f32]| DeviceTensor::from_f32(client, x, &[b, h, n, d], dtype);
            let (q_t, k_t, v_t) = (upload(&q)?, upload(&k)?, upload(&v)?);
            let inputs = PrefillInputs {
                q: &q_t,
                k: &k_t,
                v: &v_t,
                slopes: &slopes_t,
                initial_state: None,
            };
            let config = PrefillConfig::for_client(client);
            let (result, time) = median_time(client, || prefill(client, &inputs, &config))?;
            let out_error = relative_error(&f64s(&result.out.to_f32_vec(client)?), &exact.out);
            let state_error = relative_error(&f64s(&result.final_state.to_f32_vec(client)?), &exact.state);
            let error = out_error.max(state_error);
            let seconds = time.as_secs_f64();
            rows.push(Row {
                text: format!(
                    "| {b:>5} | {h:>5} | {n:>6} | {:<5} | {error:>10.2e} | {:>9.3} | {:>12.3e} |",
                    dtype.to_string(),
                    seconds * 1e3,
                    (b * n) as f64 / seconds,
                ),
                error,
                bound: bound(dtype),
            });
        }
    }
    Ok(rows)
}

fn decode_rows(
    client: &Client,
    sizes: &Sizes,
    dtypes: &[DType],
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let (h, d) = (8, sizes.dim);
    let slope_values = slopes::layer_slopes(h, 16, 32)?;
    let slopes_t = DeviceTensor::from_f32(client, &slope_values, &[h], DType::F32)?;
    let mut rows = Vec::new();
    for (seed, &batch) in sizes.decode.iter().enumerate() {
        let seed = 100 + 10 * seed as u64;
        let (q, k, v) = (
            exact_inputs(batch * h * d, seed + 1),
            exact_inputs(batch * h * d, seed + 2),
            exact_inputs(batch * h * d, seed + 3),
        );
        // A cache of twice the batch's slots, the batch in reverse order of
        // slots: as a serving engine's cache looks, not slot i for row i.
        let slots_len = 2 * batch;
        let cache_values = exact_inputs(slots_len * h * d * d, seed + 4);
        let slots: Vec<i32> = (0..batch).map(|i| (2 * (batch - 1 - i)) as i32).collect();
        for &dtype in dtypes {
            let upload = |x: &[f32]| DeviceTensor::from_f32(client, x, &[batch, h, 1, d], dtype);
            let (q_t, k_t, v_t) = (upload(&q)?, upload(&k)?, upload(&v)?);
            let cache = DeviceTensor::from_f32(client, &cache_values, &[slots_len, h, d, d], DType::F32)?;
            let inputs = DecodeInputs {
                q: &q_t,
                k: &k_t,
                v: &v_t,
                cache: &cache,
                slopes: &slopes_t,
                slots: &slots,
                scale: None,
                rows_in_flight: None,
            };
            // The cache advances on every run: the reference takes as many steps.
            let mut steps = 0;
            let (out, time) = median_time(client, || {
                steps += 1;
                decode(client, &inputs)
            })?;
            let mut state = f64s(&cache_values);
            let slots_i64: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
            let mut expected = Vec::new();
            for _ in 0..steps {
                expected = reference::decode(
                    h,
                    d,
                    d,
                    &f64s(&q),
                    &f64s(&k),
                    &f64s(&v),
                    &mut state,
                    &f64s(&slope_values),
                    &slots_i64,
                );
            }
            let error = relative_error(&f64s(&out.to_f32_vec(client)?), &expected)
                .max(relative_error(&f64s(&cache.to_f32_vec(client)?), &state));
            let seconds = time.as_secs_f64();
            // Each step reads and writes its rows' states once.
            let state_bytes = 2.0 * (batch * h * d * d * 4) as f64;
            rows.push(Row {
                text: format!(
                    "| {batch:>5} | {h:>5} | {:<5} | {error:>10.2e} | {:>9.1} | {:>12.3e} | {:>14.1} |",
                    dtype.to_string(),
                    seconds * 1e6,
                    batch as f64 / seconds,
                    state_bytes / seconds / 1e9,
                ),
                error,
                bound: bound(dtype),
            });
        }
    }
    Ok(rows)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = runtime::best_client();
    let runtime_name = if client.name().to_lowercase().contains("cuda") {
        "CUDA"
    } else {
        "wgpu"
    };
    println!("lightning-attention quickstart");
    println!("runtime: {runtime_name}");
    println!("device:  {}", runtime::describe(&client));
    let dtypes: Vec<DType> = [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .filter(|dtype| dtype.is_supported(&client))
        .collect();
    let sizes = sizes(&client);
    let d = sizes.dim;
    println!(
        "error: relative to the f64 reference (output and final state); bounds f32 1e-4, f16/bf16 1e-2\n"
    );

    println!("prefill, d = e = {d}, from a zero state (median of {RUNS} runs after a warm-up):");
    println!("| batch | heads | tokens | dtype |      error | time (ms) |     tokens/s |");
    println!("|------:|------:|-------:|:------|-----------:|----------:|-------------:|");
    let mut rows = prefill_rows(&client, &sizes, &dtypes)?;
    for row in &rows {
        println!("{}", row.text);
    }

    println!("\ndecode, one token per sequence against a slot cache, d = e = {d}:");
    println!("| batch | heads | dtype |      error | time (us) |     tokens/s | state GB/s r+w |");
    println!("|------:|------:|:------|-----------:|----------:|-------------:|---------------:|");
    let decode = decode_rows(&client, &sizes, &dtypes)?;
    for row in &decode {
        println!("{}", row.text);
    }
    rows.extend(decode);

    println!("\nnext:");
    println!(
        "  bash scripts/test.sh                       every kernel against the reference (property tests)"
    );
    println!("  cargo bench --bench lightning              device-side times at sizes that fill a GPU");
    println!("  cargo run --release --example engine       a toy serving engine over the backend");
    println!(
        "  cargo run --release -p lightning-attention-burn-examples --example minimax_layer\n                                             MiniMax's layer (lightning_attention::burn) trained on Burn"
    );

    let failed: Vec<&Row> = rows
        .iter()
        .filter(|row| row.error.is_nan() || row.error >= row.bound)
        .collect();
    if !failed.is_empty() {
        for row in &failed {
            eprintln!("over its bound ({:e}): {}", row.bound, row.text);
        }
        return Err(format!("{} result(s) missed their accuracy bound", failed.len()).into());
    }
    Ok(())
}
