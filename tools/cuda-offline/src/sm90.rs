//! The device an NVIDIA H200 (sm_90) reports through cubecl-cuda 0.11.3 with
//! the `cuda-cpp` feature, the project's CUDA build: what
//! `cubecl-cuda-0.11.3/src/runtime.rs` builds from the driver's attributes,
//! with the H200's values written in (driver 580, CUDA 13.0; 132 SMs, 227 KiB
//! of opt-in shared memory per cube). The plans read the hardware limits, the
//! cmma configurations and the type support from here; the compiler reads
//! the options.

use cubecl::cmma::MatrixLayout;
use cubecl::ir::features::{AtomicUsage, Plane, Tma, TypeUsage};
use cubecl::ir::{
    ContiguousElements, DeviceIdentity, DeviceProperties, ElemType, FloatKind, HardwareProperties,
    MemoryDeviceProperties, MmaProperties, OpaqueType, TargetProperties, Type, VectorSize,
};
use cubecl_common::profile::TimingMethod;
use cubecl_cpp::cuda::arch::CudaArchitecture;
use cubecl_cpp::cuda::mma::CudaCmmaCompiler;
use cubecl_cpp::cuda::mma::manual::contiguous_elements_cuda;
use cubecl_cpp::cuda::{supported_mma_combinations, supported_scaled_mma_combinations};
use cubecl_cpp::register_supported_types;
use cubecl_cpp::shared::{
    CompilationOptions, CppSupportedFeatures, register_mma_features, register_scaled_mma_features,
    register_wmma_features,
};

/// Compute capability.
const ARCH: u32 = 90;
/// The CUDA version the runtime's bindings were built for (`CUDARC_CUDA_VERSION=13000`).
const CUDA_VERSION: u32 = 13000;
/// HBM of the H200, bytes (141 GB; it bounds only the buffer checks of the
/// plans, never a kernel's source).
const MEMORY: u64 = 141_000_000_000;
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN` on sm_90.
const MAX_SHARED: usize = 232_448;
/// Multiprocessors of the H200.
const SMS: u32 = 132;

/// The device properties cubecl-cuda reports for the H200.
pub fn properties() -> DeviceProperties {
    let arch = CudaArchitecture {
        version: ARCH,
        tensor_cores: true,
    };
    let cmma = CudaCmmaCompiler::Cpp.supported_cmma_combinations(&arch);
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 1024,
        max_shared_memory_size: MAX_SHARED,
        max_cube_count: (2_147_483_647, 65_535, 65_535),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(SMS),
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: if cmma.is_empty() { None } else { Some(8) },
        num_cpu_cores: None,
        last_level_cache_size: None,
        max_vector_size: VectorSize::MAX,
        cube_mma_reserved_shared_memory: 0,
    };
    let memory = MemoryDeviceProperties::new(MEMORY / 4, 512).with_max_memory(MEMORY);
    let identity = DeviceIdentity {
        name: "NVIDIA H200 (offline description)".into(),
        fingerprint: format!("ptx_sm{ARCH}"),
        physical: None,
    };
    let mut props = DeviceProperties::new(
        Default::default(),
        memory,
        hardware,
        TimingMethod::Device,
        identity,
    );
    register_supported_types(&mut props);
    // arch >= 60, 70: atomics, barriers, plane sync.
    props.register_atomic_type_usage(
        Type::atomic(ElemType::Float(FloatKind::F64)),
        AtomicUsage::Add | AtomicUsage::LoadStore | AtomicUsage::Exchange,
    );
    props.register_atomic_type_usage(Type::atomic(ElemType::Float(FloatKind::F16)), AtomicUsage::Add);
    props.register_atomic_type_usage(
        Type::atomic(Type::new(ElemType::Float(FloatKind::F16)).with_vector_size(2)),
        AtomicUsage::Add | AtomicUsage::LoadStore | AtomicUsage::Exchange,
    );
    props.register_opaque_type(OpaqueType::Barrier);
    props.features.plane.insert(Plane::Sync);
    // arch >= 75: ldmatrix.
    props
        .features
        .matmul
        .ldmatrix
        .insert(ElemType::Float(FloatKind::F16));
    props
        .features
        .matmul
        .ldmatrix
        .insert(ElemType::Float(FloatKind::BF16));
    // arch >= 80: tf32, async copies.
    props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
    props.features.copy_async = true;
    // arch >= 90: TMA, clusters, stmatrix, vector atomics.
    props.features.tma.insert(Tma::Base);
    props.register_opaque_type(OpaqueType::TensorMap);
    props.features.cube_cluster = true;
    props
        .features
        .matmul
        .stmatrix
        .insert(ElemType::Float(FloatKind::F16));
    props
        .features
        .matmul
        .stmatrix
        .insert(ElemType::Float(FloatKind::BF16));
    for vec in [2, 4, 8] {
        for kind in [FloatKind::BF16, FloatKind::F16] {
            props.register_atomic_type_usage(
                Type::atomic(Type::new(kind).with_vector_size(vec)),
                AtomicUsage::Add | AtomicUsage::LoadStore | AtomicUsage::Exchange,
            );
        }
    }
    for vec in [4, 8] {
        for kind in [FloatKind::BF16, FloatKind::F16] {
            props.register_atomic_type_usage(
                Type::atomic(Type::new(kind).with_vector_size(vec)),
                AtomicUsage::MinMax,
            );
        }
    }
    for vec in [2, 4] {
        props.register_atomic_type_usage(
            Type::atomic(Type::new(ElemType::Float(FloatKind::F32)).with_vector_size(vec)),
            AtomicUsage::LoadStore | AtomicUsage::Exchange | AtomicUsage::Add,
        );
    }
    props.features.memory_reinterpret = true;
    props.features.alignment = true;
    props.features.device_memory_scope = true;
    props.features.plane.insert(Plane::Ops);
    props.features.plane.insert(Plane::NonUniformControlFlow);
    register_wmma_features(cmma, &mut props);
    register_mma_features(supported_mma_combinations(&arch), &mut props);
    register_scaled_mma_features(supported_scaled_mma_combinations(&arch), &mut props);
    props
}

/// What the CUDA runtime's compiler targets (`CudaRuntime::target_properties`).
pub fn target_properties() -> TargetProperties {
    TargetProperties {
        mma: MmaProperties {
            register_size_bits: 32,
            const_plane_size: 32,
            register_layout_a: MatrixLayout::RowMajor,
            register_layout_b: MatrixLayout::ColMajor,
            register_layout_acc: MatrixLayout::RowMajor,
            register_duplication_a: 1,
            register_duplication_b: 1,
            register_duplication_acc: 1,
            contiguous_elements: ContiguousElements::new(contiguous_elements_cuda),
        },
    }
}

/// The C++ compiler's options as the runtime sets them on sm_90.
pub fn compilation_options() -> CompilationOptions {
    CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            fast_math: true,
            dp4a: true,
            grid_constants: true,
            fast_tanh: CUDA_VERSION >= 12080,
            clusters: true,
            elect_sync: true,
        },
        ..Default::default()
    }
}
