//! The decode host API: one token per sequence against the slot-indexed state cache.

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::problem::config::check_scale;
use crate::problem::shapes::{
    DecodeShape, TensorShape, check_tensor, decode_args, expect_shape, validate_decode_shapes,
};
use crate::routines::decode::launch_decode;
use crate::routines::decode::{DecodePlan, plan_decode};
use crate::routines::table::upload;
use crate::{DeviceTensor, Result};

/// The slot index that marks a padding row.
pub const PADDING_SLOT: i32 = -1;

/// The arguments of a decode step.
#[derive(Clone, Copy, Debug)]
pub struct DecodeInputs<'a> {
    /// Queries `[b, h, 1, d]`.
    pub q: &'a DeviceTensor,
    /// Keys `[b, h, 1, d]`.
    pub k: &'a DeviceTensor,
    /// Values `[b, h, 1, e]`.
    pub v: &'a DeviceTensor,
    /// The state cache `[slots, h, d, e]`, updated in place: f32, or bf16
    /// (with an even `e`) for half the memory and half the bytes a step
    /// streams. The kernel computes in f32 either way; a bf16 state is widened
    /// exactly when read and rounded once when written back (nearest, ties to
    /// even, NaN kept). The price in accuracy: the README's "bf16 state cache".
    pub cache: &'a DeviceTensor,
    /// One slope per head, `[h]` f32.
    pub slopes: &'a DeviceTensor,
    /// Per sequence, its slot in the cache or [`PADDING_SLOT`]; distinct.
    pub slots: &'a [i32],
    /// Multiplies the output; `None` is 1.
    pub scale: Option<f32>,
    /// Rows of the cache one unit loads before it stores any (1 to 32);
    /// `None` is the measured default ([`crate::Tuning::decode_rows_in_flight`]).
    pub rows_in_flight: Option<usize>,
}

/// Validates and plans a decode step without launching anything.
pub fn plan_decode_step(client: &Client, inputs: &DecodeInputs) -> Result<(DecodeShape, DecodePlan)> {
    plan_step(LaunchTarget::Device(client), inputs)
}

/// [`plan_decode_step`] on `target`'s device.
pub(crate) fn plan_step(target: LaunchTarget, inputs: &DecodeInputs) -> Result<(DecodeShape, DecodePlan)> {
    let shape = validate_decode(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cache,
        inputs.slopes,
        inputs.slots,
    )?;
    check_scale(inputs.scale)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    let plan = plan_decode(&shape, &DeviceLimits::of_target(target), inputs.rows_in_flight)?;
    Ok((shape, plan))
}

/// Runs a decode step, returning the output `[b, h, 1, e]`; the cache is
/// updated in place. Returns [`crate::LightningError::OutOfMemory`], having
/// allocated nothing, where the device cannot hold the step's buffers.
///
/// # Non-finite results
///
/// As in [`crate::prefill`]: computed in f32, the output rounded to the dtype
/// of q as IEEE 754 says (an f16 output past ±65504 is ±inf, NaN where inf -
/// inf meets), the f32 state overflowing only past f32's range, all in an `Ok`
/// result. Decode takes no check option: a check is one more launch and a wait
/// for the device, which a step that otherwise never waits would feel. Call
/// [`crate::check_finite`] on `out` (or the cache) where wanted, or launch a
/// [`crate::FiniteScan`] per step and read them all after one wait.
pub fn decode(client: &Client, inputs: &DecodeInputs) -> Result<DeviceTensor> {
    let (shape, plan) = plan_decode_step(client, inputs)?;
    let mut buffers = vec![Buffer::tensor(
        "out [b, h, 1, e]",
        &out_shape(&shape),
        shape.dtype,
    )];
    buffers.extend(step_buffers(LaunchTarget::Device(client), inputs, &shape, 1));
    DeviceMemory::of(client).check(&buffers)?;
    let out = DeviceTensor::empty(client, &out_shape(&shape), shape.dtype);
    launch_checked(LaunchTarget::Device(client), inputs, shape, plan, &out);
    Ok(out)
}

/// Runs a decode step into caller-owned `out` `[b, h, 1, e]` (dtype of q).
/// Non-finite results: as [`decode`].
pub fn decode_into(client: &Client, inputs: &DecodeInputs, out: &DeviceTensor) -> Result<()> {
    let (shape, plan) = plan_decode_step(client, inputs)?;
    launch_planned(client, inputs, shape, plan, out)
}

