//! Where a call's kernels go: launched on a device ([`LaunchTarget::Device`]),
//! or built without one for an offline compiler ([`LaunchTarget::Offline`]).
//!
//! Every launch of the library goes through [`launch_kernel!`], which hands the
//! same arguments either to the kernel's `launch_unchecked` or to its
//! `create_dummy_kernel` (the constructor cubecl generates so that a kernel
//! built without a client has the same compilation arguments, and with them
//! the same source, as the one a launch builds). The offline path therefore
//! keeps no copy of any planning rule or argument list: it runs the entry
//! points' own planning and launch code against an [`OfflineBuild`], which
//! stands in for the device (its properties, buffers that are never
//! allocated) and records each kernel in launch order.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::{CompilationError, define_kernel};

use crate::DType;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::tensor::DeviceTensor;

/// Where a call's launches go.
#[derive(Clone, Copy)]
pub(crate) enum LaunchTarget<'a> {
    /// Launched on this client's device.
    Device(&'a Client),
    /// Recorded, not launched (see [`OfflineBuild`]).
    Offline(&'a OfflineBuild),
}

impl<'a> LaunchTarget<'a> {
    /// What the device reports of itself.
    pub fn properties(&self) -> &'a DeviceProperties {
        match *self {
            Self::Device(client) => client.properties(),
            Self::Offline(build) => &build.properties,
        }
    }

    /// The runtime's name (`cuda`, `wgpu<wgsl>`, ...).
    pub fn runtime_name(&self) -> &'static str {
        match *self {
            Self::Device(client) => client.name(),
            Self::Offline(build) => build.runtime_name,
        }
    }

    /// An uninitialized buffer of `bytes` (offline: a handle with no memory behind it).
    pub fn empty(&self, bytes: usize) -> Handle {
        match self {
            Self::Device(client) => client.empty(bytes),
            Self::Offline(build) => build.handle(bytes),
        }
    }

    /// A buffer holding `bytes` (offline: a handle with no memory behind it).
    pub fn create_from_slice(&self, bytes: &[u8]) -> Handle {
        match self {
            Self::Device(client) => client.create_from_slice(bytes),
            Self::Offline(build) => build.handle(bytes.len()),
        }
    }

    /// Bytes the device can still allocate ([`DeviceMemory::available`]);
    /// `None` offline or where the runtime reports no capacity.
    pub fn available_memory(&self) -> Option<u64> {
        match self {
            Self::Device(client) => DeviceMemory::of(client).available,
            Self::Offline(_) => None,
        }
    }

    /// Checks `buffers` against the device's memory (see
    /// [`DeviceMemory::check`]); an offline build allocates nothing.
    pub fn check_memory(&self, buffers: &[Buffer]) -> crate::Result<()> {
        match self {
            Self::Device(client) => DeviceMemory::of(client).check(buffers),
            Self::Offline(_) => Ok(()),
        }
    }

    /// An uninitialized tensor (see [`DeviceTensor::empty`]).
    pub fn empty_tensor(&self, shape: &[usize], dtype: DType) -> DeviceTensor {
        let len: usize = shape.iter().product();
        DeviceTensor {
            handle: self.empty(len * dtype.size()),
            shape: shape.to_vec(),
            dtype,
        }
    }
}

/// Launches a `#[cube(launch_unchecked, create_dummy_kernel)]` kernel on a
/// [`LaunchTarget`], or records it in its [`OfflineBuild`]: one argument list
/// for both. Write it inside `unsafe { }` with the launch's SAFETY comment
/// (the device arm calls `launch_unchecked`).
///
/// `launch_kernel!(target, kernels::diag::diag[F], count, dim, args...)`;
/// the generic arguments go in brackets (`[]` for none).
macro_rules! launch_kernel {
    ($target:expr, $($kernel:ident)::+ [$($generic:ty),* $(,)?], $count:expr, $($arg:expr),+ $(,)?) => {{
        let count: cubecl::prelude::CubeCount = $count;
        match $target {
            $crate::device::target::LaunchTarget::Device(client) => {
                $($kernel)::+::launch_unchecked::<$($generic),*>(client, count, $($arg),+)
            }
            $crate::device::target::LaunchTarget::Offline(build) => build.record(
                count.clone(),
                $($kernel)::+::create_dummy_kernel::<$($generic),*>(
                    build.properties_shared(),
                    build.target_properties_shared(),
                    count,
                    $($arg),+
                ),
            ),
        }
    }};
}
pub(crate) use launch_kernel;

/// A stand-in for a device that records the kernels a call would launch,
/// with their exact compile-time arguments, cube dims and dtypes, instead of
/// launching them: for compiling a runtime's kernels where it has no device
/// (the CUDA kernels through NVRTC on a machine without a GPU:
/// `tools/cuda-offline`). Build one from the properties the runtime would
/// report, run the `offline::build_*` functions, then compile
/// what [`OfflineBuild::take_kernels`] returns.
pub struct OfflineBuild {
    properties: Arc<DeviceProperties>,
    target_properties: Arc<TargetProperties>,
    runtime_name: &'static str,
    /// What the kernels recorded next are labelled with.
    label: RefCell<String>,
    stage: Cell<&'static str>,
    kernels: RefCell<Vec<OfflineKernel>>,
}

