//! The error of a benchmarked prefill against the f64 recurrence (`--accuracy`).
//!
//! The recurrence is run on the CPU for a few `(batch, head)` slices spread
//! over the shape (the first and the last head among them: the last has the
//! weakest decay, so the largest states), one thread each, from the inputs as
//! the device holds them (read back, so bf16 rounding on upload is not counted
//! as error). The reported figure is `||out - ref|| / ||ref||` over those slices.

use lightning_attention::DeviceTensor;
use lightning_attention::cubecl::prelude::*;
use lightning_attention::reference::{Dims, recurrence, relative_error};

/// Slices the error is measured on (at most).
const SLICES: usize = 8;

/// Relative error of `out` (`[b, h, n, e]`) against the recurrence, and how
/// many `(batch, head)` slices it covers.
#[allow(clippy::too_many_arguments)]
pub fn prefill_error(
    client: &Client,
    shape: [usize; 4],
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    slopes: &[f32],
    scale: f32,
    out: &DeviceTensor,
) -> (f64, usize) {
    let [b, h, n, d] = shape;
    let e = d;
    let read = |t: &DeviceTensor| t.to_f32_vec(client).expect("read back");
    let (q, k, v, out) = (read(q), read(k), read(v), read(out));
    let pairs = b * h;
    let picked: Vec<usize> = if pairs <= SLICES {
        (0..pairs).collect()
    } else {
        (0..SLICES).map(|i| i * (pairs - 1) / (SLICES - 1)).collect()
    };
    let slice = |x: &[f32], bh: usize, width: usize| -> Vec<f64> {
        x[bh * n * width..(bh + 1) * n * width]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let results: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = picked
            .iter()
            .map(|&bh| {
                let (q, k, v, out) = (
                    slice(&q, bh, d),
                    slice(&k, bh, d),
                    slice(&v, bh, e),
                    slice(&out, bh, e),
                );
                let slope = slopes[bh % h] as f64;
                scope.spawn(move || {
                    let dims = Dims {
                        batch: 1,
                        heads: 1,
                        seq_len: n,
                        key_dim: d,
                        value_dim: e,
                    };
                    let mut reference = recurrence(dims, &q, &k, &v, &[slope], None).out;
                    reference.iter_mut().for_each(|x| *x *= scale as f64);
                    (out, reference)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reference thread"))
            .collect()
    });
    let (got, want): (Vec<f64>, Vec<f64>) = results
        .into_iter()
        .flat_map(|(got, want)| got.into_iter().zip(want))
        .unzip();
    (relative_error(&got, &want), picked.len())
}
