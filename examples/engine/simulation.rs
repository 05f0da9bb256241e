//! A toy serving engine driving [`LightningBackend`] over many steps, every
//! output checked against the f64 reference.
//!
//! Requests arrive with prompts of random lengths, take a free slot, are
//! prefilled (from zeros: nobody clears the slot they inherit), then decode a
//! few tokens each and finish, freeing their slot. A step with arrivals is one
//! mixed extend call (the new prompts and every running request's next token);
//! a step without is one decode call. Shared by `examples/engine/main.rs` and
//! the test suite, which runs it on the CPU path in CI.
//!
//! With a bf16 state cache the reference rounds its states to bf16 after each
//! step, as the kernels round what they write, so that the comparison judges
//! the kernels and not the format (whose own price the README measures).

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{VarlenProblem, relative_error, varlen};
use lightning_attention::{
    BackendConfig, DType, DeviceTensor, LightningBackend, LightningError, PrefillConfig, VarlenBatch, slopes,
};

/// The worst relative error a run with a bf16 cache may show against the
/// rounded reference: the kernels' f32 results land on a neighbouring bf16 of
/// the reference's now and then. Measured on lavapipe: 1.7e-4 (the test
/// suite's workload), 1.6e-4 (the example's defaults); about twice that.
pub const BF16_CACHE_BOUND: f64 = 4e-4;

/// The engine's model and workload.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Heads of the whole model.
    pub heads: usize,
    /// `d = e`.
    pub dim: usize,
    /// Linear-attention layers.
    pub layers: usize,
    /// Cache slots (concurrent requests).
    pub slots: usize,
    /// Engine steps to run.
    pub steps: usize,
    /// Longest prompt.
    pub max_prompt: usize,
    /// Seed of the workload and the activations.
    pub seed: u64,
    /// dtype of the state cache: f32 or bf16.
    pub state_dtype: DType,
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Step number.
    pub step: usize,
    /// "extend" (prefills, maybe with decodes) or "decode".
    pub kind: &'static str,
    /// Prompt lengths prefilled this step.
    pub prefills: Vec<usize>,
    /// Requests that decoded one token.
    pub decodes: usize,
    /// Worst relative error over the layers' outputs and states.
    pub worst_error: f64,
    /// Slots that a finished request left and a new one took this step.
    pub reused_slots: usize,
}

struct Request {
    slot: i32,
    tokens_left: usize,
}

