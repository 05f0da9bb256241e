//! Planning of the fused routine (`kernels::fused`): its chunk, tiles and grid.

use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::routines::five_kernels::GRID_SIDE;
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Result};

/// Most columns of `d` the portable routine stages per step.
const MAX_KEY_CHUNK: usize = 32;
/// Most value columns one unit holds (a 128-wide value tile).
const MAX_COLS_PER_UNIT: usize = 8;

/// The fused routine's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedPlan {
    /// The launch: x over value tiles, y over heads, z over sequences (the
    /// launch takes the table's walks).
    pub dims: LaunchDims,
    /// Tokens per chunk (the config's sub-block).
    pub chunk: usize,
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
/// value tile narrowed first (it holds the state: `d` rows of it).
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
    let value_tile = GRID_SIDE * cols_per_unit;
    let dims = LaunchDims {
        cubes: (
            count(e.div_ceil(value_tile)),
            count(work.heads),
            count(work.sequences),
        ),
        units: count(GRID_SIDE * GRID_SIDE),
        shared_bytes: bytes(key_chunk, cols_per_unit),
    }
    .check("fused", limits)?;
    Ok(FusedPlan {
        dims,
        chunk,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
    })
}
