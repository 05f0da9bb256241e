//! The launches of one planned call: the prefill kernels over a table of
//! sequences, the snapshot kernel, and the decode kernel, in stream order.
//!
//! Dense prefill, packed (varlen) prefill, mixed batches and the serving
//! backend all end here; they differ only in the table, the layout strides and
//! where states live. Everything passed in was validated and planned against
//! the device before, which is what makes the `launch_unchecked` calls sound.

use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels as kernels;

use crate::plan::{
    CMMA_VECTOR, DecodePlan, DiagRoutine, KvParallelRoutine, LaunchDims, PrefillPlan, Products,
};
use crate::sequences::{DeviceTable, IndexBuffer};
use crate::widen;
use crate::{DType, DeviceTensor, PrefillConfig};

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
    Decode,
    /// 16-bit inputs widened to f32 copies before the launches, or the output
    /// rounded back after them (see `crate::widen`).
    Widen,
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

/// The tensor bound where a kernel's optional input is absent: four f32, one
/// vector of the widest binding that may receive it (kv-reduce reads
/// `initial` in vectors of 4), or wgpu refuses a binding smaller than one
/// vector.
pub(crate) fn unused_binding(client: &Client) -> DeviceTensor {
    DeviceTensor::empty(client, &[4], DType::F32)
}

/// A kernel argument over a whole validated tensor.
pub(crate) fn arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: validation checked that the buffer holds `num_elements` of its dtype.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements()) }
}

/// Everything one call launches with.
pub(crate) struct CallLaunch<'a> {
    pub client: &'a Client,
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
    pub plan: &'a PrefillPlan,
    /// The decode launch, when the table routes sequences to it.
    pub decode: Option<&'a DecodePlan>,
    /// Caller-given initial states (dense batches); `None` reads them from `states`.
    pub initial: Option<&'a DeviceTensor>,
    /// `[slots, h, d, e]` f32: where final states (and snapshots) are written.
    pub states: &'a DeviceTensor,
    /// A buffer of at least `plan.block_states_len` f32.
    pub workspace: &'a Handle,
    /// A one-element f32 buffer bound where a kernel reads nothing.
    pub unused: &'a DeviceTensor,
    /// [`Variant::FORWARD`] but for the backward pass.
    pub variant: Variant,
}

