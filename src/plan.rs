//! Launch planning: grids, tiles and workspaces from the problem and the device's limits.
//!
//! Every size a kernel will use is decided and checked here, so that the
//! launches that follow are `launch_unchecked` on a configuration known to fit.

use cubecl::prelude::*;
use lightning_attention_kernels::staging::{F32_ROW_PAD, ROW_PAD};

use crate::chunk_plan::{ChunkStatePlan, plan_chunk_state};
use crate::config::check_scale;
use crate::memory::Buffer;
use crate::shapes::{
    DecodeShape, PrefillShape, TensorShape, validate_decode_shapes, validate_prefill_shapes,
};
use crate::widen;
use crate::{DType, LightningError, Precision, PrefillConfig, Result, Routines};

/// Units per cube the portable routines aim for.
const TARGET_UNITS: u32 = 256;
/// Most value columns one diag unit accumulates (a 128-wide tile).
const MAX_DIAG_COLS_PER_UNIT: usize = 8;
/// Largest chunk of `d` diag stages per step.
const MAX_KEY_CHUNK: usize = 32;
/// Units along each side of the 16 x 16 unit grid of diag, kv-parallel and
/// non-diag (fixed by the kernels).
const GRID_SIDE: usize = 16;
/// Most rows (and columns) of the state one kv-parallel unit accumulates.
const MAX_PER_UNIT: usize = 4;
/// Most tokens kv-parallel stages at once.
const MAX_KV_STAGE: usize = 32;

/// What the device allows, read from its reported properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Shared memory per cube, bytes.
    pub shared_memory: usize,
    /// Units per cube.
    pub max_units: u32,
    /// Cubes per grid dimension.
    pub max_cube_count: (u32, u32, u32),
    /// Bytes in one buffer (wgpu caps a binding at about 2 GiB).
    pub max_buffer: u64,
    /// Units per plane when the runtime has one fixed plane size, else `None`.
    pub plane_size: Option<u32>,
    /// Input dtypes with a 16 x 16 x 16 `cmma` into f32 accumulators.
    pub tensor_cores: TensorCores,
    /// Rows of the cache one decode unit loads before it stores any: 16 on
    /// CUDA, 1 elsewhere, unless [`DECODE_ROWS_IN_FLIGHT_VAR`] says otherwise
    /// (1 to 32). On an H100 the batched loads raised CUDA's decode bandwidth
    /// by 5-10% and lowered wgpu's (WGSL) by 25% (BENCHMARKS.md); on the H200
    /// 16 (all of a unit's rows at e = d = 128, one round of loads) took a
    /// 70-layer step at h = 8 from 3.82 to 3.18 us per layer at batch 1 and
    /// from 7.08 to 6.14 at batch 16, the same beyond (BENCHMARKS.md run 15).
    pub decode_rows_in_flight: usize,
    /// Multiprocessors (SMs), where the runtime reports them: the
    /// chunk-recurrent routine narrows its tiles until its walks fill them.
    pub multiprocessors: Option<u32>,
    /// The runtime has no bf16 type of its own (WGSL, SPIR-V): bf16 tensors
    /// are widened to f32 from their 32-bit words and rounded back (see
    /// [`crate::DType::is_native`]).
    pub bf16_words: bool,
}

/// Which input dtypes a device multiplies on tensor cores (a 16 x 16 x 16
/// `cmma` with f32 accumulators, as its runtime reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorCores {
    /// f16 inputs.
    pub f16: bool,
    /// bf16 inputs.
    pub bf16: bool,
}

