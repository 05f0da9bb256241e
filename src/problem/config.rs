//! The comptime block configuration of the prefill, its precision and
//! routines, the measuring knobs ([`Tuning`]), and their validation.

use crate::{LightningError, Result};

/// How the prefill is blocked, and an optional query scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillConfig {
    /// `BLOCK`: tokens per block. A power of two.
    pub block: usize,
    /// `CBLOCK`: tokens per sub-block, the tile of the intra-block work. A power
    /// of two that divides `block`.
    pub sub_block: usize,
    /// Multiplies every output (`o_t = scale * q_t kv_t`); `None` is 1, as in
    /// MiniMax (no `1/sqrt(d)` unless asked).
    pub scale: Option<f32>,
    /// Which kernel routines the call may use.
    pub routines: Routines,
    /// How f32 inputs are multiplied (16-bit inputs ignore it).
    pub precision: Precision,
    /// After the launches, check that the output and the final states hold
    /// only finite values, and return [`LightningError::NonFinite`] naming the
    /// tensor if not (default off). Without it an f16 output past 65504 comes
    /// back as ±inf (or NaN, from inf - inf) in an `Ok` result, as IEEE
    /// rounding gives (see [`crate::DType`]). The check scans each tensor once
    /// and waits for the device ([`crate::check_finite`]); the calls that honour
    /// it are [`crate::prefill`], [`crate::prefill_into`] and
    /// [`crate::profile_prefill_into`] (`out`, then `final_state`), and
    /// [`crate::prefill_varlen`] and [`crate::prefill_varlen_into`] (`out`
    /// only: the cache's other slots may hold anything, and a non-finite final
    /// state shows in its sequence's last output). Decode, the backward pass
    /// and [`crate::LightningBackend`] (whose calls never wait on the device)
    /// ignore it: call [`crate::check_finite`] on their results where wanted.
    pub check_finite: bool,
    /// Tiles and batching with measured defaults, for benchmarks that vary
    /// them ([`Tuning::default`] is what every call should use).
    pub tuning: Tuning,
}

/// The measuring knobs: tile and batching choices whose defaults were
/// measured (BENCHMARKS.md, SPEED_NOTES.md), passed by a benchmark that
/// compares other values. `None` takes the measured default. The library
/// reads no environment variable for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Most columns of `e` one tensor-core diag cube holds: 16 to 128, a
    /// multiple of 16; `None` is 128 (with scalar loads, 64 made bf16 diag
    /// 2x slower on an H100: SPEED_NOTES.md, variants 3 and 10).
    pub diag_value_tile: Option<usize>,
    /// Rows of the cache one decode unit loads before it stores any: 1 to
    /// 32; `None` is 16 on CUDA and 1 elsewhere. On an H100 the batched loads
    /// raised CUDA's decode bandwidth by 5-10% and lowered wgpu's (WGSL) by
    /// 25% (BENCHMARKS.md); on the H200 16 (all of a unit's rows at e = d =
    /// 128, one round of loads) took a 70-layer step at h = 8 from 3.82 to
    /// 3.18 us per layer at batch 1 and from 7.08 to 6.14 at batch 16, the
    /// same beyond (BENCHMARKS.md run 15). Decode calls take it from
    /// [`crate::DecodeInputs::rows_in_flight`]; packed batches and the serving
    /// backend from their [`PrefillConfig`].
    pub decode_rows_in_flight: Option<usize>,
    /// How the fused routine ([`Routines::Fused`]) multiplies; the default
    /// takes tensor cores where the device has them for the dtype.
    pub fused_products: FusedProducts,
    /// Columns of `e` one cube of the fused routine's tensor-core walk holds
    /// (the portable walk ignores it): 16 to 128, a power of two; `None` is 64
    /// (faster than 128 at every bench shape on an H100: SPEED_NOTES.md,
    /// variant 21).
    pub fused_value_tile: Option<usize>,
    /// Sets of `Q`, `K`, `V` tiles the tensor-core walk stages (1 or 2): with
    /// 2 the next chunk's tiles are copied in asynchronously (`cp.async`)
    /// while the chunk's products run (CUDA, 16-bit inputs, `d` a multiple
    /// of 16, where the sets fit; else 1). `None` is 2 where the ring
    /// applies: on an H100 it beat one set at all six bench shapes with
    /// every chunk and tile the autotuner tried, by 0.4-57% (BENCHMARKS.md,
    /// 2026-12-05 night; SPEED_NOTES.md, variant 24).
    pub fused_stages: Option<usize>,
    /// Segments per sequence the tensor-core walk takes at least (1, 2 or
    /// 4; a power of two number of blocks each, kv-parallel and kv-reduce
    /// carrying the state across them): more walks where a call's walks
    /// leave the SMs' cube slots empty. `None` is 1: segments only where the
    /// walks leave SMs idle (an H100 ran (1,64,16384,128) at 0.48 waves of
    /// its slots that way: BENCHMARKS.md, 2026-12-06).
    pub fused_split: Option<usize>,
    /// How the fused routine's tensor-core walk picks its chunk, value tile,
    /// stages and split where the knobs above leave them open: measured by
    /// cubecl's autotuner on the first call of each shape bucket (the
    /// default), or by the plan's fixed rule.
    pub fused_choice: FusedChoice,
    /// The fused backward's gradients of k and v: one reverse walk that
    /// carries the gradient state once and writes both (`false`: the default,
    /// where the tensor-core walk runs and all of `e` fits one cube), or, with
    /// `true`, two reverse forward walks, one per gradient (as the other
    /// routines run them).
    pub fused_separate_key_value: bool,
}

