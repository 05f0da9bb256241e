//! The packed training forward: its launch groups planned, checked
//! against memory and launched (see the parent module's doc).

use cubecl::prelude::*;

use crate::device::memory::Buffer;
use crate::device::target::LaunchTarget;
use crate::device::tensor::{check_distinct, unused_binding, zero_from};
use crate::entry::varlen::{DeviceBatch, PlannedBatch, check_out};
use crate::problem::packed::{VarlenShape, check_optional};
use crate::routines::table::SequenceTable;
use crate::routines::widen;
use crate::{DType, DeviceTensor, PrefillConfig, Result, check_finite};

use super::*;

/// A packed forward validated and planned: its launch groups.
struct PlannedForward {
    /// The caller's tensors.
    shape: VarlenShape,
    /// What the groups launch with (f32 copies where `widened`).
    config: PrefillConfig,
    widened: bool,
    groups: Vec<PlannedBatch>,
    /// The call's buffers other than the groups', in the order it allocates them.
    fixed: Vec<Buffer>,
}

/// Validates a packed training forward and plans its launch groups, on
/// `planning`'s limits and memory. `allocates` says which of out and the
/// final states the call allocates (they count in the memory the groups
/// share); `writes_final` whether final states are written at all.
fn plan_forward(
    planning: &Planning,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    (allocates, writes_final): ((bool, bool), bool),
) -> Result<PlannedForward> {
    config.validate()?;
    let shape = check_forward(inputs)?;
    let limits = &planning.limits;
    let (launch_shape, launch_config, widened) = launch_form(&shape, config, limits);
    let rows = shape.total_tokens * shape.heads;
    let copies = crate::device::memory::f32_copies([
        rows * shape.key_dim,
        rows * shape.key_dim,
        rows * shape.value_dim,
        rows * shape.value_dim,
    ]);
    widen::check_copies(limits, shape.dtype, config, &copies)?;
    let mut fixed = Vec::new();
    if allocates.0 {
        fixed.push(Buffer::tensor("out [T, h, e]", &shape.out_shape(), shape.dtype));
    }
    if allocates.1 {
        fixed.push(Buffer::tensor(
            "final_states [N, h, d, e] f32",
            &state_shape(&shape),
            DType::F32,
        ));
    }
    if widened {
        fixed.extend(
            copies
                .iter()
                .map(|&(name, elements)| Buffer::elements(name, elements, DType::F32)),
        );
    }
    let cu = inputs.cu_seqlens;
    let groups = planning
        .groups(cu, &launch_shape, &launch_config, &fixed)
        .into_iter()
        .map(|docs| {
            let table = SequenceTable::packed(
                cu,
                docs,
                inputs.initial_states.is_some(),
                writes_final,
                &launch_config,
            );
            PlannedBatch::from_table(launch_shape, table, &launch_config, limits)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PlannedForward {
        shape,
        config: launch_config,
        widened,
        groups,
        fixed,
    })
}

impl PlannedForward {
    /// Everything the call allocates, in order: the fixed buffers, then the
    /// largest group's.
    fn buffers(&self) -> Vec<Buffer> {
        let mut buffers = self.fixed.clone();
        buffers.extend(largest(
            self.groups.iter().map(|group| DeviceBatch::buffers(group, false)),
        ));
        buffers
    }
}

/// Validates a packed training forward and plans it without launching
/// anything; returns its sizes.
pub fn plan_packed(client: &Client, inputs: &PackedInputs, config: &PrefillConfig) -> Result<VarlenShape> {
    let target = LaunchTarget::Device(client);
    let planning = Planning::of(target, &PackedKnobs::default());
    let shape = check_forward(inputs)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    Ok(plan_forward(&planning, inputs, config, ((true, true), true))?.shape)
}

/// Runs a packed training forward, allocating the output and, with
/// `final_states`, the final states. Returns
/// [`crate::LightningError::OutOfMemory`], having allocated nothing, where
/// the device cannot hold the call's buffers.
pub fn prefill_packed(
    client: &Client,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    final_states: bool,
) -> Result<PackedOutput> {
    let target = LaunchTarget::Device(client);
    let planning = Planning::of(target, &PackedKnobs::default());
    let shape = check_forward(inputs)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    let planned = plan_forward(&planning, inputs, config, ((true, final_states), final_states))?;
    target.check_memory(&planned.buffers())?;
    let out = DeviceTensor::empty(client, &shape.out_shape(), shape.dtype);
    let finals = final_states.then(|| DeviceTensor::empty(client, &state_shape(&shape), DType::F32));
    launch_forward(target, planned, inputs, &out, finals.as_ref());
    if config.check_finite {
        check_finite(client, &out, "out")?;
        if let Some(finals) = &finals {
            check_finite(client, finals, "final_states")?;
        }
    }
    Ok(PackedOutput {
        out,
        final_states: finals,
    })
}

/// Runs a packed training forward into caller-owned `out` `[T, h, e]`
/// (dtype of q) and, where given, `final_states` `[N, h, d, e]` f32; every
/// element of both is written (the padding rows of `out` with zeros).
pub fn prefill_packed_into(
    client: &Client,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_states: Option<&DeviceTensor>,
) -> Result<()> {
    forward_into_on(
        client,
        &PackedKnobs::default(),
        inputs,
        config,
        (out, final_states),
    )
}

/// [`prefill_packed_into`] planned on limits narrowed by `knobs`.
pub fn prefill_packed_into_with(
    client: &Client,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    (out, final_states): (&DeviceTensor, Option<&DeviceTensor>),
    knobs: &PackedKnobs,
) -> Result<()> {
    forward_into_on(client, knobs, inputs, config, (out, final_states))
}

/// Validates, plans, checks memory for and runs a packed forward into
/// caller-owned outputs, with `knobs`.
fn forward_into_on(
    client: &Client,
    knobs: &PackedKnobs,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    (out, final_states): (&DeviceTensor, Option<&DeviceTensor>),
) -> Result<()> {
    let target = LaunchTarget::Device(client);
    let shape = check_forward(inputs)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    check_out(&shape, out)?;
    check_optional(
        final_states,
        "final_states",
        STATES,
        &state_shape(&shape),
        DType::F32,
    )?;
    check_distinct(
        ("initial_states", inputs.initial_states),
        ("final_states", final_states),
    )?;
    let planning = Planning::of(target, knobs);
    let planned = plan_forward(
        &planning,
        inputs,
        config,
        ((false, false), final_states.is_some()),
    )?;
    target.check_memory(&planned.buffers())?;
    launch_forward(target, planned, inputs, out, final_states);
    if config.check_finite {
        check_finite(client, out, "out")?;
        if let Some(finals) = final_states {
            check_finite(client, finals, "final_states")?;
        }
    }
    Ok(())
}

/// Launches a planned forward whose outputs were checked, group after
/// group, on f32 copies where it widens, then zeroes the padding rows of `out`.
fn launch_forward(
    target: LaunchTarget,
    planned: PlannedForward,
    inputs: &PackedInputs,
    out: &DeviceTensor,
    final_states: Option<&DeviceTensor>,
) {
    let shape = planned.shape;
    // No final state is written where none is asked for: any binding does.
    let unused = unused_binding(target);
    let states = (inputs.initial_states, final_states.unwrap_or(&unused));
    let config = planned.config;
    let run = |[q, k, v]: [&DeviceTensor; 3], out: &DeviceTensor| {
        for group in planned.groups {
            DeviceBatch::upload_checked(target, group).launch(
                target,
                [q, k, v, inputs.slopes],
                states,
                &config,
                out,
            );
        }
    };
    if planned.widened {
        let [q, k, v] = [inputs.q, inputs.k, inputs.v].map(|t| widen::widened(target, t));
        let wide_out = target.empty_tensor(&out.shape, DType::F32);
        run([&q, &k, &v], &wide_out);
        widen::narrow_into(target, &wide_out, out);
    } else {
        run([inputs.q, inputs.k, inputs.v], out);
    }
    if let Some(finals) = final_states {
        fill_empty(target, &shape, inputs.cu_seqlens, inputs.initial_states, finals);
    }
    zero_from(
        target,
        out,
        padding_start(&shape, inputs.cu_seqlens, shape.value_dim),
    );
}