/// One recorded kernel.
pub struct OfflineKernel {
    /// What the caller was building ([`OfflineBuild::set_label`]).
    pub label: String,
    /// The stage of the call that launches it (`diag`, `chunk_state`, ...).
    pub stage: &'static str,
    /// The kernel, as its launch would have built it.
    pub kernel: Box<dyn CubeKernel>,
    /// Cubes it would have launched.
    pub cube_count: CubeCount,
    /// The execution mode of its launch: every library launch is unchecked
    /// (bounds are validated on the host), while cubecl's dummy constructor
    /// builds a checked kernel, so set this on the definition before compiling.
    pub mode: ExecutionMode,
}

impl OfflineKernel {
    /// The id its launch gives the kernel (cubecl's compilation caches, and
    /// [`cubecl::launched`], key kernels by it).
    pub fn id(&self) -> KernelId {
        let mut id = self.kernel.id();
        id.mode = self.mode;
        id
    }

    /// The kernel's definition as its launch would compile it, ready for a
    /// compiler: the launch's execution mode, and the entry point's name,
    /// whose suffix hashes the id (mode included).
    pub fn definition(&self) -> Result<KernelDefinition, CompilationError> {
        let mut definition = define_kernel(self.kernel.as_ref())?;
        definition.settings.execution_mode = self.mode;
        let name = &definition.settings.kernel_name;
        let base = name
            .rsplit_once('_')
            .map_or(name.as_str(), |(base, _)| base)
            .to_string();
        definition.settings.kernel_name = self.id().entrypoint_name(&base);
        Ok(definition)
    }
}

impl OfflineBuild {
    /// A build for a device of `runtime_name` (as its client would name the
    /// runtime: `cuda` for the CUDA runtime) reporting `properties`, whose
    /// compiler targets `target_properties`.
    pub fn new(
        runtime_name: &'static str,
        properties: DeviceProperties,
        target_properties: TargetProperties,
    ) -> Self {
        Self {
            properties: Arc::new(properties),
            target_properties: Arc::new(target_properties),
            runtime_name,
            label: RefCell::new(String::new()),
            stage: Cell::new("call"),
            kernels: RefCell::new(Vec::new()),
        }
    }

    /// A build standing in for `client`'s device (its properties, its
    /// runtime's name and compiler target).
    pub fn like(client: &Client) -> Self {
        Self::new(
            client.name(),
            client.properties().clone(),
            client.target_properties_shared().as_ref().clone(),
        )
    }

    /// Labels the kernels recorded from now on (a shape, a config).
    pub fn set_label(&self, label: &str) {
        *self.label.borrow_mut() = label.to_string();
    }

    /// The kernels recorded so far, in launch order; the build is emptied.
    pub fn take_kernels(&self) -> Vec<OfflineKernel> {
        std::mem::take(&mut *self.kernels.borrow_mut())
    }

    /// The properties the build stands in for.
    pub fn properties(&self) -> &DeviceProperties {
        &self.properties
    }

    pub(crate) fn set_stage(&self, stage: &'static str) {
        self.stage.set(stage);
    }

    /// The properties, as a kernel's constructor takes them.
    pub fn properties_shared(&self) -> Arc<DeviceProperties> {
        self.properties.clone()
    }

    /// The compiler target's properties, as a kernel's constructor takes them.
    pub fn target_properties_shared(&self) -> Arc<TargetProperties> {
        self.target_properties.clone()
    }

    /// Records `kernel`, which its launch would run on `cube_count` cubes:
    /// what every launch of the library does on an offline target, and how a
    /// caller adds a kernel no entry point launches (a check kernel, built
    /// with its `create_dummy_kernel` and [`OfflineBuild::buffer`]s).
    pub fn record(&self, cube_count: CubeCount, kernel: impl CubeKernel + 'static) {
        self.kernels.borrow_mut().push(OfflineKernel {
            label: self.label.borrow().clone(),
            stage: self.stage.get(),
            kernel: Box::new(kernel),
            cube_count,
            mode: ExecutionMode::Unchecked,
        });
    }

    /// A kernel argument of `elements` elements of `elem_bytes` bytes with no
    /// memory behind it, for [`OfflineBuild::record`].
    pub fn buffer(&self, elements: usize, elem_bytes: usize) -> BufferArg {
        // SAFETY: the handle is never read or written: the kernel is recorded,
        // not launched.
        unsafe { BufferArg::from_raw_parts(self.handle(elements * elem_bytes), elements) }
    }

    /// A handle of `bytes` with no memory behind it: kernels record the
    /// buffer's length, nothing reads it.
    fn handle(&self, bytes: usize) -> Handle {
        use cubecl_common::device::{DeviceId, ServiceId};
        let service = ServiceId {
            device: DeviceId {
                type_id: u16::MAX,
                index_id: 0,
            },
            service: std::any::TypeId::of::<OfflineBuild>(),
        };
        Handle::new(
            service,
            cubecl_environment::stream::StreamId { value: 0 },
            bytes as u64,
        )
    }
}