/// How the fused routine's tensor-core walk ([`Routines::Fused`]) picks its
/// chunk, value tile and stages: the variants differ only in speed (every
/// one is held to the same bounds by the property tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FusedChoice {
    /// cubecl's autotuner times every variant that applies (chunks of 32
    /// and 64 tokens, value tiles of 32, 64 and 128 columns, one set of
    /// tiles or the two-set ring; the knobs a caller forces are kept) on the
    /// first call of a shape bucket (dtype, `d`, `e`, and `n`, batch and heads
    /// rounded up to powers of two) and runs the fastest from then on; with
    /// the `autotune-cache` feature the choice persists on disk across
    /// processes. The first call of a bucket takes as long as every variant
    /// together, a few times over. Where one variant applies (the portable
    /// walk, or every knob forced), nothing is timed.
    #[default]
    Tuned,
    /// The plan's fixed rule: the config's sub-block as the chunk, value
    /// tiles of 64 columns, the ring where it applies.
    Rule,
}

/// How the fused routine ([`Routines::Fused`]) takes its products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FusedProducts {
    /// The tensor-core walk (`mma.m16n8k16` register fragments, the state
    /// held in registers) where the device has it for the dtype (CUDA, f16
    /// and bf16) and the tiles fit; elsewhere the portable walk.
    #[default]
    Auto,
    /// The portable walk: products on CUDA cores in f32, the state in
    /// shared memory (every runtime).
    Portable,
    /// The tensor-core walk with each product emulated through shared memory
    /// in f32, on any runtime: the very code that runs on tensor cores, for
    /// the property tests on a device without them (slow; where its tiles do
    /// not fit, the portable walk).
    Emulated,
}