impl TensorCores {
    /// What `client`'s runtime reports, where the tensor-core routines are
    /// proven: none through wgpu, and none where the runtime cannot move the
    /// [`CMMA_VECTOR`]-wide vectors they stage with. wgpu's SPIR-V compiler
    /// reports f16 and bf16 cooperative matrices on the H200's Vulkan, and
    /// there every tensor-core test returned NaN or errors of 0.1 to 1.7, the
    /// same in three processes (BENCHMARKS.md, 2026-12-02 run 9), while its
    /// portable routines pass and run at CUDA's portable speed.
    pub fn of(client: &Client) -> Self {
        use cubecl::ir::{ElemType, FloatKind, features::MmaConfig};
        let properties = client.properties();
        if client.name().starts_with("wgpu") || properties.hardware.max_vector_size < CMMA_VECTOR {
            return Self::default();
        }
        let cmma = &properties.features.matmul.cmma;
        let has = |kind: FloatKind| {
            cmma.contains(&MmaConfig {
                a_type: ElemType::Float(kind),
                b_type: ElemType::Float(kind),
                cd_type: ElemType::Float(FloatKind::F32),
                m: 16,
                n: 16,
                k: 16,
            })
        };
        Self {
            f16: has(FloatKind::F16),
            bf16: has(FloatKind::BF16),
        }
    }

    /// Whether 16-bit inputs of `dtype` go on tensor cores as they are (f32
    /// inputs go as bf16 parts where `bf16` is true: see [`Products`]).
    pub fn supports(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 => false,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
        }
    }
}

/// How the tensor-core routines of a prefill take their operands, from the
/// input dtype, the config's [`Precision`] and the device's tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// No tensor cores: the portable routines, in f32 on CUDA cores (or the
    /// runtime's vector units). Where f32 inputs asked for [`Precision::Split`]
    /// or [`Precision::Rounded`], this is the fallback the plan reports.
    Portable,
    /// 16-bit inputs on tensor cores, as they are.
    Native,
    /// f32 inputs on bf16 tensor cores, each operand split into a high and a
    /// low part, three products ([`Precision::Split`]).
    SplitBf16,
    /// f32 inputs on bf16 tensor cores, rounded to bf16 ([`Precision::Rounded`]).
    RoundedBf16,
}

impl Products {
    /// What the device, the dtype and the config allow (before any tile or
    /// shared-memory check).
    pub fn of(dtype: DType, config: &PrefillConfig, limits: &DeviceLimits) -> Self {
        if config.routines == Routines::Portable {
            return Self::Portable;
        }
        match (dtype, config.precision) {
            (DType::F32, Precision::Split) if limits.tensor_cores.bf16 => Self::SplitBf16,
            (DType::F32, Precision::Rounded) if limits.tensor_cores.bf16 => Self::RoundedBf16,
            (DType::F32, _) => Self::Portable,
            (dtype, _) if limits.tensor_cores.supports(dtype) => Self::Native,
            _ => Self::Portable,
        }
    }

    /// Bytes a staged operand element takes in shared memory (a split's two
    /// bf16 parts are four).
    pub fn staged_bytes(&self, dtype: DType) -> usize {
        match self {
            Self::SplitBf16 => 4,
            Self::RoundedBf16 => 2,
            Self::Native | Self::Portable => dtype.size(),
        }
    }

    /// Whether f32 operands are split into high and low parts.
    pub fn split(&self) -> bool {
        *self == Self::SplitBf16
    }
}

/// The environment variable that overrides [`DeviceLimits::decode_rows_in_flight`]
/// (the test script runs the decode tests with 8 on lavapipe, so that CI runs
/// CUDA's routine too).
pub const DECODE_ROWS_IN_FLIGHT_VAR: &str = "LIGHTNING_ATTENTION_DECODE_ROWS_IN_FLIGHT";

fn decode_rows_in_flight(client: &Client) -> usize {
    // Read once: the limits are taken on every call that plans a launch.
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let by_runtime = if client.name().starts_with("cuda") { 16 } else { 1 };
    OVERRIDE
        .get_or_init(|| {
            std::env::var(DECODE_ROWS_IN_FLIGHT_VAR)
                .ok()
                .and_then(|value| value.parse::<usize>().ok())
                .filter(|&rows| (1..=32).contains(&rows))
        })
        .unwrap_or(by_runtime)
}

