//! diag, the intra-block part `(Q K^T ⊙ decay) V` of every sub-block: its
//! portable kernel (`kernels::diag`, a 16 x 16 grid of units with register
//! tiles) and its tensor-core kernel (`kernels::diag_cmma`, which can also
//! add non-diag's part and run after the state pass): the plan of each and
//! their launch.

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;
use lightning_attention_kernels::staging::{F32_ROW_PAD, ROW_PAD};

use super::{GRID_SIDE, MAX_KEY_CHUNK};
use crate::device::limits::{CMMA_VECTOR, DeviceLimits, LaunchDims, count};
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{Call, Staging};
use crate::routines::products::Products;
use crate::routines::table::PrefillWork;
use crate::{DType, PrefillConfig, Result};

/// Most value columns one diag unit accumulates (a 128-wide tile).
const MAX_DIAG_COLS_PER_UNIT: usize = 8;
/// Most columns of `e` one tensor-core diag cube holds (8 accumulators per
/// plane), unless [`crate::Tuning::diag_value_tile`] says otherwise: with
/// scalar loads, 64 made bf16 diag 2x slower on an H100 (SPEED_NOTES.md,
/// variants 3 and 10).
pub(crate) const MAX_CMMA_VALUE_TILE: usize = 128;

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

/// diag's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagPlan {
    /// The launch.
    pub dims: LaunchDims,
    /// Which routine runs.
    pub routine: DiagRoutine,
    /// The portable kernel's chunk of `d` staged per step.
    pub key_chunk: usize,
    /// Query rows (and key columns) of scores and outputs each portable unit holds.
    pub rows_per_unit: usize,
    /// Value columns of outputs each portable unit holds.
    pub cols_per_unit: usize,
}

/// The widest value tile whose kernel fits a unit's registers: 128 columns
/// hold 8 accumulators per plane beside the query and key fragments, which
/// fits (173 registers for bf16, 180 for split f32 at d = e = 128) except
/// with a key dim past 128 (255 registers and a spill, bf16 and f32 at d =
/// 256) and with split f32 operands whose key dim is narrower than the tile
/// (255 and a spill at d = 64, e = 128); 64 columns take 134 to 184 there,
/// without spills (SPEED_NOTES.md, the offline compile).
fn register_value_tile(key_pad: usize, value_pad: usize, products: Products) -> usize {
    if key_pad > 128 || (products.split() && key_pad < value_pad.min(MAX_CMMA_VALUE_TILE)) {
        64
    } else {
        128
    }
}

/// Plans diag: the tensor-core launch `on_tensor_cores` where the choice
/// ([`crate::plan::PrefillPlan::new`]) found one, else the portable one. The
/// portable tiles are planned either way (the backward kernels take them).
pub(crate) fn plan(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    on_tensor_cores: Option<(LaunchDims, DiagRoutine)>,
) -> Result<DiagPlan> {
    let (cb, d, e) = (config.sub_block, work.key_dim, work.value_dim);
    // A 16 x 16 grid of units with register tiles of scores and outputs;
    // shared memory holds the sub_block^2 scores and two sub_block x
    // (key-chunk + 1) tiles of Q and K. A wide chunk means fewer barriers;
    // it shrinks until the tiles fit.
    let rows_per_unit = (cb / GRID_SIDE).max(1);
    let cols_per_unit = (e.next_power_of_two() / GRID_SIDE).clamp(1, MAX_DIAG_COLS_PER_UNIT);
    let value_tile = GRID_SIDE * cols_per_unit;
    let bytes = |chunk: usize| (cb * cb + 2 * cb * (chunk + 1)) * 4;
    let mut key_chunk = d.next_power_of_two().min(MAX_KEY_CHUNK);
    while key_chunk > 1 && bytes(key_chunk) > limits.shared_memory {
        key_chunk /= 2;
    }
    let (dims, routine) = match on_tensor_cores {
        Some(tensor_cores) => tensor_cores,
        None => (
            LaunchDims {
                cubes: (
                    count(work.sub_blocks),
                    count(work.heads),
                    count(e.div_ceil(value_tile)),
                ),
                units: count(GRID_SIDE * GRID_SIDE),
                shared_bytes: bytes(key_chunk),
            }
            .check("diag", limits)?,
            DiagRoutine::Portable,
        ),
    };
    Ok(DiagPlan {
        dims,
        routine,
        key_chunk,
        rows_per_unit,
        cols_per_unit,
    })
}

