//! The main job: one prefill and one decode step on the best device present,
//! each checked against the f64 reference and timed.
//!
//! `cargo run --release --example quickstart [-- --heads H --seq-len N --dim D]`

use std::time::Instant;

use lightning_attention::cubecl::future::block_on;
use lightning_attention::reference::random::uniform_f32;
use lightning_attention::reference::{self, Dims, relative_error};
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, PrefillConfig, PrefillInputs, decode, prefill, runtime, slopes,
};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (h, n, d) = (arg("--heads", 8), arg("--seq-len", 1024), arg("--dim", 128));
    let client = runtime::best_client();
    println!("device: {}", runtime::describe(&client));
    let dims = Dims {
        batch: 1,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: d,
    };
    let (q, k, v) = (
        uniform_f32(dims.qk_len(), 1),
        uniform_f32(dims.qk_len(), 2),
        uniform_f32(dims.v_len(), 3),
    );
    let slope_values = slopes::layer_slopes(h, 0, 2)?;
    let upload = |x: &[f32], shape: &[usize]| DeviceTensor::from_f32(&client, x, shape, DType::F32);
    let (q_t, k_t, v_t) = (
        upload(&q, &[1, h, n, d])?,
        upload(&k, &[1, h, n, d])?,
        upload(&v, &[1, h, n, d])?,
    );
    let s_t = upload(&slope_values, &[h])?;
    let inputs = PrefillInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        slopes: &s_t,
        initial_state: None,
    };
    let config = PrefillConfig::for_client(&client);

    // The first call compiles the kernels; time the second.
    prefill(&client, &inputs, &config)?;
    block_on(client.sync())?;
    let start = Instant::now();
    let result = prefill(&client, &inputs, &config)?;
    block_on(client.sync())?;
    let prefill_time = start.elapsed();

    let exact = reference::recurrence(dims, &f64s(&q), &f64s(&k), &f64s(&v), &f64s(&slope_values), None);
    let out_err = relative_error(&f64s(&result.out.to_f32_vec(&client)?), &exact.out);
    let state_err = relative_error(&f64s(&result.final_state.to_f32_vec(&client)?), &exact.state);
    println!(
        "prefill b=1 h={h} n={n} d=e={d} f32: {:.3} ms ({:.0} tokens/s), rel. error out {out_err:.2e}, state {state_err:.2e}",
        prefill_time.as_secs_f64() * 1e3,
        n as f64 / prefill_time.as_secs_f64()
    );

    // One decode step continuing the sequence from its final state (slot 0).
    let (qd, kd, vd) = (
        uniform_f32(h * d, 4),
        uniform_f32(h * d, 5),
        uniform_f32(h * d, 6),
    );
    let (qd_t, kd_t, vd_t) = (
        upload(&qd, &[1, h, 1, d])?,
        upload(&kd, &[1, h, 1, d])?,
        upload(&vd, &[1, h, 1, d])?,
    );
    let cache = result.final_state;
    let decode_inputs = DecodeInputs {
        q: &qd_t,
        k: &kd_t,
        v: &vd_t,
        cache: &cache,
        slopes: &s_t,
        slots: &[0],
        scale: None,
    };
    let start = Instant::now();
    let out = decode(&client, &decode_inputs)?;
    block_on(client.sync())?;
    let decode_time = start.elapsed();
    let mut state = exact.state;
    let expected = reference::decode(
        h,
        d,
        d,
        &f64s(&qd),
        &f64s(&kd),
        &f64s(&vd),
        &mut state,
        &f64s(&slope_values),
        &[0],
    );
    let err = relative_error(&f64s(&out.to_f32_vec(&client)?), &expected);
    println!(
        "decode  b=1 h={h} d=e={d} f32: {:.3} ms (includes compilation), rel. error {err:.2e}",
        decode_time.as_secs_f64() * 1e3
    );
    let worst = out_err.max(state_err).max(err);
    if worst.is_nan() || worst >= 1e-4 {
        return Err(format!("error {worst:e} exceeds 1e-4").into());
    }
    Ok(())
}
