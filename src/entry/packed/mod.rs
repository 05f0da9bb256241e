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

use cubecl::prelude::Client;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, fits_one_buffer};
use crate::device::target::LaunchTarget;
use crate::device::tensor::copy_or_zero;
use crate::entry::backward::check_scale;
use crate::entry::varlen::PlannedBatch;
use crate::problem::packed::{VarlenShape, check_offsets_within, check_optional, check_packed_tensors};
use crate::problem::shapes::{MAX_ELEMENTS, TensorShape};
use crate::routines::prefill::plan::{copies_precision, widens};
use crate::routines::table::SequenceTable;
use crate::{DType, DeviceTensor, PrefillConfig, Result, Routines};

mod backward;
mod forward;

pub use backward::{backward_packed, backward_packed_into, backward_packed_into_with};
pub use forward::{plan_packed, prefill_packed, prefill_packed_into, prefill_packed_into_with};

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
    let backward = backward::plan_backward_groups(&planning, &shape, cu_seqlens, with_initial, config, &[])?;
    Ok(PackedPlan {
        shape,
        forward_groups: forward_groups.len(),
        backward_groups: backward.groups.len(),
    })
}

/// Validates and plans a packed training call, forward and backward, on
/// `client`'s device from its tensors' shapes and dtypes alone, for a
/// caller whose buffers do not exist yet (Burn's lazy Fusion backend): q,
/// k `[T, h, d]`, v `[T, h, e]`, slopes `[h]` f32, `cu_seqlens` as
/// [`PackedInputs`] takes it, optional initial states `[N, h, d, e]` f32.
/// Every check of [`plan_packed_limits`] on the device's limits, the dtype
/// supported on the device, and the outputs and gradients each fitting one
/// buffer; the device's free memory is checked when the call runs.
#[allow(clippy::too_many_arguments)]
pub fn plan_packed_shapes(
    client: &Client,
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    slopes: &TensorShape,
    cu_seqlens: &[u32],
    initial_states: Option<&TensorShape>,
    config: &PrefillConfig,
) -> Result<PackedPlan> {
    config.validate()?;
    let mut shape = check_packed_tensors(q, k, v, slopes)?;
    shape.sequences = check_offsets_within(cu_seqlens, shape.total_tokens)?;
    check_optional(
        initial_states,
        "initial_states",
        STATES,
        &state_shape(&shape),
        DType::F32,
    )?;
    shape.dtype.check_supported(client.properties(), client.name())?;
    let limits = DeviceLimits::of(client);
    let plan = plan_packed_limits(&limits, &shape, cu_seqlens, initial_states.is_some(), config)?;
    for output in [
        Buffer::tensor("out [T, h, e]", &shape.out_shape(), shape.dtype),
        Buffer::tensor("dq [T, h, d]", &q.shape, shape.dtype),
        Buffer::tensor("final_states [N, h, d, e] f32", &state_shape(&shape), DType::F32),
    ] {
        fits_one_buffer(output, limits.max_buffer)?;
    }
    Ok(plan)
}
