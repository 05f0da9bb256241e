//! A decode state cache split over several buffers.
//!
//! wgpu binds at most about 2 GiB per buffer, so one `[slots, h, d, e]` f32
//! cache holds at most about 500 sequences of h = 64, d = e = 128 there. A
//! [`SplitCache`] numbers its slots across several buffers (parts), in order;
//! a decode step against it launches the decode kernel once per part, each
//! launch serving the entries whose slots lie in its part and skipping the
//! others (their cubes read and write nothing), so every output row is written
//! once and every state is read and written once, as with one buffer.
//!
//! The parts hold f32 or bf16 states, all the same (a bf16 cache holds twice
//! the slots per buffer; see [`crate::DecodeInputs::cache`]).

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::entry::decode::{check_out, step_buffers};
use crate::problem::shapes::{DecodeShape, TensorShape, check_slots, check_state_dtype, check_tensor};
use crate::routines::decode::DecodePlan;
use crate::routines::decode::launch_decode;
use crate::routines::table::upload;
use crate::{DType, DecodeInputs, DeviceTensor, LightningError, PADDING_SLOT, Result};

/// The slot the decode kernel skips: an entry another part's launch serves.
const SKIPPED_SLOT: i32 = -2;

/// `slots` states `[h, d, e]` (f32 or bf16) in one or more buffers (parts),
/// slot `s` in the part whose range holds it.
#[derive(Clone, Debug)]
pub struct SplitCache {
    parts: Vec<DeviceTensor>,
    /// The first slot of each part, and the total after the last.
    starts: Vec<usize>,
}

impl SplitCache {
    /// `slots` zeroed f32 states in as few parts as the device's largest buffer allows.
    pub fn zeros(
        client: &Client,
        slots: usize,
        heads: usize,
        key_dim: usize,
        value_dim: usize,
    ) -> Result<Self> {
        Self::zeros_of(client, slots, [heads, key_dim, value_dim], DType::F32)
    }

    /// `slots` zeroed states `[h, d, e]` of `state_dtype` (f32, or bf16 with
    /// an even `e`) in as few parts as the device's largest buffer allows.
    pub fn zeros_of(
        client: &Client,
        slots: usize,
        [heads, key_dim, value_dim]: [usize; 3],
        state_dtype: DType,
    ) -> Result<Self> {
        let state_bytes = (heads * key_dim * value_dim * state_dtype.size()).max(1) as u64;
        let max_buffer = DeviceLimits::of(client).max_buffer;
        crate::device::memory::fits_one_buffer(
            Buffer::new("one slot's state [h, d, e] of the split cache", state_bytes),
            max_buffer,
        )?;
        let per_part = (max_buffer / state_bytes) as usize;
        Self::zeros_in_parts_of(client, slots, per_part, [heads, key_dim, value_dim], state_dtype)
    }

    /// `slots` zeroed f32 states, at most `part_slots` in each part.
    pub fn zeros_in_parts(
        client: &Client,
        slots: usize,
        part_slots: usize,
        heads: usize,
        key_dim: usize,
        value_dim: usize,
    ) -> Result<Self> {
        Self::zeros_in_parts_of(client, slots, part_slots, [heads, key_dim, value_dim], DType::F32)
    }

    /// `slots` zeroed states of `state_dtype`, at most `part_slots` in each part.
    pub fn zeros_in_parts_of(
        client: &Client,
        slots: usize,
        part_slots: usize,
        [heads, key_dim, value_dim]: [usize; 3],
        state_dtype: DType,
    ) -> Result<Self> {
        check_state_dtype(
            &TensorShape {
                shape: vec![slots, heads, key_dim, value_dim],
                dtype: state_dtype,
            },
            "split cache state_dtype",
        )?;
        let part_slots = part_slots.max(1);
        let shapes: Vec<[usize; 4]> = (0..slots.div_ceil(part_slots).max(1))
            .map(|p| {
                let len = part_slots.min(slots - (p * part_slots).min(slots));
                [len, heads, key_dim, value_dim]
            })
            .collect();
        // Every part checked before the first is allocated: each may fit
        // where all of them do not.
        let buffers: Vec<Buffer> = shapes
            .iter()
            .map(|shape| Buffer::tensor("part [slots, h, d, e] of the split cache", shape, state_dtype))
            .collect();
        DeviceMemory::of(client).check(&buffers)?;
        let parts = shapes
            .iter()
            .map(|shape| DeviceTensor::filled(client, shape, state_dtype, 0.0))
            .collect::<Result<Vec<_>>>()?;
        Self::from_parts(parts)
    }

