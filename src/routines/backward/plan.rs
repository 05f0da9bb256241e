//! The grids of the backward kernels of the key and value gradients, from
//! the portable plan of their pass.

use crate::Result;
use crate::device::limits::{DeviceLimits, LaunchDims};
use crate::routines::prefill::plan::PrefillPlan;

/// The grids of the two backward kernels for one pass; their tiles are the
/// pass's diag and non-diag tiles (see `BackwardLaunch::pass`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardPlan {
    pub diag: LaunchDims,
    pub non_diag: LaunchDims,
}

impl BackwardPlan {
    /// Plans from the (portable) plan of the pass: the same tiles and shared
    /// memory as diag and non-diag, with column tiles over `max(d, e)` since
    /// each cube writes columns of dk (`d` wide) and of dv (`e` wide).
    pub fn new(pass: &PrefillPlan, key_dim: usize, value_dim: usize, limits: &DeviceLimits) -> Result<Self> {
        let widest = key_dim.max(value_dim);
        let tiles =
            |cols_per_unit: usize| u32::try_from(widest.div_ceil(16 * cols_per_unit)).unwrap_or(u32::MAX);
        let diag = LaunchDims {
            cubes: (
                pass.diag.dims.cubes.0,
                pass.diag.dims.cubes.1,
                tiles(pass.diag.cols_per_unit),
            ),
            ..pass.diag.dims
        }
        .check("backward-diag", limits)?;
        let non_diag = LaunchDims {
            cubes: (
                pass.non_diag.dims.cubes.0,
                pass.non_diag.dims.cubes.1,
                tiles(pass.non_diag.cols_per_unit),
            ),
            ..pass.non_diag.dims
        }
        .check("backward-non-diag", limits)?;
        Ok(Self { diag, non_diag })
    }
}
