//! Ranks as threads of one process on one device: the communicator the tests
//! run the algorithm through without several GPUs.
//!
//! Each rank runs on its own thread with its own [`InProcessComm`]; a gather
//! reads each rank's tensor back to the host, waits for every rank at a
//! barrier, and uploads the stacked tensors. The ranks' code is the code a
//! rank on its own GPU runs; only the transport differs.

use std::sync::{Arc, Barrier, Mutex, PoisonError};

use cubecl::prelude::*;

use super::comm::StateComm;
use crate::{DType, DeviceTensor, LightningError, Result};

/// One rank of a group of threads sharing a device (see [`in_process_group`]).
#[derive(Clone, Debug)]
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    barrier: Barrier,
    /// Each rank's tensor of the gather under way, read back; `None` where
    /// that rank could not read its tensor.
    slots: Mutex<Vec<Option<Vec<f32>>>>,
}

/// The communicators of a group of `world` ranks, rank `r` at index `r`; give
/// each to its own thread (see [`run_in_process`]).
pub fn in_process_group(world: usize) -> Vec<InProcessComm> {
    let shared = Arc::new(Shared {
        world,
        barrier: Barrier::new(world),
        slots: Mutex::new(vec![None; world]),
    });
    (0..world)
        .map(|rank| InProcessComm {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

/// Runs `rank_fn` once per rank of a group of `world`, each on its own thread
/// with its rank's communicator, and returns what each returned, in rank
/// order. Every rank must make the same collective calls (the
/// sequence-parallel entry points do, whatever their arguments), and none may
/// panic: the others would wait for it at the next gather.
pub fn run_in_process<T: Send>(world: usize, rank_fn: impl Fn(&InProcessComm) -> T + Sync) -> Vec<T> {
    let comms = in_process_group(world);
    std::thread::scope(|scope| {
        let rank_fn = &rank_fn;
        let handles: Vec<_> = comms
            .iter()
            .map(|comm| scope.spawn(move || rank_fn(comm)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

impl StateComm for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, client: &Client, local: &DeviceTensor) -> Result<DeviceTensor> {
        let shared = &*self.shared;
        // A rank whose read fails still takes part, or the others would wait
        // for it at the barrier forever.
        let own = local.to_f32_vec(client);
        let len = local.num_elements();
        let lock = || shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
        lock()[self.rank] = own.as_ref().ok().cloned();
        shared.barrier.wait();
        let stacked = stack(&lock(), len);
        // No rank may write the next gather's slot before every rank has read this one.
        shared.barrier.wait();
        own?;
        let shape: Vec<usize> = [shared.world]
            .into_iter()
            .chain(local.shape.iter().copied())
            .collect();
        DeviceTensor::from_f32(client, &stacked?, &shape, DType::F32)
    }
}

/// The slots in rank order, each of `len` elements.
fn stack(slots: &[Option<Vec<f32>>], len: usize) -> Result<Vec<f32>> {
    let mut stacked = Vec::with_capacity(slots.len() * len);
    for (rank, slot) in slots.iter().enumerate() {
        match slot {
            Some(values) if values.len() == len => stacked.extend_from_slice(values),
            Some(values) => {
                return Err(LightningError::Communicator(format!(
                    "rank {rank} gathered {} elements, this rank {len}; every rank must gather the same shape",
                    values.len()
                )));
            }
            None => {
                return Err(LightningError::Communicator(format!(
                    "rank {rank} could not read its tensor back for the gather"
                )));
            }
        }
    }
    Ok(stacked)
}
