//! kv-parallel, each block's decayed `K^T V` into its slot of the per-block
//! workspace: its portable kernel (`kernels::kv_parallel`, a 16 x 16 grid of
//! units, each holding up to 4 x 4 elements of the state tile) and its
//! tensor-core kernel (`kernels::kv_parallel_cmma`): the plan of each and
//! their launch. The chunk-recurrent routine's segmented walk runs it over
//! segments ([`BlockRun`]).

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;
use lightning_attention_kernels::staging::{F32_ROW_PAD, ROW_PAD};

use super::{GRID_SIDE, per_unit};
use crate::device::limits::{CMMA_VECTOR, DeviceLimits, LaunchDims, count};
use crate::device::target::launch_kernel;
use crate::device::tensor::arg;
use crate::routines::common::{BlockRun, Call, Staging};
use crate::routines::products::Products;
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Result};

/// Most tokens the portable kernel stages at once.
const MAX_KV_STAGE: usize = 32;
/// Most rows of `d` one tensor-core kv-parallel cube holds (8 planes).
const MAX_CMMA_KEY_TILE: usize = 128;
/// Most columns of `e` one tensor-core kv-parallel cube holds (4 accumulators per plane).
const MAX_CMMA_STATE_COLS: usize = 64;
/// Most tokens tensor-core kv-parallel stages at once: a whole block of 128,
/// so that a cube loads, waits and multiplies once instead of twice (its
/// stalls were mostly waits on global loads, SPEED_NOTES.md variant 9).
const MAX_CMMA_STAGE: usize = 128;

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

/// kv-parallel's launch and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvParallelPlan {
    /// The launch (its cubes along x are a call's blocks; a `BlockRun`
    /// over segments replaces them).
    pub dims: LaunchDims,
    /// Which routine runs.
    pub routine: KvParallelRoutine,
    /// Tokens the portable kernel stages at once.
    pub stage: usize,
    /// Rows of the state each portable unit accumulates.
    pub rows_per_unit: usize,
    /// Columns of the state each portable unit accumulates.
    pub cols_per_unit: usize,
}

/// Plans kv-parallel: the tensor-core launch `on_tensor_cores` where the
/// choice found one, else the portable one (whose tiles are planned either way).
pub(crate) fn plan(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    on_tensor_cores: Option<(LaunchDims, KvParallelRoutine)>,
) -> Result<KvParallelPlan> {
    let (d, e) = (work.key_dim, work.value_dim);
    // A 16 x 16 grid of units, each holding up to 4 x 4 elements of the
    // d x e tile in registers; K and V staged up to 32 tokens deep.
    let (rows_per_unit, cols_per_unit) = (per_unit(d), per_unit(e));
    let (key_tile, value_tile) = (GRID_SIDE * rows_per_unit, GRID_SIDE * cols_per_unit);
    let stage = config.sub_block.min(MAX_KV_STAGE);
    let (dims, routine) = match on_tensor_cores {
        Some(tensor_cores) => tensor_cores,
        None => (
            LaunchDims {
                cubes: (
                    count(work.blocks),
                    count(work.heads),
                    count(d.div_ceil(key_tile) * e.div_ceil(value_tile)),
                ),
                units: count(GRID_SIDE * GRID_SIDE),
                shared_bytes: stage * (key_tile + value_tile) * 4,
            }
            .check("kv-parallel", limits)?,
            KvParallelRoutine::Portable,
        ),
    };
    Ok(KvParallelPlan {
        dims,
        routine,
        stage,
        rows_per_unit,
        cols_per_unit,
    })
}

/// The tensor-core launch for this work, where the plane size, the block and
/// shared memory allow it; `products` are the operands the choice gave.
pub(crate) fn on_tensor_cores(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    products: Products,
) -> Option<(LaunchDims, KvParallelRoutine)> {
    let plane = limits.plane_size?;
    if !config.block.is_multiple_of(16) {
        return None;
    }
    let key_tile = (work.key_dim.div_ceil(16) * 16).min(MAX_CMMA_KEY_TILE);
    let value_tile = (work.value_dim.div_ceil(16) * 16).min(MAX_CMMA_STATE_COLS);
    let stage = config.block.min(MAX_CMMA_STAGE);
    let planes = key_tile / 16;
    // Staged rows padded as kernels::staging pads them (both parts of a split).
    let elem = products.staged_bytes(work.dtype);
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

/// Launches kv-parallel over `run` for inputs of `F`: each block's decayed
/// `K^T V` into its slot, staged on tensor cores as `M` (split as `staging`
/// says).
pub(crate) fn launch<F: Float + CubeElement, M: Float + CubeElement>(
    call: &Call,
    staging: &Staging,
    plan: &KvParallelPlan,
    run: &BlockRun,
) {
    let (target, table, variant) = (call.target, call.table, call.variant);
    let h = call.heads as u32;
    let (d, e) = (call.key_dim, call.value_dim);
    let (head_stride, token_stride) = (call.layout.head_stride, call.layout.token_stride);
    let dims = LaunchDims {
        cubes: (run.cubes, plan.dims.cubes.1, plan.dims.cubes.2),
        ..plan.dims
    };
    // SAFETY: the plan checked the tiles and the grid (no more cubes along x
    // than the call has blocks) against the device; every table entry and
    // buffer size was validated.
    match plan.routine {
        KvParallelRoutine::Portable => unsafe {
            launch_kernel!(
                target,
                kernels::kv_parallel::kv_parallel[F],
                dims.cube_count(),
                dims.cube_dim(),
                arg(call.k),
                arg(call.v),
                arg(call.slopes),
                table.seq_starts.arg(),
                run.work.arg(),
                call.run_states(run),
                h,
                head_stride,
                token_stride,
                d,
                e,
                run.block,
                plan.stage,
                plan.rows_per_unit,
                plan.cols_per_unit,
                variant.reversed,
            )
        },
        KvParallelRoutine::TensorCores {
            stage,
            key_tile,
            value_tile,
        } => unsafe {
            launch_kernel!(target, kernels::kv_parallel_cmma::kv_parallel_cmma[F, M],
                dims.cube_count(),
                dims.cube_dim(),
                CMMA_VECTOR,
                arg(call.k),
                arg(call.v),
                arg(call.slopes),
                table.seq_starts.arg(),
                run.work.arg(),
                call.run_states(run),
                h,
                head_stride,
                token_stride,
                d,
                e,
                run.block,
                stage,
                key_tile,
                value_tile,
                staging.plane_size,
                variant.reversed,
                staging.split,
            )
        },
    }
}
