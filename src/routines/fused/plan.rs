//! Planning of the fused routine: which walk (the tensor-core one,
//! `kernels::fused_fragments`, or the portable twin, `kernels::fused`), its
//! chunk, tiles and grid.

use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::routines::chunk_recurrent::plan::segments_for;
use crate::routines::five_kernels::GRID_SIDE;
use crate::routines::table::PrefillWork;
use crate::{DType, FusedProducts, PrefillConfig, Result, Routines};

/// Largest key dim of the tensor-core walk: its state tile takes `d / 2`
/// registers per unit (64 at d = 128).
pub(super) const MAX_FRAGMENT_KEY_DIM: usize = 128;
/// Chunks of the tensor-core walk: a multiple of 16 (the product's rows),
/// at most 64 (the scores' tiles per plane).
pub(super) const FRAGMENT_CHUNKS: [usize; 3] = [16, 32, 64];
/// Value tile of the tensor-core walk unless tuned: 64 columns (4 planes).
/// On an H100 it ran the six bf16 bench shapes 1.05-1.37x faster than 128
/// (two cubes per SM where one ran, at twice the score work: SPEED_NOTES.md,
/// variant 21); [`crate::Tuning::fused_value_tile`] takes 128.
const FRAGMENT_VALUE_TILE: usize = 64;
/// Units per plane of the tensor-core walk (`mma.sync` is a plane's).
pub(super) const PLANE: usize = 32;

/// Most columns of `d` the portable routine stages per step.
const MAX_KEY_CHUNK: usize = 32;
/// Most value columns one unit holds (a 128-wide value tile).
const MAX_COLS_PER_UNIT: usize = 8;
/// Cubes per multiprocessor the value tiles aim for before segments: one
/// walk is a chain of dependent steps, so the more walks, the more of their
/// latency overlaps.
const CUBES_PER_SM: usize = 2;

/// The fused routine's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedPlan {
    /// The launch: x over value tiles, y over heads, z over walks (the
    /// launch takes the table's).
    pub dims: LaunchDims,
    /// Tokens per chunk (the config's sub-block).
    pub chunk: usize,
    /// Tokens per block (the config's): the unit segments are counted in.
    pub block: usize,
    /// Blocks per segment where sequences are split into segments walked in
    /// parallel (few, long sequences: kv-parallel and kv-reduce carry the
    /// state across segments first, as for the chunk-recurrent routine; one
    /// block where the call takes snapshots, whose kv-snapshot reads those
    /// states), else `None`.
    pub segment_blocks: Option<usize>,
    /// Segments per sequence the tensor-core walk was asked for
    /// ([`crate::Tuning::fused_split`]) where they changed its segments; 1
    /// where the rule's segments (or none) stand.
    pub split: usize,
    /// Columns of `d` staged per step.
    pub key_chunk: usize,
    /// Query rows of a chunk each unit holds.
    pub rows_per_unit: usize,
    /// Value columns each unit holds; the value tile is `16 *` this (the
    /// portable walk).
    pub cols_per_unit: usize,
    /// The tensor-core walk, where the plan takes it; else the portable one.
    pub fragments: Option<FragmentWalk>,
}

/// The tensor-core walk's tiles (`kernels::fused_fragments`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentWalk {
    /// Planes of 32 units per cube; each holds 16 value columns of the state,
    /// so the value tile is `16 *` this.
    pub planes: usize,
    /// Products emulated through shared memory (any runtime) rather than on
    /// tensor cores ([`FusedProducts::Emulated`]).
    pub emulated: bool,
    /// Scalars per vector q, k, v and out move in: the widest of 8, 4, 2, 1
    /// that divides `d` and `e` and the device's vectors allow.
    pub vector: usize,
    /// Sets of `Q`, `K`, `V` tiles: 2 where the next chunk is copied in
    /// asynchronously during the chunk ([`crate::Tuning::fused_stages`]).
    pub stages: usize,
    /// The backward's dk and dv walk (`kernels::fused_key_value`, planned
    /// by `key_value::plan`) in place of the dv pass's forward walk: one
    /// cube holds all of `e`.
    pub key_value: bool,
}