impl CallLaunch<'_> {
    /// Hands each launch to `hook`, in order, for the dtype of q.
    /// Operands are staged as the plan's [`Products`] say: bf16 parts for f32
    /// inputs on tensor cores, else the input dtype.
    pub fn run(&self, hook: &mut dyn FnMut(Stage, &dyn Fn())) {
        match self.q.dtype {
            DType::F32 => self.run_f32(hook),
            _ if self.plan.widened => self.run_widened(hook),
            DType::F16 => self.run_typed::<half::f16, half::f16>(hook),
            DType::BF16 => self.run_typed::<half::bf16, half::bf16>(hook),
        }
    }

    /// f32 inputs, staged as bf16 parts where the plan puts them on tensor cores.
    fn run_f32(&self, hook: &mut dyn FnMut(Stage, &dyn Fn())) {
        if matches!(self.plan.products, Products::SplitBf16 | Products::RoundedBf16) {
            self.run_typed::<f32, half::bf16>(hook);
        } else {
            self.run_typed::<f32, f32>(hook);
        }
    }

    /// 16-bit inputs on f32 copies: q, k, v widened, the f32 launches the plan
    /// holds (see [`PrefillPlan::widened`]) into an f32 output, rounded back
    /// into `out`.
    fn run_widened(&self, hook: &mut dyn FnMut(Stage, &dyn Fn())) {
        let client = self.client;
        let copy = |t: &DeviceTensor| DeviceTensor::empty(client, &t.shape, DType::F32);
        let (q, k, v, out) = (copy(self.q), copy(self.k), copy(self.v), copy(self.out));
        hook(Stage::Widen, &|| {
            for (narrow, wide) in [(self.q, &q), (self.k, &k), (self.v, &v)] {
                widen::widen_into(client, narrow, wide);
            }
        });
        CallLaunch {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            ..*self
        }
        .run_f32(hook);
        hook(Stage::Widen, &|| widen::narrow_into(client, &out, self.out));
    }

    /// The launches for inputs of `F`, staged on tensor cores as `M`.
    fn run_typed<F: Float + CubeElement, M: Float + CubeElement>(
        &self,
        hook: &mut dyn FnMut(Stage, &dyn Fn()),
    ) {
        let Self {
            client,
            q,
            k,
            v,
            slopes,
            out,
            table,
            plan,
            config,
            layout,
            ..
        } = self;
        let h = self.heads as u32;
        let (d, e, block, cb, scale) = (
            self.key_dim,
            self.value_dim,
            config.block,
            config.sub_block,
            // The output multiplier; `None` is 1.
            config.scale.unwrap_or(1.0),
        );
        let (head_stride, token_stride) = (layout.head_stride, layout.token_stride);
        let variant = self.variant;
        let states_arg = || self.block_states_arg();
        // SAFETY (every launch below): each size, tile, grid and table entry was
        // validated and planned against the device's limits; each kernel
        // bounds-checks the tails of n, d and e.
        if plan.total_blocks > 0 {
            let diag = || match plan.diag_routine {
                DiagRoutine::Portable => unsafe {
                    kernels::diag::diag::launch_unchecked::<F>(
                        client,
                        plan.diag.cube_count(),
                        plan.diag.cube_dim(),
                        arg(q),
                        arg(k),
                        arg(v),
                        arg(slopes),
                        table.seq_starts.arg(),
                        table.sub_block_work.arg(),
                        arg(out),
                        h,
                        head_stride,
                        token_stride,
                        scale,
                        d,
                        e,
                        block,
                        cb,
                        plan.diag_key_chunk,
                        plan.diag_rows_per_unit,
                        plan.diag_cols_per_unit,
                        variant.reversed,
                    )
                },
                DiagRoutine::TensorCores {
                    value_tile,
                    fused_non_diag,
                } => {
                    // The per-block states as the state pass stored them.
                    macro_rules! diag_cmma {
                        ($states:ty) => {
                            unsafe {
                                kernels::diag_cmma::diag_cmma::launch_unchecked::<F, M, $states>(
                                    client,
                                    plan.diag.cube_count(),
                                    plan.diag.cube_dim(),
                                    CMMA_VECTOR,
                                    arg(q),
                                    arg(k),
                                    arg(v),
                                    arg(slopes),
                                    table.seq_starts.arg(),
                                    table.block_offsets.arg(),
                                    table.sub_block_work.arg(),
                                    states_arg(),
                                    arg(out),
                                    h,
                                    head_stride,
                                    token_stride,
                                    scale,
                                    d,
                                    e,
                                    block,
                                    cb,
                                    value_tile,
                                    plan.plane_size,
                                    fused_non_diag,
                                    variant.reversed,
                                    plan.products.split(),
                                )
                            }
                        };
                    }
                    if plan.chunk_state.is_some_and(|chunk| chunk.states_in_input_dtype) {
                        diag_cmma!(F)
                    } else {
                        diag_cmma!(f32)
                    }
                }
            };
            let fused = plan.diag_routine.fuses_non_diag();
            if !fused {
                hook(Stage::Diag, &diag);
            }
            if let Some(chunk) = &plan.chunk_state {
                hook(Stage::ChunkState, &|| self.launch_chunk_state::<F, M>(chunk));
            } else {
                let blocks = BlockRun {
                    block,
                    cubes: plan.kv_parallel.cubes.0,
                    work: &table.block_work,
                    offsets: &table.block_offsets,
                    states: self.workspace,
                    states_len: plan.block_states_len,
                };
                hook(Stage::KvParallel, &|| self.launch_kv_parallel::<F, M>(&blocks));
                hook(Stage::KvReduce, &|| self.launch_kv_reduce(&blocks));
            }
            if fused {
                hook(Stage::Diag, &diag);
            } else {
                hook(Stage::NonDiag, &|| unsafe {
                    kernels::non_diag::non_diag::launch_unchecked::<F>(
                        client,
                        plan.non_diag.cube_count(),
                        plan.non_diag.cube_dim(),
                        arg(q),
                        arg(slopes),
                        table.seq_starts.arg(),
                        table.block_offsets.arg(),
                        table.sub_block_work.arg(),
                        states_arg(),
                        arg(out),
                        h,
                        head_stride,
                        token_stride,
                        scale,
                        d,
                        e,
                        block,
                        cb,
                        plan.non_diag_key_chunk,
                        plan.non_diag_rows_per_unit,
                        plan.non_diag_cols_per_unit,
                        variant.reversed,
                    )
                });
            }
        }
        if plan.kv_snapshot.cubes.2 > 0 {
            hook(Stage::KvSnapshot, &|| unsafe {
                kernels::kv_snapshot::kv_snapshot::launch_unchecked::<F>(
                    client,
                    plan.kv_snapshot.cube_count(),
                    plan.kv_snapshot.cube_dim(),
                    arg(k),
                    arg(v),
                    arg(slopes),
                    table.seq_starts.arg(),
                    table.block_offsets.arg(),
                    table.snapshot_work.arg(),
                    states_arg(),
                    arg(self.states),
                    h,
                    head_stride,
                    token_stride,
                    d,
                    e,
                    block,
                )
            });
        }
        if let Some(decode) = self.decode {
            hook(Stage::Decode, &|| {
                launch_decode(
                    client,
                    decode,
                    [q, k, v, slopes],
                    &[(self.states, &table.decode_slots)],
                    &table.decode_tokens,
                    true,
                    out,
                    self.heads,
                    scale,
                    d,
                    e,
                )
            });
        }
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

impl CallLaunch<'_> {
    /// The per-block state workspace, as a kernel argument.
    pub(crate) fn block_states_arg(&self) -> BufferArg {
        // SAFETY: the workspace holds at least this many f32 (so as many of a
        // narrower type).
        unsafe { BufferArg::from_raw_parts(self.workspace.clone(), self.plan.block_states_len.max(1)) }
    }

    fn run_states(&self, run: &BlockRun) -> BufferArg {
        // SAFETY: the caller's buffer holds at least this many f32.
        unsafe { BufferArg::from_raw_parts(run.states.clone(), run.states_len.max(1)) }
    }

    /// kv-parallel over `run`: each block's decayed `K^T V` into its slot.
    /// Staged on tensor cores as `M` (split as the plan's products say).
    pub(crate) fn launch_kv_parallel<F: Float + CubeElement, M: Float + CubeElement>(&self, run: &BlockRun) {
        let plan = self.plan;
        let (client, table, variant) = (self.client, self.table, self.variant);
        let h = self.heads as u32;
        let (d, e) = (self.key_dim, self.value_dim);
        let (head_stride, token_stride) = (self.layout.head_stride, self.layout.token_stride);
        let dims = LaunchDims {
            cubes: (run.cubes, plan.kv_parallel.cubes.1, plan.kv_parallel.cubes.2),
            ..plan.kv_parallel
        };
        // SAFETY: the plan checked the tiles and the grid (no more cubes
        // along x than the call has blocks) against the device; every table
        // entry and buffer size was validated.
        match plan.kv_parallel_routine {
            KvParallelRoutine::Portable => unsafe {
                kernels::kv_parallel::kv_parallel::launch_unchecked::<F>(
                    client,
                    dims.cube_count(),
                    dims.cube_dim(),
                    arg(self.k),
                    arg(self.v),
                    arg(self.slopes),
                    table.seq_starts.arg(),
                    run.work.arg(),
                    self.run_states(run),
                    h,
                    head_stride,
                    token_stride,
                    d,
                    e,
                    run.block,
                    plan.kv_stage,
                    plan.kv_rows_per_unit,
                    plan.kv_cols_per_unit,
                    variant.reversed,
                )
            },
            KvParallelRoutine::TensorCores {
                stage,
                key_tile,
                value_tile,
            } => unsafe {
                kernels::kv_parallel_cmma::kv_parallel_cmma::launch_unchecked::<F, M>(
                    client,
                    dims.cube_count(),
                    dims.cube_dim(),
                    CMMA_VECTOR,
                    arg(self.k),
                    arg(self.v),
                    arg(self.slopes),
                    table.seq_starts.arg(),
                    run.work.arg(),
                    self.run_states(run),
                    h,
                    head_stride,
                    token_stride,
                    d,
                    e,
                    run.block,
                    stage,
                    key_tile,
                    value_tile,
                    plan.plane_size,
                    variant.reversed,
                    plan.products.split(),
                )
            },
        }
    }

    /// kv-reduce over `run`: each block's slot becomes its incoming state,
    /// and each sequence's final state goes to its slot of `states`.
    pub(crate) fn launch_kv_reduce(&self, run: &BlockRun) {
        let plan = self.plan;
        let (table, variant) = (self.table, self.variant);
        let initial = self.initial.unwrap_or(self.unused);
        // SAFETY: as for kv-parallel; kv-reduce's grid was planned per sequence.
        unsafe {
            kernels::kv_reduce::kv_reduce::launch_unchecked(
                self.client,
                plan.kv_reduce.cube_count(),
                plan.kv_reduce.cube_dim(),
                plan.kv_reduce_vector_size,
                arg(self.slopes),
                table.seq_starts.arg(),
                run.offsets.arg(),
                table.initial_slots.arg(),
                table.final_slots.arg(),
                table.reduce_work.arg(),
                arg(initial),
                self.run_states(run),
                arg(self.states),
                self.heads as u32,
                variant.initial_scale,
                variant.final_scale,
                self.key_dim,
                self.value_dim,
                run.block,
                self.initial.is_none(),
                variant.transpose_initial,
                variant.advance_initial,
                variant.retreat_final,
            )
        }
    }
}

