//! What sequence parallelism needs of a communicator: its rank, the number of
//! ranks, and a gather of one f32 tensor per rank.

use cubecl::prelude::*;

use crate::{DeviceTensor, LightningError, Result};

/// The ranks of one sequence-parallel group, as seen from one of them.
///
/// Every rank calls [`StateComm::all_gather`] the same number of times, in the
/// same order, with tensors of the same shape: it is a collective. The
/// sequence-parallel entry points make exactly two calls per pass (one of a
/// few numbers that check the ranks agree, one of the `[b, h, d, e]` states),
/// on every rank, whatever the rank's arguments, so a rank that refuses its
/// arguments does not leave the others waiting.
pub trait StateComm {
    /// This rank, in `0..world_size()`; rank `r` holds the `r`-th segment of
    /// the sequences.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Every rank's `local` (f32), stacked in rank order:
    /// `[world_size, ..local.shape]`, the same on every rank.
    fn all_gather(&self, client: &Client, local: &DeviceTensor) -> Result<DeviceTensor>;
}

/// Checks that `comm` names a rank of its group.
pub(crate) fn check_comm(comm: &dyn StateComm) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 0 || rank >= world {
        return Err(LightningError::Communicator(format!(
            "rank {rank} of a group of {world}: expected a rank in 0..{world} of at least one"
        )));
    }
    Ok(())
}
