//! Planning of the chunk-recurrent routine's state pass (`kernels::chunk_state`):
//! whether it runs, in which variant, and its tiles.
//!
//! The routine replaces kv-parallel and kv-reduce of the five-kernel design by
//! one walk over each sequence's blocks, so that the per-block states cross
//! HBM once (`kernels::chunk_state`). diag (and non-diag, or diag with it
//! fused) run after it on the states it leaves, as after kv-reduce.
//!
//! It is chosen with every other routine in [`crate::plan::PrefillPlan::new`],
//! from the config's [`crate::Routines`] and the device:
//! - `Auto`: the tensor-core variant where the device multiplies the dtype on
//!   tensor cores, else the five kernels;
//! - `ChunkRecurrent`: the tensor-core variant where possible, else the
//!   portable variant (the one CI runs on lavapipe);
//! - `Portable`: the five kernels.
//!
//! f32 inputs reach the tensor-core variant as bf16 operands, split into
//! high and low parts or rounded as the config's `Precision` says (the plan's
//! `Products`); the portable variant splits too where `Precision::Split` is
//! forced onto it (`ChunkRecurrent` without tensor cores: what CI checks).

use lightning_attention_kernels::staging::{F32_ROW_PAD, ROW_PAD};

use crate::device::limits::{CMMA_VECTOR, DeviceLimits, LaunchDims, count};
use crate::routines::products::{Products, cmma_vector_size};
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Result};

/// Most rows of `d` one tensor-core cube holds (8 planes of 16, 256 units).
/// At 256 units the bf16 kernel takes 172 registers a unit at BLOCK 128
/// (stage 128: one cube per SM, as Nsight Compute read) and 100 at BLOCK 64
/// (two cubes per SM; the offline compile, SPEED_NOTES.md issue 27); 64
/// rows (128 units) measured slower on five of the six bench shapes on an
/// H200 (SPEED_NOTES.md, variant 13).
const MAX_CMMA_KEY_TILE: usize = 128;
/// Most columns of `e` one tensor-core cube holds (4 accumulators per plane).
const MAX_CMMA_VALUE_TILE: usize = 64;
/// Fewest columns a narrowed value tile keeps (2 accumulators per plane).
const MIN_CMMA_VALUE_TILE: usize = 32;
/// Tokens one tensor-core stage multiplies at once.
const MAX_CMMA_STAGE: usize = 128;
/// Cubes per multiprocessor the tiles and segments aim for: a walk is a
/// chain of dependent steps, so the more walks, the more of their load
/// latency overlaps.
const CUBES_PER_SM: usize = 2;
/// The SM count assumed where the runtime reports none.
const FALLBACK_MULTIPROCESSORS: usize = 8;
/// Units of a portable cube.
const PORTABLE_UNITS: usize = 256;
/// Most rows (and columns) of the state one portable cube holds.
const MAX_PORTABLE_TILE: usize = 64;
/// Most tokens one portable stage multiplies at once.
const MAX_PORTABLE_STAGE: usize = 32;

/// The state pass's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkStatePlan {
    /// The launch: x over state tiles, y over heads, z over sequences.
    pub dims: LaunchDims,
    /// Tokens per block (the config's).
    pub block: usize,
    /// Tokens multiplied per step (divides the block).
    pub stage: usize,
    /// Blocks per segment where sequences are split into segments walked in
    /// parallel (few, long sequences), else `None` (one walk per sequence).
    pub segment_blocks: Option<usize>,
    /// Rows of `d` per cube.
    pub key_tile: usize,
    /// Columns of `e` per cube.
    pub value_tile: usize,
    /// Units per cube.
    pub units: usize,
    /// Scalars per vector k, v and the states move in.
    pub vector_size: usize,
    /// The tensor-core variant (else the portable one).
    pub tensor_cores: bool,
    /// K and V are staged as high and low parts, three products each (f32
    /// inputs, [`crate::Precision::Split`]): in bf16 parts where the plan's
    /// [`Products`] is [`Products::SplitBf16`], else (the portable variant
    /// forced on a device without tensor cores) in f32 parts on the bf16 grid.
    pub split: bool,
    /// The per-block states are stored in the input dtype instead of f32:
    /// where their one reader, diag on tensor cores with non-diag fused,
    /// rounds them to it anyway (half the bytes, the same result).
    pub states_in_input_dtype: bool,
}

