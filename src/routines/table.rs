//! The table of sequences and work lists the prefill kernels walk, built on the host.
//!
//! The kernels take no `[b, h, n]` shape: they take where each sequence starts
//! (`cu_seqlens`), where its blocks sit in the per-block workspace, where its
//! states come from and go, and flat lists of the sub-blocks, blocks,
//! sequences and snapshots to compute, one entry per cube along x (or z). A
//! dense batch is the special case of `b` sequences of `n` tokens. Sequences a
//! mixed batch routes to the decode kernel appear in no prefill work list.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device::target::LaunchTarget;
use crate::problem::shapes::PrefillShape;
use crate::{DType, PrefillConfig};

/// How much work one prefill call holds, whatever its layout: the sizes the
/// launches are planned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillWork {
    /// dtype of q, k, v and the output.
    pub dtype: DType,
    /// `h`.
    pub heads: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// Query sub-blocks over all sequences run through the prefill kernels.
    pub sub_blocks: usize,
    /// Blocks over all those sequences.
    pub blocks: usize,
    /// Sequences run through the prefill kernels.
    pub sequences: usize,
    /// States written after chosen tokens (speculative decoding).
    pub snapshots: usize,
}

impl PrefillWork {
    /// The work of a dense `[b, h, n, ...]` prefill.
    pub fn dense(shape: &PrefillShape, config: &PrefillConfig) -> Self {
        Self {
            dtype: shape.dtype,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            sub_blocks: shape.batch * shape.seq_len.div_ceil(config.sub_block),
            blocks: shape.batch * shape.seq_len.div_ceil(config.block),
            sequences: shape.batch,
            snapshots: 0,
        }
    }
}

/// The walks of a planned chunk-recurrent state pass: tokens per block and
/// blocks per segment (`None`: one walk per sequence). The table lists them
/// where a plan has the pass (`PrefillPlan::chunk_walk`).
pub(crate) type ChunkWalk = (usize, Option<usize>);

/// Where a sequence's state comes from and goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SequenceStates {
    /// Slot the initial state is read from, or negative for zeros.
    pub initial: i32,
    /// Slot the final state is written to, or negative for none (padding).
    pub last: i32,
}

/// Host-side work lists of one call (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SequenceTable {
    /// `cu_seqlens`: sequence `i` holds tokens `seq_starts[i]..seq_starts[i + 1]`.
    pub seq_starts: Vec<u32>,
    /// Index of each sequence's first block in the per-block workspace.
    pub block_offsets: Vec<u32>,
    /// Per sequence, the slot its initial state is read from (-1: zeros).
    pub initial_slots: Vec<i32>,
    /// Per sequence, the slot its final state is written to (-1: none).
    pub final_slots: Vec<i32>,
    /// `(sequence, first token)` of every query sub-block (diag, non-diag).
    pub sub_block_work: Vec<u32>,
    /// `(sequence, block)` of every block, in workspace order (kv-parallel).
    pub block_work: Vec<u32>,
    /// Sequences to reduce over blocks (kv-reduce).
    pub reduce_work: Vec<u32>,
    /// `(sequence, token, slot)` of every snapshot (kv-snapshot).
    pub snapshot_work: Vec<u32>,
    /// Token of each sequence routed to the decode kernel.
    pub decode_tokens: Vec<u32>,
    /// Slot of each sequence routed to the decode kernel.
    pub decode_slots: Vec<i32>,
    /// Blocks in the workspace.
    pub blocks: usize,
}

impl SequenceTable {
    /// Builds the work lists. `seq_starts` has one more entry than `states`, and
    /// every sequence is at least one token long (validated by the caller).
    /// With `route_decodes`, a one-token sequence that continues a stored state
    /// and takes no snapshot goes to the decode kernel; `snapshots` lists
    /// `(sequence, token, slot)`.
    pub fn new(
        seq_starts: &[u32],
        states: &[SequenceStates],
        snapshots: &[(u32, u32, i32)],
        route_decodes: bool,
        config: &PrefillConfig,
    ) -> Self {
        let mut table = Self {
            seq_starts: seq_starts.to_vec(),
            ..Self::default()
        };
        for (seq, state) in states.iter().enumerate() {
            let len = (seq_starts[seq + 1] - seq_starts[seq]) as usize;
            let has_snapshot = snapshots.iter().any(|&(s, _, _)| s as usize == seq);
            table.initial_slots.push(state.initial);
            table.final_slots.push(state.last);
            table.block_offsets.push(table.blocks as u32);
            if route_decodes && len == 1 && state.initial >= 0 && state.initial == state.last && !has_snapshot
            {
                table.decode_tokens.push(seq_starts[seq]);
                table.decode_slots.push(state.last);
                continue;
            }
            let seq_id = seq as u32;
            for start in (0..len).step_by(config.sub_block) {
                table.sub_block_work.extend([seq_id, start as u32]);
            }
            let blocks = len.div_ceil(config.block);
            for blk in 0..blocks {
                table.block_work.extend([seq_id, blk as u32]);
            }
            table.blocks += blocks;
            table.reduce_work.push(seq_id);
        }
        for &(seq, token, slot) in snapshots {
            table.snapshot_work.extend([seq, token, slot as u32]);
        }
        table
    }

