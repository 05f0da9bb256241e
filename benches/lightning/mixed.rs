//! A serving engine's step: prefills of many lengths beside a crowd of decodes,
//! as one packed call against the slot cache, versus one call per prefill
//! request plus one for the decodes (what engines that loop over requests do).

use lightning_attention::cubecl::prelude::*;
use lightning_attention::{
    DType, DeviceTensor, PrefillConfig, VarlenBatch, VarlenInputs, prefill_varlen_into,
};

use crate::report::Row;
use crate::{Options, median_time, slopes, upload};

/// The step: prompt lengths of the new requests, running requests decoding
/// one token each, heads and head dim (`d = e`).
struct Step {
    prefills: Vec<usize>,
    decodes: usize,
    heads: usize,
    dim: usize,
}

impl Step {
    /// 8 prompts of 100 to 8000 tokens and 120 decodes, h = 64, d = 128; a
    /// tenth of the prompts, a tenth of the decodes and 4 heads with `--quick`.
    fn new(quick: bool) -> Self {
        let prefills = vec![100, 250, 600, 1200, 2000, 3500, 5500, 8000];
        if quick {
            Self {
                prefills: prefills.iter().map(|p| p / 10).collect(),
                decodes: 12,
                heads: 4,
                dim: 64,
            }
        } else {
            Self {
                prefills,
                decodes: 120,
                heads: 64,
                dim: 128,
            }
        }
    }
}

/// One packed call's tensors and metadata.
struct Packed {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    out: DeviceTensor,
    cu: Vec<u32>,
    slots: Vec<i32>,
    has_initial: Vec<bool>,
}

impl Packed {
    /// Sequences of `lengths` tokens in slots from `first_slot`, continuing their
    /// state when `continuing`.
    fn new(
        client: &Client,
        step: &Step,
        lengths: &[usize],
        first_slot: i32,
        continuing: bool,
        dtype: DType,
        seed: u64,
    ) -> Self {
        let (heads, dim) = (step.heads, step.dim);
        let mut cu = vec![0u32];
        for &len in lengths {
            cu.push(cu.last().unwrap() + len as u32);
        }
        let tokens = *cu.last().unwrap() as usize;
        Self {
            q: upload(client, &[tokens, heads, dim], dtype, seed),
            k: upload(client, &[tokens, heads, dim], dtype, seed + 1),
            v: upload(client, &[tokens, heads, dim], dtype, seed + 2),
            out: DeviceTensor::empty(client, &[tokens, heads, dim], dtype),
            slots: (0..lengths.len() as i32).map(|i| first_slot + i).collect(),
            has_initial: vec![continuing; lengths.len()],
            cu,
        }
    }

    fn run(&self, client: &Client, slopes: &DeviceTensor, cache: &DeviceTensor, config: &PrefillConfig) {
        let inputs = VarlenInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            slopes,
            cache,
            batch: VarlenBatch {
                cu_seqlens: &self.cu,
                slots: &self.slots,
                has_initial_state: &self.has_initial,
                snapshots: None,
            },
        };
        prefill_varlen_into(client, &inputs, config, &self.out).expect("a valid packed call");
    }
}

/// The rows: the whole step in one call for each routine the bench names
/// (`--routines`), then the per-request loop with the first of them.
pub fn bench_mixed(client: &Client, target: &str, dtype: DType, opts: &Options, bw: f64) -> Vec<Row> {
    let step_shape = Step::new(opts.quick);
    let Step {
        ref prefills,
        decodes: decode_count,
        heads,
        dim,
    } = step_shape;
    let tokens = prefills.iter().sum::<usize>() + decode_count;
    let sequences = prefills.len() + decode_count;
    let shape = [sequences, heads, tokens, dim];
    let mut one_calls: Vec<Row> = opts
        .routines
        .iter()
        .map(|&routines| {
            let mut row = Row::new(target, "mixed step, 1 call", shape, dtype);
            row.op = format!(
                "mixed step, 1 call, {}/{}{}",
                opts.configs[0].0,
                opts.configs[0].1,
                crate::routines_label(routines)
            );
            row
        })
        .collect();
    let mut looped = Row::new(target, "mixed step, per-request loop", shape, dtype);
    if !dtype.is_supported(client) {
        for row in one_calls.iter_mut().chain([&mut looped]) {
            row.note = "dtype unsupported by this runtime".into();
        }
        one_calls.push(looped);
        return one_calls;
    }
    // The first of the bench's configs (`--configs`), with each routine.
    let (block, sub_block) = opts.configs[0];
    let configs: Vec<PrefillConfig> = opts
        .routines
        .iter()
        .map(|&routines| {
            PrefillConfig::new(block, sub_block)
                .with_tuning(opts.tuning)
                .with_routines(routines)
        })
        .collect();
    let config = configs[0];
    let s = slopes(client, heads, opts);
    // Small random states: the decodes continue them over many timed steps.
    let cache = upload(client, &[sequences, heads, dim, dim], DType::F32, 20);

    // One call: the new prompts (from zeros) and then every decode token.
    let mut lengths = prefills.clone();
    lengths.extend(vec![1; decode_count]);
    let mut step = Packed::new(client, &step_shape, &lengths, 0, false, dtype, 30);
    for flag in &mut step.has_initial[prefills.len()..] {
        *flag = true;
    }
    // The loop: one call per prompt, then one call for all the decodes.
    let prompts: Vec<Packed> = prefills
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            Packed::new(
                client,
                &step_shape,
                &[len],
                i as i32,
                false,
                dtype,
                40 + 3 * i as u64,
            )
        })
        .collect();
    let decodes = Packed::new(
        client,
        &step_shape,
        &vec![1; decode_count],
        prefills.len() as i32,
        true,
        dtype,
        90,
    );

    let times: Vec<_> = configs
        .iter()
        .map(|config| median_time(client, opts.reps, || step.run(client, &s, &cache, config)))
        .collect();
    let time = times[0];
    let loop_time = median_time(client, opts.reps, || {
        for prompt in &prompts {
            prompt.run(client, &s, &cache, &config);
        }
        decodes.run(client, &s, &cache, &config);
    });
    // IO floor: q, k, v, out of every token; the prompts' final states written;
    // the decodes' states read and written.
    let state = heads * dim * dim * 4;
    let bytes = tokens * heads * 4 * dim * dtype.size() + (prefills.len() + 2 * decode_count) * state;
    for (row, &t) in one_calls.iter_mut().zip(&times) {
        row.measured(t, tokens, bytes as f64, bw);
    }
    looped.measured(loop_time, tokens, bytes as f64, bw);
    looped.note = format!(
        "{:.2}x the first 1-call time",
        loop_time.as_secs_f64() / time.as_secs_f64()
    );
    one_calls.push(looped);
    one_calls
}