impl DeviceLimits {
    /// The limits `client`'s device reports.
    pub fn of(client: &Client) -> Self {
        let hw = &client.properties().hardware;
        Self {
            shared_memory: hw.max_shared_memory_size,
            max_units: hw.max_units_per_cube,
            max_cube_count: hw.max_cube_count,
            max_buffer: client.properties().memory.max_page_size,
            plane_size: (hw.plane_size_min == hw.plane_size_max).then_some(hw.plane_size_max),
            tensor_cores: TensorCores::of(client),
            decode_rows_in_flight: decode_rows_in_flight(client),
            multiprocessors: hw.num_streaming_multiprocessors,
            bf16_words: !DType::BF16.is_native(client),
        }
    }
}

/// Grid, cube size and shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Cubes along x, y, z.
    pub cubes: (u32, u32, u32),
    /// Units per cube (1-D).
    pub units: u32,
    /// Shared memory per cube, bytes.
    pub shared_bytes: usize,
}

impl LaunchDims {
    pub(crate) fn check(self, kernel: &'static str, limits: &DeviceLimits) -> Result<Self> {
        let fits = |resource, required: u64, available: u64| {
            if required > available {
                Err(LightningError::DoesNotFit {
                    kernel,
                    resource,
                    required,
                    available,
                })
            } else {
                Ok(())
            }
        };
        fits(
            "bytes of shared memory",
            self.shared_bytes as u64,
            limits.shared_memory as u64,
        )?;
        fits("units per cube", self.units as u64, limits.max_units as u64)?;
        fits(
            "cubes along x",
            self.cubes.0 as u64,
            limits.max_cube_count.0 as u64,
        )?;
        fits(
            "cubes along y",
            self.cubes.1 as u64,
            limits.max_cube_count.1 as u64,
        )?;
        fits(
            "cubes along z",
            self.cubes.2 as u64,
            limits.max_cube_count.2 as u64,
        )?;
        Ok(self)
    }

    /// The cube count to launch with.
    pub fn cube_count(&self) -> CubeCount {
        CubeCount::Static(self.cubes.0, self.cubes.1, self.cubes.2)
    }

    /// The cube dim to launch with.
    pub fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(self.units)
    }
}

/// How much work one prefill call holds, whatever its layout: the sizes the
/// launches are planned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillWork {
    /// dtype of q, k, v and the output.
    pub dtype: DType,
    /// `h`.
    pub heads: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// Query sub-blocks over all sequences run through the prefill kernels.
    pub sub_blocks: usize,
    /// Blocks over all those sequences.
    pub blocks: usize,
    /// Sequences run through the prefill kernels.
    pub sequences: usize,
    /// States written after chosen tokens (speculative decoding).
    pub snapshots: usize,
}

impl PrefillWork {
    /// The work of a dense `[b, h, n, ...]` prefill.
    pub fn dense(shape: &PrefillShape, config: &PrefillConfig) -> Self {
        Self {
            dtype: shape.dtype,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            sub_blocks: shape.batch * shape.seq_len.div_ceil(config.sub_block),
            blocks: shape.batch * shape.seq_len.div_ceil(config.block),
            sequences: shape.batch,
            snapshots: 0,
        }
    }
}

/// Which routine of diag a prefill runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiagRoutine {
    /// The portable kernel (`kernels::diag`).
    Portable,
    /// Tensor cores (`kernels::diag_cmma`), with this many columns of `e` per cube.
    TensorCores {
        /// Columns of `e` per cube, a multiple of 16.
        value_tile: usize,
        /// The kernel adds the non-diag part too (bf16), runs after kv-reduce,
        /// and non-diag is not launched.
        fused_non_diag: bool,
    },
}

impl DiagRoutine {
    /// Whether diag also computes non-diag's part (and so runs after kv-reduce).
    pub fn fuses_non_diag(&self) -> bool {
        matches!(
            self,
            Self::TensorCores {
                fused_non_diag: true,
                ..
            }
        )
    }
}

/// Which routine of kv-parallel a prefill runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvParallelRoutine {
    /// The portable kernel (`kernels::kv_parallel`).
    Portable,
    /// Tensor cores (`kernels::kv_parallel_cmma`).
    TensorCores {
        /// Tokens staged per step, a multiple of 16.
        stage: usize,
        /// Rows of `d` per cube, a multiple of 16 (one plane per 16).
        key_tile: usize,
        /// Columns of `e` per cube, a multiple of 16.
        value_tile: usize,
    },
}

