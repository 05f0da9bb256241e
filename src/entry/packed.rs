//! Packed training: the forward and the backward of many documents of any
//! lengths concatenated into one batch, FLA's varlen layout.
//!
//! q, k `[T, h, d]` and v `[T, h, e]` hold the documents back to back;
//! `cu_seqlens` (`N + 1` offsets, from 0, non-decreasing) says where each
//! starts; a document may be empty (its output has no rows, its final state
//! is its initial state, and its initial state's gradient its final
//! state's: no kernel walks it). Each document runs from its own initial state (row `i` of an
//! optional `[N, h, d, e]` f32 tensor, else zeros) and nothing crosses a
//! boundary: a document's outputs, final state and gradients are those of a
//! dense call on that document alone. The last offset may stop short of `T`:
//! the rows past it are padding, which no kernel reads and which come back as
//! zeros in the output and in every gradient.
//!
//! The forward is the serving path's packed call ([`crate::prefill_varlen`])
//! with the states given as tensors instead of a slot cache: the same table
//! of sequences, plan and launches, reading initial states from row `i` of
//! the caller's tensor and writing final states to row `i` of another (only
//! where they are asked for). The backward is the dense backward's passes
//! ([`crate::backward`]'s module doc) over that table: dq forward in time,
//! dk and dv reversed in time, each walking every document separately.
//!
//! Launch groups: every block of every document takes an `h x d x e` f32
//! state in the per-block workspace, so 100 000 short documents at h = 64,
//! d = e = 128 would need 10^11 elements at once. A call splits its
//! documents into consecutive groups whose workspace fits 32-bit indices,
//! one buffer, the knob [`PackedKnobs::group_workspace`] and half of the
//! device memory left by the call's other buffers, and whose sub-blocks
//! and blocks fit the grid along x (and, for the routines that walk
//! sequences along z, whose walks fit it along z); the groups run one
//! after another over slices of the sequence table (documents are
//! independent), each freeing its workspace. Everything the call allocates
//! (its outputs, the f32 copies of 16-bit inputs, the largest group's
//! buffers) is checked before anything is. kv-reduce loops over the
//! sequences past the grid's limit along z, so a group is not bounded there.

use std::ops::Range;

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::Buffer;
use crate::device::target::LaunchTarget;
use crate::device::tensor::{check_distinct, copy_or_zero, unused_binding, zero_from};
use crate::entry::backward::{
    PassInputs, Passes, check_scale, key_value_plan, larger_pass_buffers, plan_work, run_passes,
};
use crate::entry::varlen::{DeviceBatch, PlannedBatch, check_out};
use crate::problem::packed::{VarlenShape, check_offsets_within, check_optional, check_packed_tensors};
use crate::problem::shapes::MAX_ELEMENTS;
use crate::routines::backward::plan::BackwardPlan;
use crate::routines::common::Layout;
use crate::routines::prefill::plan::{PrefillPlan, copies_precision, widens};
use crate::routines::table::SequenceTable;
use crate::routines::widen;
use crate::{DType, DeviceTensor, PrefillConfig, Result, Routines, check_finite};

/// The layout of the per-document states, as errors name it.
const STATES: (&[&str], &str) = (&["N", "h", "d", "e"], "[N, h, d, e]");

/// The arguments of a packed training forward.
#[derive(Clone, Copy, Debug)]
pub struct PackedInputs<'a> {
    /// Queries `[T, h, d]`.
    pub q: &'a DeviceTensor,
    /// Keys `[T, h, d]`, same dtype as q.
    pub k: &'a DeviceTensor,
    /// Values `[T, h, e]`, same dtype as q.
    pub v: &'a DeviceTensor,
    /// One slope per head, `[h]` f32 (see [`crate::slopes`]).
    pub slopes: &'a DeviceTensor,
    /// `N + 1` offsets: document `i` is tokens `cu_seqlens[i]..cu_seqlens[i + 1]`;
    /// starts at 0, does not decrease (a document may be empty), ends at most
    /// at `T` (rows past it are padding).
    pub cu_seqlens: &'a [u32],
    /// Each document's state before its first token, `[N, h, d, e]` f32;
    /// `None` for zeros.
    pub initial_states: Option<&'a DeviceTensor>,
}

/// What a packed training forward returns.
#[derive(Clone, Debug)]
pub struct PackedOutput {
    /// `[T, h, e]`, dtype of q; zeros past `cu_seqlens[N]`.
    pub out: DeviceTensor,
    /// Each document's state after its last token, `[N, h, d, e]` f32, where
    /// asked for.
    pub final_states: Option<DeviceTensor>,
}

/// The arguments of a packed training backward: the forward's inputs and
/// the upstream gradients.
#[derive(Clone, Copy, Debug)]
pub struct PackedBackwardInputs<'a> {
    /// The forward's arguments.
    pub forward: PackedInputs<'a>,
    /// Gradient of the output `[T, h, e]`, dtype of q (its padding rows are ignored).
    pub d_out: &'a DeviceTensor,
    /// Gradient of the final states `[N, h, d, e]` f32; `None` for zeros.
    pub d_final_states: Option<&'a DeviceTensor>,
}

