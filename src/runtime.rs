//! Runtime selection: the best device this build links and this machine has.

use cubecl::Device;
use cubecl::prelude::*;

/// The most capable device present: CUDA when the build has the `cuda` feature
/// and a driver answers, else wgpu (a GPU, or lavapipe on the CPU).
pub fn best_device() -> Device {
    Device::default()
}

/// A client on [`best_device`].
pub fn best_client() -> Client {
    best_device().client()
}

/// A short description of the client's runtime and limits, for logs.
pub fn describe(client: &Client) -> String {
    let hw = &client.properties().hardware;
    format!(
        "{} (shared memory {} KiB, {} units per cube)",
        client.name(),
        hw.max_shared_memory_size / 1024,
        hw.max_units_per_cube
    )
}
