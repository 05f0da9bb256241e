//! Packed (varlen) prefill and mixed batches: many sequences of any lengths,
//! prefills and decodes together, in one call against a slot-indexed state cache.
//!
//! q, k `[T, h, d]` and v `[T, h, e]` hold the tokens of `N` sequences back to
//! back; `cu_seqlens` (`N + 1` offsets) says where each starts. Each sequence
//! names its slot of the state cache `[slots, h, d, e]` and whether it
//! continues the state stored there or starts from zeros (a new request, with
//! no need to clear its slot first); its final state is written back to the
//! slot. A one-token sequence that continues its state is served by the decode
//! kernel in the same call; everything else by the blocked prefill kernels. A
//! call launches at most six kernels, however many sequences it holds.
//!
//! Padding: a sequence whose slot is -1 reads and writes no state; its output
//! is computed from a zero state (and its `has_initial_state` flag is ignored).
//!
//! The cache is f32 or bf16. Against a bf16 cache the prefill kernels run on
//! an f32 scratch of the call's states, gathered before and rounded back
//! after (two launches more; `routines::state_scratch` says why), and the
//! decode rows on the bf16 cache itself.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::problem::packed::{SlotRegistry, VarlenShape, check_len, check_offsets, check_tensors};
use crate::problem::shapes::{DecodeShape, check_tensor, expect_shape};
use crate::routines::common::{Call, Layout, Variant};
use crate::routines::decode::{DecodePlan, plan_decode};
use crate::routines::prefill::launch::CallLaunch;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::state_scratch::{DeviceScratch, StateScratch};
use crate::routines::table::{DeviceTable, SequenceStates, SequenceTable};
use crate::routines::widen;
use crate::{DType, DeviceTensor, LightningError, PrefillConfig, Result, check_finite};

/// States to keep after each of the last `count` tokens of every sequence, so
/// that a speculative-decoding verifier can roll back to any accepted prefix.
#[derive(Clone, Copy, Debug)]
pub struct Snapshots<'a> {
    /// `K`: snapshots per sequence.
    pub count: usize,
    /// `[N, K]` row-major: `slots[i * K + j]` receives sequence `i`'s state
    /// after its token `len_i - K + j` (so `j = K - 1` is the final state), or
    /// -1 for none. Distinct from each other and from the sequences' own slots.
    pub slots: &'a [i32],
}

/// The batch metadata of one packed call (an engine step), without the tensors.
#[derive(Clone, Copy, Debug)]
pub struct VarlenBatch<'a> {
    /// `N + 1` offsets: sequence `i` is tokens `cu_seqlens[i]..cu_seqlens[i + 1]`;
    /// starts at 0, increases strictly, ends at `T`.
    pub cu_seqlens: &'a [u32],
    /// `N` slots of the state cache, distinct, or -1 for padding.
    pub slots: &'a [i32],
    /// `N` flags: continue the state stored in the slot (`true`) or start from zeros.
    pub has_initial_state: &'a [bool],
    /// Speculative-decoding snapshots, if any.
    pub snapshots: Option<Snapshots<'a>>,
}

/// The arguments of a packed call.
#[derive(Clone, Copy, Debug)]
pub struct VarlenInputs<'a> {
    /// Queries `[T, h, d]`.
    pub q: &'a DeviceTensor,
    /// Keys `[T, h, d]`, same dtype as q.
    pub k: &'a DeviceTensor,
    /// Values `[T, h, e]`, same dtype as q.
    pub v: &'a DeviceTensor,
    /// One slope per head, `[h]` f32.
    pub slopes: &'a DeviceTensor,
    /// The state cache `[slots, h, d, e]`, f32 or bf16 (even `e`): read and
    /// written in place; a bf16 state is rounded once per write (see
    /// [`crate::DecodeInputs::cache`]).
    pub cache: &'a DeviceTensor,
    /// Offsets, slots, flags and snapshots.
    pub batch: VarlenBatch<'a>,
}

/// A batch validated and planned for one shape: what to upload and launch.
#[derive(Clone, Debug)]
pub(crate) struct PlannedBatch {
    pub shape: VarlenShape,
    pub table: SequenceTable,
    pub prefill: PrefillPlan,
    pub decode: Option<DecodePlan>,
    /// The f32 scratch of the states, against a bf16 cache.
    pub scratch: Option<StateScratch>,
}

