//! A whole decode step of a model: `layers` layers of the serving backend's
//! `forward_decode`, launched layer by layer, and the same step captured once
//! as a graph and replayed (CUDA graphs on CUDA, cubecl's recorded dispatches
//! on wgpu), timed per step; the note gives the time per layer. Heads are what
//! one tensor-parallel rank holds (h = 8 is one rank of 64 heads over 8 GPUs).
//! The rows that issue 17's goals are stated in.
//!
//! Beside them, the yardstick for a step of that shape: `layers` launches of
//! a kernel that only streams each layer's state in place (reads and writes
//! the same bytes as the decode's cache, nothing else), replayed from a graph
//! the same way. What it reaches is the most any one-launch-per-layer decode
//! can: a small layer pays each launch's fixed cost whatever the kernel does.

use lightning_attention::cubecl::client::Graph;
use lightning_attention::cubecl::prelude::*;
use lightning_attention::cubecl::server::ServerError;
use lightning_attention::{BackendConfig, DType, DeviceTensor, LightningBackend, PrefillConfig};
use std::time::Duration;

use crate::report::Row;
use crate::{Options, median_time, upload, vector_grid};

/// Fills a step row from its median `time` for `batch` sequences and `layers`
/// layers: tokens/s and the share of the floor over `bytes.0` bytes moved,
/// the state's TB/s over `bytes.1`, and the time per layer.
fn record(row: &mut Row, time: Duration, batch: usize, layers: usize, bytes: (usize, usize), bw: f64) {
    let (io, state_bytes) = bytes;
    row.measured(time, batch, io as f64, bw);
    row.state_tb_s = Some(state_bytes as f64 / time.as_secs_f64() / 1e12);
    row.note = format!("{:.2} us per layer", time.as_secs_f64() * 1e6 / layers as f64);
}

/// `step` run once outside a graph (first launches compile), then recorded as one.
fn capture(client: &Client, step: impl Fn()) -> Result<Graph, ServerError> {
    client.graph_prepare()?;
    step();
    client.start_capture()?;
    step();
    client.stop_capture()
}

/// `state = factor * state` in place, one 4-wide vector per unit: the
/// cache's traffic of one decode layer without the decode (factor is 1 at run
/// time, so the compiler cannot drop the loads and stores).
#[cube(launch_unchecked)]
fn stream_state<N: Size>(state: &mut [Vector<f32, N>], factor: f32) {
    let pos = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * CUBE_DIM as usize
        + UNIT_POS as usize;
    if pos < state.len() {
        let value = state[pos];
        state[pos] = value * Vector::new(factor);
    }
}

