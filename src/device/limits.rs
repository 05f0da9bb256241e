//! What the device allows, read from its reported properties: shared memory,
//! units and cubes, the largest buffer, the plane size, the SM count, the
//! tensor cores the runtime reports, and whether bf16 travels as words; and
//! [`LaunchDims`], one launch's grid checked against them.

use cubecl::prelude::*;

use super::target::LaunchTarget;

use crate::{DType, LightningError, Result};

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
    /// Units per plane when the runtime has one fixed plane size, else `None`.
    pub plane_size: Option<u32>,
    /// Input dtypes with a 16 x 16 x 16 `cmma` into f32 accumulators.
    pub tensor_cores: TensorCores,
    /// Input dtypes with the register-fragment product `mma.m16n8k16` into
    /// f32 (cubecl's `MmaDefinition`), planes of 32 units: the tensor-core
    /// fused walk ([`TensorCores::fragments_of`]).
    pub fragments: TensorCores,
    /// Widest vector a binding may take, in scalars.
    pub max_vector: usize,
    /// Multiprocessors (SMs), where the runtime reports them: the
    /// chunk-recurrent routine narrows its tiles until its walks fill them.
    pub multiprocessors: Option<u32>,
    /// The runtime has no bf16 type of its own (WGSL, SPIR-V): bf16 tensors
    /// are widened to f32 from their 32-bit words and rounded back (see
    /// [`crate::DType::is_native`]).
    pub bf16_words: bool,
    /// The runtime is CUDA (some routines batch differently there: the
    /// decode's rows in flight, [`crate::Tuning::decode_rows_in_flight`]).
    pub cuda: bool,
}
/// Which input dtypes a device multiplies on tensor cores (a 16 x 16 x 16
/// `cmma` with f32 accumulators, as its runtime reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorCores {
    /// f16 inputs.
    pub f16: bool,
    /// bf16 inputs.
    pub bf16: bool,
}

impl TensorCores {
    /// What `client`'s runtime reports, where the tensor-core routines are
    /// proven: none through wgpu, and none where the runtime cannot move the
    /// [`CMMA_VECTOR`]-wide vectors they stage with. wgpu's SPIR-V compiler
    /// reports f16 and bf16 cooperative matrices on the H200's Vulkan, and
    /// there every tensor-core test returned NaN or errors of 0.1 to 1.7, the
    /// same in three processes (BENCHMARKS.md, 2026-12-02 run 9), while its
    /// portable routines pass and run at CUDA's portable speed.
    pub fn of(client: &Client) -> Self {
        Self::of_target(LaunchTarget::Device(client))
    }

    /// What `target`'s runtime reports (see [`TensorCores::of`]).
    pub(crate) fn of_target(target: LaunchTarget) -> Self {
        use cubecl::ir::{ElemType, FloatKind, features::MmaConfig};
        let properties = target.properties();
        if target.runtime_name().starts_with("wgpu") || properties.hardware.max_vector_size < CMMA_VECTOR {
            return Self::default();
        }
        let cmma = &properties.features.matmul.cmma;
        let has = |kind: FloatKind| {
            cmma.contains(&MmaConfig {
                a_type: ElemType::Float(kind),
                b_type: ElemType::Float(kind),
                cd_type: ElemType::Float(FloatKind::F32),
                m: 16,
                n: 16,
                k: 16,
            })
        };
        Self {
            f16: has(FloatKind::F16),
            bf16: has(FloatKind::BF16),
        }
    }

    /// Which dtypes `client`'s runtime multiplies as register fragments
    /// (`mma.m16n8k16` into f32, planes of 32 units): what the tensor-core
    /// fused walk needs. None through wgpu (its tensor-core results were
    /// wrong on the H200's Vulkan, see [`TensorCores::of`]).
    pub fn fragments_of(client: &Client) -> Self {
        Self::fragments_of_target(LaunchTarget::Device(client))
    }