impl PlannedBatch {
    /// Validates `batch` against tensors of `shape` and plans its launches.
    pub fn new(
        target: LaunchTarget,
        mut shape: VarlenShape,
        batch: &VarlenBatch,
        config: &PrefillConfig,
    ) -> Result<Self> {
        config.validate()?;
        shape
            .dtype
            .check_supported(target.properties(), target.runtime_name())?;
        let limits = DeviceLimits::of_target(target);
        widen::check_copies(&limits, shape.dtype, config, &copies(&shape)[..3])?;
        let sequences = check_offsets(batch.cu_seqlens, shape.total_tokens)?;
        shape.sequences = sequences;
        check_len("slots", batch.slots.len(), sequences)?;
        check_len("has_initial_state", batch.has_initial_state.len(), sequences)?;
        let mut registry = SlotRegistry::new(shape.slots);
        for (seq, &slot) in batch.slots.iter().enumerate() {
            registry.claim(seq, slot)?;
        }
        let snapshots = snapshot_work(batch, &mut registry)?;
        let states: Vec<SequenceStates> = batch
            .slots
            .iter()
            .zip(batch.has_initial_state)
            .map(|(&slot, &has_initial)| SequenceStates {
                initial: if has_initial && slot >= 0 { slot } else { -1 },
                last: slot,
            })
            .collect();
        let mut table = SequenceTable::new(batch.cu_seqlens, &states, &snapshots, true, config);
        let scratch = (shape.state_dtype == DType::BF16).then(|| StateScratch::renumber(&mut table));
        if let Some(scratch) = &scratch {
            check_scratch_grid(scratch, &limits)?;
        }
        Ok(Self {
            scratch,
            ..Self::from_table(shape, table, config, &limits)?
        })
    }

    /// Plans the launches of `table` over tensors of `shape` (a packed
    /// training call's launch group: see `entry::packed`).
    pub fn from_table(
        shape: VarlenShape,
        table: SequenceTable,
        config: &PrefillConfig,
        limits: &DeviceLimits,
    ) -> Result<Self> {
        let prefill = PrefillPlan::new(
            &table.work(shape.heads, shape.key_dim, shape.value_dim, shape.dtype),
            config,
            limits,
        )?;
        let decode = match table.decodes() {
            0 => None,
            decodes => Some(plan_decode(
                &DecodeShape {
                    batch: decodes,
                    heads: shape.heads,
                    key_dim: shape.key_dim,
                    value_dim: shape.value_dim,
                    slots: shape.slots,
                    dtype: shape.dtype,
                    state_dtype: shape.state_dtype,
                },
                limits,
                config.tuning.decode_rows_in_flight,
            )?),
        };
        Ok(Self {
            shape,
            table,
            prefill,
            decode,
            scratch: None,
        })
    }

    /// The states' shape `[h, d, e]` and elements.
    fn state_shape(&self) -> ([usize; 3], usize) {
        let shape = &self.shape;
        let state = [shape.heads, shape.key_dim, shape.value_dim];
        (state, state.iter().product())
    }
}

/// The scratch's gather and scatter run one cube row per entry: refused with
/// a typed error where the device's grid has fewer rows.
fn check_scratch_grid(scratch: &StateScratch, limits: &DeviceLimits) -> Result<()> {
    let available = limits.max_cube_count.1 as u64;
    if scratch.entries() as u64 > available {
        return Err(LightningError::DoesNotFit {
            kernel: "widen_states / narrow_states (bf16 state cache)",
            resource: "cubes along y (sequences and snapshots with a state)",
            required: scratch.entries() as u64,
            available,
        });
    }
    Ok(())
}