    /// A dense batch: `batch` sequences of `seq_len` tokens; sequence `i` reads
    /// its initial state from row `i` (when there is one) and writes its final
    /// state to row `i`.
    pub fn dense(batch: usize, seq_len: usize, has_initial: bool, config: &PrefillConfig) -> Self {
        let n = seq_len as u32;
        let seq_starts: Vec<u32> = (0..=batch as u32).map(|i| i * n).collect();
        let states: Vec<SequenceStates> = (0..batch as i32)
            .map(|i| SequenceStates {
                initial: if has_initial { i } else { -1 },
                last: i,
            })
            .collect();
        Self::new(&seq_starts, &states, &[], false, config)
    }

    /// Documents `docs` of a packed training batch: document `i` of
    /// `cu_seqlens` reads its initial state from row `i` (where
    /// `has_initial`) and writes its final state to row `i` (where
    /// `writes_final`; nowhere else). Empty documents are left out (their
    /// neighbours' tokens stay contiguous, and no kernel walks zero tokens);
    /// nothing is routed to the decode kernel.
    pub fn packed(
        cu_seqlens: &[u32],
        docs: std::ops::Range<usize>,
        has_initial: bool,
        writes_final: bool,
        config: &PrefillConfig,
    ) -> Self {
        let mut seq_starts = vec![cu_seqlens[docs.start]];
        let mut states = Vec::new();
        for doc in docs {
            if cu_seqlens[doc + 1] == cu_seqlens[doc] {
                continue;
            }
            seq_starts.push(cu_seqlens[doc + 1]);
            let row = doc as i32;
            states.push(SequenceStates {
                initial: if has_initial { row } else { -1 },
                last: if writes_final { row } else { -1 },
            });
        }
        Self::new(&seq_starts, &states, &[], false, config)
    }

    /// The sizes the launches are planned from.
    pub fn work(&self, heads: usize, key_dim: usize, value_dim: usize, dtype: DType) -> PrefillWork {
        PrefillWork {
            dtype,
            heads,
            key_dim,
            value_dim,
            sub_blocks: self.sub_block_work.len() / 2,
            blocks: self.blocks,
            sequences: self.reduce_work.len(),
            snapshots: self.snapshot_work.len() / 3,
        }
    }

    /// Sequences routed to the decode kernel.
    pub fn decodes(&self) -> usize {
        self.decode_tokens.len()
    }

    /// The runs the chunk-recurrent state pass walks (see
    /// `kernels::chunk_state`): one per sequence, or, with segments of
    /// `segment_blocks` blocks, one per segment, with the segments' own lists.
    pub fn chunk_runs(&self, block: usize, segment_blocks: Option<usize>) -> ChunkRuns {
        let mut runs = ChunkRuns {
            segment_offsets: vec![0; self.initial_slots.len()],
            ..ChunkRuns::default()
        };
        for &seq in &self.reduce_work {
            let len = (self.seq_starts[seq as usize + 1] - self.seq_starts[seq as usize]) as usize;
            let blocks = len.div_ceil(block);
            let Some(per_segment) = segment_blocks else {
                runs.walks.extend([seq, 0, blocks as u32]);
                continue;
            };
            runs.segment_offsets[seq as usize] = (runs.segment_work.len() / 2) as u32;
            for (segment, first) in (0..blocks).step_by(per_segment).enumerate() {
                runs.walks
                    .extend([seq, first as u32, per_segment.min(blocks - first) as u32]);
                runs.segment_work.extend([seq, segment as u32]);
            }
        }
        runs
    }

    /// The runs a planned chunk-recurrent state pass walks, if there is one.
    fn planned_runs(&self, walk: Option<ChunkWalk>) -> ChunkRuns {
        walk.map(|(block, segment_blocks)| self.chunk_runs(block, segment_blocks))
            .unwrap_or_default()
    }

