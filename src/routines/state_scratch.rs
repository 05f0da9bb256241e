//! Prefills against a bf16 state cache, on an f32 scratch of the call's states.
//!
//! The prefill kernels (five kernels, chunk-recurrent, fused, kv-snapshot) read
//! and write f32 states through the table's slots. Against a bf16 cache a call
//! gathers the states its sequences continue into a scratch `[entries, h, d,
//! e]` f32 of its own (`kernels::state_words::widen_states`, exact), runs
//! those kernels untouched on the scratch with the table's slots renumbered
//! into it, and rounds the final states and snapshots back into their slots
//! (`narrow_states`, once per element, nearest even, NaN kept). Why not bf16
//! in every prefill kernel: a prefill's state traffic (one read and one write
//! of each sequence's state) is small beside the work on its tokens, so two
//! light passes cost little, where a bf16 variant of every prefill routine
//! would multiply the kernels to maintain and compile. The decode rows of a
//! mixed batch, whose bytes are all state, keep their slots in the cache and
//! go to the decode kernel, which streams the bf16 cache itself.

use lightning_attention_kernels::state_words::{narrow_states, widen_states};

use crate::device::memory::Buffer;
use crate::device::target::{LaunchTarget, launch_kernel};
use crate::device::tensor::arg;
use crate::routines::table::{IndexBuffer, SequenceTable, upload};
use crate::routines::widen::words_arg;
use crate::{DType, DeviceTensor};

/// Units per cube of the gather and scatter.
const UNITS: u32 = 256;
/// Most cubes along x per scratch entry (each unit strides over the rest).
const MAX_CUBES_X: usize = 1024;

/// The scratch of one call: per entry, the cache slot gathered into it before
/// the launches and the one it is rounded back into after (-1: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct StateScratch {
    /// Per entry, the slot read (a continued state) or -1.
    pub read: Vec<i32>,
    /// Per entry, the slot written (a final state or a snapshot) or -1.
    pub write: Vec<i32>,
}

impl StateScratch {
    /// Renumbers `table`'s prefill slots into scratch entries and returns the
    /// scratch: one entry per sequence the prefill kernels run that reads or
    /// writes a slot, one per snapshot. Sequences routed to the decode kernel
    /// keep their cache slots in the decode list (their initial and final
    /// slots, which no prefill kernel reads, become -1).
    pub fn renumber(table: &mut SequenceTable) -> Self {
        let mut scratch = Self::default();
        for seq in 0..table.final_slots.len() {
            let (initial, last) = (table.initial_slots[seq], table.final_slots[seq]);
            let routed = last >= 0 && table.decode_slots.contains(&last);
            if routed || (initial < 0 && last < 0) {
                table.initial_slots[seq] = -1;
                table.final_slots[seq] = -1;
                continue;
            }
            let entry = scratch.read.len() as i32;
            scratch.read.push(initial);
            scratch.write.push(last);
            table.initial_slots[seq] = if initial >= 0 { entry } else { -1 };
            table.final_slots[seq] = if last >= 0 { entry } else { -1 };
        }
        for work in table.snapshot_work.chunks_exact_mut(3) {
            let entry = scratch.read.len() as u32;
            scratch.read.push(-1);
            scratch.write.push(work[2] as i32);
            work[2] = entry;
        }
        scratch
    }

    /// Entries in the scratch.
    pub fn entries(&self) -> usize {
        self.read.len()
    }

    /// What the scratch allocates for states of `state_len` elements: the f32
    /// states and the two slot lists.
    pub fn buffers(&self, state_len: usize) -> Vec<Buffer> {
        if self.entries() == 0 {
            return Vec::new();
        }
        vec![
            Buffer::elements(
                "f32 scratch of a bf16-cache call's states [entries, h, d, e]",
                self.entries() * state_len,
                DType::F32,
            ),
            Buffer::new("scratch slots read", self.entries() as u64 * 4),
            Buffer::new("scratch slots written", self.entries() as u64 * 4),
        ]
    }

    /// The scratch on the device, for states of `state_shape` `[h, d, e]`;
    /// `None` where the call has no entry.
    pub fn upload(&self, target: LaunchTarget, state_shape: [usize; 3]) -> Option<DeviceScratch> {
        if self.entries() == 0 {
            return None;
        }
        let [h, d, e] = state_shape;
        Some(DeviceScratch {
            states: target.empty_tensor(&[self.entries(), h, d, e], DType::F32),
            read: upload(target, &self.read),
            write: upload(target, &self.write),
            entries: self.entries(),
        })
    }
}

/// A call's scratch on the device (see the module doc).
#[derive(Clone, Debug)]
pub(crate) struct DeviceScratch {
    /// `[entries, h, d, e]` f32.
    pub states: DeviceTensor,
    read: IndexBuffer,
    write: IndexBuffer,
    entries: usize,
}

impl DeviceScratch {
    /// Gathers the continued states of the bf16 `cache` into the scratch.
    pub fn widen_from(&self, target: LaunchTarget, cache: &DeviceTensor) {
        let (count, dim, words) = self.grid(target);
        // SAFETY: every read slot is a slot of the cache and every entry one of
        // the scratch (validated and renumbered on the host); units stride
        // below `words`, the words of one state.
        unsafe {
            launch_kernel!(
                target,
                widen_states[],
                count,
                dim,
                words_arg(cache),
                self.read.arg(),
                arg(&self.states),
                words,
            )
        }
    }

    /// Rounds the scratch's final states and snapshots into the bf16 `cache`.
    pub fn narrow_into(&self, target: LaunchTarget, cache: &DeviceTensor) {
        let (count, dim, words) = self.grid(target);
        // SAFETY: as in `widen_from`.
        unsafe {
            launch_kernel!(
                target,
                narrow_states[],
                count,
                dim,
                arg(&self.states),
                self.write.arg(),
                words_arg(cache),
                words,
            )
        }
    }

    /// The grid of both passes and the words of one state.
    fn grid(&self, target: LaunchTarget) -> (cubecl::prelude::CubeCount, cubecl::prelude::CubeDim, u32) {
        let state_len: usize = self.states.shape[1..].iter().product();
        let words = state_len / 2;
        let max_x = target.properties().hardware.max_cube_count.0 as usize;
        let cubes_x = words.div_ceil(UNITS as usize).clamp(1, MAX_CUBES_X.min(max_x));
        (
            cubecl::prelude::CubeCount::Static(cubes_x as u32, self.entries as u32, 1),
            cubecl::prelude::CubeDim::new_1d(UNITS),
            words as u32,
        )
    }
}