/// The widest vector of 4, 2 or 1 scalars dividing `d` and `e` (the portable
/// variant's: wgpu takes vectors of at most 4).
fn portable_vector_size(key_dim: usize, value_dim: usize) -> usize {
    cmma_vector_size(key_dim, value_dim).min(4)
}

/// Shared memory of a launch, bytes (the kernel's module doc).
fn shared_bytes(elem: usize, stage: usize, key_tile: usize, value_tile: usize) -> usize {
    elem * stage * (key_tile + value_tile + 2 * ROW_PAD) + 4 * key_tile * (value_tile + F32_ROW_PAD)
}

/// The launch: x over the state's tiles, y over heads, z over one walk per
/// sequence (segments add walks: see [`with_segments`]).
fn launch_dims(
    work: &PrefillWork,
    key_tile: usize,
    value_tile: usize,
    units: usize,
    shared: usize,
) -> LaunchDims {
    LaunchDims {
        cubes: (
            count(work.key_dim.div_ceil(key_tile) * work.value_dim.div_ceil(value_tile)),
            count(work.heads),
            count(work.sequences),
        ),
        units: count(units),
        shared_bytes: shared,
    }
}

/// The chosen variant's plan `plan` with its segments and its grid checked;
/// `fused_diag` says whether diag, with non-diag fused in, is the states'
/// only reader (then they are stored in the input dtype).
pub(crate) fn with_segments(
    plan: ChunkStatePlan,
    work: &PrefillWork,
    limits: &DeviceLimits,
    fused_diag: bool,
) -> Result<ChunkStatePlan> {
    let segment_blocks = segment_blocks(work, &plan, limits);
    // With segments, at most one walk per sequence plus one per full segment.
    let walks = work.sequences + segment_blocks.map_or(0, |segment| work.blocks / segment);
    let dims = LaunchDims {
        cubes: (plan.dims.cubes.0, plan.dims.cubes.1, count(walks)),
        ..plan.dims
    }
    .check("chunk-state", limits)?;
    Ok(ChunkStatePlan {
        dims,
        states_in_input_dtype: fused_diag,
        segment_blocks,
        ..plan
    })
}

/// Blocks per segment, where one walk per sequence would leave SMs idle
/// (fewer cubes than SMs): a power of two, so that the walks come to about
/// [`CUBES_PER_SM`] cubes per SM. Where the runtime reports no SM count,
/// [`FALLBACK_MULTIPROCESSORS`] stands in (so that the CPU path walks
/// segments too, and CI checks them).
fn segment_blocks(work: &PrefillWork, plan: &ChunkStatePlan, limits: &DeviceLimits) -> Option<usize> {
    segments_for(work, plan.dims.cubes.0 as usize, limits)
}

/// Blocks per segment for a walk routine with `tiles` cubes per (walk, head)
/// (the state pass's tiles, the fused routine's value tiles): see
/// [`segment_blocks`]; the fused routine segments its walks by this rule too.
pub(crate) fn segments_for(work: &PrefillWork, tiles: usize, limits: &DeviceLimits) -> Option<usize> {
    let sms = limits
        .multiprocessors
        .map_or(FALLBACK_MULTIPROCESSORS, |sms| sms as usize);
    let cubes_per_walk = tiles * work.heads;
    let walks = work.sequences.max(1);
    if cubes_per_walk * walks >= sms || work.blocks <= walks {
        return None;
    }
    let wanted = (CUBES_PER_SM * sms).div_ceil(cubes_per_walk);
    let per_sequence = work.blocks / walks;
    let segment = (per_sequence * walks / wanted).max(1);
    // The largest power of two not above it: few distinct segment lengths,
    // each a comptime block of kv-parallel and kv-reduce.
    let segment = 1 << segment.ilog2();
    (segment < per_sequence).then_some(segment)
}