impl Tuning {
    /// Checks each knob's range.
    pub fn validate(&self) -> Result<()> {
        if let Some(tile) = self.diag_value_tile
            && !((16..=128).contains(&tile) && tile.is_multiple_of(16))
        {
            return Err(LightningError::InvalidTuning {
                knob: "diag_value_tile",
                value: tile,
                expected: "16 to 128, a multiple of 16",
            });
        }
        if let Some(tile) = self.fused_value_tile
            && !((16..=128).contains(&tile) && tile.is_power_of_two())
        {
            return Err(LightningError::InvalidTuning {
                knob: "fused_value_tile",
                value: tile,
                expected: "16 to 128, a power of two",
            });
        }
        if let Some(stages) = self.fused_stages
            && !(1..=2).contains(&stages)
        {
            return Err(LightningError::InvalidTuning {
                knob: "fused_stages",
                value: stages,
                expected: "1 or 2",
            });
        }
        if let Some(split) = self.fused_split
            && ![1, 2, 4].contains(&split)
        {
            return Err(LightningError::InvalidTuning {
                knob: "fused_split",
                value: split,
                expected: "1, 2 or 4",
            });
        }
        check_rows_in_flight(self.decode_rows_in_flight)
    }
}

/// Rows in flight, when given, are 1 to 32.
pub(crate) fn check_rows_in_flight(rows: Option<usize>) -> Result<()> {
    match rows {
        Some(rows) if !(1..=32).contains(&rows) => Err(LightningError::InvalidTuning {
            knob: "decode_rows_in_flight",
            value: rows,
            expected: "1 to 32",
        }),
        _ => Ok(()),
    }
}

/// How the products of f32 inputs are computed: the accuracy each choice
/// promises against the f64 recurrence is measured in BENCHMARKS.md and held
/// by the prefill and backward property tests (`tests/kernels/prefill.rs`,
/// `tests/kernels/backward.rs`).
///
/// Tensor cores multiply 16-bit operands. Where the device has bf16 tensor
/// cores (CUDA, sm_80 on), `Split` and `Rounded` run the tensor-core routines
/// on f32 inputs; elsewhere every choice runs the portable routines in f32
/// (exact), and the plan says so ([`crate::plan::PrefillPlan::products`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Each f32 operand is split into a high and a low bf16 part and each
    /// product taken as `hi hi + hi lo + lo hi` on tensor cores, with f32
    /// accumulation: about `2^-17` of each product is lost (f32 class: the
    /// property tests hold it to 1e-4; at the bench shapes 6.1e-6 with
    /// MiniMax's first-layer slopes, 1.1e-5 to 3.8e-5 with the last layer's,
    /// whose weak decay sums tens of thousands of tokens into each state).
    /// Three tensor-core products per product, twice the staged bytes of bf16.
    #[default]
    Split,
    /// f32 operands rounded to bf16 for one tensor-core product: bf16's
    /// accuracy class (about 3e-3, like bf16 inputs), the speed of bf16 on
    /// the tensor cores with f32 traffic. For users who accept what Triton's
    /// tf32 `tl.dot` gives (vLLM's f32 prefill: 1.4e-3).
    Rounded,
    /// Exact f32 products on CUDA cores (the portable routines, about 3e-7):
    /// the slowest.
    Exact,
}

/// Which routines a prefill may run: the accelerated ones where the device
/// offers them (tensor cores), only the portable ones (the same kernels on
/// every runtime; for comparisons and tests), or the chunk-recurrent routine
/// everywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routines {
    /// The fastest routine the device and dtype allow: on CUDA with f16 or
    /// bf16 inputs, `d` and `e` of 64 or 128 and no snapshots, the fused
    /// routine's tensor-core walk (its variant by the fixed rule; `Fused`
    /// with [`FusedChoice::Tuned`] lets the autotuner choose); else the
    /// chunk-recurrent routine on tensor cores where it runs, else the five
    /// kernels.
    #[default]
    Auto,
    /// The portable routines only (the five kernels).
    Portable,
    /// The chunk-recurrent routine (one walk over each sequence's blocks
    /// instead of kv-parallel and kv-reduce): on tensor cores where the device
    /// has them, else its portable variant. `Auto` takes it wherever tensor
    /// cores run; this forces it everywhere (for tests and comparisons).
    ChunkRecurrent,
    /// The fused routine (forced here; `Auto` takes it where it was
    /// measured faster): the whole
    /// prefill in one pass per sequence (or segment), the running state kept
    /// on the chip and written once as the final state. On CUDA with f16 or
    /// bf16 inputs its tensor-core walk (the state in registers), its variant
    /// by the autotuner ([`FusedChoice`]); on devices without that walk its
    /// portable walk (products on CUDA cores in f32; see [`FusedProducts`]).
    /// Where the device has the tensor-core walk but the call cannot take it
    /// (f32 inputs, tiles that do not fit), the chunk-recurrent routine runs
    /// instead: the portable walk there was 5.5x slower (H100).
    /// A packed call with snapshots walks one block per segment, so that
    /// kv-reduce leaves every block's incoming state for kv-snapshot (the
    /// walk writes no state but the final one).
    Fused,
}

