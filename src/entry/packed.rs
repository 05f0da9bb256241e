//! Packed training: the forward and the backward of many documents of any
//! lengths concatenated into one batch, FLA's varlen layout.
//!
//! q, k `[T, h, d]` and v `[T, h, e]` hold the documents back to back;
//! `cu_seqlens` (`N + 1` offsets, from 0, strictly increasing) says where each
//! starts. Each document runs from its own initial state (row `i` of an
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
//! The grid scales with the documents: sub-blocks and blocks run along x,
//! and kv-reduce loops over sequences past the grid's limit along z, so a
//! call of 100 000 one-token documents at h = 64 plans on CUDA's limits
//! ([`crate::plan::plan_packed_limits`]).

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::device::tensor::{unused_binding, zero_from};
use crate::entry::backward::{PassInputs, Passes, check_scale, key_value_plan, plan_work, run_passes};
use crate::entry::varlen::{DeviceBatch, PlannedBatch, check_out};
use crate::problem::packed::{VarlenShape, check_offsets_within, check_optional, check_packed_tensors};
use crate::routines::backward::plan::BackwardPlan;
use crate::routines::common::Layout;
use crate::routines::prefill::plan::{PrefillPlan, copies_precision, widens};
use crate::routines::table::SequenceTable;
use crate::routines::widen;
use crate::{DType, DeviceTensor, PrefillConfig, Result, check_finite};

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
    /// starts at 0, increases strictly, ends at most at `T` (rows past it are padding).
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

fn plan_forward(
    target: LaunchTarget,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    writes_final: bool,
) -> Result<PlannedBatch> {
    let shape = check_forward(inputs)?;
    PlannedBatch::packed(
        target,
        shape,
        inputs.cu_seqlens,
        (inputs.initial_states.is_some(), writes_final),
        config,
    )
}

/// Validates a packed training forward and plans it without launching
/// anything; returns its sizes.
pub fn plan_packed(client: &Client, inputs: &PackedInputs, config: &PrefillConfig) -> Result<VarlenShape> {
    Ok(plan_forward(LaunchTarget::Device(client), inputs, config, true)?.shape)
}

/// Validates and plans a packed training call, forward and backward, with
/// `cu_seqlens` over tensors of `shape` (`total_tokens`, `heads`, `key_dim`,
/// `value_dim` and `dtype` are read; the rest is ignored) on a device with
/// `limits`, from sizes alone: every grid, tile and buffer-size check of
/// [`prefill_packed`] and [`backward_packed`]. Returns the shape with its
/// sequences counted.
pub fn plan_packed_limits(
    limits: &DeviceLimits,
    shape: &VarlenShape,
    cu_seqlens: &[u32],
    with_initial: bool,
    config: &PrefillConfig,
) -> Result<VarlenShape> {
    config.validate()?;
    check_scale(config)?;
    let shape = VarlenShape {
        sequences: check_offsets_within(cu_seqlens, shape.total_tokens)?,
        slots: 0,
        ..*shape
    };
    let table = SequenceTable::packed(cu_seqlens, with_initial, true, config);
    PrefillPlan::new(
        &table.work(shape.heads, shape.key_dim, shape.value_dim, shape.dtype),
        config,
        limits,
    )?;
    plan_backward(&shape, &table, config, limits)?;
    Ok(shape)
}

