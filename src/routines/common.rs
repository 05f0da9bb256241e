//! What every routine's launch takes: the call's tensors and sizes
//! ([`Call`]), the kernels of a call in launch order ([`Stage`]), how rows
//! step ([`Layout`]), how the backward pass transforms the forward
//! ([`Variant`]), and the blocks kv-parallel and kv-reduce run over
//! ([`BlockRun`]).

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device::target::LaunchTarget;
use crate::device::tensor::arg;
use crate::routines::table::{DeviceTable, IndexBuffer};
use crate::{DeviceTensor, PrefillConfig};

/// Units per cube the portable routines aim for.
pub(crate) const TARGET_UNITS: u32 = 256;

/// The kernels of a call, in launch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Diag,
    KvParallel,
    KvReduce,
    /// The chunk-recurrent state pass (in place of kv-parallel and kv-reduce).
    ChunkState,
    NonDiag,
    KvSnapshot,
    /// The fused routine (in place of every prefill kernel above).
    Fused,
    Decode,
    /// 16-bit inputs widened to f32 copies before the launches, or the output
    /// rounded back after them (see `crate::widen`).
    Widen,
}

impl Stage {
    /// The stage's name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Diag => "diag",
            Self::KvParallel => "kv_parallel",
            Self::KvReduce => "kv_reduce",
            Self::ChunkState => "chunk_state",
            Self::NonDiag => "non_diag",
            Self::KvSnapshot => "kv_snapshot",
            Self::Fused => "fused",
            Self::Decode => "decode",
            Self::Widen => "widen",
        }
    }
}

/// How rows of q, k, v and out step (see `kernels::layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub head_stride: u32,
    pub token_stride: u32,
}

impl Layout {
    /// `[b, h, n, x]`.
    pub fn dense(seq_len: usize) -> Self {
        Self {
            head_stride: seq_len as u32,
            token_stride: 1,
        }
    }
    /// `[total_tokens, h, x]`.
    pub fn packed(heads: usize) -> Self {
        Self {
            head_stride: 1,
            token_stride: heads as u32,
        }
    }
}

/// How a call transforms the forward computation; the backward pass runs the
/// forward kernels with these (see `kernels::kv_reduce` and `kernels::layout`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Variant {
    /// Read every sequence back to front.
    pub reversed: bool,
    /// The initial state is stored transposed, `[e, d]`.
    pub transpose_initial: bool,
    /// Multiplies the initial state.
    pub initial_scale: f32,
    /// The initial state enters one decay step late (times `exp(s)`).
    pub advance_initial: bool,
    /// Multiplies the final state.
    pub final_scale: f32,
    /// The final state is decayed one more step (times `exp(-s)`).
    pub retreat_final: bool,
}

impl Variant {
    /// The forward computation as it is.
    pub const FORWARD: Self = Self {
        reversed: false,
        transpose_initial: false,
        initial_scale: 1.0,
        advance_initial: false,
        final_scale: 1.0,
        retreat_final: false,
    };
}

/// The tensors, sizes and tables one call's prefill routines launch with,
/// as its entry point gives them; each family's launch takes this, the
/// plan's [`Staging`] where it needs it, and its own plan.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub target: LaunchTarget<'a>,
    pub q: &'a DeviceTensor,
    pub k: &'a DeviceTensor,
    pub v: &'a DeviceTensor,
    pub slopes: &'a DeviceTensor,
    pub out: &'a DeviceTensor,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub config: &'a PrefillConfig,
    pub layout: Layout,
    pub table: &'a DeviceTable,
    /// Caller-given initial states (dense batches); `None` reads them from `states`.
    pub initial: Option<&'a DeviceTensor>,
    /// `[slots, h, d, e]` f32: where final states (and snapshots) are written.
    pub states: &'a DeviceTensor,
    /// The per-block state workspace: at least [`Staging::block_states_len`] f32.
    pub workspace: &'a Handle,
    /// A one-element f32 buffer bound where a kernel reads nothing.
    pub unused: &'a DeviceTensor,
    /// [`Variant::FORWARD`] but for the backward pass.
    pub variant: Variant,
}

/// What a call's plan says about how its kernels stage operands and where
/// the per-block states lie (`PrefillPlan::staging`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Staging {
    /// Units per plane the tensor-core routines are compiled for (0 where the
    /// runtime has no fixed plane size).
    pub plane_size: usize,
    /// f32 operands are split into high and low bf16 parts on tensor cores.
    pub split: bool,
    /// Elements of the per-block state workspace the kernels may touch (f32,
    /// or as many of a narrower type).
    pub block_states_len: usize,
}

impl Call<'_> {
    /// The per-block state workspace, as a kernel argument.
    pub fn block_states_arg(&self, staging: &Staging) -> BufferArg {
        // SAFETY: the workspace holds at least this many f32 (so as many of a
        // narrower type).
        unsafe { BufferArg::from_raw_parts(self.workspace.clone(), staging.block_states_len.max(1)) }
    }

    /// The states `run` reads and writes, as a kernel argument.
    pub fn run_states(&self, run: &BlockRun) -> BufferArg {
        // SAFETY: the caller's buffer holds at least this many f32.
        unsafe { BufferArg::from_raw_parts(run.states.clone(), run.states_len.max(1)) }
    }

    /// The caller's initial states, or the unused binding where they come
    /// from the slots of `states`.
    pub fn initial_arg(&self) -> BufferArg {
        arg(self.initial.unwrap_or(self.unused))
    }
}

/// The blocks kv-parallel and kv-reduce run over: a call's blocks (the
/// five-kernel design), or the segments of the chunk-recurrent routine's
/// segmented walk (a segment as one long block).
pub(crate) struct BlockRun<'a> {
    /// Tokens per block.
    pub block: usize,
    /// Blocks in `work` (kv-parallel's cubes along x).
    pub cubes: u32,
    /// `(sequence, block)` of each block, in the order of `states`.
    pub work: &'a IndexBuffer,
    /// Each sequence's first block in `states`.
    pub offsets: &'a IndexBuffer,
    /// `[blocks, h, d, e]` f32: each block's `K^T V`, then its incoming state.
    pub states: &'a Handle,
    /// Elements of `states` the kernels may touch.
    pub states_len: usize,
}