/// Most rows of `d` one tensor-core kv-parallel cube holds (8 planes).
const MAX_CMMA_KEY_TILE: usize = 128;
/// Most columns of `e` one tensor-core kv-parallel cube holds (4 accumulators per plane).
const MAX_CMMA_STATE_COLS: usize = 64;
/// Most tokens tensor-core kv-parallel stages at once: a whole block of 128,
/// so that a cube loads, waits and multiplies once instead of twice (its
/// stalls were mostly waits on global loads, SPEED_NOTES.md variant 9).
const MAX_CMMA_STAGE: usize = 128;

/// Whether the tensor-core routines may run this work at all: the config
/// allows them, the device multiplies its dtype on tensor cores (f32 as bf16
/// parts: [`Products`]), and `d` and
/// `e` take [`CMMA_VECTOR`]-wide vectors. Each routine adds its own tile and
/// shared-memory checks.
pub(crate) fn tensor_cores_may_run(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> bool {
    Products::of(work.dtype, config, limits) != Products::Portable
        && cmma_vector_size(work.key_dim, work.value_dim) == CMMA_VECTOR
}

/// How this work's tensor-core routines take their operands, where they may
/// run at all (else [`Products::Portable`]). The launch stages operands in
/// the dtype this implies (bf16 for f32 inputs on tensor cores), whichever
/// routine (tensor-core or portable) each kernel then runs.
pub(crate) fn planned_products(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Products {
    if tensor_cores_may_run(work, config, limits) {
        Products::of(work.dtype, config, limits)
    } else {
        Products::Portable
    }
}

/// The tensor-core kv-parallel launch for this work, where the device, dtype,
/// config and shared memory allow it.
fn kv_parallel_on_tensor_cores(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Option<(LaunchDims, KvParallelRoutine)> {
    let plane = limits.plane_size?;
    if !tensor_cores_may_run(work, config, limits) || !config.block.is_multiple_of(16) {
        return None;
    }
    let key_tile = (work.key_dim.div_ceil(16) * 16).min(MAX_CMMA_KEY_TILE);
    let value_tile = (work.value_dim.div_ceil(16) * 16).min(MAX_CMMA_STATE_COLS);
    let stage = config.block.min(MAX_CMMA_STAGE);
    let planes = key_tile / 16;
    // Staged rows padded as kernels::staging pads them (both parts of a split).
    let elem = planned_products(work, config, limits).staged_bytes(work.dtype);
    let shared_bytes =
        elem * stage * (key_tile + value_tile + 2 * ROW_PAD) + 4 * 16 * (16 + F32_ROW_PAD) * planes;
    let dims = LaunchDims {
        cubes: (
            count(work.blocks),
            count(work.heads),
            count(work.key_dim.div_ceil(key_tile) * work.value_dim.div_ceil(value_tile)),
        ),
        units: count(planes) * plane,
        shared_bytes,
    };
    dims.check("kv-parallel (tensor cores)", limits).ok().map(|dims| {
        (
            dims,
            KvParallelRoutine::TensorCores {
                stage,
                key_tile,
                value_tile,
            },
        )
    })
}

/// Most columns of `e` one tensor-core diag cube holds (8 accumulators per
/// plane): with scalar loads, 64 made bf16 diag 2x slower on an H100
/// (SPEED_NOTES.md, variants 3 and 10).
const MAX_CMMA_VALUE_TILE: usize = 128;

/// The environment variable that overrides the most columns of `e` one
/// tensor-core diag cube holds (128 unless set; 16 to 128, a multiple of 16):
/// for measuring other tiles without a rebuild (SPEED_NOTES.md).
pub const DIAG_VALUE_TILE_VAR: &str = "LIGHTNING_ATTENTION_DIAG_VALUE_TILE";

fn max_cmma_value_tile() -> usize {
    // Read once: every call that plans a launch asks.
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    OVERRIDE
        .get_or_init(|| {
            std::env::var(DIAG_VALUE_TILE_VAR)
                .ok()
                .and_then(|value| value.parse::<usize>().ok())
                .filter(|&tile| (16..=128).contains(&tile) && tile.is_multiple_of(16))
        })
        .unwrap_or(MAX_CMMA_VALUE_TILE)
}

/// The tensor-core diag launch for this work, where the device, dtype, config
/// and shared memory allow it.
fn diag_on_tensor_cores(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Option<(LaunchDims, DiagRoutine)> {
    let cb = config.sub_block;
    let plane = limits.plane_size?;
    if !tensor_cores_may_run(work, config, limits) || !cb.is_multiple_of(16) {
        return None;
    }
    let key_pad = work.key_dim.div_ceil(16) * 16;
    let value_tile = (work.value_dim.div_ceil(16) * 16).min(max_cmma_value_tile());
    let elem = planned_products(work, config, limits).staged_bytes(work.dtype);
    // Staged rows padded as kernels::staging pads them.
    let shared_bytes = elem * cb * (2 * (key_pad + ROW_PAD) + (value_tile + ROW_PAD) + (cb + ROW_PAD))
        + 4 * cb * (cb + F32_ROW_PAD);
    let dims = LaunchDims {
        cubes: (
            count(work.sub_blocks),
            count(work.heads),
            count(work.value_dim.div_ceil(value_tile)),
        ),
        units: count(cb / 16) * plane,
        shared_bytes,
    };
    dims.check("diag (tensor cores)", limits).ok().map(|dims| {
        // f16 keeps non-diag apart: a long sequence's state can exceed its
        // range (bf16 and f32 keep f32's exponent range).
        let fused_non_diag = work.dtype != DType::F16;
        (
            dims,
            DiagRoutine::TensorCores {
                value_tile,
                fused_non_diag,
            },
        )
    })
}

/// The prefill launches and their tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Blocks over all sequences (slots of the per-block workspace).
    pub total_blocks: usize,
    /// Elements of the per-block state workspace `[total_blocks, h, d, e]`.
    pub block_states_len: usize,
    /// diag launch.
    pub diag: LaunchDims,
    /// Which diag routine runs.
    pub diag_routine: DiagRoutine,
    /// Units per plane the tensor-core routines are compiled for (0 where the
    /// runtime has no fixed plane size; the portable routines ignore it).
    pub plane_size: usize,
    /// diag's chunk of `d` staged per step.
    pub diag_key_chunk: usize,
    /// Query rows (and key columns) of scores and outputs each diag unit holds.
    pub diag_rows_per_unit: usize,
    /// Value columns of outputs each diag unit holds.
    pub diag_cols_per_unit: usize,
    /// kv-parallel launch.
    pub kv_parallel: LaunchDims,
    /// Which kv-parallel routine runs.
    pub kv_parallel_routine: KvParallelRoutine,
    /// Tokens kv-parallel stages at once.
    pub kv_stage: usize,
    /// Rows of the state each kv-parallel unit accumulates.
    pub kv_rows_per_unit: usize,
    /// Columns of the state each kv-parallel unit accumulates.
    pub kv_cols_per_unit: usize,
    /// kv-reduce launch.
    pub kv_reduce: LaunchDims,
    /// Scalars per vector kv-reduce moves states in (see [`kv_reduce_vector_size`]).
    pub kv_reduce_vector_size: usize,
    /// non-diag launch.
    pub non_diag: LaunchDims,
    /// non-diag's chunk of `d` staged per step.
    pub non_diag_key_chunk: usize,
    /// Rows of outputs each non-diag unit computes.
    pub non_diag_rows_per_unit: usize,
    /// Columns of outputs each non-diag unit computes.
    pub non_diag_cols_per_unit: usize,
    /// kv-snapshot launch (zero cubes when no snapshot is asked for).
    pub kv_snapshot: LaunchDims,
    /// The chunk-recurrent state pass, where it replaces kv-parallel and
    /// kv-reduce (see [`crate::chunk_plan`]).
    pub chunk_state: Option<ChunkStatePlan>,
    /// How the tensor-core routines take their operands: for f32 inputs,
    /// whether the config's [`Precision`] runs on tensor cores or falls back
    /// to the portable routines ([`Products::Portable`]) on this device.
    pub products: Products,
    /// 16-bit inputs run on f32 copies: bf16 on a runtime without bf16
    /// ([`DeviceLimits::bf16_words`]), or any 16-bit dtype whose products run
    /// portable ([`Products::Portable`]). The launches widen q, k, v to f32
    /// first, run this f32 plan (made with [`Precision::Rounded`] for bf16
    /// values, whose bf16 parts are exact, and [`Precision::Exact`] for f16)
    /// and round the output back.
    pub widened: bool,
}

/// The vector the tensor-core routines run with: 8 scalars, 16 bytes of
/// 16-bit inputs. They are planned only where `d` and `e` are multiples of 8
/// (the head dims of real models); other dims take the portable routines.
/// The kernels take any vector dividing both, but only 8 has run on a GPU
/// with tensor cores, so only 8 is planned.
pub const CMMA_VECTOR: usize = 8;

/// The widest vector (8, 4, 2 or 1 scalars) dividing both `d` and `e`: the
/// tensor-core routines load rows of q, k, v and the block states in vectors
/// of this many scalars, and every row and tile edge falls on a vector
/// boundary (they are planned only where it is [`CMMA_VECTOR`]).
pub fn cmma_vector_size(key_dim: usize, value_dim: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|lanes| key_dim.is_multiple_of(*lanes) && value_dim.is_multiple_of(*lanes))
        .unwrap_or(1)
}

/// kv-reduce's vector: 4 scalars (16 bytes) where they divide the flat
/// `d x e` state, else 1. The kernel only streams states, so wide accesses
/// are what it has to gain.
pub fn kv_reduce_vector_size(key_dim: usize, value_dim: usize) -> usize {
    if (key_dim * value_dim).is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// `x` as a grid count, saturated (a check against the device's limits follows).
pub(crate) fn count(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

impl PrefillPlan {
    /// Plans a validated prefill on a device with `limits`.
    pub fn new(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> Result<Self> {
        config.validate()?;
        if widen::widens(work.dtype, config, limits) {
            let copies = PrefillWork {
                dtype: DType::F32,
                ..*work
            };
            let precision = widen::copies_precision(work.dtype);
            let plan = Self::new(&copies, &config.with_precision(precision), limits)?;
            return Ok(Self {
                widened: true,
                ..plan
            });
        }
        let (cb, e, d) = (config.sub_block, work.value_dim, work.key_dim);
        let heads = count(work.heads);
        let units = TARGET_UNITS.min(limits.max_units);
        let block_states_len = work.blocks * work.heads * d * e;
        crate::shapes::expect_addressable(
            "per-block state workspace [blocks, h, d, e]",
            block_states_len as u64,
        )?;
        crate::memory::fits_one_buffer(
            Buffer::elements(
                "per-block state workspace [blocks, h, d, e] f32",
                block_states_len,
                DType::F32,
            ),
            limits.max_buffer,
        )?;
        let sub_blocks = count(work.sub_blocks);

        // diag: a 16 x 16 grid of units with register tiles of scores and outputs;
        // shared memory holds the sub_block^2 scores and two sub_block x
        // (key-chunk + 1) tiles of Q and K. A wide chunk means fewer barriers;
        // it shrinks until the tiles fit.
        let diag_rows_per_unit = (cb / GRID_SIDE).max(1);
        let diag_cols_per_unit = (e.next_power_of_two() / GRID_SIDE).clamp(1, MAX_DIAG_COLS_PER_UNIT);
        let diag_value_tile = GRID_SIDE * diag_cols_per_unit;
        let diag_bytes = |chunk: usize| (cb * cb + 2 * cb * (chunk + 1)) * 4;
        let mut diag_key_chunk = d.next_power_of_two().min(MAX_KEY_CHUNK);
        while diag_key_chunk > 1 && diag_bytes(diag_key_chunk) > limits.shared_memory {
            diag_key_chunk /= 2;
        }
        let (diag, diag_routine) = match diag_on_tensor_cores(work, config, limits) {
            Some(tensor_cores) => tensor_cores,
            None => (
                LaunchDims {
                    cubes: (sub_blocks, heads, count(e.div_ceil(diag_value_tile))),
                    units: count(GRID_SIDE * GRID_SIDE),
                    shared_bytes: diag_bytes(diag_key_chunk),
                }
                .check("diag", limits)?,
                DiagRoutine::Portable,
            ),
        };

        // kv-parallel: a 16 x 16 grid of units, each holding up to 4 x 4 elements
        // of the d x e tile in registers; K and V staged up to 32 tokens deep.
        let per_unit = |dim: usize| (dim.next_power_of_two() / GRID_SIDE).clamp(1, MAX_PER_UNIT);
        let (kv_rows_per_unit, kv_cols_per_unit) = (per_unit(d), per_unit(e));
        let (kv_key_tile, kv_value_tile) = (GRID_SIDE * kv_rows_per_unit, GRID_SIDE * kv_cols_per_unit);
        let kv_stage = cb.min(MAX_KV_STAGE);
        let (kv_parallel, kv_parallel_routine) = match kv_parallel_on_tensor_cores(work, config, limits) {
            Some(tensor_cores) => tensor_cores,
            None => (
                LaunchDims {
                    cubes: (
                        count(work.blocks),
                        heads,
                        count(d.div_ceil(kv_key_tile) * e.div_ceil(kv_value_tile)),
                    ),
                    units: count(GRID_SIDE * GRID_SIDE),
                    shared_bytes: kv_stage * (kv_key_tile + kv_value_tile) * 4,
                }
                .check("kv-parallel", limits)?,
                KvParallelRoutine::Portable,
            ),
        };

        // kv-snapshot: one unit per element of the state; kv-reduce: one per
        // vector of them.
        let state_chunks = count((d * e).div_ceil(units as usize));
        let kv_reduce_vector_size = kv_reduce_vector_size(d, e);
        let kv_reduce = LaunchDims {
            cubes: (
                count((d * e / kv_reduce_vector_size).div_ceil(units as usize)),
                heads,
                count(work.sequences),
            ),
            units,
            shared_bytes: 0,
        }
        .check("kv-reduce", limits)?;
        let kv_snapshot = LaunchDims {
            cubes: (state_chunks, heads, count(work.snapshots)),
            units,
            shared_bytes: 0,
        }
        .check("kv-snapshot", limits)?;

        // non-diag: the same 16 x 16 grid, each unit holding sub_block / 16 rows
        // and up to 4 columns of outputs; Q and the state staged in chunks of d.
        let non_diag_rows_per_unit = (cb / GRID_SIDE).max(1);
        let non_diag_cols_per_unit = per_unit(e);
        let non_diag_key_chunk = d.next_power_of_two().min(MAX_KEY_CHUNK);
        let non_diag_value_tile = GRID_SIDE * non_diag_cols_per_unit;
        let non_diag = LaunchDims {
            cubes: (sub_blocks, heads, count(e.div_ceil(non_diag_value_tile))),
            units: count(GRID_SIDE * GRID_SIDE),
            shared_bytes: (cb * (non_diag_key_chunk + 1) + non_diag_key_chunk * non_diag_value_tile) * 4,
        }
        .check("non-diag", limits)?;

        // kv-snapshot reads the per-block states in f32: then they stay f32.
        let chunk_state = plan_chunk_state(
            work,
            config,
            limits,
            diag_routine.fuses_non_diag() && work.snapshots == 0,
        )?;
        let products = planned_products(work, config, limits);
        Ok(Self {
            total_blocks: work.blocks,
            block_states_len,
            diag,
            diag_routine,
            plane_size: limits.plane_size.unwrap_or(0) as usize,
            diag_key_chunk,
            diag_rows_per_unit,
            diag_cols_per_unit,
            kv_parallel,
            kv_parallel_routine,
            kv_stage,
            kv_rows_per_unit,
            kv_cols_per_unit,
            kv_reduce,
            kv_reduce_vector_size,
            non_diag,
            non_diag_key_chunk,
            non_diag_rows_per_unit,
            non_diag_cols_per_unit,
            kv_snapshot,
            chunk_state,
            products,
            widened: false,
        })
    }
}

/// How a decode step is split: cube size and grid, and the kernel's tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// The launch.
    pub dims: LaunchDims,
    /// Lanes of the vectors v, out and the cache are moved in (divides `e`).
    pub vector_size: usize,
    /// Vector columns per cube.
    pub column_tile: usize,
    /// Groups the `d` rows of a column are split over (their partial dot
    /// products are summed in shared memory).
    pub row_groups: usize,
    /// Rows of the cache a unit loads before it stores any.
    pub rows_in_flight: usize,
}

/// Plans a validated decode step: 4-lane vectors where `e` allows, up to 32
/// vector columns per cube, the rows of each column split over up to
/// `256 / columns` units.
pub fn plan_decode(shape: &DecodeShape, limits: &DeviceLimits) -> Result<DecodePlan> {
    let vector_size = if shape.value_dim.is_multiple_of(4) { 4 } else { 1 };
    let vector_cols = shape.value_dim / vector_size;
    let units = TARGET_UNITS.min(limits.max_units) as usize;
    let column_tile = vector_cols.next_power_of_two().min(32).min(units);
    let row_groups = (units / column_tile)
        .min(shape.key_dim.next_power_of_two())
        .max(1);
    let dims = LaunchDims {
        cubes: (
            count(vector_cols.div_ceil(column_tile)),
            count(shape.batch * shape.heads),
            1,
        ),
        units: count(column_tile * row_groups),
        shared_bytes: column_tile * row_groups * vector_size * 4,
    }
    .check("decode", limits)?;
    Ok(DecodePlan {
        dims,
        vector_size,
        column_tile,
        row_groups,
        rows_in_flight: limits.decode_rows_in_flight.max(1),
    })
}

/// The runtime can hold `dtype` (see [`DType::is_supported`]).
fn check_supported(client: &Client, dtype: DType) -> Result<()> {
    if dtype.is_supported(client) {
        Ok(())
    } else {
        Err(LightningError::UnsupportedDType {
            dtype,
            runtime: client.name(),
        })
    }
}

/// Validates and plans a dense prefill from its arguments' shapes and dtypes
/// alone: every check of [`crate::plan_prefill`] (block config, shapes,
/// dtypes, the runtime's dtype support, the device's limits) but the buffers'
/// sizes, for a caller whose buffers do not exist yet (Burn's Fusion backend);
/// the output and final state it will allocate are checked against the
/// largest buffer the device allocates
/// ([`crate::LightningError::OutOfMemory`]).
pub fn plan_prefill_shapes(
    client: &Client,
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    slopes: &TensorShape,
    initial_state: Option<&TensorShape>,
    config: &PrefillConfig,
) -> Result<(PrefillShape, PrefillPlan)> {
    config.validate()?;
    let shape = validate_prefill_shapes(q, k, v, slopes, initial_state)?;
    check_supported(client, shape.dtype)?;
    let limits = DeviceLimits::of(client);
    let plan = PrefillPlan::new(&PrefillWork::dense(&shape, config), config, &limits)?;
    // The buffers the caller will allocate must each fit one buffer too.
    for output in [
        Buffer::tensor("out [b, h, n, e]", &shape.out_shape(), shape.dtype),
        Buffer::tensor("final_state [b, h, d, e] f32", &shape.state_shape(), DType::F32),
    ] {
        crate::memory::fits_one_buffer(output, limits.max_buffer)?;
    }
    Ok((shape, plan))
}

/// Validates and plans a decode step from its arguments' shapes and dtypes
/// alone: every check of [`crate::plan_decode_step`] but the buffers' sizes.
#[allow(clippy::too_many_arguments)]
pub fn plan_decode_shapes(
    client: &Client,
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    cache: &TensorShape,
    slopes: &TensorShape,
    slots: &[i32],
    scale: Option<f32>,
) -> Result<(DecodeShape, DecodePlan)> {
    let shape = validate_decode_shapes(q, k, v, cache, slopes, slots)?;
    check_scale(scale)?;
    check_supported(client, shape.dtype)?;
    let plan = plan_decode(&shape, &DeviceLimits::of(client))?;
    Ok((shape, plan))
}
