//! Decode through the serving backend, whose step is prepared once (the slot
//! list written into a buffer it owns) and whose per-layer call only launches:
//! beside the `decode` row, which passes host slots to `decode_into` and so
//! times their upload too, this row tells the launch from the upload.

use lightning_attention::cubecl::prelude::*;
use lightning_attention::{BackendConfig, DType, DeviceTensor, LightningBackend, PrefillConfig};

use crate::report::Row;
use crate::{Options, median_time, upload};

/// One decode layer of `batch` sequences, h = 64, d = e = 128, f32, against
/// a cache of `state_dtype`.
pub fn bench_backend_decode(
    client: &Client,
    target: &str,
    batch: usize,
    state_dtype: DType,
    opts: &Options,
    bw: f64,
) -> Row {
    let (h, d, e) = (64, 128, 128);
    let mut row = Row::new(target, "decode (backend)", [batch, h, 1, d], DType::F32);
    row.op = crate::cache_op("decode (backend)", state_dtype);
    let config = BackendConfig {
        heads: h,
        key_dim: d,
        value_dim: e,
        // The slope ladder needs two layers; only layer 0 is timed.
        layers: 2,
        slots: batch,
        max_batch: batch,
        tensor_parallel: (0, 1),
        dtype: DType::F32,
        prefill: PrefillConfig::default().with_tuning(opts.tuning),
        state_dtype,
    };
    let mut backend = match LightningBackend::new(client, config) {
        Ok(backend) => backend,
        Err(err) => {
            row.note = err.to_string();
            return row;
        }
    };
    let slots: Vec<i32> = (0..batch as i32).rev().collect();
    if let Err(err) = backend.prepare_decode(&slots) {
        row.note = err.to_string();
        return row;
    }
    let q = upload(client, &[batch, h, d], DType::F32, 4);
    let k = upload(client, &[batch, h, d], DType::F32, 5);
    let v = upload(client, &[batch, h, e], DType::F32, 6);
    let out = DeviceTensor::empty(client, &[batch, h, e], DType::F32);
    if let Err(err) = backend.forward_decode(0, &q, &k, &v, &out) {
        row.note = err.to_string();
        return row;
    }
    let time = median_time(client, opts.reps, || {
        backend
            .forward_decode(0, &q, &k, &v, &out)
            .expect("validated above");
    });
    let state_bytes = 2 * batch * h * d * e * state_dtype.size();
    let io = state_bytes + batch * h * (2 * d + 2 * e) * 4;
    row.measured(time, batch, io as f64, bw);
    row.state_tb_s = Some(state_bytes as f64 / time.as_secs_f64() / 1e12);
    row
}