/// Plans the fused routine: the tensor-core walk where the config and the
/// device allow it and its tiles fit ([`fragments`]), else the portable one
/// on devices without the tensor-core walk, or where the caller asks for it
/// ([`FusedProducts::Portable`]). `None` where the device has the tensor-core
/// walk but this call cannot take it (f32 inputs, tiles that do not fit):
/// there the portable walk, products on CUDA cores in f32, ran 5.5x slower
/// than the chunk-recurrent routine on tensor cores (26.4 against 4.8 ms at
/// (1,64,16384,128) on an H100: SPEED_NOTES.md variant 19, BENCHMARKS.md),
/// so the call takes that routine instead.
pub(crate) fn plan(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<Option<FusedPlan>> {
    if let Some(plan) = fragments(work, config, limits)? {
        return Ok(Some(plan));
    }
    let has_walk = limits.fragments.supports(DType::F16) || limits.fragments.supports(DType::BF16);
    if config.tuning.fused_products == FusedProducts::Auto && has_walk {
        return Ok(None);
    }
    portable(work, config, limits).map(Some)
}

/// Key and value dims at which `Routines::Auto` takes the tensor-core walk:
/// those an H100 measured it at (BENCHMARKS.md, 2026-12-05 and 2026-12-06),
/// where it ran bf16 prefill 2.1-4.3x, forward+backward 1.9-3.5x and the
/// mixed serving step 2.5x faster than the chunk-recurrent routine.
const AUTO_DIMS: [usize; 2] = [64, 128];

/// Whether `Routines::Auto` takes the fused routine for this call: the
/// tensor-core walk runs it natively (the device has register fragments
/// for its 16-bit dtype, the config asks for no other products, the chunk
/// and tiles fit), its grid fits the device's, `d` and `e` are among
/// [`AUTO_DIMS`], and the call takes no snapshots (the walk would go one
/// block per segment there, never measured). Elsewhere `Auto` keeps the
/// routines it took before, and `Routines::Fused` still forces the walk.
pub(crate) fn takes_auto(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> bool {
    let fused = config.with_routines(Routines::Fused);
    config.routines == Routines::Auto
        && config.tuning.fused_products == FusedProducts::Auto
        && work.snapshots == 0
        && AUTO_DIMS.contains(&work.key_dim)
        && AUTO_DIMS.contains(&work.value_dim)
        && matches!(
            fragments(work, &fused, limits),
            Ok(Some(FusedPlan { fragments: Some(walk), .. })) if !walk.emulated
        )
}

/// Whether the tensor-core walk runs 16-bit inputs as they are on this
/// device with this config (else they run on f32 copies): the decision the
/// prefill plan's products take for [`crate::Routines::Fused`].
pub(crate) fn native_fragments(dtype: DType, config: &PrefillConfig, limits: &DeviceLimits) -> bool {
    config.tuning.fused_products == FusedProducts::Auto && limits.fragments.supports(dtype)
}

/// Shared memory of the tensor-core walk, bytes (the kernel's module doc):
/// `Q`, `K`, `V`, `P` and `O` in the staged type, the decay tables and the
/// emulation's scratch in f32.
fn fragment_shared_bytes(
    chunk: usize,
    key_dim: usize,
    value_tile: usize,
    element: usize,
    emulated: bool,
    sets: usize,
) -> usize {
    let key_pad = key_dim.div_ceil(16) * 16;
    let planes = value_tile / 16;
    let scratch = if emulated { planes * (16 * 16 + 16 * 8) } else { 1 };
    // Rows padded by 8 scalars on tensor cores (`kernels::staging::ROW_PAD`).
    let pad = if emulated { 0 } else { 8 };
    element
        * (sets * (2 * chunk * (key_pad + pad) + chunk * (value_tile + pad))
            + chunk * (chunk + pad)
            + chunk * (value_tile + pad))
        + 4 * (5 * chunk + 1 + scratch)
}

/// Plans the tensor-core walk, or `None` where it does not run: the config
/// asks for the portable walk, the device has no register fragments for the
/// dtype (and the config does not ask for the emulation), `d` is past
/// [`MAX_FRAGMENT_KEY_DIM`], the chunk is not one of [`FRAGMENT_CHUNKS`], or
/// no value tile fits shared memory. The value tile is the tuning's, else 64
/// columns (measured: [`FRAGMENT_VALUE_TILE`]), narrowed until it fits, and
/// at least the chunk (every plane's share of the scores lies in one row
/// block); further parallelism comes from segments, not narrower tiles
/// (each tile recomputes the chunk's scores: variant 19).
fn fragments(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> Result<Option<FusedPlan>> {
    let emulated = match config.tuning.fused_products {
        FusedProducts::Portable => return Ok(None),
        FusedProducts::Emulated => true,
        FusedProducts::Auto if native_fragments(work.dtype, config, limits) => false,
        FusedProducts::Auto => return Ok(None),
    };
    let (chunk, d, e) = (config.sub_block, work.key_dim, work.value_dim);
    if d > MAX_FRAGMENT_KEY_DIM || !FRAGMENT_CHUNKS.contains(&chunk) {
        return Ok(None);
    }
    let element = if emulated { work.dtype.size() } else { 2 };
    let narrowest = chunk.max(16);
    let mut value_tile = match config.tuning.fused_value_tile {
        Some(tile) => tile.max(narrowest),
        None => e
            .next_power_of_two()
            .clamp(narrowest, FRAGMENT_VALUE_TILE.max(narrowest)),
    };
    let vector = [8, 4, 2]
        .into_iter()
        .find(|&lanes| lanes <= limits.max_vector && d % lanes == 0 && e % lanes == 0)
        .unwrap_or(1);
    // The ring copies 16 bytes at a time into rows with no padding column.
    // The ring unless one set is asked for: on an H100 it beat one set at
    // every bench shape, chunk and tile (BENCHMARKS.md, the tuner's run).
    let ring = config.tuning.fused_stages != Some(1) && !emulated && vector * element == 16 && d % 16 == 0;
    let mut stages = if ring { 2 } else { 1 };
    let sized = |tile: usize, sets: usize| fragment_shared_bytes(chunk, d, tile, element, emulated, sets);
    if sized(value_tile, stages) > limits.shared_memory {
        stages = 1;
    }
    let bytes = |tile: usize| sized(tile, stages);
    while bytes(value_tile) > limits.shared_memory && value_tile > narrowest {
        value_tile /= 2;
    }
    if bytes(value_tile) > limits.shared_memory || (value_tile / 16) * PLANE > limits.max_units as usize {
        return Ok(None);
    }
    let planes = value_tile / 16;
    let (dims, segment_blocks, split) = walk_grid(
        work,
        e.div_ceil(value_tile),
        planes * PLANE,
        bytes(value_tile),
        config.tuning.fused_split.unwrap_or(1),
        "fused (tensor cores)",
        limits,
    )?;
    Ok(Some(FusedPlan {
        dims,
        chunk,
        block: config.block,
        segment_blocks,
        split,
        key_chunk: 0,
        rows_per_unit: 0,
        cols_per_unit: 0,
        fragments: Some(FragmentWalk {
            planes,
            emulated,
            vector,
            stages,
            key_value: false,
        }),
    }))
}

/// Shared memory of the portable routine, bytes (the kernel's module doc).
fn shared_bytes(chunk: usize, key_chunk: usize, value_tile: usize, key_dim: usize) -> usize {
    4 * (chunk * chunk + 2 * chunk * (key_chunk + 1) + chunk * value_tile + key_dim * value_tile)
}

/// Plans the portable routine: a chunk of the config's sub-block, the widest
/// value tile (up to 128 columns) and key chunk that fit shared memory, the
/// value tile narrowed first (it holds the state: `d` rows of it); then
/// narrower value tiles and segments where the walks would leave SMs idle.
pub(crate) fn portable(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<FusedPlan> {
    let (chunk, d, e) = (config.sub_block, work.key_dim, work.value_dim);
    let rows_per_unit = (chunk / GRID_SIDE).max(1);
    let mut cols_per_unit = (e.next_power_of_two() / GRID_SIDE).clamp(1, MAX_COLS_PER_UNIT);
    let mut key_chunk = d.next_power_of_two().min(MAX_KEY_CHUNK);
    let bytes = |key_chunk: usize, cols: usize| shared_bytes(chunk, key_chunk, GRID_SIDE * cols, d);
    while bytes(key_chunk, cols_per_unit) > limits.shared_memory {
        if cols_per_unit > 1 {
            cols_per_unit /= 2;
        } else if key_chunk > 1 {
            key_chunk /= 2;
        } else {
            break;
        }
    }
    // Narrower value tiles (more cubes, each walking the same chunks) while
    // the walks would leave SMs idle, down to 16 columns.
    if let Some(sms) = limits.multiprocessors {
        let cubes = |cols: usize| e.div_ceil(GRID_SIDE * cols) * work.heads * work.sequences;
        while cols_per_unit > 1 && cubes(cols_per_unit) < CUBES_PER_SM * sms as usize {
            cols_per_unit /= 2;
        }
    }
    // Then segments, where even that leaves SMs idle.
    let (dims, segment_blocks, split) = walk_grid(
        work,
        e.div_ceil(GRID_SIDE * cols_per_unit),
        GRID_SIDE * GRID_SIDE,
        bytes(key_chunk, cols_per_unit),
        1,
        "fused",
        limits,
    )?;
    Ok(FusedPlan {
        dims,
        chunk,
        block: config.block,
        segment_blocks,
        split,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
        fragments: None,
    })
}

/// The grid of either walk over `tiles` value tiles per head: the sequences
/// split into segments by the chunk-recurrent rule where the walks would
/// leave SMs idle (`segments_for`), into shorter ones where `split` asks for
/// at least that many per sequence ([`split_segments`]), or into single
/// blocks where the call takes snapshots, x over tiles, y over heads, z over
/// walks, checked against the device; and the blocks per segment, and the
/// split where it changed them (else 1).
pub(super) fn walk_grid(
    work: &PrefillWork,
    tiles: usize,
    units: usize,
    shared_bytes: usize,
    split: usize,
    label: &'static str,
    limits: &DeviceLimits,
) -> Result<(LaunchDims, Option<usize>, usize)> {
    // A call with snapshots walks one block per segment: kv-reduce then
    // leaves every block's incoming state in the segment states, where
    // kv-snapshot reads them (the walk itself writes no state but the last).
    let (segment_blocks, split) = if work.snapshots > 0 {
        (Some(1), 1)
    } else {
        let rule = segments_for(work, tiles, limits);
        match split_segments(work, split) {
            Some(segment) if rule.is_none_or(|rule| segment < rule) => (Some(segment), split),
            _ => (rule, 1),
        }
    };
    let walks = work.sequences + segment_blocks.map_or(0, |segment| work.blocks / segment);
    let dims = LaunchDims {
        cubes: (count(tiles), count(work.heads), count(walks)),
        units: count(units),
        shared_bytes,
    }
    .check(label, limits)?;
    Ok((dims, segment_blocks, split))
}

/// Blocks per segment where each sequence (of the work's mean length) is to
/// be walked in at least `split` segments: the largest power of two not
/// above `blocks / split` (few distinct segment lengths, each a comptime
/// block of kv-parallel and kv-reduce), where that is shorter than a
/// sequence. The rule (`segments_for`) segments only where the walks leave
/// SMs idle; an H100 ran (1,64,16384,128)'s 256 walks at 0.48 waves of the
/// cubes its SMs hold (BENCHMARKS.md, 2026-12-06), which this fills.
fn split_segments(work: &PrefillWork, split: usize) -> Option<usize> {
    if split <= 1 {
        return None;
    }
    let per_sequence = work.blocks / work.sequences.max(1);
    let segment = (per_sequence / split).max(1);
    let segment = 1 << segment.ilog2();
    (segment < per_sequence).then_some(segment)
}