    /// What `target`'s runtime reports (see [`TensorCores::fragments_of`]).
    pub(crate) fn fragments_of_target(target: LaunchTarget) -> Self {
        use cubecl::ir::{ElemType, FloatKind, features::MmaConfig};
        let properties = target.properties();
        let hw = &properties.hardware;
        if target.runtime_name().starts_with("wgpu") || hw.plane_size_min != 32 || hw.plane_size_max != 32 {
            return Self::default();
        }
        let mma = &properties.features.matmul.mma;
        let has = |kind: FloatKind| {
            mma.contains(&MmaConfig {
                a_type: ElemType::Float(kind),
                b_type: ElemType::Float(kind),
                cd_type: ElemType::Float(FloatKind::F32),
                m: 16,
                n: 8,
                k: 16,
            })
        };
        Self {
            f16: has(FloatKind::F16),
            bf16: has(FloatKind::BF16),
        }
    }

    /// Whether 16-bit inputs of `dtype` go on tensor cores as they are (f32
    /// inputs go as bf16 parts where `bf16` is true: see [`Products`](crate::plan::Products)).
    pub fn supports(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 => false,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
        }
    }
}
impl DeviceLimits {
    /// The limits `client`'s device reports.
    pub fn of(client: &Client) -> Self {
        Self::of_target(LaunchTarget::Device(client))
    }

    /// The limits `target`'s device reports (an offline build: the ones it
    /// stands in for).
    pub(crate) fn of_target(target: LaunchTarget) -> Self {
        let properties = target.properties();
        let hw = &properties.hardware;
        Self {
            shared_memory: hw.max_shared_memory_size,
            max_units: hw.max_units_per_cube,
            max_cube_count: hw.max_cube_count,
            max_buffer: properties.memory.max_page_size,
            plane_size: (hw.plane_size_min == hw.plane_size_max).then_some(hw.plane_size_max),
            tensor_cores: TensorCores::of_target(target),
            fragments: TensorCores::fragments_of_target(target),
            max_vector: hw.max_vector_size,
            cuda: target.runtime_name().starts_with("cuda"),
            multiprocessors: hw.num_streaming_multiprocessors,
            bf16_words: !DType::BF16.is_native_in(properties),
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
    pub(crate) fn check(self, kernel: &'static str, limits: &DeviceLimits) -> Result<Self> {
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

/// The vector the tensor-core routines run with: 8 scalars, 16 bytes of
/// 16-bit inputs. They are planned only where `d` and `e` are multiples of 8
/// (the head dims of real models), and only on a runtime that moves vectors
/// this wide ([`TensorCores::of`]); other dims take the portable routines.
/// The kernels take any vector dividing both, but only 8 has run on a GPU
/// with tensor cores, so only 8 is planned.
pub const CMMA_VECTOR: usize = 8;

/// `x` as a grid count, saturated (a check against the device's limits follows).
pub(crate) fn count(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// bf16 travels as the 32-bit words holding its elements in pairs on this
/// runtime (it has no bf16 type: WGSL, SPIR-V), so kernels run on f32 copies.
pub(crate) fn bf16_words(dtype: DType, target: LaunchTarget) -> bool {
    dtype == DType::BF16 && !dtype.is_native_in(target.properties())
}

/// Units per cube of a grid-stride kernel (a conversion, a fill, a scan).
const GRID_STRIDE_UNITS: u32 = 256;
/// The most cubes a grid-stride kernel launches; each unit loops over items beyond.
const GRID_STRIDE_MAX_CUBES: u32 = 8192;

/// Grid of a grid-stride kernel (a conversion, a fill, a scan) over `items`
/// words or elements.
pub(crate) fn grid_stride(target: LaunchTarget, items: usize) -> (CubeCount, CubeDim) {
    let max = target.properties().hardware.max_cube_count.0;
    let cubes = items
        .div_ceil(GRID_STRIDE_UNITS as usize)
        .clamp(1, GRID_STRIDE_MAX_CUBES.min(max) as usize) as u32;
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(GRID_STRIDE_UNITS))
}
