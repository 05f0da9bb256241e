//! The price of a bf16 state cache in accuracy: one sequence's state carried
//! through prefills and many decode steps in an f32 cache and in a bf16 one,
//! each against the f64 recurrence run on the same tokens.
//!
//! Two heads: MiniMax's strongest decay (layer 0 of 80, head 0 of 64: the
//! state forgets in a few tokens) and its weakest (layer 79, head 63: almost
//! none, the state sums its whole history). A bf16 cache rounds the state
//! once per token written; with strong decay that error is forgotten as fast
//! as it is made, with weak decay it accumulates. Shared by
//! `examples/state_drift/main.rs` (the README's table) and the test suite
//! (`tests/kernels/state_drift.rs`, at a small size with bounds from it).

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::{decode as reference_decode, relative_error};
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, PrefillConfig, Result, VarlenBatch, VarlenInputs, decode,
    prefill_varlen, slopes,
};

/// The two heads measured, in slope order.
pub const HEADS: [&str; 2] = ["strongest decay", "weakest decay"];

/// One measurement: the state's error (relative, over the head's `d x e`)
/// after `tokens` tokens, and the output error of the last of them.
#[derive(Clone, Debug)]
pub struct Drift {
    /// The cache's dtype.
    pub state_dtype: DType,
    /// Decode steps (or the schedule's tokens) behind the measurement.
    pub steps: usize,
    /// Per head ([`HEADS`]), the state's relative error against f64.
    pub state_error: [f64; 2],
    /// Per head, the last output's relative error against f64.
    pub out_error: [f64; 2],
}

/// MiniMax's strongest and weakest per-layer slopes (see the module doc).
pub fn extreme_slopes() -> Result<[f32; 2]> {
    let strongest = slopes::layer_slopes(64, 0, 80)?[0];
    let weakest = slopes::layer_slopes(64, 79, 80)?[63];
    Ok([strongest, weakest])
}

/// One sequence in slot 0 of a one-slot cache, and its f64 twin.
struct Sequence<'a> {
    client: &'a Client,
    dim: usize,
    state_dtype: DType,
    slopes: DeviceTensor,
    slopes64: Vec<f64>,
    cache: DeviceTensor,
    reference: Vec<f64>,
    rng: SeededRng,
}

impl<'a> Sequence<'a> {
    fn new(client: &'a Client, dim: usize, state_dtype: DType, seed: u64) -> Result<Self> {
        let slopes = extreme_slopes()?;
        Ok(Self {
            client,
            dim,
            state_dtype,
            slopes: DeviceTensor::from_f32(client, &slopes, &[2], DType::F32)?,
            slopes64: slopes.iter().map(|&s| f64::from(s)).collect(),
            cache: DeviceTensor::filled(client, &[1, 2, dim, dim], state_dtype, 0.0)?,
            reference: vec![0.0; 2 * dim * dim],
            rng: SeededRng::new(seed),
        })
    }

    /// `tokens` tokens of q, k, v `[tokens, 2, d]`, exact in f32.
    fn tokens(&mut self, tokens: usize) -> [Vec<f32>; 3] {
        let len = tokens * 2 * self.dim;
        [0, 1, 2].map(|_| (0..len).map(|_| self.rng.unit() as f32).collect())
    }

    /// The f64 recurrence over `tokens`, token by token; the last output.
    fn reference_steps(&mut self, [q, k, v]: &[Vec<f32>; 3], tokens: usize) -> Vec<f64> {
        let row = 2 * self.dim;
        let mut out = Vec::new();
        for t in 0..tokens {
            let part = |x: &[f32]| {
                x[t * row..(t + 1) * row]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect::<Vec<_>>()
            };
            let (d, slopes) = (self.dim, &self.slopes64);
            out = reference_decode(
                2,
                d,
                d,
                &part(q),
                &part(k),
                &part(v),
                &mut self.reference,
                slopes,
                &[0],
            );
        }
        out
    }