/// Checks `out` against a step [`plan_decode_step`] accepted, and the
/// step's own buffers against the device's memory, then launches it.
fn launch_planned(
    client: &Client,
    inputs: &DecodeInputs,
    shape: DecodeShape,
    plan: DecodePlan,
    out: &DeviceTensor,
) -> Result<()> {
    check_out(out, &shape)?;
    let target = LaunchTarget::Device(client);
    DeviceMemory::of(client).check(&step_buffers(target, inputs, &shape, 1))?;
    launch_checked(target, inputs, shape, plan, out);
    Ok(())
}

/// `[b, h, 1, e]`.
fn out_shape(shape: &DecodeShape) -> [usize; 4] {
    [shape.batch, shape.heads, 1, shape.value_dim]
}

/// What a step allocates around the caller's tensors, against a cache in
/// `parts` parts: each part's slots, the unused token list, and the f32
/// copies of bf16 inputs on a runtime without bf16.
pub(crate) fn step_buffers(
    target: LaunchTarget,
    inputs: &DecodeInputs,
    shape: &DecodeShape,
    parts: usize,
) -> Vec<Buffer> {
    let mut buffers = vec![Buffer::new("decode slots", inputs.slots.len().max(1) as u64 * 4); parts];
    buffers.push(Buffer::new("unused token list", 4));
    let out = shape.batch * shape.heads * shape.value_dim;
    buffers.extend(crate::device::memory::decode_copies(
        crate::device::limits::bf16_words(shape.dtype, target),
        [
            inputs.q.num_elements(),
            inputs.k.num_elements(),
            inputs.v.num_elements(),
            out,
        ],
    ));
    buffers
}

/// Launches a step whose tensors were checked and whose buffers fit the device.
pub(crate) fn launch_checked(
    target: LaunchTarget,
    inputs: &DecodeInputs,
    shape: DecodeShape,
    plan: DecodePlan,
    out: &DeviceTensor,
) {
    let slots = upload(target, inputs.slots);
    // Bound for the kernel's packed mode, which a dense step does not use.
    let unused_tokens = upload::<u32>(target, &[]);
    let scale = inputs.scale.unwrap_or(1.0);
    let tensors = [inputs.q, inputs.k, inputs.v, inputs.slopes];
    let (heads, d, e) = (shape.heads, shape.key_dim, shape.value_dim);
    launch_decode(
        target,
        &plan,
        tensors,
        &[(inputs.cache, &slots)],
        &unused_tokens,
        false,
        out,
        heads,
        scale,
        d,
        e,
    );
}

/// Checks `out` `[b, h, 1, e]` (dtype of q) against a validated step.
pub(crate) fn check_out(out: &DeviceTensor, shape: &DecodeShape) -> Result<()> {
    check_tensor(
        out,
        "out",
        &["b", "h", "n", "e"],
        "[b, h, 1, e]",
        Some(shape.dtype),
    )?;
    expect_shape(
        out,
        "out",
        &[shape.batch, shape.heads, 1, shape.value_dim],
        "[b, h, 1, e]",
    )
}

/// Validates the arguments of a decode step: q, k `[b, h, 1, d]`, v `[b, h, 1, e]`,
/// cache `[slots, h, d, e]` f32 or bf16 (even `e`), slopes `[h]` f32, and `b` slot indices, each -1
/// (padding) or a distinct slot of the cache.
pub fn validate_decode(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    cache: &DeviceTensor,
    slopes: &DeviceTensor,
    slots: &[i32],
) -> Result<DecodeShape> {
    decode_args(q, k, v, cache, slopes, slots)
}

/// Validates and plans a decode step from its arguments' shapes and dtypes
/// alone: every check of [`crate::plan_decode_step`] but the buffers' sizes.
#[allow(clippy::too_many_arguments)]
pub fn plan_decode_shapes(
    client: &Client,
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    cache: &TensorShape,
    slopes: &TensorShape,
    slots: &[i32],
    scale: Option<f32>,
) -> Result<(DecodeShape, DecodePlan)> {
    let shape = validate_decode_shapes(q, k, v, cache, slopes, slots)?;
    check_scale(scale)?;
    shape.dtype.check_supported(client.properties(), client.name())?;
    let plan = plan_decode(&shape, &DeviceLimits::of(client), None)?;
    Ok((shape, plan))
}