/// Runs the engine, calling `report` after each step; returns the worst error seen.
pub fn run(
    client: &Client,
    config: EngineConfig,
    mut report: impl FnMut(&StepReport),
) -> Result<f64, LightningError> {
    let EngineConfig {
        heads: h,
        dim: d,
        layers,
        slots,
        ..
    } = config;
    let mut backend = LightningBackend::new(
        client,
        BackendConfig {
            heads: h,
            key_dim: d,
            value_dim: d,
            layers,
            slots,
            max_batch: slots,
            tensor_parallel: (0, 1),
            dtype: DType::F32,
            prefill: PrefillConfig::new(64, 32),
            state_dtype: config.state_dtype,
        },
    )?;
    let layer_slopes: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            Ok(slopes::layer_slopes(h, l, layers)?
                .iter()
                .map(|&s| s as f64)
                .collect())
        })
        .collect::<Result<_, LightningError>>()?;
    // The reference caches start as the backend's: zeros.
    let mut reference_caches = vec![vec![0.0f64; slots * h * d * d]; layers];
    let mut rng = SeededRng::new(config.seed);
    let mut running: Vec<Request> = Vec::new();
    let mut free: Vec<i32> = (0..slots as i32).rev().collect();
    let mut ever_used = vec![false; slots];
    let mut worst = 0.0f64;

    for step in 0..config.steps {
        // Arrivals: up to three, while slots are free; a quiet step now and then.
        let mut arrivals = Vec::new();
        let arriving = (rng.unit() * 0.5 + 0.5) * if step % 4 == 3 { 1.0 } else { 3.5 };
        for _ in 0..arriving as usize {
            if let Some(slot) = free.pop() {
                let prompt = 1 + ((rng.unit() * 0.5 + 0.5) * config.max_prompt as f64) as usize;
                let tokens_left = 1 + ((rng.unit() * 0.5 + 0.5) * 10.0) as usize;
                arrivals.push((prompt.min(config.max_prompt), Request { slot, tokens_left }));
            }
        }
        if arrivals.is_empty() && running.is_empty() {
            continue;
        }
        let mut reused_slots = 0;
        for (_, request) in &arrivals {
            let used = &mut ever_used[request.slot as usize];
            reused_slots += *used as usize;
            *used = true;
        }
        // The step's sequences: new prompts from zeros, then one token per running request.
        let mut cu = vec![0u32];
        let mut seq_slots = Vec::new();
        let mut has_initial = Vec::new();
        for (prompt, request) in &arrivals {
            cu.push(cu.last().unwrap() + *prompt as u32);
            seq_slots.push(request.slot);
            has_initial.push(false);
        }
        for request in &running {
            cu.push(cu.last().unwrap() + 1);
            seq_slots.push(request.slot);
            has_initial.push(true);
        }
        let tokens = *cu.last().unwrap() as usize;
        let kind = if arrivals.is_empty() {
            backend.prepare_decode(&seq_slots)?;
            "decode"
        } else {
            backend.prepare_extend(&VarlenBatch {
                cu_seqlens: &cu,
                slots: &seq_slots,
                has_initial_state: &has_initial,
                snapshots: None,
            })?;
            "extend"
        };

        let mut step_worst = 0.0f64;
        for layer in 0..layers {
            let values = |rng: &mut SeededRng, len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.unit() as f32).collect()
            };
            let (q, k, v) = (
                values(&mut rng, tokens * h * d),
                values(&mut rng, tokens * h * d),
                values(&mut rng, tokens * h * d),
            );
            let upload = |x: &[f32]| DeviceTensor::from_f32(client, x, &[tokens, h, d], DType::F32);
            let (q_t, k_t, v_t) = (upload(&q)?, upload(&k)?, upload(&v)?);
            let out = DeviceTensor::filled(client, &[tokens, h, d], DType::F32, f32::NAN)?;
            if kind == "decode" {
                backend.forward_decode(layer, &q_t, &k_t, &v_t, &out)?;
            } else {
                backend.forward_extend(layer, &q_t, &k_t, &v_t, &out)?;
            }

            let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let cu64: Vec<usize> = cu.iter().map(|&x| x as usize).collect();
            let slots64: Vec<i64> = seq_slots.iter().map(|&s| s as i64).collect();
            let (qf, kf, vf) = (f64s(&q), f64s(&k), f64s(&v));
            let expected = varlen(
                &VarlenProblem {
                    heads: h,
                    key_dim: d,
                    value_dim: d,
                    q: &qf,
                    k: &kf,
                    v: &vf,
                    slopes: &layer_slopes[layer],
                    scale: 1.0,
                    cu_seqlens: &cu64,
                    slots: &slots64,
                    has_initial_state: &has_initial,
                    snapshots: None,
                },
                &mut reference_caches[layer],
            );
            if config.state_dtype == DType::BF16 {
                // Rounding a state already in bf16 keeps it: only the written change.
                for x in reference_caches[layer].iter_mut() {
                    *x = f64::from(half::bf16::from_f64(*x));
                }
            }
            let actual = f64s(&out.to_f32_vec(client)?);
            let cache = f64s(&backend.cache(layer)?.to_f32_vec(client)?);
            // Only the slots of live requests hold meaningful states.
            let state = h * d * d;
            let live: Vec<f64> = seq_slots
                .iter()
                .flat_map(|&s| cache[s as usize * state..(s as usize + 1) * state].to_vec())
                .collect();
            let live_ref: Vec<f64> = seq_slots
                .iter()
                .flat_map(|&s| reference_caches[layer][s as usize * state..(s as usize + 1) * state].to_vec())
                .collect();
            let err = relative_error(&actual, &expected).max(relative_error(&live, &live_ref));
            // NaN (an unwritten output) must count as the worst error.
            step_worst = if err.is_nan() {
                f64::INFINITY
            } else {
                step_worst.max(err)
            };
        }
        worst = worst.max(step_worst);
        report(&StepReport {
            step,
            kind,
            prefills: arrivals.iter().map(|(p, _)| *p).collect(),
            decodes: running.len(),
            worst_error: step_worst,
            reused_slots,
        });

        // New requests join; every running request spends a token; the done leave.
        running.extend(arrivals.into_iter().map(|(_, r)| r));
        running.retain_mut(|r| {
            r.tokens_left -= 1;
            if r.tokens_left == 0 {
                free.push(r.slot);
            }
            r.tokens_left > 0
        });
    }
    Ok(worst)
}