    /// What [`SequenceTable::upload`] allocates with `walk`: bytes over all
    /// its lists (an empty one still binds one element), and the segments of
    /// the chunk-recurrent walk (zero without segments).
    pub fn device_bytes(&self, walk: Option<ChunkWalk>) -> (u64, usize) {
        let runs = self.planned_runs(walk);
        let lists = [
            runs.walks.len(),
            runs.segment_work.len(),
            runs.segment_offsets.len(),
            self.seq_starts.len(),
            self.block_offsets.len(),
            self.initial_slots.len(),
            self.final_slots.len(),
            self.sub_block_work.len(),
            self.block_work.len(),
            self.reduce_work.len(),
            self.snapshot_work.len(),
            self.decode_tokens.len(),
            self.decode_slots.len(),
        ];
        let bytes = lists.iter().map(|&len| len.max(1) as u64 * 4).sum();
        (bytes, runs.segment_work.len() / 2)
    }

    /// Copies the table to the device, with the runs of the planned
    /// chunk-recurrent state pass `walk`, if there is one.
    pub fn upload(&self, target: LaunchTarget, walk: Option<ChunkWalk>) -> DeviceTable {
        let runs = self.planned_runs(walk);
        DeviceTable {
            chunk_walks: upload(target, &runs.walks),
            segment_work: upload(target, &runs.segment_work),
            segment_offsets: upload(target, &runs.segment_offsets),
            segments: runs.segment_work.len() / 2,
            walks: runs.walks.len() / 3,
            seq_starts: upload(target, &self.seq_starts),
            block_offsets: upload(target, &self.block_offsets),
            initial_slots: upload(target, &self.initial_slots),
            final_slots: upload(target, &self.final_slots),
            sub_block_work: upload(target, &self.sub_block_work),
            block_work: upload(target, &self.block_work),
            reduce_work: upload(target, &self.reduce_work),
            reduces: self.reduce_work.len(),
            snapshot_work: upload(target, &self.snapshot_work),
            decode_tokens: upload(target, &self.decode_tokens),
            decode_slots: upload(target, &self.decode_slots),
        }
    }
}

/// Host-side runs of the chunk-recurrent state pass ([`SequenceTable::chunk_runs`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ChunkRuns {
    /// `(sequence, first block, blocks)` of each walk.
    pub walks: Vec<u32>,
    /// `(sequence, segment)` of each segment (empty without segments).
    pub segment_work: Vec<u32>,
    /// Per sequence, its first segment.
    pub segment_offsets: Vec<u32>,
}

/// A device buffer of 32-bit integers and the count it holds.
#[derive(Clone, Debug)]
pub(crate) struct IndexBuffer {
    handle: Handle,
    len: usize,
}

impl IndexBuffer {
    /// The first `len` 32-bit elements of `handle` (which holds at least that many).
    pub fn new(handle: Handle, len: usize) -> Self {
        Self { handle, len }
    }

    /// The buffer as a kernel argument.
    pub fn arg(&self) -> BufferArg {
        // SAFETY: the buffer was created with `len` 32-bit elements (at least one).
        unsafe { BufferArg::from_raw_parts(self.handle.clone(), self.len) }
    }
}

/// Copies `values` to a new device buffer.
pub(crate) fn upload<T: CubeElement>(target: LaunchTarget, values: &[T]) -> IndexBuffer {
    // An empty list still binds a buffer: a one-element one nobody reads.
    if values.is_empty() {
        let zero = [T::from_bytes(&[0u8; 4])[0]];
        return IndexBuffer {
            handle: target.create_from_slice(T::as_bytes(&zero)),
            len: 1,
        };
    }
    IndexBuffer {
        handle: target.create_from_slice(T::as_bytes(values)),
        len: values.len(),
    }
}

/// The table on the device, ready to bind.
#[derive(Clone, Debug)]
pub(crate) struct DeviceTable {
    pub seq_starts: IndexBuffer,
    pub block_offsets: IndexBuffer,
    pub initial_slots: IndexBuffer,
    pub final_slots: IndexBuffer,
    pub sub_block_work: IndexBuffer,
    pub block_work: IndexBuffer,
    pub reduce_work: IndexBuffer,
    /// Entries of `reduce_work` (its buffer binds one where it is empty).
    pub reduces: usize,
    pub snapshot_work: IndexBuffer,
    pub decode_tokens: IndexBuffer,
    pub decode_slots: IndexBuffer,
    /// The chunk-recurrent state pass's walks (see [`ChunkRuns`]).
    pub chunk_walks: IndexBuffer,
    pub segment_work: IndexBuffer,
    pub segment_offsets: IndexBuffer,
    pub segments: usize,
    pub walks: usize,
}
