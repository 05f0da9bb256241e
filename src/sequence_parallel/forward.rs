//! The sequence-parallel prefill of one rank's segment.

use cubecl::prelude::*;

use super::agree::{Claim, agree};
use super::combine::decayed_sum_of;
use super::comm::{StateComm, check_comm};
use super::state_pass::{StatePass, final_state};
use crate::routines::common::Variant;
use crate::{DType, DeviceTensor, LightningError, PrefillConfig, PrefillInputs, Result, plan_prefill};

/// What a rank's sequence-parallel prefill returns.
#[derive(Clone, Debug)]
pub struct SegmentOutput {
    /// The outputs of this rank's tokens `[b, h, n_r, e]`, dtype of q: the
    /// whole sequence's outputs at those tokens.
    pub out: DeviceTensor,
    /// The state after this rank's last token `[b, h, d, e]` f32; on the last
    /// rank, the sequence's final state.
    pub final_state: DeviceTensor,
    /// The state entering this rank's segment `[b, h, d, e]` f32 (rank 0: the
    /// caller's initial state, or zeros). The backward pass takes it back as
    /// its `initial_state`.
    pub incoming_state: DeviceTensor,
}

/// Runs this rank's part of a prefill of sequences split across the ranks of
/// `comm`: rank `r` holds tokens `[start_r, end_r)` of every sequence
/// (`inputs` are `[b, h, n_r, ..]`, the segments in rank order, of any
/// nonzero lengths), and every rank calls this with its own segment.
/// `inputs.initial_state` is the state before the sequence's first token:
/// rank 0 only.
///
/// Each rank first computes its segment's final state from zeros (rank 0:
/// its whole prefill from the initial state), the ranks gather those
/// (`world x b x h x d x e x 4` bytes), and each other rank then runs its
/// prefill from the state entering its segment, the decayed sum of the
/// states before it (see the module doc): two passes over the segment's
/// tokens on ranks `1..`, the first only the state pass.
///
/// Every rank returns an error when any rank's arguments are refused (that
/// rank's own error; [`LightningError::SequenceParallelPeer`] on the others)
/// or when the ranks disagree on batch, heads, head dims, dtype or scale.
pub fn prefill(
    client: &Client,
    comm: &dyn StateComm,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> Result<SegmentOutput> {
    check_comm(comm)?;
    let rank = comm.rank();
    let local = check(client, rank, inputs, config);
    let segments = agree(
        client,
        comm,
        local.as_ref().map(|(claim, _)| *claim).map_err(Clone::clone),
    )?;
    let (_, (shape, plan)) = local?;

    // Phase 1: this segment's final state from zeros; rank 0's whole prefill
    // is already exact (it starts where the sequence starts).
    // Its errors wait until after the gather (the checks above make one
    // unlikely), so that the other ranks are not left waiting for it.
    let first = (rank == 0).then(|| crate::prefill(client, inputs, config));
    let local_final = match &first {
        Some(Ok(output)) => output.final_state.clone(),
        Some(Err(_)) => DeviceTensor::filled(client, &shape.state_shape(), DType::F32, 0.0)?,
        None => final_state(
            client,
            &StatePass {
                operands: [inputs.q, inputs.k, inputs.v],
                slopes: inputs.slopes,
                initial: None,
                variant: Variant::FORWARD,
            },
            &shape,
            &plan,
            config,
        ),
    };

    // Phase 2: every segment's final state, and this rank's incoming state
    // P_r = sum_{j<r} a^(start_r - end_j) L_j.
    let gathered = comm.all_gather(client, &local_final)?;
    if let Some(output) = first {
        let output = output?;
        let incoming = match inputs.initial_state {
            Some(initial) => initial.clone(),
            None => DeviceTensor::filled(client, &shape.state_shape(), DType::F32, 0.0)?,
        };
        return Ok(SegmentOutput {
            out: output.out,
            final_state: output.final_state,
            incoming_state: incoming,
        });
    }
    let gaps: Vec<f32> = (0..comm.world_size())
        .map(|j| segments.starts[rank].saturating_sub(segments.end(j)) as f32)
        .collect();
    let incoming = decayed_sum_of(client, &gathered, inputs.slopes, &gaps, 0..rank);
    let output = crate::prefill(
        client,
        &PrefillInputs {
            initial_state: Some(&incoming),
            ..*inputs
        },
        config,
    )?;
    Ok(SegmentOutput {
        out: output.out,
        final_state: output.final_state,
        incoming_state: incoming,
    })
}

/// This rank's own checks: the prefill's validation and plan, and an initial
/// state on rank 0 only.
fn check(
    client: &Client,
    rank: usize,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> Result<(Claim, (crate::shapes::PrefillShape, crate::plan::PrefillPlan))> {
    let planned = plan_prefill(client, inputs, config)?;
    if rank > 0 && inputs.initial_state.is_some() {
        return Err(LightningError::SequenceParallelArgument {
            what: "initial_state",
            rank,
            rule: "the state before the sequence enters on rank 0 only; the others compute theirs",
        });
    }
    Ok((Claim::of(&planned.0, config), planned))
}
