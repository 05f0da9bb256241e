//! The sequence-parallel backward pass of one rank's segment.

use cubecl::prelude::*;

use super::agree::{Claim, agree};
use super::combine::decayed_sum_of;
use super::comm::{StateComm, check_comm};
use super::state_pass::{StatePass, final_state};
use crate::problem::shapes::PrefillShape;
use crate::routines::common::Variant;
use crate::routines::prefill::plan::PrefillPlan;
use crate::{BackwardInputs, Gradients, LightningError, PrefillConfig, PrefillInputs, Result, plan_prefill};

/// Runs this rank's part of the backward pass of [`super::prefill`]: every
/// rank calls it with its own segment of q, k, v and `d_out`, and
///
/// - `initial_state`: the state entering this rank's segment, the
///   [`super::SegmentOutput::incoming_state`] its prefill returned (on rank 0
///   the caller's initial state, or `None` for zeros; `None` elsewhere is a
///   zero incoming state, which the prefill returns only when it is one);
/// - `d_final_state`: the gradient of the sequence's final state, on the last
///   rank only (`None` for zeros).
///
/// The gradient reaching a segment's end flows from the ranks after it: the
/// map from it to the gradient of the segment's incoming state is
/// `D_r + a^(n_r) G`, with `D_r` that gradient when `G` is zero. Each rank
/// first computes `D_r` (the reverse state pass alone; on the last rank from
/// the caller's `d_final_state`, so that its `D` carries it), the ranks gather
/// them, and each rank runs its backward with
/// `G_r = sum_{j>r} a^(start_j - end_r) D_j` as its `d_final_state` (the
/// caller's on the last rank).
///
/// Returns this segment's dq, dk, dv; `d_initial_state` is the gradient of
/// this rank's incoming state (on rank 0, of the caller's initial state).
/// Errors as [`super::prefill`] does.
pub fn backward(
    client: &Client,
    comm: &dyn StateComm,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
) -> Result<Gradients> {
    check_comm(comm)?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let last = rank + 1 == world;
    let local = check(client, rank, world, inputs, config);
    let segments = agree(
        client,
        comm,
        local.as_ref().map(|(claim, _)| *claim).map_err(Clone::clone),
    )?;
    let (_, (shape, plan)) = local?;

    // Phase 1: the gradient of the incoming state from this segment alone
    // (and, on the last rank, from the caller's final-state gradient). Only
    // the reverse state pass runs here, never the whole backward, so that
    // nothing can fail between the two collectives.
    let local_gradient = final_state(client, &reverse_pass(inputs, config), &shape, &plan, config);

    // Phase 2: every segment's D_j, and the gradient reaching this segment's
    // end: the caller's on the last rank, else the decayed sum of the later
    // segments' D_j.
    let gathered = comm.all_gather(client, &local_gradient)?;
    let gaps: Vec<f32> = (0..world)
        .map(|j| segments.starts[j].saturating_sub(segments.end(rank)) as f32)
        .collect();
    let leaving = (!last).then(|| decayed_sum_of(client, &gathered, inputs.slopes, &gaps, rank + 1..world));
    crate::backward(
        client,
        &BackwardInputs {
            d_final_state: leaving.as_ref().or(inputs.d_final_state),
            ..*inputs
        },
        config,
    )
}

/// The reverse sweep of the backward's dv pass (see [`crate::backward`]):
/// q' = k, k' = q, v' = do, back to front, from the caller's final-state
/// gradient where there is one (times `1 / c`), whose final state times `c a`
/// is the gradient of the incoming state.
fn reverse_pass<'a>(inputs: &BackwardInputs<'a>, config: &PrefillConfig) -> StatePass<'a> {
    let scale = config.scale.unwrap_or(1.0);
    StatePass {
        operands: [inputs.k, inputs.q, inputs.d_out],
        slopes: inputs.slopes,
        initial: inputs.d_final_state,
        variant: Variant {
            reversed: true,
            initial_scale: 1.0 / scale,
            advance_initial: true,
            final_scale: scale,
            retreat_final: true,
            ..Variant::FORWARD
        },
    }
}

/// This rank's own checks: everything [`crate::backward`] would refuse, and a
/// final-state gradient on the last rank only.
fn check(
    client: &Client,
    rank: usize,
    world: usize,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
) -> Result<(Claim, (PrefillShape, PrefillPlan))> {
    let forward = PrefillInputs {
        q: inputs.q,
        k: inputs.k,
        v: inputs.v,
        slopes: inputs.slopes,
        initial_state: inputs.initial_state,
    };
    let (shape, plan) = plan_prefill(client, &forward, config)?;
    crate::entry::backward::check_upstream(inputs, &shape)?;
    if inputs.d_final_state.is_some() && rank + 1 != world {
        return Err(LightningError::SequenceParallelArgument {
            what: "d_final_state",
            rank,
            rule: "the gradient of the sequence's final state enters on the last rank only",
        });
    }
    let scale = config.scale.unwrap_or(1.0);
    if scale == 0.0 {
        return Err(LightningError::UnsupportedScale {
            scale: scale.to_string(),
            reason: "the backward pass divides the final-state gradient by the scale; use a nonzero scale",
        });
    }
    Ok((Claim::of(&shape, config), (shape, plan)))
}