/// What a packed training backward returns, in the packed layout.
#[derive(Clone, Debug)]
pub struct PackedGradients {
    /// `[T, h, d]`, dtype of q; zeros past `cu_seqlens[N]`.
    pub dq: DeviceTensor,
    /// `[T, h, d]`, dtype of q; zeros past `cu_seqlens[N]`.
    pub dk: DeviceTensor,
    /// `[T, h, e]`, dtype of q; zeros past `cu_seqlens[N]`.
    pub dv: DeviceTensor,
    /// Gradient of the initial states `[N, h, d, e]` f32, where the forward
    /// had them (`None` where it started from zeros).
    pub d_initial_states: Option<DeviceTensor>,
}

/// Narrower limits for a packed training call than its device's: tests set
/// them to run the launch groups and kv-reduce's loop over sequences at
/// sizes a CPU device holds ([`crate::testing`]). The default narrows nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedKnobs {
    /// Cubes per grid dimension, each taken where below the device's.
    pub max_cube_count: Option<(u32, u32, u32)>,
    /// The most per-block workspace elements one launch group takes.
    pub group_workspace: Option<u64>,
}

/// What a packed call plans on: the device's limits (narrowed by the
/// knobs), the memory it has left, and the group knob.
struct Planning {
    limits: DeviceLimits,
    available: Option<u64>,
    group_workspace: Option<u64>,
}

impl Planning {
    fn of(target: LaunchTarget, knobs: &PackedKnobs) -> Self {
        let mut limits = DeviceLimits::of_target(target);
        if let Some((x, y, z)) = knobs.max_cube_count {
            let (dx, dy, dz) = limits.max_cube_count;
            limits.max_cube_count = (dx.min(x), dy.min(y), dz.min(z));
        }
        Self {
            limits,
            available: target.available_memory(),
            group_workspace: knobs.group_workspace,
        }
    }

    /// The most per-block workspace elements of one group, once the call's
    /// `fixed` buffers are allocated (see the module doc).
    fn group_budget(&self, fixed: &[Buffer]) -> u64 {
        let mut budget = MAX_ELEMENTS.min(self.limits.max_buffer / 4);
        if let Some(knob) = self.group_workspace {
            budget = budget.min(knob);
        }
        if let Some(available) = self.available {
            budget = budget.min(available.saturating_sub(total(fixed)) / 2 / 4);
        }
        budget
    }

    /// Splits the documents of `cu_seqlens` into consecutive launch groups
    /// for launches of `work_shape` with `config` (see the module doc). A
    /// document too large for a group of its own is a group of its own:
    /// its plan reports what does not fit.
    fn groups(
        &self,
        cu_seqlens: &[u32],
        work_shape: &VarlenShape,
        config: &PrefillConfig,
        fixed: &[Buffer],
    ) -> Vec<Range<usize>> {
        let per_block = (work_shape.heads * work_shape.key_dim * work_shape.value_dim) as u64;
        let max_blocks = self.group_budget(fixed) / per_block.max(1);
        let (max_x, _, max_z) = self.limits.max_cube_count;
        let (max_x, max_z) = (max_x as usize, max_z as usize);
        // The chunk-recurrent pass and the fused routine run a walk per
        // sequence or segment along z, at most one per sequence and one per
        // block; kv-reduce loops past the limit.
        let walks_along_z = matches!(config.routines, Routines::ChunkRecurrent | Routines::Fused);
        let documents = cu_seqlens.len() - 1;
        let mut groups = Vec::new();
        let (mut first, mut blocks, mut sub_blocks, mut sequences) = (0, 0usize, 0usize, 0usize);
        for doc in 0..documents {
            let len = (cu_seqlens[doc + 1] - cu_seqlens[doc]) as usize;
            let (b, s, q) = (
                len.div_ceil(config.block),
                len.div_ceil(config.sub_block),
                usize::from(len > 0),
            );
            let fits = (blocks + b) as u64 <= max_blocks
                && blocks + b <= max_x
                && sub_blocks + s <= max_x
                && (!walks_along_z || sequences + q + blocks + b <= max_z);
            if !fits && doc > first {
                groups.push(first..doc);
                (first, blocks, sub_blocks, sequences) = (doc, 0, 0, 0);
            }
            (blocks, sub_blocks, sequences) = (blocks + b, sub_blocks + s, sequences + q);
        }
        groups.push(first..documents);
        // A group of empty documents launches nothing (see `fill_empty`).
        groups.retain(|docs| cu_seqlens[docs.start] != cu_seqlens[docs.end]);
        groups
    }
}

/// The states of empty documents, which no kernel walks: rows of `dst`
/// `[N, h, d, e]` copied from `src` (same shape) for each run of empty
/// documents, or zeroed without `src`. A document of no tokens leaves its
/// state as it was (its decay is the identity): its final state is its
/// initial state, and its initial state's gradient its final state's.
fn fill_empty(
    target: LaunchTarget,
    shape: &VarlenShape,
    cu_seqlens: &[u32],
    src: Option<&DeviceTensor>,
    dst: &DeviceTensor,
) {
    let state = shape.heads * shape.key_dim * shape.value_dim;
    let mut doc = 0;
    while doc < shape.sequences {
        if cu_seqlens[doc + 1] != cu_seqlens[doc] {
            doc += 1;
            continue;
        }
        let first = doc;
        while doc < shape.sequences && cu_seqlens[doc + 1] == cu_seqlens[doc] {
            doc += 1;
        }
        copy_or_zero(target, src, dst, (first * state, doc * state));
    }
}

