//! Planning of the fused routine (`kernels::fused`): its chunk, tiles and grid.

use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::routines::chunk_recurrent::plan::segments_for;
use crate::routines::five_kernels::GRID_SIDE;
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Result};

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
    /// state across segments first, as for the chunk-recurrent routine),
    /// else `None`.
    pub segment_blocks: Option<usize>,
    /// Columns of `d` staged per step.
    pub key_chunk: usize,
    /// Query rows of a chunk each unit holds.
    pub rows_per_unit: usize,
    /// Value columns each unit holds; the value tile is `16 *` this.
    pub cols_per_unit: usize,
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
    let tiles = e.div_ceil(GRID_SIDE * cols_per_unit);
    // Then segments, where even that leaves SMs idle.
    let segment_blocks = segments_for(work, tiles, limits);
    let walks = work.sequences + segment_blocks.map_or(0, |segment| work.blocks / segment);
    let dims = LaunchDims {
        cubes: (count(tiles), count(work.heads), count(walks)),
        units: count(GRID_SIDE * GRID_SIDE),
        shared_bytes: bytes(key_chunk, cols_per_unit),
    }
    .check("fused", limits)?;
    Ok(FusedPlan {
        dims,
        chunk,
        block: config.block,
        segment_blocks,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
    })
}
