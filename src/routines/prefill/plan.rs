//! The plan of a prefill call, and the one function that chooses its
//! routines: [`PrefillPlan::new`]. Every rule that picks one routine over
//! another lives here, and only here:
//! - 16-bit inputs run on f32 copies (bf16 without a bf16 type, or products
//!   that run portable: [`widens`], see `routines::widen`);
//! - the operands of the tensor-core routines ([`Products`]), from the dtype,
//!   the config's [`Precision`] and the device's tensor cores;
//! - diag and kv-parallel on tensor cores where they may run and fit, else
//!   portable;
//! - the chunk-recurrent state pass in place of kv-parallel and kv-reduce:
//!   `Auto` where its tensor-core variant runs and its walks fit the grid,
//!   `ChunkRecurrent` always (its portable variant elsewhere), `Portable` never;
//! - the fused routine in place of every other prefill kernel with
//!   `Routines::Fused`, and with `Auto` where its tensor-core walk runs
//!   natively at the dims it was measured faster at and the call takes no
//!   snapshots (`fused::takes_auto`); a call with snapshots walks single blocks
//!   (the segments' incoming states are the blocks', for kv-snapshot);
//!   its tensor-core walk where the device has register fragments for the
//!   16-bit dtype ([`crate::FusedProducts`]); its portable walk on devices
//!   without them; on devices with them, calls the tensor-core walk cannot
//!   take (f32) are planned as `ChunkRecurrent` plans them.
//!
//! Each family plans its own tiles, grids and shared memory beside its launch.

use crate::device::limits::{CMMA_VECTOR, DeviceLimits, LaunchDims};
use crate::device::memory::{Buffer, fits_one_buffer};
use crate::problem::shapes::expect_addressable;
use crate::routines::chunk_recurrent::plan::{self as chunk, ChunkStatePlan};
use crate::routines::common::Staging;
use crate::routines::five_kernels::diag::{self, DiagPlan, MAX_CMMA_VALUE_TILE};
use crate::routines::five_kernels::kv_parallel::{self, KvParallelPlan};
use crate::routines::five_kernels::kv_reduce::{self, KvReducePlan};
use crate::routines::five_kernels::{
    kv_snapshot,
    non_diag::{self, NonDiagPlan},
};
use crate::routines::fused::key_value;
use crate::routines::fused::plan::{self as fused, FusedPlan};
use crate::routines::products::{Products, cmma_vector_size};
use crate::routines::table::{ChunkWalk, PrefillWork};
use crate::{DType, LightningError, Precision, PrefillConfig, Result, Routines};

/// The prefill launches and their tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Blocks over all sequences (slots of the per-block workspace).
    pub total_blocks: usize,
    /// Elements of the per-block state workspace `[total_blocks, h, d, e]`.
    pub block_states_len: usize,
    /// Units per plane the tensor-core routines are compiled for (0 where the
    /// runtime has no fixed plane size; the portable routines ignore it).
    pub plane_size: usize,
    /// diag: its launch, routine and tiles.
    pub diag: DiagPlan,
    /// kv-parallel: its launch, routine and tiles.
    pub kv_parallel: KvParallelPlan,
    /// kv-reduce: its launch and vector.
    pub kv_reduce: KvReducePlan,
    /// non-diag: its launch and tiles.
    pub non_diag: NonDiagPlan,
    /// kv-snapshot launch (zero cubes when no snapshot is asked for).
    pub kv_snapshot: LaunchDims,
    /// The chunk-recurrent state pass, where it replaces kv-parallel and
    /// kv-reduce (see [`crate::chunk_plan`]).
    pub chunk_state: Option<ChunkStatePlan>,
    /// The fused routine, where it replaces every other prefill kernel
    /// ([`Routines::Fused`]).
    pub fused: Option<FusedPlan>,
    /// How the tensor-core routines take their operands: for f32 inputs,
    /// whether the config's [`Precision`] runs on tensor cores or falls back
    /// to the portable routines ([`Products::Portable`]) on this device.
    pub products: Products,
    /// 16-bit inputs run on f32 copies: bf16 on a runtime without bf16
    /// ([`DeviceLimits::bf16_words`]), or any 16-bit dtype whose products run
    /// portable ([`Products::Portable`]). The launches widen q, k, v to f32
    /// first, run this f32 plan (made with [`Precision::Rounded`] for bf16
    /// values, whose bf16 parts are exact, and [`Precision::Exact`] for f16)
    /// and round the output back.
    pub widened: bool,
}