/// The step of `layers` layers, `batch` sequences of `heads` heads, d = e =
/// 128, f32, against caches of `state_dtype`: one row launched layer by
/// layer, one replayed from a graph (and, with an f32 cache, the yardstick).
pub fn bench_decode_step(
    client: &Client,
    target: &str,
    (layers, heads, batch): (usize, usize, usize),
    state_dtype: DType,
    opts: &Options,
    bw: f64,
) -> Vec<Row> {
    let (d, e) = (128, 128);
    let row = |how: &str| {
        let mut row = Row::new(target, "decode step", [batch, heads, 1, d], DType::F32);
        row.op = crate::cache_op(&format!("decode step {layers} layers ({how})"), state_dtype);
        row
    };
    let (mut launched, mut replayed) = (row("launches"), row("graph"));
    let config = BackendConfig {
        heads,
        key_dim: d,
        value_dim: e,
        // The slope ladder needs two layers at least.
        layers: layers.max(2),
        slots: batch,
        max_batch: batch,
        tensor_parallel: (0, 1),
        dtype: DType::F32,
        prefill: PrefillConfig::default().with_tuning(opts.tuning),
        state_dtype,
    };
    let failed = |mut a: Row, mut b: Row, note: String| {
        a.note.clone_from(&note);
        b.note = note;
        vec![a, b]
    };
    let mut backend = match LightningBackend::new(client, config) {
        Ok(backend) => backend,
        Err(err) => return failed(launched, replayed, err.to_string()),
    };
    let slots: Vec<i32> = (0..batch as i32).rev().collect();
    if let Err(err) = backend.prepare_decode(&slots) {
        return failed(launched, replayed, err.to_string());
    }
    let q = upload(client, &[batch, heads, d], DType::F32, 4);
    let k = upload(client, &[batch, heads, d], DType::F32, 5);
    let v = upload(client, &[batch, heads, e], DType::F32, 6);
    let outs: Vec<DeviceTensor> = (0..layers)
        .map(|_| DeviceTensor::empty(client, &[batch, heads, e], DType::F32))
        .collect();
    let step = || {
        for (layer, out) in outs.iter().enumerate() {
            backend
                .forward_decode(layer, &q, &k, &v, out)
                .expect("a prepared decode step");
        }
    };
    if let Err(err) =
        (0..layers).try_for_each(|layer| backend.forward_decode(layer, &q, &k, &v, &outs[layer]))
    {
        return failed(launched, replayed, err.to_string());
    }
    let state_bytes = layers * 2 * batch * heads * d * e * state_dtype.size();
    let io = state_bytes + layers * batch * heads * (2 * d + 2 * e) * 4;
    let measured = |row: &mut Row, time| record(row, time, batch, layers, (io, state_bytes), bw);
    measured(&mut launched, median_time(client, opts.reps, step));

    // The same step, recorded once after a warm-up and replayed.
    match capture(client, step) {
        Ok(graph) => {
            let time = median_time(client, opts.reps, || {
                // SAFETY: every buffer the graph recorded (q, k, v, the
                // outputs, the caches, slopes and slots) lives until this
                // function returns, and only this client's stream uses them.
                unsafe { graph.replay() }.expect("replay of a recorded step");
            });
            measured(&mut replayed, time);
        }
        Err(err) => replayed.note = format!("no graph on this runtime: {err}"),
    }
    if state_dtype != DType::F32 {
        // The yardstick streams f32 states: the f32 cache's rows carry it.
        return vec![launched, replayed];
    }
    // The caches go before the yardstick allocates as many bytes again.
    drop(backend);
    let stream = bench_state_stream(client, target, layers, [batch, heads, 1, d], opts, bw);
    vec![launched, replayed, stream]
}

/// The yardstick row: `layers` in-place streams of a `[batch, heads, d, e]`
/// f32 state, one launch each, replayed from a graph.
fn bench_state_stream(
    client: &Client,
    target: &str,
    layers: usize,
    shape: [usize; 4],
    opts: &Options,
    bw: f64,
) -> Row {
    let [batch, heads, _, d] = shape;
    let mut row = Row::new(target, "decode step", shape, DType::F32);
    row.op = format!("state stream {layers} layers (graph)");
    let floats = batch * heads * d * d;
    let states: Vec<_> = (0..layers).map(|_| client.empty(floats * 4)).collect();
    let (count, dim) = vector_grid(floats);
    let step = || {
        for state in &states {
            // SAFETY: the grid covers `floats / 4` vectors and the kernel
            // checks its index against the buffer's length.
            unsafe {
                stream_state::launch_unchecked(
                    client,
                    count.clone(),
                    dim,
                    4,
                    BufferArg::from_raw_parts(state.clone(), floats),
                    1.0f32,
                )
            }
        }
    };
    let state_bytes = layers * 2 * floats * 4;
    match capture(client, step) {
        Ok(graph) => {
            let time = median_time(client, opts.reps, || {
                // SAFETY: the recorded buffers live until this function returns.
                unsafe { graph.replay() }.expect("replay of a recorded stream");
            });
            record(&mut row, time, batch, layers, (state_bytes, state_bytes), bw);
        }
        Err(err) => row.note = format!("no graph on this runtime: {err}"),
    }
    row
}
