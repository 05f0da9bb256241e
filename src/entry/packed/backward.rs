//! The packed training backward: the dense backward's passes
//! (`entry::backward::run_passes`) over each launch group (see the parent module's doc).

use std::ops::Range;

use cubecl::prelude::*;

use crate::device::memory::Buffer;
use crate::device::target::LaunchTarget;
use crate::device::tensor::{check_distinct, unused_binding, zero_from};
use crate::entry::backward::{
    PassInputs, Passes, check_scale, key_value_plan, larger_pass_buffers, plan_work, run_passes,
};
use crate::problem::packed::{VarlenShape, check_optional};
use crate::routines::backward::plan::BackwardPlan;
use crate::routines::common::Layout;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::table::SequenceTable;
use crate::routines::widen;
use crate::{DType, DeviceTensor, PrefillConfig, Result};

use super::*;

/// Checks the backward's tensors: the forward's, `d_out` like the output,
/// `d_final_states` like the final states.
fn check_backward(inputs: &PackedBackwardInputs) -> Result<VarlenShape> {
    let shape = check_forward(&inputs.forward)?;
    check_optional(
        Some(inputs.d_out),
        "d_out",
        (&["T", "h", "e"], "[T, h, e]"),
        &shape.out_shape(),
        shape.dtype,
    )?;
    check_optional(
        inputs.d_final_states,
        "d_final_states",
        STATES,
        &state_shape(&shape),
        DType::F32,
    )?;
    Ok(shape)
}

/// Validates a packed backward's arguments and config on `target`; returns
/// the shape.
fn check_backward_call(
    target: LaunchTarget,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
) -> Result<VarlenShape> {
    config.validate()?;
    check_scale(config)?;
    let shape = check_backward(inputs)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    Ok(shape)
}

/// Checks caller-owned gradients against the forward's tensors.
fn check_gradients(
    shape: &VarlenShape,
    inputs: &PackedBackwardInputs,
    grads: &PackedGradients,
) -> Result<()> {
    let forward = &inputs.forward;
    let qk = (&["T", "h", "d"][..], "[T, h, d]");
    check_optional(Some(&grads.dq), "dq", qk, &forward.q.shape, shape.dtype)?;
    check_optional(Some(&grads.dk), "dk", qk, &forward.k.shape, shape.dtype)?;
    check_optional(
        Some(&grads.dv),
        "dv",
        (&["T", "h", "e"], "[T, h, e]"),
        &forward.v.shape,
        shape.dtype,
    )?;
    match (forward.initial_states, &grads.d_initial_states) {
        (Some(_), Some(d_initial)) => check_optional(
            Some(d_initial),
            "d_initial_states",
            STATES,
            &state_shape(shape),
            DType::F32,
        ),
        (None, None) => Ok(()),
        (Some(_), None) | (None, Some(_)) => Err(crate::LightningError::LengthMismatch {
            what: "d_initial_states",
            expected: usize::from(forward.initial_states.is_some()),
            rule: "a gradient of the initial states where, and only where, the forward had them",
            actual: usize::from(grads.d_initial_states.is_some()),
        }),
    }
}

/// One launch group of a backward: its documents and its passes' plans.
pub(super) struct BackwardGroup {
    docs: Range<usize>,
    /// The dv pass's plan and the swapped one of the dq and dk passes.
    plans: [PrefillPlan; 2],
    key_value: Option<BackwardPlan>,
    /// What its larger pass allocates.
    buffers: Vec<Buffer>,
}

/// A packed backward validated and planned: its launch groups.
pub(super) struct PlannedBackward {
    shape: VarlenShape,
    /// What the passes run with (f32 copies where `widened`).
    config: PrefillConfig,
    widened: bool,
    pub(super) groups: Vec<BackwardGroup>,
    /// The call's buffers other than the groups', in the order it allocates them.
    fixed: Vec<Buffer>,
}

impl PlannedBackward {
    /// Everything the call allocates, in order: the fixed buffers (the
    /// gradients it allocates, the f32 copies of 16-bit inputs and
    /// gradients), then the largest group's pass.
    fn buffers(&self) -> Vec<Buffer> {
        let mut buffers = self.fixed.clone();
        buffers.extend(largest(self.groups.iter().map(|group| group.buffers.clone())));
        buffers
    }
}

