//! Launch planning: grids, tiles and workspaces from the problem and the device's limits.
//!
//! Every size a kernel will use is decided and checked here, so that the
//! launches that follow are `launch_unchecked` on a configuration known to fit.

use cubecl::prelude::*;

use crate::shapes::{DecodeShape, MAX_ELEMENTS, PrefillShape};
use crate::{LightningError, PrefillConfig, Result};

/// Units per cube the portable routines aim for.
const TARGET_UNITS: u32 = 256;
/// Largest tile along `e` staged by diag and non-diag.
const MAX_VALUE_TILE: usize = 128;
/// Side of the `d x e` tile each kv-parallel cube owns (one unit per element).
const STATE_TILE: usize = 16;

/// What the device allows, read from its reported properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Shared memory per cube, bytes.
    pub shared_memory: usize,
    /// Units per cube.
    pub max_units: u32,
    /// Cubes per grid dimension.
    pub max_cube_count: (u32, u32, u32),
    /// Bytes in one buffer (wgpu caps a binding at about 2 GiB).
    pub max_buffer: u64,
}

impl DeviceLimits {
    /// The limits `client`'s device reports.
    pub fn of(client: &Client) -> Self {
        let hw = &client.properties().hardware;
        Self {
            shared_memory: hw.max_shared_memory_size,
            max_units: hw.max_units_per_cube,
            max_cube_count: hw.max_cube_count,
            max_buffer: client.properties().memory.max_page_size,
        }
    }
}

/// Grid, cube size and shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Cubes along x, y, z.
    pub cubes: (u32, u32, u32),
    /// Units per cube (1-D).
    pub units: u32,
    /// Shared memory per cube, bytes.
    pub shared_bytes: usize,
}

impl LaunchDims {
    fn check(self, kernel: &'static str, limits: &DeviceLimits) -> Result<Self> {
        let fits = |resource, required: u64, available: u64| {
            if required > available {
                Err(LightningError::DoesNotFit {
                    kernel,
                    resource,
                    required,
                    available,
                })
            } else {
                Ok(())
            }
        };
        fits(
            "bytes of shared memory",
            self.shared_bytes as u64,
            limits.shared_memory as u64,
        )?;
        fits("units per cube", self.units as u64, limits.max_units as u64)?;
        fits(
            "cubes along x",
            self.cubes.0 as u64,
            limits.max_cube_count.0 as u64,
        )?;
        fits(
            "cubes along y",
            self.cubes.1 as u64,
            limits.max_cube_count.1 as u64,
        )?;
        fits(
            "cubes along z",
            self.cubes.2 as u64,
            limits.max_cube_count.2 as u64,
        )?;
        Ok(self)
    }

    /// The cube count to launch with.
    pub fn cube_count(&self) -> CubeCount {
        CubeCount::Static(self.cubes.0, self.cubes.1, self.cubes.2)
    }

    /// The cube dim to launch with.
    pub fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(self.units)
    }
}

/// The four prefill launches and their tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Blocks in the sequence, `ceil(n / block)`.
    pub num_blocks: usize,
    /// Elements of the per-block state workspace `[b, h, num_blocks, d, e]`.
    pub block_states_len: usize,
    /// diag launch.
    pub diag: LaunchDims,
    /// diag's tile along `e`.
    pub diag_value_tile: usize,
    /// kv-parallel launch.
    pub kv_parallel: LaunchDims,
    /// kv-parallel's tile along `d`.
    pub kv_key_tile: usize,
    /// kv-parallel's tile along `e`.
    pub kv_value_tile: usize,
    /// kv-reduce launch.
    pub kv_reduce: LaunchDims,
    /// non-diag launch.
    pub non_diag: LaunchDims,
    /// non-diag's tile along `e`.
    pub non_diag_value_tile: usize,
}

fn count(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

impl PrefillPlan {
    /// Plans a validated prefill on a device with `limits`.
    pub fn new(shape: &PrefillShape, config: &PrefillConfig, limits: &DeviceLimits) -> Result<Self> {
        config.validate()?;
        let (cb, e, d, n) = (config.sub_block, shape.value_dim, shape.key_dim, shape.seq_len);
        let bh = count(shape.batch_heads());
        let units = TARGET_UNITS.min(limits.max_units);
        let num_blocks = n.div_ceil(config.block);
        let block_states_len = shape.batch_heads() * num_blocks * d * e;
        if block_states_len as u64 > MAX_ELEMENTS {
            return Err(LightningError::TooLarge {
                tensor: "per-block state workspace [b, h, n / BLOCK, d, e]",
                elements: block_states_len as u64,
                max: MAX_ELEMENTS,
            });
        }
        let workspace_bytes = block_states_len as u64 * 4;
        if workspace_bytes > limits.max_buffer {
            return Err(LightningError::DoesNotFit {
                kernel: "per-block state workspace [b, h, n / BLOCK, d, e]",
                resource: "bytes in one buffer",
                required: workspace_bytes,
                available: limits.max_buffer,
            });
        }
        let sub_blocks = count(n.div_ceil(cb));

        // diag stages sub_block^2 scores and sub_block x tile accumulators; the
        // widest value tile that fits avoids recomputing scores per tile.
        let diag_bytes = |tile: usize| (cb * cb + cb * tile) * 4;
        let mut diag_value_tile = e.next_power_of_two().min(MAX_VALUE_TILE);
        while diag_value_tile > 1 && diag_bytes(diag_value_tile) > limits.shared_memory {
            diag_value_tile /= 2;
        }
        let diag = LaunchDims {
            cubes: (sub_blocks, bh, count(e.div_ceil(diag_value_tile))),
            units,
            shared_bytes: diag_bytes(diag_value_tile),
        }
        .check("diag", limits)?;

        let kv_key_tile = d.next_power_of_two().min(STATE_TILE);
        let kv_value_tile = e.next_power_of_two().min(STATE_TILE);
        let kv_parallel = LaunchDims {
            cubes: (
                count(num_blocks),
                bh,
                count(d.div_ceil(kv_key_tile) * e.div_ceil(kv_value_tile)),
            ),
            units: count(kv_key_tile * kv_value_tile),
            shared_bytes: cb * (kv_key_tile + kv_value_tile) * 4,
        }
        .check("kv-parallel", limits)?;

        let kv_reduce = LaunchDims {
            cubes: (count((d * e).div_ceil(units as usize)), bh, 1),
            units,
            shared_bytes: 0,
        }
        .check("kv-reduce", limits)?;

        let non_diag_value_tile = e.next_power_of_two().min(MAX_VALUE_TILE);
        let non_diag = LaunchDims {
            cubes: (sub_blocks, bh, count(e.div_ceil(non_diag_value_tile))),
            units,
            shared_bytes: 0,
        }
        .check("non-diag", limits)?;

        Ok(Self {
            num_blocks,
            block_states_len,
            diag,
            diag_value_tile,
            kv_parallel,
            kv_key_tile,
            kv_value_tile,
            kv_reduce,
            non_diag,
            non_diag_value_tile,
        })
    }
}

/// Plans a validated decode step: one unit per value column, one cube row per (b, h).
pub fn plan_decode(shape: &DecodeShape, limits: &DeviceLimits) -> Result<LaunchDims> {
    let units = count(shape.value_dim.next_power_of_two())
        .min(TARGET_UNITS)
        .min(limits.max_units);
    LaunchDims {
        cubes: (
            count(shape.value_dim.div_ceil(units as usize)),
            count(shape.batch * shape.heads),
            1,
        ),
        units,
        shared_bytes: 0,
    }
    .check("decode", limits)
}