    /// A cache of the caller's parts, each `[slots_i, h, d, e]` with the same
    /// `h, d, e` and dtype (f32, or bf16 with an even `e`); slots are numbered
    /// across the parts in order. A part of another dtype than the first is
    /// [`LightningError::StateDType`].
    pub fn from_parts(parts: Vec<DeviceTensor>) -> Result<Self> {
        const CACHE: &str = "[slots, h, d, e]";
        let Some(first) = parts.first() else {
            return Err(LightningError::Shape {
                tensor: "cache parts",
                expected: vec![1],
                layout: "at least one part",
                actual: vec![0],
            });
        };
        let mut starts = vec![0];
        for part in &parts {
            check_tensor(part, "cache part", &["slots", "h", "d", "e"], CACHE, None)?;
            check_state_dtype(part, "cache part")?;
            if part.dtype != first.dtype {
                return Err(LightningError::StateDType {
                    tensor: "cache part",
                    expected: first.dtype,
                    actual: part.dtype,
                });
            }
            if part.shape[1..] != first.shape[1..] {
                let mut expected = first.shape.clone();
                expected[0] = part.shape[0];
                return Err(LightningError::Shape {
                    tensor: "cache part",
                    expected,
                    layout: "[slots, h, d, e], with the h, d, e of the first part",
                    actual: part.shape.clone(),
                });
            }
            starts.push(starts.last().copied().unwrap_or(0) + part.shape[0]);
        }
        Ok(Self { parts, starts })
    }

    /// The parts, in slot order.
    pub fn parts(&self) -> &[DeviceTensor] {
        &self.parts
    }

    /// dtype of the states (every part's).
    pub fn state_dtype(&self) -> DType {
        self.parts[0].dtype
    }

    /// Slots over all parts.
    pub fn slots(&self) -> usize {
        self.starts[self.parts.len()]
    }

    /// The part holding `slot`, and the slot's index in it.
    pub fn locate(&self, slot: usize) -> Option<(usize, usize)> {
        let part = self
            .starts
            .partition_point(|&start| start <= slot)
            .checked_sub(1)?;
        (part < self.parts.len()).then(|| (part, slot - self.starts[part]))
    }

    /// An error about the first part, which a step is validated against,
    /// told of the whole cache, the tensor the caller passed: a part's
    /// shape `[slots_0, h, d, e]` becomes the cache's `[slots, h, d, e]`
    /// (the parts share `h, d, e`, and the slot count is never at fault
    /// there: the slots were checked against the whole cache first).
    fn whole_cache_error(&self, err: LightningError) -> LightningError {
        match err {
            LightningError::Shape {
                tensor: "cache",
                mut expected,
                layout,
                mut actual,
            } => {
                for shape in [&mut expected, &mut actual] {
                    if let Some(slots) = shape.first_mut() {
                        *slots = self.slots();
                    }
                }
                LightningError::Shape {
                    tensor: "cache",
                    expected,
                    layout,
                    actual,
                }
            }
            other => other,
        }
    }

    /// `slots` as part `part` sees them: its own slots local to it, padding
    /// for the first part only, every other entry skipped.
    fn local_slots(&self, part: usize, slots: &[i32]) -> Vec<i32> {
        slots
            .iter()
            .map(|&slot| match slot {
                PADDING_SLOT if part == 0 => PADDING_SLOT,
                PADDING_SLOT => SKIPPED_SLOT,
                slot => match self.locate(slot as usize) {
                    Some((p, local)) if p == part => local as i32,
                    _ => SKIPPED_SLOT,
                },
            })
            .collect()
    }
}

