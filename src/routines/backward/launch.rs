//! The launches of the backward kernels of the key and value gradients
//! (`kernels::backward_diag` and `kernels::backward_non_diag`), planned
//! beside them in `plan.rs`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels as kernels;

use super::plan::BackwardPlan;
use crate::device::target::{LaunchTarget, launch_kernel};
use crate::device::tensor::arg;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::table::DeviceTable;
use crate::{DType, DeviceTensor, PrefillConfig};

/// The tensors and sizes both backward kernels launch with.
pub(crate) struct BackwardLaunch<'a> {
    pub target: LaunchTarget<'a>,
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
            launch_kernel!(
                self.target,
                kernels::backward_diag::backward_diag[F],
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
                self.pass.diag.key_chunk,
                self.pass.diag.rows_per_unit,
                self.pass.diag.cols_per_unit,
            )
        }
    }

    fn non_diag_typed<F: Float + CubeElement>(&self) {
        let plan = self.plan;
        // SAFETY: as for diag; the workspace holds the pass's `block_states_len` f32.
        unsafe {
            launch_kernel!(
                self.target,
                kernels::backward_non_diag::backward_non_diag[F],
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
                self.pass.non_diag.key_chunk,
                self.pass.non_diag.rows_per_unit,
                self.pass.non_diag.cols_per_unit,
            )
        }
    }
}