/// The tensor-core launch for this work, where the plane size, the sub-block
/// and shared memory allow it; `products` are the operands the choice gave,
/// `max_value_tile` the most columns of `e` per cube.
pub(crate) fn on_tensor_cores(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    products: Products,
    max_value_tile: usize,
) -> Option<(LaunchDims, DiagRoutine)> {
    let cb = config.sub_block;
    let plane = limits.plane_size?;
    if !cb.is_multiple_of(16) {
        return None;
    }
    let key_pad = work.key_dim.div_ceil(16) * 16;
    let value_pad = work.value_dim.div_ceil(16) * 16;
    let value_tile = value_pad
        .min(max_value_tile)
        .min(register_value_tile(key_pad, value_pad, products));
    let elem = products.staged_bytes(work.dtype);
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

/// Launches diag for inputs of `F`, the tensor-core kernel staging its
/// operands as `M`; `states_in_input_dtype` says how the state pass stored
/// the per-block states the fused kernel reads (as `F`, else f32).
pub(crate) fn launch<F: Float + CubeElement, M: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    plan: &DiagPlan,
    states_in_input_dtype: bool,
) {
    let Call {
        target,
        q,
        k,
        v,
        slopes,
        out,
        table,
        config,
        layout,
        variant,
        ..
    } = *call;
    let h = call.heads as u32;
    let (d, e, block, cb) = (call.key_dim, call.value_dim, config.block, config.sub_block);
    // The output multiplier; `None` is 1.
    let scale = config.scale.unwrap_or(1.0);
    let (head_stride, token_stride) = (layout.head_stride, layout.token_stride);
    // SAFETY (each launch): each size, tile, grid and table entry was
    // validated and planned against the device's limits; each kernel
    // bounds-checks the tails of n, d and e.
    match plan.routine {
        DiagRoutine::Portable => unsafe {
            launch_kernel!(
                target,
                kernels::diag::diag[F],
                plan.dims.cube_count(),
                plan.dims.cube_dim(),
                arg(q),
                arg(k),
                arg(v),
                arg(slopes),
                table.seq_starts.arg(),
                table.sub_block_work.arg(),
                arg(out),
                h,
                head_stride,
                token_stride,
                scale,
                d,
                e,
                block,
                cb,
                plan.key_chunk,
                plan.rows_per_unit,
                plan.cols_per_unit,
                variant.reversed,
            )
        },
        DiagRoutine::TensorCores {
            value_tile,
            fused_non_diag,
        } => {
            // The per-block states as the state pass stored them.
            macro_rules! diag_cmma {
                ($states:ty) => {
                    unsafe {
                        launch_kernel!(target, kernels::diag_cmma::diag_cmma[F, M, $states],
                            plan.dims.cube_count(),
                            plan.dims.cube_dim(),
                            CMMA_VECTOR,
                            arg(q),
                            arg(k),
                            arg(v),
                            arg(slopes),
                            table.seq_starts.arg(),
                            table.block_offsets.arg(),
                            table.sub_block_work.arg(),
                            call.block_states_arg(staging),
                            arg(out),
                            h,
                            head_stride,
                            token_stride,
                            scale,
                            d,
                            e,
                            block,
                            cb,
                            value_tile,
                            staging.plane_size,
                            fused_non_diag,
                            variant.reversed,
                            staging.split,
                        )
                    }
                };
            }
            if states_in_input_dtype {
                diag_cmma!(F)
            } else {
                diag_cmma!(f32)
            }
        }
    }
}
