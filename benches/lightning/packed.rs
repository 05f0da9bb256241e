//! Training on a packed batch (`--only packed`): the documents of the mixed
//! serving step's prompts (8 of 100 to 8000 tokens, h = 64, d = e = 128)
//! back to back in one `[T, h, *]` row, forward and backward through
//! `prefill_packed_into` and `backward_packed_into`, with each routine the
//! bench names: the figure issue 29 asks for beside FLA's
//! `chunk_simple_gla(..., cu_seqlens=...)` forward and backward.

use lightning_attention::cubecl::prelude::*;
use lightning_attention::{
    DType, DeviceTensor, PackedBackwardInputs, PackedGradients, PackedInputs, PrefillConfig,
    backward_packed_into, prefill_packed_into,
};

use crate::report::Row;
use crate::{Options, median_time, routines_label, slopes, upload};

/// Prompt lengths of the packed batch (a tenth, 4 heads and d = 64 with `--quick`).
const DOCUMENTS: [usize; 8] = [100, 250, 600, 1200, 2000, 3500, 5500, 8000];

/// One fwd+bwd row per routine the bench names, at the first `--configs`.
pub fn bench_packed(client: &Client, target: &str, dtype: DType, opts: &Options, bw: f64) -> Vec<Row> {
    let (lengths, h, d): (Vec<usize>, usize, usize) = if opts.quick {
        (DOCUMENTS.iter().map(|n| n / 10).collect(), 4, 64)
    } else {
        (DOCUMENTS.to_vec(), 64, 128)
    };
    let tokens: usize = lengths.iter().sum();
    let mut cu_seqlens = vec![0u32];
    for len in &lengths {
        cu_seqlens.push(cu_seqlens.last().expect("starts at 0") + *len as u32);
    }
    let shape = [lengths.len(), h, tokens, d];
    let (block, sub_block) = opts.configs[0];
    let mut rows = Vec::new();
    for &routines in &opts.routines {
        let mut row = Row::new(target, "packed fwd+bwd", shape, dtype);
        row.op = format!("packed fwd+bwd {block}/{sub_block}{}", routines_label(routines));
        if !dtype.is_supported(client) {
            row.note = "dtype unsupported by this runtime".into();
            rows.push(row);
            continue;
        }
        let config = PrefillConfig::new(block, sub_block)
            .with_tuning(opts.tuning)
            .with_routines(routines);
        let q = upload(client, &[tokens, h, d], dtype, 51);
        let k = upload(client, &[tokens, h, d], dtype, 52);
        let v = upload(client, &[tokens, h, d], dtype, 53);
        let d_out = upload(client, &[tokens, h, d], dtype, 54);
        let s = slopes(client, h, opts);
        let out = DeviceTensor::empty(client, &[tokens, h, d], dtype);
        let grads = PackedGradients {
            dq: DeviceTensor::empty(client, &[tokens, h, d], dtype),
            dk: DeviceTensor::empty(client, &[tokens, h, d], dtype),
            dv: DeviceTensor::empty(client, &[tokens, h, d], dtype),
            d_initial_states: None,
        };
        let forward = PackedInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &s,
            cu_seqlens: &cu_seqlens,
            initial_states: None,
        };
        let backward = PackedBackwardInputs {
            forward,
            d_out: &d_out,
            d_final_states: None,
        };
        let step = || {
            prefill_packed_into(client, &forward, &config, &out, None)
                .and_then(|()| backward_packed_into(client, &backward, &config, &grads))
        };
        if let Err(err) = step() {
            row.note = err.to_string();
            rows.push(row);
            continue;
        }
        let time = median_time(client, opts.reps, || step().expect("validated above"));
        // IO floor as the dense fwd+bwd row's: q, k, v, out; q, k, v, d_out
        // read and dq, dk, dv written.
        let bytes = 4 * tokens * h * d * dtype.size() * 3;
        row.measured(time, tokens, bytes as f64, bw);
        rows.push(row);
    }
    rows
}