impl Default for PrefillConfig {
    /// vLLM's `BLOCK = 256` with sub-blocks of 32, no scale, no finite check.
    fn default() -> Self {
        Self {
            block: 256,
            sub_block: 32,
            scale: None,
            routines: Routines::Auto,
            precision: Precision::Split,
            check_finite: false,
            tuning: Tuning::default(),
        }
    }
}

impl PrefillConfig {
    /// The block configuration measured fastest for `client`'s device: BLOCK
    /// 64 / CBLOCK 64 where a cube has at least 64 KiB of shared memory (CUDA;
    /// on an H200 with the chunk-recurrent routine it ran the benchmark's bf16
    /// prefill shapes 1.13-1.24x faster than 128/64, and f16 within 5%; 128/64
    /// had been 1.3-1.45x faster than the default on an H100 with the
    /// five-kernel design), else [`PrefillConfig::default`] (wgpu/Vulkan with
    /// 48 KiB, where the wider sub-block ran slower, and lavapipe with 32 KiB).
    /// See BENCHMARKS.md.
    pub fn for_client(client: &cubecl::prelude::Client) -> Self {
        if client.properties().hardware.max_shared_memory_size >= 64 * 1024 {
            Self::new(64, 64)
        } else {
            Self::default()
        }
    }

    /// A config with the given block and sub-block and no scale.
    pub fn new(block: usize, sub_block: usize) -> Self {
        Self {
            block,
            sub_block,
            scale: None,
            routines: Routines::Auto,
            precision: Precision::Split,
            check_finite: false,
            tuning: Tuning::default(),
        }
    }

    /// The same config with a query scale.
    pub fn with_scale(self, scale: f32) -> Self {
        Self {
            scale: Some(scale),
            ..self
        }
    }

    /// The same config restricted to `routines`.
    pub fn with_routines(self, routines: Routines) -> Self {
        Self { routines, ..self }
    }

    /// The same config with f32 products computed as `precision` says.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    /// The same config with the check of [`PrefillConfig::check_finite`] on or off.
    pub fn with_check_finite(self, check_finite: bool) -> Self {
        Self { check_finite, ..self }
    }

    /// The same config with the measuring knobs `tuning`.
    pub fn with_tuning(self, tuning: Tuning) -> Self {
        Self { tuning, ..self }
    }

    /// Checks the rules the kernels rely on.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason| {
            Err(LightningError::InvalidBlock {
                block: self.block,
                sub_block: self.sub_block,
                reason,
            })
        };
        if self.block == 0 || self.sub_block == 0 {
            return fail("both must be at least 1");
        }
        if !self.block.is_power_of_two() {
            return fail("BLOCK must be a power of two");
        }
        if self.sub_block > self.block || !self.block.is_multiple_of(self.sub_block) {
            return fail("BLOCK must be a multiple of CBLOCK");
        }
        if !self.sub_block.is_power_of_two() {
            return fail("CBLOCK must be a power of two");
        }
        check_scale(self.scale)?;
        self.tuning.validate()
    }
}

/// A scale, when given, must be finite.
pub(crate) fn check_scale(scale: Option<f32>) -> Result<()> {
    match scale {
        Some(scale) if !scale.is_finite() => Err(LightningError::InvalidScale(scale.to_string())),
        _ => Ok(()),
    }
}
