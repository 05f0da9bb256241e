//! The decode kernel's plan (`kernels::decode`): cube size, grid, tiles and
//! the rows of the cache a unit loads before it stores any.

use crate::device::limits::{DeviceLimits, LaunchDims, count};
use crate::problem::config::check_rows_in_flight;
use crate::problem::shapes::DecodeShape;
use crate::routines::common::TARGET_UNITS;
use crate::{DType, Result};

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

/// Rows in flight where the call gives none: 16 on CUDA (all of a unit's
/// rows at e = d = 128, one round of loads), 1 elsewhere (batched loads
/// lowered wgpu's bandwidth by 25% on an H100; see
/// [`crate::Tuning::decode_rows_in_flight`]).
pub(crate) fn default_rows_in_flight(limits: &DeviceLimits) -> usize {
    if limits.cuda { 16 } else { 1 }
}

/// Plans a validated decode step: 4-lane vectors where `e` allows (else 2
/// against a bf16 cache, whose vectors are whole words, else 1), up to 32
/// vector columns per cube, the rows of each column split over up to
/// `256 / columns` units; `rows_in_flight` (1 to 32, validated) or the
/// runtime's default.
pub fn plan_decode(
    shape: &DecodeShape,
    limits: &DeviceLimits,
    rows_in_flight: Option<usize>,
) -> Result<DecodePlan> {
    check_rows_in_flight(rows_in_flight)?;
    let vector_size = if shape.value_dim.is_multiple_of(4) {
        4
    } else if shape.state_dtype == DType::BF16 {
        // Validated even: a vector of two elements is one word.
        2
    } else {
        1
    };
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
        rows_in_flight: rows_in_flight
            .unwrap_or_else(|| default_rows_in_flight(limits))
            .max(1),
    })
}