impl PrefillPlan {
    /// Chooses the routines of a validated prefill on a device with `limits`
    /// (the module doc lists the rules) and plans each.
    pub fn new(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> Result<Self> {
        config.validate()?;
        if fused::takes_auto(work, config, limits) {
            return Self::new(work, &config.with_routines(Routines::Fused), limits);
        }
        // The fused routine where it is planned; where the device has the
        // tensor-core walk but this call cannot take it, the chunk-recurrent
        // routine exactly as `ChunkRecurrent` plans it (see `fused::plan`).
        if config.routines == Routines::Fused && fused::plan(work, config, limits)?.is_none() {
            return Self::new(work, &config.with_routines(Routines::ChunkRecurrent), limits);
        }
        if widens(work.dtype, config, limits) {
            let copies = PrefillWork {
                dtype: DType::F32,
                ..*work
            };
            let precision = copies_precision(work.dtype);
            let plan = Self::new(&copies, &config.with_precision(precision), limits)?;
            return Ok(Self {
                widened: true,
                ..plan
            });
        }
        let (d, e) = (work.key_dim, work.value_dim);
        // The fused routine walks each sequence once and writes no state
        // but the final one; with snapshots it walks single blocks, whose
        // incoming states kv-snapshot reads (its segment states, checked
        // with the call's other buffers before any allocation).
        let fused = match config.routines {
            Routines::Fused => fused::plan(work, config, limits)?,
            _ => None,
        };
        // The per-block state workspace of the other routines; the fused
        // routine allocates none, so a workspace past one buffer does not
        // refuse it (wgpu refused (4,64,8192,128) for its 2 GiB).
        let block_states_len = if fused.is_some() {
            0
        } else {
            work.blocks * work.heads * d * e
        };
        expect_addressable(
            "per-block state workspace [blocks, h, d, e]",
            block_states_len as u64,
        )?;
        fits_one_buffer(
            Buffer::elements(
                "per-block state workspace [blocks, h, d, e] f32",
                block_states_len,
                DType::F32,
            ),
            limits.max_buffer,
        )?;
        let products = planned_products(work, config, limits);
        let tensor_cores = products != Products::Portable;
        let max_value_tile = config.tuning.diag_value_tile.unwrap_or(MAX_CMMA_VALUE_TILE);
        let diag = diag::plan(
            work,
            config,
            limits,
            tensor_cores
                .then(|| diag::on_tensor_cores(work, config, limits, products, max_value_tile))
                .flatten(),
        )?;
        let kv_parallel = kv_parallel::plan(
            work,
            config,
            limits,
            tensor_cores
                .then(|| kv_parallel::on_tensor_cores(work, config, limits, products))
                .flatten(),
        )?;
        let kv_reduce = kv_reduce::plan(work, limits)?;
        let kv_snapshot = kv_snapshot::plan(work, limits)?;
        let non_diag = non_diag::plan(work, config, limits)?;
        let chunk_state = match config.routines {
            Routines::Portable => None,
            Routines::Fused if fused.is_some() => None,
            routines => match tensor_cores
                .then(|| chunk::on_tensor_cores(work, config, limits, products))
                .flatten()
            {
                Some(plan) => Some(plan),
                None if routines == Routines::Auto => None,
                None => Some(chunk::portable(
                    work,
                    config,
                    limits,
                    portable_chunk_operands(work, config, products),
                )?),
            },
        };
        // kv-snapshot reads the per-block states in f32: then they stay f32.
        let fused_diag = diag.routine.fuses_non_diag() && work.snapshots == 0;
        // Its walks run along z, one cube per sequence: `Auto` takes
        // kv-parallel and kv-reduce instead where they pass the grid's limit
        // (a packed batch of many short documents; kv-reduce loops over them).
        let chunk_state = match chunk_state
            .map(|plan| chunk::with_segments(plan, work, limits, fused_diag))
            .transpose()
        {
            Err(LightningError::DoesNotFit { .. }) if config.routines == Routines::Auto => None,
            planned => planned?,
        };
        Ok(Self {
            total_blocks: work.blocks,
            block_states_len,
            plane_size: limits.plane_size.unwrap_or(0) as usize,
            diag,
            kv_parallel,
            kv_reduce,
            non_diag,
            kv_snapshot,
            chunk_state,
            fused,
            products,
            widened: false,
        })
    }

    /// The plan of a backward's dv pass (over `work`, the forward's shape):
    /// this plan, with its fused walk replaced by the backward's dk and dv
    /// walk where that applies (`fused::key_value::plan`: the tensor-core
    /// walk, all of `e` in one cube), so that one reverse walk carries the
    /// gradient state and writes both gradients; else as it is (the dk pass
    /// then runs on its own).
    pub(crate) fn for_key_value(
        self,
        work: &PrefillWork,
        config: &PrefillConfig,
        limits: &DeviceLimits,
    ) -> Self {
        let walk = match self.fused {
            Some(walk) if !self.widened => walk,
            _ => return self,
        };
        match key_value::plan(work, config, limits, &walk) {
            Some(merged) => Self {
                fused: Some(merged),
                ..self
            },
            None => self,
        }
    }

    /// Whether the dv pass this plan runs is the dk and dv walk
    /// ([`Self::for_key_value`]).
    pub(crate) fn walks_key_value(&self) -> bool {
        self.fused
            .and_then(|walk| walk.fragments)
            .is_some_and(|walk| walk.key_value)
    }

    /// How the call's kernels stage operands and where the per-block states
    /// lie, as every family's launch takes it.
    pub(crate) fn staging(&self) -> Staging {
        Staging {
            plane_size: self.plane_size,
            split: self.products.split(),
            block_states_len: self.block_states_len,
        }
    }

    /// The walks of the chunk-recurrent state pass, where the plan has it
    /// (the sequence table lists them).
    pub(crate) fn chunk_walk(&self) -> Option<ChunkWalk> {
        match (self.chunk_state, self.fused) {
            (Some(chunk), _) => Some((chunk.block, chunk.segment_blocks)),
            (None, Some(fused)) => Some((fused.block, fused.segment_blocks)),
            (None, None) => None,
        }
    }
}

/// What the device, the dtype and the config allow the tensor-core routines
/// to take as operands (before any tile or shared-memory check).
fn products(dtype: DType, config: &PrefillConfig, limits: &DeviceLimits) -> Products {
    // The fused routine takes 16-bit inputs as they are where its
    // tensor-core walk runs them (else f32 copies, for its portable walk or
    // the emulation); f32 inputs take its portable walk.
    if config.routines == Routines::Fused {
        return if fused::native_fragments(dtype, config, limits) {
            Products::Native
        } else {
            Products::Portable
        };
    }
    if config.routines == Routines::Portable {
        return Products::Portable;
    }
    match (dtype, config.precision) {
        (DType::F32, Precision::Split) if limits.tensor_cores.bf16 => Products::SplitBf16,
        (DType::F32, Precision::Rounded) if limits.tensor_cores.bf16 => Products::RoundedBf16,
        (DType::F32, _) => Products::Portable,
        (dtype, _) if limits.tensor_cores.supports(dtype) => Products::Native,
        _ => Products::Portable,
    }
}

/// How this work's tensor-core routines take their operands, where they may
/// run at all (else [`Products::Portable`]): the config allows them, the
/// device multiplies the dtype on tensor cores (f32 as bf16 parts), and `d`
/// and `e` take [`CMMA_VECTOR`]-wide vectors. Each routine adds its own tile
/// and shared-memory checks. The launch stages operands in the dtype this
/// implies (bf16 for f32 inputs on tensor cores), whichever routine
/// (tensor-core or portable) each kernel then runs.
fn planned_products(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> Products {
    if cmma_vector_size(work.key_dim, work.value_dim) == CMMA_VECTOR {
        products(work.dtype, config, limits)
    } else {
        Products::Portable
    }
}

/// Whether the portable chunk-recurrent variant splits its operands, and the
/// bytes a staged element then takes: as the tensor-core routines would on
/// this device (bf16 parts), or, where they cannot run, f32 parts for f32
/// inputs that ask for [`Precision::Split`] (the same structure, checked by
/// CI on lavapipe).
fn portable_chunk_operands(work: &PrefillWork, config: &PrefillConfig, products: Products) -> (bool, usize) {
    match products {
        Products::Portable if work.dtype == DType::F32 && config.precision == Precision::Split => (true, 8),
        products => (products.split(), products.staged_bytes(work.dtype)),
    }
}

/// Whether a prefill (or backward) of `dtype` inputs with `config` runs on f32
/// copies on a device with `limits` (`routines::widen`'s module doc says when).
pub(crate) fn widens(dtype: DType, config: &PrefillConfig, limits: &DeviceLimits) -> bool {
    match dtype {
        DType::F32 => false,
        DType::BF16 if limits.bf16_words => true,
        dtype => products(dtype, config, limits) == Products::Portable,
    }
}

/// The precision the f32 copies of `dtype` inputs run with (`routines::widen`).
pub(crate) fn copies_precision(dtype: DType) -> Precision {
    match dtype {
        DType::BF16 => Precision::Rounded,
        _ => Precision::Exact,
    }
}