/// Bytes over `buffers`.
fn total(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|buffer| buffer.bytes).sum()
}

/// The buffers of the group that allocates the most.
fn largest(groups: impl Iterator<Item = Vec<Buffer>>) -> Vec<Buffer> {
    groups.max_by_key(|buffers| total(buffers)).unwrap_or_default()
}

/// Checks the forward's tensors and offsets; returns the shape with its
/// sequences counted.
fn check_forward(inputs: &PackedInputs) -> Result<VarlenShape> {
    let mut shape = check_packed_tensors(inputs.q, inputs.k, inputs.v, inputs.slopes)?;
    shape.sequences = check_offsets_within(inputs.cu_seqlens, shape.total_tokens)?;
    check_optional(
        inputs.initial_states,
        "initial_states",
        STATES,
        &state_shape(&shape),
        DType::F32,
    )?;
    Ok(shape)
}

/// `[N, h, d, e]` of `shape`.
fn state_shape(shape: &VarlenShape) -> Vec<usize> {
    vec![shape.sequences, shape.heads, shape.key_dim, shape.value_dim]
}

/// The first element of a `[T, h, x]` tensor of `shape` past its last document.
fn padding_start(shape: &VarlenShape, cu_seqlens: &[u32], row: usize) -> usize {
    cu_seqlens[shape.sequences] as usize * shape.heads * row
}

/// The shape and config the launches run with: f32 copies, with the copies'
/// precision, where the dtype widens (see `routines::widen`). Returns them
/// and whether it widens.
fn launch_form(
    shape: &VarlenShape,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> (VarlenShape, PrefillConfig, bool) {
    if widens(shape.dtype, config, limits) {
        let wide = VarlenShape {
            dtype: DType::F32,
            ..*shape
        };
        (wide, config.with_precision(copies_precision(shape.dtype)), true)
    } else {
        (*shape, *config, false)
    }
}

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

/// What [`plan_packed_limits`] planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedPlan {
    /// The shape, its sequences counted.
    pub shape: VarlenShape,
    /// Launch groups of the forward (see [`prefill_packed`]).
    pub forward_groups: usize,
    /// Launch groups of the backward.
    pub backward_groups: usize,
}

/// Validates and plans a packed training call, forward and backward, with
/// `cu_seqlens` over tensors of `shape` (`total_tokens`, `heads`, `key_dim`,
/// `value_dim` and `dtype` are read; the rest is ignored) on a device with
/// `limits` and no memory limit but `limits.max_buffer`, from sizes alone:
/// the launch groups, and every grid, tile and buffer-size check of
/// [`prefill_packed`] and [`backward_packed`] for each.
pub fn plan_packed_limits(
    limits: &DeviceLimits,
    shape: &VarlenShape,
    cu_seqlens: &[u32],
    with_initial: bool,
    config: &PrefillConfig,
) -> Result<PackedPlan> {
    config.validate()?;
    check_scale(config)?;
    let shape = VarlenShape {
        sequences: check_offsets_within(cu_seqlens, shape.total_tokens)?,
        slots: 0,
        ..*shape
    };
    let planning = Planning {
        limits: *limits,
        available: None,
        group_workspace: None,
    };
    let (launch_shape, launch_config, _) = launch_form(&shape, config, limits);
    let forward_groups = planning.groups(cu_seqlens, &launch_shape, &launch_config, &[]);
    for docs in &forward_groups {
        let table = SequenceTable::packed(cu_seqlens, docs.clone(), with_initial, true, &launch_config);
        PlannedBatch::from_table(launch_shape, table, &launch_config, limits)?;
    }
    let backward = plan_backward_groups(&planning, &shape, cu_seqlens, with_initial, config, &[])?;
    Ok(PackedPlan {
        shape,
        forward_groups: forward_groups.len(),
        backward_groups: backward.groups.len(),
    })
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
struct BackwardGroup {
    docs: Range<usize>,
    /// The dv pass's plan and the swapped one of the dq and dk passes.
    plans: [PrefillPlan; 2],
    key_value: Option<BackwardPlan>,
    /// What its larger pass allocates.
    buffers: Vec<Buffer>,
}

/// A packed backward validated and planned: its launch groups.
struct PlannedBackward {
    shape: VarlenShape,
    /// What the passes run with (f32 copies where `widened`).
    config: PrefillConfig,
    widened: bool,
    groups: Vec<BackwardGroup>,
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
fn plan_backward_groups(
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
        let table = |has_initial, writes_final| {
            SequenceTable::packed(
                cu_seqlens,
                group.docs.clone(),
                has_initial,
                writes_final,
                &planned.config,
            )
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
