//! Planning and launching the backward kernels of the key and value gradients
//! (`kernels::backward_diag` and `kernels::backward_non_diag`).
//!
//! They stand in for diag and non-diag in the reversed pass whose states are
//! the gradient states `G` (see [`crate::backward`]): kv-parallel and kv-reduce
//! of that pass are the reverse sweep, unchanged.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels as kernels;

use crate::launch::arg;
use crate::plan::{DeviceLimits, LaunchDims, PrefillPlan};
use crate::sequences::DeviceTable;
use crate::{DType, DeviceTensor, PrefillConfig, Result};

/// The grids of the two backward kernels for one pass; their tiles are the
/// pass's diag and non-diag tiles (see [`BackwardLaunch::pass`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardPlan {
    diag: LaunchDims,
    non_diag: LaunchDims,
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
                pass.diag.cubes.0,
                pass.diag.cubes.1,
                tiles(pass.diag_cols_per_unit),
            ),
            ..pass.diag
        }
        .check("backward-diag", limits)?;
        let non_diag = LaunchDims {
            cubes: (
                pass.non_diag.cubes.0,
                pass.non_diag.cubes.1,
                tiles(pass.non_diag_cols_per_unit),
            ),
            ..pass.non_diag
        }
        .check("backward-non-diag", limits)?;
        Ok(Self { diag, non_diag })
    }
}

/// The tensors and sizes both backward kernels launch with.
pub(crate) struct BackwardLaunch<'a> {
    pub client: &'a Client,
    pub plan: &'a BackwardPlan,
    /// The (portable) plan of the pass [`BackwardPlan`] was made from.
    pub pass: &'a PrefillPlan,
    pub table: &'a DeviceTable,
    pub q: &'a DeviceTensor,
    pub k: &'a DeviceTensor,
    pub v: &'a DeviceTensor,
    pub d_out: &'a DeviceTensor,
    pub slopes: &'a DeviceTensor,
    pub dk: &'a DeviceTensor,
    pub dv: &'a DeviceTensor,
    /// The pass's per-block gradient states `[blocks, h, d, e]`.
    pub block_states: &'a Handle,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    /// Dense rows: `(head_stride, token_stride)`.
    pub strides: (u32, u32),
    pub config: &'a PrefillConfig,
}

impl BackwardLaunch<'_> {
    /// Writes the intra-block parts of dk and dv.
    pub fn diag(&self) {
        match self.q.dtype {
            DType::F32 => self.diag_typed::<f32>(),
            DType::F16 => self.diag_typed::<half::f16>(),
            DType::BF16 => self.diag_typed::<half::bf16>(),
        }
    }

    /// Adds the parts of dk and dv from each block's incoming gradient state.
    pub fn non_diag(&self) {
        match self.q.dtype {
            DType::F32 => self.non_diag_typed::<f32>(),
            DType::F16 => self.non_diag_typed::<half::f16>(),
            DType::BF16 => self.non_diag_typed::<half::bf16>(),
        }
    }

    fn diag_typed<F: Float + CubeElement>(&self) {
        let plan = self.plan;
        // SAFETY: the tensors were validated against the shapes the plan was
        // made for, the geometry checked against the device; the kernel
        // bounds-checks the tails of n, d and e.
        unsafe {
            kernels::backward_diag::backward_diag::launch_unchecked::<F>(
                self.client,
                plan.diag.cube_count(),
                plan.diag.cube_dim(),
                arg(self.q),
                arg(self.k),
                arg(self.v),
                arg(self.d_out),
                arg(self.slopes),
                self.table.seq_starts.arg(),
                self.table.sub_block_work.arg(),
                arg(self.dk),
                arg(self.dv),
                self.heads as u32,
                self.strides.0,
                self.strides.1,
                self.config.scale.unwrap_or(1.0),
                self.key_dim,
                self.value_dim,
                self.config.block,
                self.config.sub_block,
                self.pass.diag_key_chunk,
                self.pass.diag_rows_per_unit,
                self.pass.diag_cols_per_unit,
            )
        }
    }

    fn non_diag_typed<F: Float + CubeElement>(&self) {
        let plan = self.plan;
        // SAFETY: as for diag; the workspace holds the pass's `block_states_len` f32.
        unsafe {
            kernels::backward_non_diag::backward_non_diag::launch_unchecked::<F>(
                self.client,
                plan.non_diag.cube_count(),
                plan.non_diag.cube_dim(),
                arg(self.k),
                arg(self.v),
                arg(self.slopes),
                self.table.seq_starts.arg(),
                self.table.block_offsets.arg(),
                self.table.sub_block_work.arg(),
                BufferArg::from_raw_parts(self.block_states.clone(), self.pass.block_states_len.max(1)),
                arg(self.dk),
                arg(self.dv),
                self.heads as u32,
                self.strides.0,
                self.strides.1,
                self.config.scale.unwrap_or(1.0),
                self.key_dim,
                self.value_dim,
                self.config.block,
                self.config.sub_block,
                self.pass.non_diag_key_chunk,
                self.pass.non_diag_rows_per_unit,
                self.pass.non_diag_cols_per_unit,
            )
        }
    }
}
