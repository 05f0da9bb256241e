//! The cost of the opt-in finite check beside the calls it guards (issue 18),
//! `--only finite`. Per prefill shape and dtype: the prefill, then the scan
//! of its output and of its final state. Per decode batch (h = 64, d = e =
//! 128, f32): the decode step, then the scan of its output and of the states
//! it updated. A scan row's time is the device time of the launch (the
//! 8-byte report's upload included), and its "of IO floor" the scan's share
//! of the copy bandwidth; its note is the wall time of the whole
//! `check_finite` (launch, wait, read-back) as a caller pays it.

use std::time::{Duration, Instant};

use lightning_attention::cubecl::future::block_on;
use lightning_attention::cubecl::prelude::*;
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, FiniteScan, PrefillConfig, PrefillInputs, check_finite, decode_into,
    prefill_into,
};

use crate::report::Row;
use crate::{Options, median_time, slopes, upload};

/// The prefill row and its two scan rows.
pub fn bench_prefill_check(
    client: &Client,
    target: &str,
    shape: [usize; 4],
    dtype: DType,
    opts: &Options,
    bw: f64,
) -> Vec<Row> {
    let [b, h, n, d] = shape;
    let e = d;
    let mut call = Row::new(target, "prefill (finite group)", shape, dtype);
    if !dtype.is_supported(client) {
        call.note = "dtype unsupported by this runtime".into();
        return vec![call];
    }
    let q = upload(client, &[b, h, n, d], dtype, 1);
    let k = upload(client, &[b, h, n, d], dtype, 2);
    let v = upload(client, &[b, h, n, e], dtype, 3);
    let s = slopes(client, h, opts);
    let out = DeviceTensor::empty(client, &[b, h, n, e], dtype);
    let state = DeviceTensor::empty(client, &[b, h, d, e], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
    };
    let config = PrefillConfig::for_client(client).with_tuning(opts.tuning);
    if let Err(err) = prefill_into(client, &inputs, &config, &out, &state) {
        call.note = err.to_string();
        return vec![call];
    }
    let time = median_time(client, opts.reps, || {
        prefill_into(client, &inputs, &config, &out, &state).expect("validated above");
    });
    let bytes = (2 * b * h * n * d + 2 * b * h * n * e) * dtype.size() + b * h * d * e * 4;
    call.measured(time, b * n, bytes as f64, bw);
    call.note = format!("{}/{}", config.block, config.sub_block);
    let rows = [("check out", &out), ("check final_state", &state)]
        .map(|(op, t)| scan_row(client, target, op, shape, t, b * n, opts, bw, time));
    let mut all = vec![call];
    all.extend(rows);
    all
}

/// The decode row and its two scan rows.
pub fn bench_decode_check(client: &Client, target: &str, batch: usize, opts: &Options, bw: f64) -> Vec<Row> {
    let (h, d, e) = (64, 128, 128);
    let shape = [batch, h, 1, d];
    let mut call = Row::new(target, "decode (finite group)", shape, DType::F32);
    let cache_bytes = (batch * h * d * e * 4) as u64;
    let max_buffer = client.properties().memory.max_page_size;
    if cache_bytes > max_buffer {
        call.note = format!("the {cache_bytes}-byte cache exceeds this runtime's largest buffer");
        return vec![call];
    }
    // Small values keep the state bounded over the many timed steps.
    let q = upload(client, &[batch, h, 1, d], DType::F32, 4);
    let k = upload(client, &[batch, h, 1, d], DType::F32, 5);
    let v = upload(client, &[batch, h, 1, e], DType::F32, 6);
    let s = slopes(client, h, opts);
    let cache = upload(client, &[batch, h, d, e], DType::F32, 7);
    let out = DeviceTensor::empty(client, &[batch, h, 1, e], DType::F32);
    let slots: Vec<i32> = (0..batch as i32).collect();
    let inputs = DecodeInputs {
        q: &q,
        k: &k,
        v: &v,
        cache: &cache,
        slopes: &s,
        slots: &slots,
        scale: None,
        rows_in_flight: opts.tuning.decode_rows_in_flight,
    };
    if let Err(err) = decode_into(client, &inputs, &out) {
        call.note = err.to_string();
        return vec![call];
    }
    let time = median_time(client, opts.reps, || {
        decode_into(client, &inputs, &out).expect("validated above")
    });
    let state_bytes = 2 * batch * h * d * e * 4;
    call.measured(
        time,
        batch,
        (state_bytes + batch * h * (2 * d + 2 * e) * 4) as f64,
        bw,
    );
    let rows = [("check decode out", &out), ("check cache", &cache)]
        .map(|(op, t)| scan_row(client, target, op, shape, t, batch, opts, bw, time));
    let mut all = vec![call];
    all.extend(rows);
    all
}

/// One scan's row: device time of the launch, wall time of the whole check,
/// and both beside `call`, the time of the call it would follow.
#[allow(clippy::too_many_arguments)]
fn scan_row(
    client: &Client,
    target: &str,
    op: &'static str,
    shape: [usize; 4],
    tensor: &DeviceTensor,
    tokens: usize,
    opts: &Options,
    bw: f64,
    call: Duration,
) -> Row {
    let mut row = Row::new(target, op, shape, tensor.dtype);
    let device = median_time(client, opts.reps, || {
        FiniteScan::launch(client, tensor, op).expect("a valid tensor");
    });
    row.measured(
        device,
        tokens,
        (tensor.num_elements() * tensor.dtype.size()) as f64,
        bw,
    );
    let verdict = match check_finite(client, tensor, op) {
        Ok(()) => "finite".to_string(),
        Err(err) => err.to_string(),
    };
    let wall = wall_time(client, opts.reps, || {
        let _ = check_finite(client, tensor, op);
    });
    row.note = format!(
        "device {:.1} us ({:.1}% of the call's {:.1} us); wall with read-back {:.1} us; {verdict}",
        micros(device),
        100.0 * device.as_secs_f64() / call.as_secs_f64(),
        micros(call),
        micros(wall),
    );
    row
}

/// Median wall time of `reps` runs of `work`, each started on an idle device.
fn wall_time(client: &Client, reps: usize, work: impl Fn()) -> Duration {
    work();
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            block_on(client.sync()).expect("the device ran");
            let start = Instant::now();
            work();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
