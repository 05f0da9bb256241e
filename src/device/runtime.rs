//! Runtime selection: the best device this build links and this machine has.
//!
//! `LIGHTNING_ATTENTION_RUNTIME=cuda` or `=wgpu` forces one runtime (the tests
//! and benchmarks use it to run the same binary on both targets of one GPU).

use cubecl::Device;
use cubecl::prelude::*;

use crate::{LightningError, Result};

/// The environment variable that forces a runtime: `cuda` or `wgpu`.
pub const RUNTIME_VAR: &str = "LIGHTNING_ATTENTION_RUNTIME";

/// The device of a named runtime: `"cuda"` (GPU 0) or `"wgpu"` (the best
/// adapter wgpu finds, lavapipe included).
pub fn named_device(runtime: &str) -> Result<Device> {
    let device = match runtime {
        "cuda" => Device::cuda(0),
        "wgpu" => Device::wgpu(Default::default()),
        other => {
            return Err(LightningError::Device(format!(
                "unknown runtime `{other}`: expected cuda or wgpu"
            )));
        }
    };
    device.map_err(|e| LightningError::Device(format!("{runtime} is not available: {e:?}")))
}

/// The device to run on: the runtime named by [`RUNTIME_VAR`] if set, else the
/// most capable present (CUDA when the build has the `cuda` feature and a
/// driver answers, else wgpu: a GPU, or lavapipe on the CPU).
pub fn best_device() -> Result<Device> {
    match std::env::var(RUNTIME_VAR) {
        Ok(name) if !name.is_empty() => named_device(&name),
        _ => Ok(Device::default()),
    }
}

/// A client on [`best_device`].
///
/// # Panics
/// If [`RUNTIME_VAR`] names a runtime that is not available; use
/// [`best_device`] to handle that case.
pub fn best_client() -> Client {
    best_device().unwrap_or_else(|e| panic!("{e}")).client()
}

/// A name for `client`'s device, the same for every client of it: the key of
/// what the library keeps per device (the fused walk's autotuner results,
/// the dense work lists).
pub(crate) fn device_key(client: &Client) -> String {
    let device = client.service_id().device;
    format!("{}-{}-{}", client.name(), device.type_id, device.index_id)
}

/// A short description of the client's runtime, adapter and limits, for logs: shared
/// memory, units per cube, plane size, the tensor cores it reports and how it
/// takes bf16.
pub fn describe(client: &Client) -> String {
    let hw = &client.properties().hardware;
    let cores = crate::plan::TensorCores::of(client);
    let cores = match (cores.f16, cores.bf16) {
        (true, true) => "f16 and bf16",
        (true, false) => "f16",
        (false, true) => "bf16",
        (false, false) => "none",
    };
    let bf16 = if crate::DType::BF16.is_native(client) {
        "native"
    } else {
        "as words"
    };
    format!(
        "{} on {} (shared memory {} KiB, {} units per cube, planes of {}-{}, tensor cores: {cores}, bf16 {bf16})",
        client.name(),
        client.properties().identity.name,
        hw.max_shared_memory_size / 1024,
        hw.max_units_per_cube,
        hw.plane_size_min,
        hw.plane_size_max,
    )
}