/// Plans the launch groups of a backward of a packed forward of `shape`
/// over `cu_seqlens`, on f32 copies where the dtype widens; `allocated` are
/// the buffers the call allocates first (the gradients, where it does).
pub(super) fn plan_backward_groups(
    planning: &Planning,
    shape: &VarlenShape,
    cu_seqlens: &[u32],
    with_initial: bool,
    config: &PrefillConfig,
    allocated: &[Buffer],
) -> Result<PlannedBackward> {
    let limits = &planning.limits;
    let (work_shape, pass_config, widened) = launch_form(shape, config, limits);
    let mut fixed = allocated.to_vec();
    let (h, d, e) = (shape.heads, shape.key_dim, shape.value_dim);
    if widened {
        let rows = shape.total_tokens * h;
        let (qk, v) = (rows * d, rows * e);
        let copies = [
            ("f32 copy of q", qk),
            ("f32 copy of k", qk),
            ("f32 copy of v", v),
            ("f32 copy of d_out", v),
            ("f32 dq", qk),
            ("f32 dk", qk),
            ("f32 dv", v),
        ];
        widen::check_copies(limits, shape.dtype, config, &copies)?;
        fixed.extend(copies.map(|(name, elements)| Buffer::elements(name, elements, DType::F32)));
    }
    let groups = planning
        .groups(cu_seqlens, &work_shape, &pass_config, &fixed)
        .into_iter()
        .map(|docs| {
            let table = SequenceTable::packed(cu_seqlens, docs.clone(), with_initial, true, &pass_config);
            let plans = plan_work(&table.work(h, d, e, work_shape.dtype), &pass_config, limits)?;
            let key_value = key_value_plan(&plans[0], d, e, limits)?;
            let buffers = larger_pass_buffers([&plans[0], &plans[1]], &table, [h, d, e]);
            Ok(BackwardGroup {
                docs,
                plans,
                key_value,
                buffers,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PlannedBackward {
        shape: *shape,
        config: pass_config,
        widened,
        groups,
        fixed,
    })
}

/// Runs the backward of a packed training forward run with `config` (its
/// blocks and scale): each document's gradients are those of a dense
/// [`crate::backward`] of that document alone. Returns
/// [`crate::LightningError::OutOfMemory`], having allocated nothing, where
/// the device cannot hold the gradients and the passes' buffers.
pub fn backward_packed(
    client: &Client,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
) -> Result<PackedGradients> {
    let target = LaunchTarget::Device(client);
    let shape = check_backward_call(target, inputs, config)?;
    let forward = &inputs.forward;
    let mut gradients = vec![
        Buffer::tensor("dq [T, h, d]", &forward.q.shape, shape.dtype),
        Buffer::tensor("dk [T, h, d]", &forward.k.shape, shape.dtype),
        Buffer::tensor("dv [T, h, e]", &forward.v.shape, shape.dtype),
    ];
    if forward.initial_states.is_some() {
        gradients.push(Buffer::tensor(
            "d_initial_states [N, h, d, e] f32",
            &state_shape(&shape),
            DType::F32,
        ));
    }
    let planned = plan_backward_groups(
        &Planning::of(target, &PackedKnobs::default()),
        &shape,
        forward.cu_seqlens,
        forward.initial_states.is_some(),
        config,
        &gradients,
    )?;
    target.check_memory(&planned.buffers())?;
    let empty = |like: &DeviceTensor| DeviceTensor::empty(client, &like.shape, shape.dtype);
    let grads = PackedGradients {
        dq: empty(forward.q),
        dk: empty(forward.k),
        dv: empty(forward.v),
        d_initial_states: forward
            .initial_states
            .map(|_| DeviceTensor::empty(client, &state_shape(&shape), DType::F32)),
    };
    launch_backward(target, &planned, inputs, &grads);
    Ok(grads)
}

/// [`backward_packed`] into caller-owned gradients: `dq`, `dk` like q and k,
/// `dv` like v, and `d_initial_states` `[N, h, d, e]` f32 where (and only
/// where) the forward had initial states. Every element is written.
pub fn backward_packed_into(
    client: &Client,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
    grads: &PackedGradients,
) -> Result<()> {
    backward_into_on(client, &PackedKnobs::default(), inputs, config, grads)
}

/// [`backward_packed_into`] planned on limits narrowed by `knobs`.
pub fn backward_packed_into_with(
    client: &Client,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
    grads: &PackedGradients,
    knobs: &PackedKnobs,
) -> Result<()> {
    backward_into_on(client, knobs, inputs, config, grads)
}

/// Validates, plans (on limits narrowed by `knobs`), checks memory for and
/// runs a packed backward into caller-owned gradients.
fn backward_into_on(
    client: &Client,
    knobs: &PackedKnobs,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
    grads: &PackedGradients,
) -> Result<()> {
    let target = LaunchTarget::Device(client);
    let shape = check_backward_call(target, inputs, config)?;
    check_gradients(&shape, inputs, grads)?;
    check_distinct(
        ("d_final_states", inputs.d_final_states),
        ("d_initial_states", grads.d_initial_states.as_ref()),
    )?;
    let forward = &inputs.forward;
    let planned = plan_backward_groups(
        &Planning::of(target, knobs),
        &shape,
        forward.cu_seqlens,
        forward.initial_states.is_some(),
        config,
        &[],
    )?;
    target.check_memory(&planned.buffers())?;
    launch_backward(target, &planned, inputs, grads);
    Ok(())
}

/// Launches a planned backward into checked gradients, on f32 copies of
/// q, k, v and d_out (rounded back into `grads`) where it widens, then
/// zeroes the gradients' padding rows.
fn launch_backward(
    target: LaunchTarget,
    planned: &PlannedBackward,
    inputs: &PackedBackwardInputs,
    grads: &PackedGradients,
) {
    let forward = &inputs.forward;
    let narrow = [&grads.dq, &grads.dk, &grads.dv];
    let d_initial = grads.d_initial_states.as_ref();
    if planned.widened {
        let [q, k, v, d_out] =
            [forward.q, forward.k, forward.v, inputs.d_out].map(|t| widen::widened(target, t));
        let wide = narrow.map(|t| target.empty_tensor(&t.shape, DType::F32));
        run_groups(
            target,
            planned,
            forward.cu_seqlens,
            &pass_inputs(inputs, [&q, &k, &v, &d_out]),
            ([&wide[0], &wide[1], &wide[2]], d_initial),
        );
        for (wide, narrow) in wide.iter().zip(narrow) {
            widen::narrow_into(target, wide, narrow);
        }
    } else {
        run_groups(
            target,
            planned,
            forward.cu_seqlens,
            &pass_inputs(inputs, [forward.q, forward.k, forward.v, inputs.d_out]),
            (narrow, d_initial),
        );
    }
    let shape = &planned.shape;
    if let Some(d_initial) = d_initial {
        fill_empty(
            target,
            shape,
            forward.cu_seqlens,
            inputs.d_final_states,
            d_initial,
        );
    }
    for (grad, row) in narrow
        .into_iter()
        .zip([shape.key_dim, shape.key_dim, shape.value_dim])
    {
        zero_from(target, grad, padding_start(shape, forward.cu_seqlens, row));
    }
}

/// What the passes read: `q`, `k`, `v` and `d_out` (the caller's or their
/// f32 copies) and the rest of `inputs`.
fn pass_inputs<'a>(
    inputs: &PackedBackwardInputs<'a>,
    [q, k, v, d_out]: [&'a DeviceTensor; 4],
) -> PassInputs<'a> {
    PassInputs {
        q,
        k,
        v,
        slopes: inputs.forward.slopes,
        d_out,
        initial: inputs.forward.initial_states,
        d_final: inputs.d_final_states,
    }
}

/// Runs the backward's passes group after group into `dq`, `dk`, `dv` and,
/// where given, `d_initial`.
fn run_groups(
    target: LaunchTarget,
    planned: &PlannedBackward,
    cu_seqlens: &[u32],
    inputs: &PassInputs,
    (grads, d_initial): ([&DeviceTensor; 3], Option<&DeviceTensor>),
) {
    let shape = &planned.shape;
    // The dq and dk passes write no final state: any binding does.
    let unused = unused_binding(target);
    for group in &planned.groups {
        let table = |has_initial, writes_final, walk| {
            SequenceTable::packed(
                cu_seqlens,
                group.docs.clone(),
                has_initial,
                writes_final,
                &planned.config,
            )
            .upload(target, walk)
        };
        run_passes(
            &Passes {
                target,
                config: &planned.config,
                heads: shape.heads,
                key_dim: shape.key_dim,
                value_dim: shape.value_dim,
                layout: Layout::packed(shape.heads),
                table: &table,
                plans: [&group.plans[0], &group.plans[1]],
                key_value: group.key_value.as_ref(),
            },
            inputs,
            grads,
            (d_initial, &unused),
        );
    }
}