/// Launches the decode kernel, once per part of the cache: `caches` pairs
/// each part `[slots, h, d, e]` with the slot of every entry in it (-1 padding,
/// written as zeros by exactly one part's launch; below -1, an entry another
/// part serves). With `indexed`, entry `b` is packed token `tokens[b]`;
/// without, rows are dense `[b, h, ...]` and `tokens` (bound, never read) may
/// be any buffer other than the slots: wgpu refuses one buffer bound twice in
/// a dispatch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_decode(
    client: &Client,
    plan: &DecodePlan,
    [q, k, v, slopes]: [&DeviceTensor; 4],
    caches: &[(&DeviceTensor, &IndexBuffer)],
    tokens: &IndexBuffer,
    indexed: bool,
    out: &DeviceTensor,
    heads: usize,
    scale: f32,
    key_dim: usize,
    value_dim: usize,
) {
    if widen::words(q.dtype, client) {
        // bf16 on a runtime without bf16: the f32 kernel on widened copies,
        // every part into one f32 output, rounded back once.
        let [q, k, v] = [q, k, v].map(|t| widen::widened(client, t));
        let wide_out = DeviceTensor::empty(client, &out.shape, DType::F32);
        launch_decode(
            client,
            plan,
            [&q, &k, &v, slopes],
            caches,
            tokens,
            indexed,
            &wide_out,
            heads,
            scale,
            key_dim,
            value_dim,
        );
        widen::narrow_into(client, &wide_out, out);
        return;
    }
    macro_rules! launch {
        ($f:ty, $cache:expr, $slots:expr) => {
            // SAFETY: shapes, slots, tokens and the grid were validated and planned.
            unsafe {
                kernels::decode::decode::launch_unchecked::<$f>(
                    client,
                    plan.dims.cube_count(),
                    plan.dims.cube_dim(),
                    plan.vector_size,
                    arg(q),
                    arg(k),
                    arg(v),
                    arg(slopes),
                    $slots.arg(),
                    tokens.arg(),
                    arg($cache),
                    arg(out),
                    heads as u32,
                    scale,
                    key_dim,
                    value_dim,
                    plan.column_tile,
                    plan.row_groups,
                    plan.rows_in_flight,
                    indexed,
                )
            }
        };
    }
    for &(cache, slots) in caches {
        // The kernel's element type is the dtype of q (validated equal to k, v, out).
        match q.dtype {
            DType::F32 => launch!(f32, cache, slots),
            DType::F16 => launch!(half::f16, cache, slots),
            DType::BF16 => launch!(half::bf16, cache, slots),
        }
    }
}