/// The f32 copies a widened call on tensors of `shape` makes (see
/// `routines::widen`): the name and elements of q, k, v and out.
fn copies(shape: &VarlenShape) -> [(&'static str, usize); 4] {
    let rows = shape.total_tokens * shape.heads;
    let (qk, v) = (rows * shape.key_dim, rows * shape.value_dim);
    crate::device::memory::f32_copies([qk, qk, v, v])
}

/// Checks the snapshots and lists them as `(sequence, token, slot)`.
fn snapshot_work(batch: &VarlenBatch, registry: &mut SlotRegistry) -> Result<Vec<(u32, u32, i32)>> {
    let Some(snapshots) = batch.snapshots else {
        return Ok(Vec::new());
    };
    let (count, sequences) = (snapshots.count, batch.slots.len());
    if snapshots.slots.len() != sequences * count {
        return Err(LightningError::LengthMismatch {
            what: "snapshot slots",
            expected: sequences * count,
            rule: "K per sequence, [N, K]",
            actual: snapshots.slots.len(),
        });
    }
    let mut work = Vec::new();
    for seq in 0..sequences {
        let row = &snapshots.slots[seq * count..(seq + 1) * count];
        if row.iter().all(|&slot| slot == -1) {
            continue;
        }
        let tokens = (batch.cu_seqlens[seq + 1] - batch.cu_seqlens[seq]) as usize;
        if count > tokens {
            return Err(LightningError::SnapshotsExceedSequence {
                sequence: seq,
                tokens,
                snapshots: count,
            });
        }
        for (j, &slot) in row.iter().enumerate() {
            registry.claim(seq, slot)?;
            if slot >= 0 {
                work.push((seq as u32, (tokens - count + j) as u32, slot));
            }
        }
    }
    Ok(work)
}

/// A planned batch on the device: its tables and the per-block workspace,
/// reusable by every layer of a step (same shape, same batch).
#[derive(Clone, Debug)]
pub(crate) struct DeviceBatch {
    pub planned: PlannedBatch,
    pub table: DeviceTable,
    pub workspace: Handle,
    pub unused: DeviceTensor,
    /// The f32 scratch of the states, against a bf16 cache with states to move.
    pub scratch: Option<DeviceScratch>,
}

impl DeviceBatch {
    /// What a call of `planned` allocates, `out` first where the call
    /// allocates its output.
    pub fn buffers(planned: &PlannedBatch, allocates_out: bool) -> Vec<Buffer> {
        let shape = &planned.shape;
        let mut buffers = Vec::new();
        if allocates_out {
            buffers.push(Buffer::tensor(
                "out [total_tokens, h, e]",
                &shape.out_shape(),
                shape.dtype,
            ));
        }
        buffers.extend(crate::routines::prefill::buffers::launch_buffers(
            &planned.prefill,
            &planned.table,
            [shape.heads, shape.key_dim, shape.value_dim],
            &copies(shape),
        ));
        if let Some(scratch) = &planned.scratch {
            buffers.extend(scratch.buffers(planned.state_shape().1));
        }
        buffers
    }

    /// Uploads the tables and allocates the workspace, once the call's
    /// buffers are known to fit the device.
    pub fn upload(client: &Client, planned: PlannedBatch) -> Result<Self> {
        DeviceMemory::of(client).check(&Self::buffers(&planned, false))?;
        Ok(Self::upload_checked(LaunchTarget::Device(client), planned))
    }

    /// [`DeviceBatch::upload`] without the memory check (done, or offline).
    pub(crate) fn upload_checked(target: LaunchTarget, planned: PlannedBatch) -> Self {
        let table = planned.table.upload(target, planned.prefill.chunk_walk());
        let workspace = target.empty(planned.prefill.block_states_len.max(1) * 4);
        let scratch = planned
            .scratch
            .as_ref()
            .and_then(|scratch| scratch.upload(target, planned.state_shape().0));
        Self {
            planned,
            table,
            workspace,
            unused: crate::device::tensor::unused_binding(target),
            scratch,
        }
    }

    /// Launches the call on q, k, v, slopes and the states, already checked
    /// against `planned.shape` (the batch metadata is in the uploaded tables).
    /// `states` is the slot cache of a serving call: initial states are read
    /// from its slots and final states written back. A packed training call
    /// gives its initial states' tensor as `initial` (rows read instead of
    /// slots) and its final states' tensor as `states`. A bf16 cache: the
    /// prefill launches on the scratch, between its gather and its scatter,
    /// and the decode rows on the cache (see the module doc).
    pub fn launch(
        &self,
        target: LaunchTarget,
        tensors: [&DeviceTensor; 4],
        (initial, states): (Option<&DeviceTensor>, &DeviceTensor),
        config: &PrefillConfig,
        out: &DeviceTensor,
    ) {
        match (&self.planned.scratch, &self.scratch) {
            (None, _) => self.launch_on(target, tensors, (initial, states), None, config, out),
            (Some(_), Some(scratch)) => {
                scratch.widen_from(target, states);
                self.launch_on(
                    target,
                    tensors,
                    (initial, &scratch.states),
                    Some(states),
                    config,
                    out,
                );
                scratch.narrow_into(target, states);
            }
            // Every sequence is a decode row: no prefill kernel runs.
            (Some(_), None) => self.launch_on(
                target,
                tensors,
                (initial, &self.unused),
                Some(states),
                config,
                out,
            ),
        }
    }

    /// The call's launches with `states` as the prefill's slot cache and
    /// `decode_cache` (where given) as the decode rows'.
    fn launch_on(
        &self,
        target: LaunchTarget,
        [q, k, v, slopes]: [&DeviceTensor; 4],
        (initial, states): (Option<&DeviceTensor>, &DeviceTensor),
        decode_cache: Option<&DeviceTensor>,
        config: &PrefillConfig,
        out: &DeviceTensor,
    ) {
        let shape = &self.planned.shape;
        CallLaunch {
            call: Call {
                target,
                q,
                k,
                v,
                slopes,
                out,
                heads: shape.heads,
                key_dim: shape.key_dim,
                value_dim: shape.value_dim,
                config,
                layout: Layout::packed(shape.heads),
                table: &self.table,
                initial,
                states,
                workspace: &self.workspace,
                unused: &self.unused,
                variant: Variant::FORWARD,
            },
            plan: &self.planned.prefill,
            decode: self.planned.decode.as_ref(),
            decode_cache,
        }
        .run(&mut |_, launch| launch());
    }
}

fn layer_tensors<'a>(inputs: &VarlenInputs<'a>) -> [&'a DeviceTensor; 4] {
    [inputs.q, inputs.k, inputs.v, inputs.slopes]
}