/// The tensor-core variant for this work, where the plane size, the block
/// and shared memory allow it; `products` are the operands the choice gave.
pub(crate) fn on_tensor_cores(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    products: Products,
) -> Option<ChunkStatePlan> {
    let plane = limits.plane_size? as usize;
    if !config.block.is_multiple_of(16) {
        return None;
    }
    let (d16, e16) = (work.key_dim.div_ceil(16) * 16, work.value_dim.div_ceil(16) * 16);
    let key_tile = d16.min(MAX_CMMA_KEY_TILE);
    let mut value_tile = e16.min(MAX_CMMA_VALUE_TILE);
    let cubes = |value_tile: usize| {
        work.key_dim.div_ceil(key_tile) * work.value_dim.div_ceil(value_tile) * work.heads * work.sequences
    };
    // A narrower value tile (halved, still a multiple of 16) where the walks
    // would leave SMs idle.
    if let Some(sms) = limits.multiprocessors
        && value_tile == MAX_CMMA_VALUE_TILE
        && cubes(value_tile) < CUBES_PER_SM * sms as usize
    {
        value_tile = MIN_CMMA_VALUE_TILE;
    }
    // Split operands (three products, twice the fragments) at stage 128 with
    // a 64-wide value tile need more than 255 registers and spill (the
    // offline compile: f32 at 128/64 and 256/32, SPEED_NOTES.md); they stage
    // 64 tokens at a time.
    let max_stage = if products.split() {
        MAX_CMMA_STAGE / 2
    } else {
        MAX_CMMA_STAGE
    };
    let stage = config.block.min(max_stage);
    let units = key_tile / 16 * plane;
    let shared = shared_bytes(products.staged_bytes(work.dtype), stage, key_tile, value_tile);
    let dims = launch_dims(work, key_tile, value_tile, units, shared)
        .check("chunk-state (tensor cores)", limits)
        .ok()?;
    Some(ChunkStatePlan {
        dims,
        block: config.block,
        segment_blocks: None,
        stage,
        key_tile,
        value_tile,
        units,
        vector_size: CMMA_VECTOR,
        tensor_cores: true,
        split: products.split(),
        states_in_input_dtype: false,
    })
}

/// The portable variant's plan (any runtime, any dtype); `(split, elem)`:
/// whether its operands are split, and the bytes a staged element takes (the
/// choice decides both).
pub(crate) fn portable(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    (split, elem): (bool, usize),
) -> Result<ChunkStatePlan> {
    let vector_size = portable_vector_size(work.key_dim, work.value_dim);
    let key_tile = work.key_dim.min(MAX_PORTABLE_TILE);
    // A multiple of the vector: e is one, and so is 64.
    let value_tile = work.value_dim.min(MAX_PORTABLE_TILE);
    let units = PORTABLE_UNITS.min(limits.max_units as usize);
    // The widest stage (a power of two dividing the block) that fits.
    let mut stage = config.block.min(MAX_PORTABLE_STAGE);
    while stage > 1 && shared_bytes(elem, stage, key_tile, value_tile) > limits.shared_memory {
        stage /= 2;
    }
    let shared = shared_bytes(elem, stage, key_tile, value_tile);
    let dims = launch_dims(work, key_tile, value_tile, units, shared).check("chunk-state", limits)?;
    Ok(ChunkStatePlan {
        dims,
        block: config.block,
        segment_blocks: None,
        stage,
        key_tile,
        value_tile,
        units,
        vector_size,
        tensor_cores: false,
        split,
        states_in_input_dtype: false,
    })
}