/// The plans of a backward over `table`: on f32 copies where the dtype widens.
fn plan_backward(
    shape: &VarlenShape,
    table: &SequenceTable,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<([PrefillPlan; 2], Option<BackwardPlan>)> {
    let (dtype, config) = if widens(shape.dtype, config, limits) {
        (DType::F32, config.with_precision(copies_precision(shape.dtype)))
    } else {
        (shape.dtype, *config)
    };
    let (h, d, e) = (shape.heads, shape.key_dim, shape.value_dim);
    let plans = plan_work(&table.work(h, d, e, dtype), &config, limits)?;
    let key_value = key_value_plan(&plans[0], d, e, limits)?;
    Ok((plans, key_value))
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
    let planned = plan_forward(target, inputs, config, final_states)?;
    let shape = planned.shape;
    let mut buffers = DeviceBatch::buffers(&planned, true);
    if final_states {
        buffers.push(Buffer::tensor(
            "final_states [N, h, d, e] f32",
            &state_shape(&shape),
            DType::F32,
        ));
    }
    DeviceMemory::of(client).check(&buffers)?;
    let out = DeviceTensor::empty(client, &shape.out_shape(), shape.dtype);
    let finals = final_states.then(|| DeviceTensor::empty(client, &state_shape(&shape), DType::F32));
    launch_forward(target, planned, inputs, config, &out, finals.as_ref());
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
    let target = LaunchTarget::Device(client);
    let planned = plan_forward(target, inputs, config, final_states.is_some())?;
    check_out(&planned.shape, out)?;
    check_optional(
        final_states,
        "final_states",
        STATES,
        &state_shape(&planned.shape),
        DType::F32,
    )?;
    DeviceMemory::of(client).check(&DeviceBatch::buffers(&planned, false))?;
    launch_forward(target, planned, inputs, config, out, final_states);
    if config.check_finite {
        check_finite(client, out, "out")?;
        if let Some(finals) = final_states {
            check_finite(client, finals, "final_states")?;
        }
    }
    Ok(())
}

/// Uploads and launches a planned forward whose outputs were checked, then
/// zeroes the padding rows of `out`.
fn launch_forward(
    target: LaunchTarget,
    planned: PlannedBatch,
    inputs: &PackedInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_states: Option<&DeviceTensor>,
) {
    let shape = planned.shape;
    // No final state is written where none is asked for: any binding does.
    let unused = unused_binding(target);
    DeviceBatch::upload_checked(target, planned).launch(
        target,
        [inputs.q, inputs.k, inputs.v, inputs.slopes],
        (inputs.initial_states, final_states.unwrap_or(&unused)),
        config,
        out,
    );
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
    let shape = check_backward(inputs)?;
    let forward = &inputs.forward;
    let mut buffers = vec![
        Buffer::tensor("dq [T, h, d]", &forward.q.shape, shape.dtype),
        Buffer::tensor("dk [T, h, d]", &forward.k.shape, shape.dtype),
        Buffer::tensor("dv [T, h, e]", &forward.v.shape, shape.dtype),
    ];
    if forward.initial_states.is_some() {
        buffers.push(Buffer::tensor(
            "d_initial_states [N, h, d, e] f32",
            &state_shape(&shape),
            DType::F32,
        ));
    }
    DeviceMemory::of(client).check(&buffers)?;
    let empty = |like: &DeviceTensor| DeviceTensor::empty(client, &like.shape, shape.dtype);
    let grads = PackedGradients {
        dq: empty(forward.q),
        dk: empty(forward.k),
        dv: empty(forward.v),
        d_initial_states: forward
            .initial_states
            .map(|_| DeviceTensor::empty(client, &state_shape(&shape), DType::F32)),
    };
    backward_packed_into(client, inputs, config, &grads)?;
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
    backward_on(LaunchTarget::Device(client), inputs, config, grads)
}

fn backward_on(
    target: LaunchTarget,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
    grads: &PackedGradients,
) -> Result<()> {
    config.validate()?;
    check_scale(config)?;
    let shape = check_backward(inputs)?;
    let forward = &inputs.forward;
    let (d, e) = (shape.key_dim, shape.value_dim);
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
            &state_shape(&shape),
            DType::F32,
        )?,
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(crate::LightningError::LengthMismatch {
                what: "d_initial_states",
                expected: usize::from(forward.initial_states.is_some()),
                rule: "a gradient of the initial states where, and only where, the forward had them",
                actual: usize::from(grads.d_initial_states.is_some()),
            });
        }
    }
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    let limits = DeviceLimits::of_target(target);
    let cu = inputs.forward.cu_seqlens;
    let table_for = |has_initial, writes_final| SequenceTable::packed(cu, has_initial, writes_final, config);
    let (plans, key_value) = plan_backward(
        &shape,
        &table_for(forward.initial_states.is_some(), true),
        config,
        &limits,
    )?;
    if widens(shape.dtype, config, &limits) {
        return backward_widened(target, inputs, config, grads);
    }
    // One pass's buffers at a time: the larger plan's.
    let table = table_for(false, false);
    let pass_buffers =
        |plan: &PrefillPlan, dims| crate::routines::prefill::buffers::launch_buffers(plan, &table, dims, &[]);
    let total = |buffers: &[Buffer]| buffers.iter().map(|buffer| buffer.bytes).sum::<u64>();
    let (pass, swapped) = (
        pass_buffers(&plans[0], [shape.heads, d, e]),
        pass_buffers(&plans[1], [shape.heads, e, d]),
    );
    target.check_memory(if total(&pass) >= total(&swapped) {
        &pass
    } else {
        &swapped
    })?;
    let unused = unused_binding(target);
    run_passes(
        &Passes {
            target,
            config,
            heads: shape.heads,
            key_dim: d,
            value_dim: e,
            layout: Layout::packed(shape.heads),
            table: &table_for,
            plans: [&plans[0], &plans[1]],
            key_value: key_value.as_ref(),
        },
        &PassInputs {
            q: forward.q,
            k: forward.k,
            v: forward.v,
            slopes: forward.slopes,
            d_out: inputs.d_out,
            initial: forward.initial_states,
            d_final: inputs.d_final_states,
        },
        [&grads.dq, &grads.dk, &grads.dv],
        (grads.d_initial_states.as_ref(), &unused),
    );
    for (grad, row) in [(&grads.dq, d), (&grads.dk, d), (&grads.dv, e)] {
        zero_from(target, grad, padding_start(&shape, cu, row));
    }
    Ok(())
}