    /// A prefill of `tokens` continuing (or, the first, starting) the state.
    fn prefill(&mut self, tokens: usize, continues: bool) -> Result<()> {
        let qkv = self.tokens(tokens);
        let upload = |x: &[f32]| DeviceTensor::from_f32(self.client, x, &[tokens, 2, self.dim], DType::F32);
        let [q, k, v] = [upload(&qkv[0])?, upload(&qkv[1])?, upload(&qkv[2])?];
        let cu = [0, tokens as u32];
        let inputs = VarlenInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &self.slopes,
            cache: &self.cache,
            batch: VarlenBatch {
                cu_seqlens: &cu,
                slots: &[0],
                has_initial_state: &[continues],
                snapshots: None,
            },
        };
        prefill_varlen(self.client, &inputs, &PrefillConfig::new(64, 32))?;
        self.reference_steps(&qkv, tokens);
        Ok(())
    }

    /// One decode step; the output's error per head.
    fn decode(&mut self) -> Result<[f64; 2]> {
        let qkv = self.tokens(1);
        let upload = |x: &[f32]| DeviceTensor::from_f32(self.client, x, &[1, 2, 1, self.dim], DType::F32);
        let [q, k, v] = [upload(&qkv[0])?, upload(&qkv[1])?, upload(&qkv[2])?];
        let inputs = DecodeInputs {
            q: &q,
            k: &k,
            v: &v,
            cache: &self.cache,
            slopes: &self.slopes,
            slots: &[0],
            scale: None,
            rows_in_flight: None,
        };
        let out = decode(self.client, &inputs)?.to_f32_vec(self.client)?;
        let expected = self.reference_steps(&qkv, 1);
        let out: Vec<f64> = out.iter().map(|&x| f64::from(x)).collect();
        let d = self.dim;
        Ok([0, 1].map(|h| relative_error(&out[h * d..(h + 1) * d], &expected[h * d..(h + 1) * d])))
    }

    /// The state's error per head.
    fn state_error(&self) -> Result<[f64; 2]> {
        let state: Vec<f64> = self
            .cache
            .to_f32_vec(self.client)?
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let len = self.dim * self.dim;
        Ok([0, 1].map(|h| {
            relative_error(
                &state[h * len..(h + 1) * len],
                &self.reference[h * len..(h + 1) * len],
            )
        }))
    }
}

/// A prompt of `prompt` tokens prefilled into the cache, then decode steps,
/// measured after each count in `checkpoints` (increasing).
pub fn decode_drift(
    client: &Client,
    state_dtype: DType,
    dim: usize,
    prompt: usize,
    checkpoints: &[usize],
    seed: u64,
) -> Result<Vec<Drift>> {
    let mut sequence = Sequence::new(client, dim, state_dtype, seed)?;
    sequence.prefill(prompt, false)?;
    let mut rows = Vec::new();
    let mut done = 0;
    for &steps in checkpoints {
        let mut out_error = [0.0; 2];
        while done < steps {
            out_error = sequence.decode()?;
            done += 1;
        }
        rows.push(Drift {
            state_dtype: sequence.state_dtype,
            steps,
            state_error: sequence.state_error()?,
            out_error,
        });
    }
    Ok(rows)
}

/// A serving schedule: `rounds` times a prefill of `chunk` tokens (a new
/// prompt's chunk, continuing the state after the first) then `decodes`
/// decode steps; measured at the end, `steps` counting every token.
pub fn schedule_drift(
    client: &Client,
    state_dtype: DType,
    dim: usize,
    (rounds, chunk, decodes): (usize, usize, usize),
    seed: u64,
) -> Result<Drift> {
    let mut sequence = Sequence::new(client, dim, state_dtype, seed)?;
    let mut out_error = [0.0; 2];
    for round in 0..rounds {
        sequence.prefill(chunk, round > 0)?;
        for _ in 0..decodes {
            out_error = sequence.decode()?;
        }
    }
    Ok(Drift {
        state_dtype,
        steps: rounds * (chunk + decodes),
        state_error: sequence.state_error()?,
        out_error,
    })
}