/// Checks `out` `[T, h, e]` (dtype of q).
pub(crate) fn check_out(shape: &VarlenShape, out: &DeviceTensor) -> Result<()> {
    const OUT: &str = "[T, h, e]";
    check_tensor(out, "out", &["T", "h", "e"], OUT, Some(shape.dtype))?;
    expect_shape(out, "out", &shape.out_shape(), OUT)
}

/// Validates a packed call and plans it without launching anything.
pub fn plan_varlen(client: &Client, inputs: &VarlenInputs, config: &PrefillConfig) -> Result<VarlenShape> {
    Ok(plan(client, inputs, config)?.shape)
}

fn plan(client: &Client, inputs: &VarlenInputs, config: &PrefillConfig) -> Result<PlannedBatch> {
    let shape = check_tensors(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.cache)?;
    PlannedBatch::new(LaunchTarget::Device(client), shape, &inputs.batch, config)
}

/// Runs a packed call, returning the output `[T, h, e]` (dtype of q); final
/// states (and snapshots) are written to their slots of the cache. Returns
/// [`LightningError::OutOfMemory`], having allocated nothing, where the
/// device cannot hold the call's buffers (see [`crate::memory`]).
pub fn prefill_varlen(
    client: &Client,
    inputs: &VarlenInputs,
    config: &PrefillConfig,
) -> Result<DeviceTensor> {
    let planned = plan(client, inputs, config)?;
    DeviceMemory::of(client).check(&DeviceBatch::buffers(&planned, true))?;
    let out = DeviceTensor::empty(client, &planned.shape.out_shape(), planned.shape.dtype);
    DeviceBatch::upload_checked(LaunchTarget::Device(client), planned).launch(
        LaunchTarget::Device(client),
        layer_tensors(inputs),
        (None, inputs.cache),
        config,
        &out,
    );
    if config.check_finite {
        check_finite(client, &out, "out")?;
    }
    Ok(out)
}

/// Runs a packed call into caller-owned `out` `[T, h, e]` (dtype of q); every
/// element is written.
pub fn prefill_varlen_into(
    client: &Client,
    inputs: &VarlenInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
) -> Result<()> {
    let planned = plan(client, inputs, config)?;
    check_out(&planned.shape, out)?;
    DeviceBatch::upload(client, planned)?.launch(
        LaunchTarget::Device(client),
        layer_tensors(inputs),
        (None, inputs.cache),
        config,
        out,
    );
    if config.check_finite {
        check_finite(client, out, "out")?;
    }
    Ok(())
}