/// 16-bit inputs on f32 copies (see `routines::widen`): the f32 backward on
/// widened copies of q, k, v and d_out, its gradients rounded back into
/// `grads` (the f32 backward zeroes the padding rows).
fn backward_widened(
    target: LaunchTarget,
    inputs: &PackedBackwardInputs,
    config: &PrefillConfig,
    grads: &PackedGradients,
) -> Result<()> {
    let forward = &inputs.forward;
    let narrow = [forward.q, forward.k, forward.v, inputs.d_out];
    let copies: Vec<(&'static str, usize)> = narrow
        .iter()
        .zip([
            "f32 copy of q",
            "f32 copy of k",
            "f32 copy of v",
            "f32 copy of d_out",
        ])
        .chain(narrow[..3].iter().zip(["f32 dq", "f32 dk", "f32 dv"]))
        .map(|(t, name)| (name, t.num_elements()))
        .collect();
    let dtype = forward.q.dtype;
    widen::check_copies(&DeviceLimits::of_target(target), dtype, config, &copies)?;
    let buffers: Vec<Buffer> = copies
        .iter()
        .map(|&(name, elements)| Buffer::elements(name, elements, DType::F32))
        .collect();
    target.check_memory(&buffers)?;
    let [q, k, v, d_out] = narrow.map(|t| widen::widened(target, t));
    let wide = |t: &DeviceTensor| target.empty_tensor(&t.shape, DType::F32);
    let wide_grads = PackedGradients {
        dq: wide(&grads.dq),
        dk: wide(&grads.dk),
        dv: wide(&grads.dv),
        d_initial_states: grads.d_initial_states.clone(),
    };
    backward_on(
        target,
        &PackedBackwardInputs {
            forward: PackedInputs {
                q: &q,
                k: &k,
                v: &v,
                ..*forward
            },
            d_out: &d_out,
            ..*inputs
        },
        &config.with_precision(copies_precision(dtype)),
        &wide_grads,
    )?;
    for (wide, narrow) in [
        (&wide_grads.dq, &grads.dq),
        (&wide_grads.dk, &grads.dk),
        (&wide_grads.dv, &grads.dv),
    ] {
        widen::narrow_into(target, wide, narrow);
    }
    Ok(())
}
