//! The launches of one planned prefill call: the chosen routines over a table
//! of sequences, the snapshot kernel, and the decode kernel, in stream order.
//!
//! Dense prefill, packed (varlen) prefill, mixed batches and the serving
//! backend all end here; they differ only in the table, the layout strides and
//! where states live. Everything passed in was validated and planned against
//! the device before, which is what makes the `launch_unchecked` calls sound.

use std::cell::OnceCell;

use cubecl::prelude::*;

use super::plan::PrefillPlan;
use crate::routines::chunk_recurrent::launch::{self as chunk_state, segment_states_arg};
use crate::routines::common::{BlockRun, Call, Stage};
use crate::routines::decode::{DecodePlan, launch_decode};
use crate::routines::five_kernels::{diag, kv_parallel, kv_reduce, kv_snapshot, non_diag};
use crate::routines::fused::launch as fused;
use crate::routines::products::Products;
use crate::routines::widen;
use crate::{DType, DeviceTensor};

/// Everything one call launches with: the caller's tensors, sizes and
/// tables, the plan, and the decode launch of a mixed batch.
pub(crate) struct CallLaunch<'a> {
    /// What the entry point gives.
    pub call: Call<'a>,
    pub plan: &'a PrefillPlan,
    /// The decode launch, when the table routes sequences to it.
    pub decode: Option<&'a DecodePlan>,
    /// The cache the decode rows read and write where it is not
    /// `call.states`: a bf16 cache, whose prefill runs on an f32 scratch
    /// (`routines::state_scratch`).
    pub decode_cache: Option<&'a DeviceTensor>,
}

impl CallLaunch<'_> {
    /// Hands each launch to `hook`, in order, for the dtype of q.
    /// Operands are staged as the plan's [`Products`] say: bf16 parts for f32
    /// inputs on tensor cores, else the input dtype.
    pub fn run(&self, hook: &mut dyn FnMut(Stage, &dyn Fn())) {
        match self.call.q.dtype {
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
        let narrow = self.call;
        let target = narrow.target;
        let copy = |t: &DeviceTensor| target.empty_tensor(&t.shape, DType::F32);
        let (q, k, v, out) = (copy(narrow.q), copy(narrow.k), copy(narrow.v), copy(narrow.out));
        hook(Stage::Widen, &|| {
            for (narrow, wide) in [(narrow.q, &q), (narrow.k, &k), (narrow.v, &v)] {
                widen::widen_into(target, narrow, wide);
            }
        });
        CallLaunch {
            call: Call {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                ..narrow
            },
            ..*self
        }
        .run_f32(hook);
        hook(Stage::Widen, &|| widen::narrow_into(target, &out, narrow.out));
    }

    /// The launches for inputs of `F`, staged on tensor cores as `M`.
    fn run_typed<F: Float + CubeElement, M: Float + CubeElement>(
        &self,
        hook: &mut dyn FnMut(Stage, &dyn Fn()),
    ) {
        let (call, plan) = (&self.call, self.plan);
        let staging = plan.staging();
        // The fused routine's segment states, where kv-snapshot reads them.
        let segment_states = OnceCell::new();
        if let (Some(fused), true) = (&plan.fused, plan.total_blocks > 0) {
            hook(Stage::Fused, &|| {
                if let Some(states) =
                    fused::launch::<F>(call, &staging, fused, &plan.kv_parallel, &plan.kv_reduce)
                {
                    let _ = segment_states.set(states);
                }
            });
        } else if plan.total_blocks > 0 {
            let states_in_input_dtype = plan.chunk_state.is_some_and(|chunk| chunk.states_in_input_dtype);
            let diag = || diag::launch::<F, M>(call, &staging, &plan.diag, states_in_input_dtype);
            let fused = plan.diag.routine.fuses_non_diag();
            if !fused {
                hook(Stage::Diag, &diag);
            }
            if let Some(chunk) = &plan.chunk_state {
                hook(Stage::ChunkState, &|| {
                    chunk_state::launch::<F, M>(call, &staging, chunk, &plan.kv_parallel, &plan.kv_reduce)
                });
            } else {
                let blocks = BlockRun {
                    block: call.config.block,
                    cubes: plan.kv_parallel.dims.cubes.0,
                    work: &call.table.block_work,
                    offsets: &call.table.block_offsets,
                    states: call.workspace,
                    states_len: plan.block_states_len,
                };
                hook(Stage::KvParallel, &|| {
                    kv_parallel::launch::<F, M>(call, &staging, &plan.kv_parallel, &blocks)
                });
                hook(Stage::KvReduce, &|| {
                    kv_reduce::launch(call, &plan.kv_reduce, &blocks)
                });
            }
            if fused {
                hook(Stage::Diag, &diag);
            } else {
                hook(Stage::NonDiag, &|| {
                    non_diag::launch::<F>(call, &staging, &plan.non_diag)
                });
            }
        }
        if plan.kv_snapshot.cubes.2 > 0 {
            hook(Stage::KvSnapshot, &|| {
                kv_snapshot::launch::<F>(
                    call,
                    &staging,
                    &plan.kv_snapshot,
                    segment_states
                        .get()
                        .map(|states| segment_states_arg(call, states)),
                )
            });
        }
        if let Some(decode) = self.decode {
            hook(Stage::Decode, &|| {
                launch_decode(
                    call.target,
                    decode,
                    [call.q, call.k, call.v, call.slopes],
                    &[(self.decode_cache.unwrap_or(call.states), &call.table.decode_slots)],
                    &call.table.decode_tokens,
                    true,
                    call.out,
                    call.heads,
                    call.config.scale.unwrap_or(1.0),
                    call.key_dim,
                    call.value_dim,
                )
            });
        }
    }
}