/// A decode step against a [`SplitCache`]: `inputs` as for [`crate::decode`],
/// with `inputs.cache` ignored (any tensor: the cache is `cache`), returning the
/// output `[b, h, 1, e]`; the cache is updated in place. Returns
/// [`LightningError::OutOfMemory`], having allocated nothing, where the
/// device cannot hold the step's buffers.
pub fn decode_split(client: &Client, inputs: &DecodeInputs, cache: &SplitCache) -> Result<DeviceTensor> {
    let step = SplitStep::new(client, inputs, cache)?;
    let shape = &step.shape;
    let out_shape = [shape.batch, shape.heads, 1, shape.value_dim];
    let mut buffers = vec![Buffer::tensor("out [b, h, 1, e]", &out_shape, shape.dtype)];
    buffers.extend(step_buffers(
        LaunchTarget::Device(client),
        inputs,
        shape,
        cache.parts.len(),
    ));
    DeviceMemory::of(client).check(&buffers)?;
    let out = DeviceTensor::empty(client, &out_shape, shape.dtype);
    step.launch(client, inputs, cache, &out);
    Ok(out)
}

/// [`decode_split`] into caller-owned `out` `[b, h, 1, e]` (dtype of q).
pub fn decode_split_into(
    client: &Client,
    inputs: &DecodeInputs,
    cache: &SplitCache,
    out: &DeviceTensor,
) -> Result<()> {
    let step = SplitStep::new(client, inputs, cache)?;
    check_out(out, &step.shape)?;
    DeviceMemory::of(client).check(&step_buffers(
        LaunchTarget::Device(client),
        inputs,
        &step.shape,
        cache.parts.len(),
    ))?;
    step.launch(client, inputs, cache, out);
    Ok(())
}

/// A decode step against a split cache, validated and planned.
struct SplitStep {
    shape: DecodeShape,
    plan: DecodePlan,
    /// Each part's view of the slots (see [`SplitCache::local_slots`]).
    local_slots: Vec<Vec<i32>>,
}

impl SplitStep {
    fn new(client: &Client, inputs: &DecodeInputs, cache: &SplitCache) -> Result<Self> {
        check_slots(inputs.slots, cache.slots())?;
        let local_slots: Vec<Vec<i32>> = (0..cache.parts.len())
            .map(|part| cache.local_slots(part, inputs.slots))
            .collect();
        // Validated and planned against the first part, with the entries of the
        // others as padding (the parts share h, d, e).
        let first_slots: Vec<i32> = local_slots[0]
            .iter()
            .map(|&slot| slot.max(PADDING_SLOT))
            .collect();
        let first = DecodeInputs {
            cache: &cache.parts[0],
            slots: &first_slots,
            ..*inputs
        };
        // `from_parts` checked the other parts against the first; the plan does
        // not depend on the number of slots.
        let (shape, plan) =
            crate::plan_decode_step(client, &first).map_err(|err| cache.whole_cache_error(err))?;
        Ok(Self {
            shape,
            plan,
            local_slots,
        })
    }

    /// Launches the step into a checked `out`, once its buffers fit the device.
    fn launch(&self, client: &Client, inputs: &DecodeInputs, cache: &SplitCache, out: &DeviceTensor) {
        let target = LaunchTarget::Device(client);
        let slots: Vec<_> = self.local_slots.iter().map(|part| upload(target, part)).collect();
        let caches: Vec<_> = cache.parts.iter().zip(&slots).collect();
        // Bound for the kernel's packed mode, which a dense step does not use.
        let unused_tokens = upload::<u32>(target, &[]);
        launch_decode(
            target,
            &self.plan,
            [inputs.q, inputs.k, inputs.v, inputs.slopes],
            &caches,
            &unused_tokens,
            false,
            out,
            self.shape.heads,
            inputs.scale.unwrap_or(1.0),
            self.shape.key_dim,
            self.shape.value_dim,
        );
    }
}
