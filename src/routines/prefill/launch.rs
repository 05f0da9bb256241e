//! The launches of one planned prefill call: the chosen routines over a table
//! of sequences, the snapshot kernel, and the decode kernel, in stream order.
//!
//! Dense prefill, packed (varlen) prefill, mixed batches and the serving
//! backend all end here; they differ only in the table, the layout strides and
//! where states live. Everything passed in was validated and planned against
//! the device before, which is what makes the `launch_unchecked` calls sound.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::plan::PrefillPlan;
use crate::routines::chunk_recurrent::launch as chunk_state;
use crate::routines::common::{BlockRun, Call, Layout, Stage, Variant};
use crate::routines::decode::{DecodePlan, launch_decode};
use crate::routines::five_kernels::{diag, kv_parallel, kv_reduce, kv_snapshot, non_diag};
use crate::routines::products::Products;
use crate::routines::table::DeviceTable;
use crate::routines::widen;
use crate::{DType, DeviceTensor, PrefillConfig};

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

    /// What every family's launch takes: the call's tensors and sizes, and
    /// the plan's plane size and operand split.
    fn call(&self) -> Call<'_> {
        Call {
            client: self.client,
            q: self.q,
            k: self.k,
            v: self.v,
            slopes: self.slopes,
            out: self.out,
            heads: self.heads,
            key_dim: self.key_dim,
            value_dim: self.value_dim,
            config: self.config,
            layout: self.layout,
            table: self.table,
            initial: self.initial,
            states: self.states,
            workspace: self.workspace,
            block_states_len: self.plan.block_states_len,
            unused: self.unused,
            variant: self.variant,
            plane_size: self.plan.plane_size,
            split: self.plan.products.split(),
        }
    }

    /// The launches for inputs of `F`, staged on tensor cores as `M`.
    fn run_typed<F: Float + CubeElement, M: Float + CubeElement>(
        &self,
        hook: &mut dyn FnMut(Stage, &dyn Fn()),
    ) {
        let plan = self.plan;
        let call = self.call();
        if plan.total_blocks > 0 {
            let states_in_input_dtype = plan.chunk_state.is_some_and(|chunk| chunk.states_in_input_dtype);
            let diag = || diag::launch::<F, M>(&call, &plan.diag, states_in_input_dtype);
            let fused = plan.diag.routine.fuses_non_diag();
            if !fused {
                hook(Stage::Diag, &diag);
            }
            if let Some(chunk) = &plan.chunk_state {
                hook(Stage::ChunkState, &|| {
                    chunk_state::launch::<F, M>(&call, chunk, &plan.kv_parallel, &plan.kv_reduce)
                });
            } else {
                let blocks = BlockRun {
                    block: self.config.block,
                    cubes: plan.kv_parallel.dims.cubes.0,
                    work: &self.table.block_work,
                    offsets: &self.table.block_offsets,
                    states: self.workspace,
                    states_len: plan.block_states_len,
                };
                hook(Stage::KvParallel, &|| {
                    kv_parallel::launch::<F, M>(&call, &plan.kv_parallel, &blocks)
                });
                hook(Stage::KvReduce, &|| {
                    kv_reduce::launch(&call, &plan.kv_reduce, &blocks)
                });
            }
            if fused {
                hook(Stage::Diag, &diag);
            } else {
                hook(Stage::NonDiag, &|| non_diag::launch::<F>(&call, &plan.non_diag));
            }
        }
        if plan.kv_snapshot.cubes.2 > 0 {
            hook(Stage::KvSnapshot, &|| {
                kv_snapshot::launch::<F>(&call, &plan.kv_snapshot)
            });
        }
        if let Some(decode) = self.decode {
            hook(Stage::Decode, &|| {
                launch_decode(
                    self.client,
                    decode,
                    [self.q, self.k, self.v, self.slopes],
                    &[(self.states, &self.table.decode_slots)],
                    &self.table.decode_tokens,
                    true,
                    self.out,
                    self.heads,
                    self.config.scale.unwrap_or(1.0),
                    self.key_dim,
                    self.value_dim,
                )
            });
        }
    }
}
