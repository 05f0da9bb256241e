//! NCCL between the GPUs of one process, through cubecl's collectives
//! (`Client::all_reduce`, cubecl-cuda's NCCL layer): one thread per rank, each
//! with its device's client.
//!
//! A gather is a sum: each rank writes its tensor into its slot of a zeroed
//! `[world, ..]` buffer and the buffers are all-reduced; every slot but one
//! adds zeros, so the sum is exact.

use cubecl::device::{CudaDevice, DeviceId};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::server::ReduceOperation;
use cubecl::{Device, RuntimeId};

use super::combine::placed;
use super::comm::StateComm;
use crate::{DType, DeviceTensor, LightningError, Result};

/// One rank of a group of CUDA devices of this process.
///
/// A device's rank is its position among the group's devices sorted by
/// index (NCCL's, through cubecl: a group is named by its devices, and each
/// device's rank is its place in the sorted list), so rank `r` must hold the
/// `r`-th segment.
#[derive(Clone, Debug)]
pub struct NcclComm {
    rank: usize,
    /// The group's devices as their servers know them, sorted.
    group: Vec<DeviceId>,
}

impl NcclComm {
    /// The communicator of `device` in the group of `devices` (CUDA devices,
    /// each once, `device` among them). Every rank must pass the same devices.
    pub fn new(device: &CudaDevice, devices: &[CudaDevice]) -> Result<Self> {
        // The id a server holds is the runtime's own, without cubecl's
        // runtime tag (see `cubecl::RuntimeId::strip`).
        let id = |d: &CudaDevice| RuntimeId::strip(Device::Cuda(d.clone()).to_id());
        let mut group: Vec<DeviceId> = devices.iter().map(id).collect();
        group.sort();
        if group.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(LightningError::Communicator(format!(
                "the devices {devices:?} name one device twice; each rank needs its own"
            )));
        }
        let rank = group.binary_search(&id(device)).map_err(|_| {
            LightningError::Communicator(format!("{device:?} is not among the group's devices {devices:?}"))
        })?;
        Ok(Self { rank, group })
    }
}

impl StateComm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.len()
    }

    fn all_gather(&self, client: &Client, local: &DeviceTensor) -> Result<DeviceTensor> {
        if local.dtype != DType::F32 {
            return Err(LightningError::DType {
                tensor: "all_gather",
                expected: DType::F32,
                actual: local.dtype,
            });
        }
        // Without NCCL (libnccl not found at run time) cubecl's collectives
        // panic: refuse with a typed error instead.
        if !client.has_device_transport() {
            return Err(LightningError::Communicator(format!(
                "{} moves nothing between devices itself (NCCL's library was not found): \
                 NcclComm needs it",
                client.name()
            )));
        }
        let slots = placed(client, local, self.rank, self.world_size())?;
        let gathered = DeviceTensor::empty(client, &slots.shape, DType::F32);
        client.clone().all_reduce(
            slots.handle.clone(),
            gathered.handle.clone(),
            ElemType::Float(FloatKind::F32),
            self.group.clone(),
            ReduceOperation::Sum,
        );
        // The reduce runs on the communication stream: the compute stream
        // waits for it before anything reads `gathered`.
        client.sync_collective();
        Ok(gathered)
    }
}
