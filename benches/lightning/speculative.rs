//! Speculative decoding's verify step: `K` draft tokens for each of `batch`
//! sequences in one packed call that writes the state after each of them
//! (`K` snapshots per sequence), against the `K` plain decode steps the same
//! tokens would take one at a time. h = 64, d = e = 128, f32 (issue 17).

use lightning_attention::cubecl::prelude::*;
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, PrefillConfig, Snapshots, VarlenBatch, VarlenInputs, decode_into,
    prefill_varlen_into,
};

use crate::report::Row;
use crate::{Options, median_time, slopes, upload};

/// The two rows: the verify call with snapshots, and `drafts` decode steps.
pub fn bench_verify(
    client: &Client,
    target: &str,
    batch: usize,
    drafts: usize,
    opts: &Options,
    bw: f64,
) -> Vec<Row> {
    let (h, d, e) = (64, 128, 128);
    let tokens = batch * drafts;
    let mut verify = Row::new(target, "verify", [batch, h, drafts, d], DType::F32);
    verify.op = format!("verify {drafts} drafts (snapshots)");
    let mut steps = Row::new(target, "verify", [batch, h, drafts, d], DType::F32);
    steps.op = format!("{drafts} decode steps");
    // Each sequence's own slot, then `drafts` snapshot slots per sequence.
    let num_slots = batch * (1 + drafts);
    let cache_bytes = (num_slots * h * d * e * 4) as u64;
    let max_buffer = client.properties().memory.max_page_size;
    if cache_bytes > max_buffer {
        let note =
            format!("the {cache_bytes}-byte cache exceeds this runtime's largest buffer ({max_buffer})");
        verify.note.clone_from(&note);
        steps.note = note;
        return vec![verify, steps];
    }
    let cache = upload(client, &[num_slots, h, d, e], DType::F32, 7);
    let s = slopes(client, h, opts);
    let q = upload(client, &[tokens, h, d], DType::F32, 4);
    let k = upload(client, &[tokens, h, d], DType::F32, 5);
    let v = upload(client, &[tokens, h, e], DType::F32, 6);
    let out = DeviceTensor::empty(client, &[tokens, h, e], DType::F32);
    let cu_seqlens: Vec<u32> = (0..=batch as u32).map(|i| i * drafts as u32).collect();
    let own: Vec<i32> = (0..batch as i32).collect();
    let snapshot_slots: Vec<i32> = (batch..num_slots).map(|s| s as i32).collect();
    let has_initial = vec![true; batch];
    let inputs = VarlenInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        cache: &cache,
        batch: VarlenBatch {
            cu_seqlens: &cu_seqlens,
            slots: &own,
            has_initial_state: &has_initial,
            snapshots: Some(Snapshots {
                count: drafts,
                slots: &snapshot_slots,
            }),
        },
    };
    let config = PrefillConfig::default().with_tuning(opts.tuning);
    let state_bytes = batch * h * d * e * 4;
    match prefill_varlen_into(client, &inputs, &config, &out) {
        Ok(()) => {
            let time = median_time(client, opts.reps, || {
                prefill_varlen_into(client, &inputs, &config, &out).expect("validated above");
            });
            // The state read once, written once and `drafts` times as snapshots.
            let io = state_bytes * (2 + drafts) + tokens * h * (2 * d + 2 * e) * 4;
            verify.measured(time, tokens, io as f64, bw);
        }
        Err(err) => verify.note = err.to_string(),
    }
    // The same tokens as `drafts` decode steps of one token per sequence.
    let one = |seed| upload(client, &[batch, h, 1, d], DType::F32, seed);
    let (q1, k1, v1) = (
        one(14),
        one(15),
        upload(client, &[batch, h, 1, e], DType::F32, 16),
    );
    let out1 = DeviceTensor::empty(client, &[batch, h, 1, e], DType::F32);
    let step = DecodeInputs {
        q: &q1,
        k: &k1,
        v: &v1,
        cache: &cache,
        slopes: &s,
        slots: &own,
        scale: None,
        rows_in_flight: opts.tuning.decode_rows_in_flight,
    };
    match decode_into(client, &step, &out1) {
        Ok(()) => {
            let time = median_time(client, opts.reps, || {
                for _ in 0..drafts {
                    decode_into(client, &step, &out1).expect("validated above");
                }
            });
            let io = drafts * (2 * state_bytes + batch * h * (2 * d + 2 * e) * 4);
            steps.measured(time, tokens, io as f64, bw);
        }
        Err(err) => steps.note = err.to_string(),
    }
    vec![verify, steps]
}
