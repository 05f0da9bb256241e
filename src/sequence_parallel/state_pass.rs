//! A segment's final state alone: the state pass of a prefill (kv-parallel and
//! kv-reduce, or the chunk-recurrent walk) without diag and non-diag, whose
//! outputs the first phase of a sequence-parallel pass does not need.
//!
//! The same launches as [`crate::prefill`]'s and [`crate::backward`]'s, with
//! the stages that compute outputs skipped: those stages only read the state
//! pass's results, never feed it.

use cubecl::prelude::*;

use crate::device::target::LaunchTarget;
use crate::device::tensor::unused_binding;
use crate::problem::shapes::PrefillShape;
use crate::routines::common::{Call, Layout, Stage, Variant};
use crate::routines::prefill::launch::CallLaunch;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::table::SequenceTable;
use crate::{DType, DeviceTensor, PrefillConfig};

/// The operands of one state pass, in the forward's roles: `[q, k, v]`, and
/// how the pass transforms the forward.
pub(crate) struct StatePass<'a> {
    pub operands: [&'a DeviceTensor; 3],
    pub slopes: &'a DeviceTensor,
    pub initial: Option<&'a DeviceTensor>,
    pub variant: Variant,
}

/// Runs `pass` on a problem of `shape` planned as `plan` (by
/// [`crate::plan_prefill`], which validated every operand) and returns the
/// final state `[b, h, d, e]` f32.
pub(crate) fn final_state(
    client: &Client,
    pass: &StatePass,
    shape: &PrefillShape,
    plan: &PrefillPlan,
    config: &PrefillConfig,
) -> DeviceTensor {
    let [q, k, v] = pass.operands;
    let states = DeviceTensor::empty(client, &shape.state_shape(), DType::F32);
    // Bound but never written (the stages that write it are skipped), except
    // by the rounding of 16-bit outputs back from their f32 copies, which
    // needs its full size.
    let out = DeviceTensor::empty(client, &shape.out_shape(), shape.dtype);
    let target = LaunchTarget::Device(client);
    let table = SequenceTable::dense(shape.batch, shape.seq_len, pass.initial.is_some(), config)
        .upload(target, plan.chunk_walk());
    let workspace = client.empty(plan.block_states_len.max(1) * 4);
    let unused = unused_binding(target);
    CallLaunch {
        call: Call {
            target,
            q,
            k,
            v,
            slopes: pass.slopes,
            out: &out,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            config,
            layout: Layout::dense(shape.seq_len),
            table: &table,
            initial: pass.initial,
            states: &states,
            workspace: &workspace,
            unused: &unused,
            variant: pass.variant,
        },
        plan,
        decode: None,
        decode_cache: None,
    }
    .run(&mut |stage, launch| match stage {
        Stage::Diag | Stage::NonDiag => {}
        _ => launch(),
    });
    states
}
