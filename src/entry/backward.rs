//! The backward pass: gradients of a dense prefill with respect to q, k, v and
//! the initial state, given the gradients of its output and final state.
//!
//! With `a = exp(-s)`, scale `c`, states `S_t` and `G_t` the gradient reaching
//! `S_t` (`G_t = a G_{t+1} + c q_t^T do_t`, `G_n = dF + c q_n^T do_n`):
//! `dq_t = c do_t S_t^T`, `dk_t = v_t G_t^T`, `dv_t = k_t G_t` and
//! `d_initial = a G_1`. Each is a lightning-attention forward in its own right,
//! so the forward kernels compute them (no copies, no extra kernels):
//!
//! - dq: forward in time with q' = do, k' = v, v' = k, whose state is `S^T`
//!   (the initial state read transposed);
//! - dv: backward in time (`reversed` addressing) with q' = k, k' = q, v' = do,
//!   whose state is `G / c` once `dF / (c a)` is its initial state; its final
//!   state times `c a` is `d_initial`;
//! - dk: backward in time with q' = v, k' = do, v' = q, whose state is `G^T / c`.
//!
//! Each pass is diag (the intra-block part), kv-parallel, kv-reduce (for dv
//! and dk the reverse sweep over blocks that carries dKV) and non-diag.
//!
//! The dv and dk passes share their operands and their state (one is the
//! transpose of the other), so where diag runs its portable routine they run
//! as one pass: `kernels::backward_diag` writes the intra-block parts of both,
//! the dv pass's kv-parallel and kv-reduce carry `G`, and
//! `kernels::backward_non_diag` adds both gradients' parts from it (see
//! `routines::backward`). With the fused routine's tensor-core walk they run
//! as one reverse walk, `kernels::fused_key_value`, which carries `G` on the
//! chip and writes both (`PrefillPlan::for_key_value`; the dq pass is the
//! fused forward walk). Where diag runs on tensor cores, the two forward
//! passes run instead, each on the tensor-core routines.
//! Slopes are not differentiated: they are fixed per layer.

use std::sync::Arc;

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::Buffer;
use crate::device::target::LaunchTarget;
use crate::entry::fused_tune::{self, TunedCall};
use crate::entry::prefill::validate_prefill;
use crate::problem::shapes::{PrefillShape, check_tensor, expect_shape};
use crate::routines::backward::launch::BackwardLaunch;
use crate::routines::backward::plan::BackwardPlan;
use crate::routines::common::{Call, Layout, Stage, Variant};
use crate::routines::dense_tables::{DenseShape, dense_device_table};
use crate::routines::five_kernels::diag::DiagRoutine;
use crate::routines::fused::launch as fused_launch;
use crate::routines::fused::variants::FusedVariant;
use crate::routines::prefill::launch::CallLaunch;
use crate::routines::prefill::plan::{PrefillPlan, copies_precision, widens};
use crate::routines::table::PrefillWork;
use crate::routines::table::{ChunkWalk, DeviceTable, SequenceTable};
use crate::routines::widen;
use crate::{DType, DeviceTensor, FusedChoice, LightningError, PrefillConfig, Result, Routines};

/// The arguments of a backward pass: the forward's inputs and the upstream gradients.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a> {
    /// Queries `[b, h, n, d]`.
    pub q: &'a DeviceTensor,
    /// Keys `[b, h, n, d]`.
    pub k: &'a DeviceTensor,
    /// Values `[b, h, n, e]`.
    pub v: &'a DeviceTensor,
    /// One slope per head, `[h]` f32.
    pub slopes: &'a DeviceTensor,
    /// The forward's initial state `[b, h, d, e]` f32; `None` for zeros.
    pub initial_state: Option<&'a DeviceTensor>,
    /// Gradient of the output `[b, h, n, e]`, dtype of q.
    pub d_out: &'a DeviceTensor,
    /// Gradient of the final state `[b, h, d, e]` f32; `None` for zeros.
    pub d_final_state: Option<&'a DeviceTensor>,
}

/// What a backward pass returns.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// `[b, h, n, d]`, dtype of q.
    pub dq: DeviceTensor,
    /// `[b, h, n, d]`, dtype of q.
    pub dk: DeviceTensor,
    /// `[b, h, n, e]`, dtype of q.
    pub dv: DeviceTensor,
    /// Gradient of the initial state `[b, h, d, e]` f32 (defined whether or not
    /// the forward had one).
    pub d_initial_state: DeviceTensor,
}

/// Checks the upstream gradients against the forward's shape: `d_out` like
/// the output (dtype of q), `d_final_state` like the final state (f32).
pub(crate) fn check_upstream(inputs: &BackwardInputs, shape: &PrefillShape) -> Result<()> {
    const OUT: &str = "[b, h, n, e]";
    check_tensor(
        inputs.d_out,
        "d_out",
        &["b", "h", "n", "e"],
        OUT,
        Some(shape.dtype),
    )?;
    expect_shape(inputs.d_out, "d_out", &shape.out_shape(), OUT)?;
    if let Some(d_final) = inputs.d_final_state {
        const STATE: &str = "[b, h, d, e]";
        check_tensor(
            d_final,
            "d_final_state",
            &["b", "h", "d", "e"],
            STATE,
            Some(DType::F32),
        )?;
        expect_shape(d_final, "d_final_state", &shape.state_shape(), STATE)?;
    }
    Ok(())
}

/// The backward passes divide the final state's gradient by the scale: it
/// must not be zero.
pub(crate) fn check_scale(config: &PrefillConfig) -> Result<()> {
    let scale = config.scale.unwrap_or(1.0);
    if scale == 0.0 {
        return Err(LightningError::UnsupportedScale {
            scale: scale.to_string(),
            reason: "the backward pass divides the final-state gradient by the scale; use a nonzero scale",
        });
    }
    Ok(())
}

/// Runs the backward pass of a prefill run with `config` (its blocks and
/// scale). Returns [`LightningError::OutOfMemory`], having allocated
/// nothing, where the device cannot hold the gradients and the passes'
/// buffers (see [`crate::memory`]).
///
/// With the fused routine and [`FusedChoice::Tuned`] (its default), the
/// variant of its walks (chunk, stages, segments; the dq walk's value tile)
/// is the autotuner's: on the first call of a shape bucket it times every
/// variant that applies, as the fused prefill does, in buckets of its own.
pub fn backward(client: &Client, inputs: &BackwardInputs, config: &PrefillConfig) -> Result<Gradients> {
    let config = match tuned_variant(client, inputs, config, true)? {
        Some(variant) => variant.apply(config),
        None => *config,
    };
    backward_on(LaunchTarget::Device(client), inputs, &config)
}

/// The variant of the fused routine's walks the autotuner settled on for
/// backward passes like this one on `client`'s device (see [`backward`]):
/// `None` before the first call of its shape bucket in this process, or
/// where nothing is tuned (another routine, the fixed rule, or one variant
/// that applies).
pub fn tuned_backward_variant(
    client: &Client,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
) -> Result<Option<FusedVariant>> {
    tuned_variant(client, inputs, config, false)
}

/// The tuned variant of a validated backward of `inputs` where `config`
/// leaves the fused walks to the autotuner and more than one variant
/// applies: the one settled for its bucket, or, with `tune`, on a new
/// bucket the fastest after timing each (every variant runs the whole
/// backward; their gradients are dropped, the caller runs the winner).
fn tuned_variant(
    client: &Client,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
    tune: bool,
) -> Result<Option<FusedVariant>> {
    if config.routines != Routines::Fused || config.tuning.fused_choice != FusedChoice::Tuned {
        return Ok(None);
    }
    plan_backward(client, inputs, config)?;
    let shape = validate_prefill(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.initial_state)?;
    let work_for = |config: &PrefillConfig| PrefillWork::dense(&shape, config);
    let with_state = inputs.initial_state.is_some();
    let settled = fused_tune::settled(client, TunedCall::Backward, &work_for, config, with_state);
    if settled.is_some() || !tune {
        return Ok(settled);
    }
    // What the tuner keeps: owned handles of the call's tensors.
    let owned = |t: &DeviceTensor| t.clone();
    let (client_owned, q, k, v, slopes, d_out) = (
        client.clone(),
        owned(inputs.q),
        owned(inputs.k),
        owned(inputs.v),
        owned(inputs.slopes),
        owned(inputs.d_out),
    );
    let (initial, d_final) = (inputs.initial_state.cloned(), inputs.d_final_state.cloned());
    let launch: fused_tune::Launch = Arc::new(move |config: &PrefillConfig| {
        let inputs = BackwardInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &slopes,
            initial_state: initial.as_ref(),
            d_out: &d_out,
            d_final_state: d_final.as_ref(),
        };
        backward_on(LaunchTarget::Device(&client_owned), &inputs, config).map(|_| ())
    });
    Ok(fused_tune::launch_tuned(
        client,
        TunedCall::Backward,
        &work_for,
        config,
        with_state,
        launch,
    ))
}

/// The plans of the passes a [`backward`] of `inputs` with `config` runs on
/// `client`'s device, validated as it validates them (of the f32 copies
/// where 16-bit inputs run widened): the dv pass's, whose fused walk is the
/// dk and dv walk where one reverse walk gives both gradients
/// ([`crate::plan::FragmentWalk::key_value`]), and the dq and dk passes'
/// (`d` and `e` swapped). For callers that check which routines run.
pub fn plan_backward(
    client: &Client,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
) -> Result<[PrefillPlan; 2]> {
    config.validate()?;
    let shape = validate_prefill(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.initial_state)?;
    check_upstream(inputs, &shape)?;
    shape.dtype.check_supported(client.properties(), client.name())?;
    check_scale(config)?;
    let limits = DeviceLimits::of(client);
    let (shape, config) = if widens(shape.dtype, config, &limits) {
        let wide = PrefillShape {
            dtype: DType::F32,
            ..shape
        };
        (wide, config.with_precision(copies_precision(shape.dtype)))
    } else {
        (shape, *config)
    };
    let (_, plan, swapped_plan) = plan_passes(&shape, &config, &limits)?;
    Ok([plan, swapped_plan])
}

/// [`backward`] on `target`'s device.
pub(crate) fn backward_on(
    target: LaunchTarget,
    inputs: &BackwardInputs,
    config: &PrefillConfig,
) -> Result<Gradients> {
    config.validate()?;
    let shape = validate_prefill(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.initial_state)?;
    check_upstream(inputs, &shape)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    check_scale(config)?;
    let limits = DeviceLimits::of_target(target);
    if widens(shape.dtype, config, &limits) {
        return backward_widened(target, inputs, &shape, config, &limits);
    }
    let (swapped, plan, swapped_plan) = plan_passes(&shape, config, &limits)?;
    let key_value = key_value_plan(&plan, shape.key_dim, shape.value_dim, &limits)?;
    target.check_memory(&gradient_buffers(&shape, config, &plan, &swapped_plan))?;

    let grads = Gradients {
        dq: target.empty_tensor(&inputs.q.shape, shape.dtype),
        dk: target.empty_tensor(&inputs.k.shape, shape.dtype),
        dv: target.empty_tensor(&inputs.v.shape, shape.dtype),
        d_initial_state: target.empty_tensor(&shape.state_shape(), DType::F32),
    };
    // The transposed final states of the dq and dk passes are not wanted.
    let scratch = target.empty_tensor(&swapped.state_shape(), DType::F32);
    let (b, n) = (shape.batch, shape.seq_len);
    run_passes(
        &Passes {
            target,
            config,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            layout: Layout::dense(n),
            // Every row of a dense batch is written, wanted or not. Its lists
            // are the ones the device keeps for the shape
            // (`routines::dense_tables`, as the forward binds them): uploading
            // two or three tables per backward was host work inside every call
            // (the forward's one took 0.09-0.11 ms per call on an H100).
            table: &|has_initial, _, walk| {
                let dense = DenseShape {
                    batch: b,
                    seq_len: n,
                    with_initial: has_initial,
                    block: config.block,
                    sub_block: config.sub_block,
                    walk,
                };
                dense_device_table(target, &SequenceTable::dense(b, n, has_initial, config), dense)
            },
            plans: [&plan, &swapped_plan],
            key_value: key_value.as_ref(),
        },
        &PassInputs {
            q: inputs.q,
            k: inputs.k,
            v: inputs.v,
            slopes: inputs.slopes,
            d_out: inputs.d_out,
            initial: inputs.initial_state,
            d_final: inputs.d_final_state,
        },
        [&grads.dq, &grads.dk, &grads.dv],
        (Some(&grads.d_initial_state), &scratch),
    );
    Ok(grads)
}

/// The backward kernels of dk and dv where diag runs its portable routine
/// (one reverse sweep gives both): they need the five kernels' stages (the
/// backward kernels take diag's and non-diag's place); the fused routine has
/// none, and tensor-core diag has its own, so those passes run as forward
/// passes, three of them (`None`).
pub(crate) fn key_value_plan(
    plan: &PrefillPlan,
    key_dim: usize,
    value_dim: usize,
    limits: &DeviceLimits,
) -> Result<Option<BackwardPlan>> {
    match plan.diag.routine {
        DiagRoutine::Portable if plan.fused.is_none() => {
            Ok(Some(BackwardPlan::new(plan, key_dim, value_dim, limits)?))
        }
        DiagRoutine::Portable | DiagRoutine::TensorCores { .. } => Ok(None),
    }
}

/// What the passes of a backward share, dense or packed: the sizes, how rows
/// step, the sequence tables and the plans.
pub(crate) struct Passes<'a> {
    pub target: LaunchTarget<'a>,
    pub config: &'a PrefillConfig,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub layout: Layout,
    /// The table on the device of a pass that reads initial states (first
    /// flag) and writes its final states (second flag; a table may write
    /// them anyway), with the runs of the pass's walk.
    pub table: &'a dyn Fn(bool, bool, Option<ChunkWalk>) -> DeviceTable,
    /// The plan of the forward's shape and of the shape with `d` and `e` swapped.
    pub plans: [&'a PrefillPlan; 2],
    /// The backward kernels of dk and dv, where they run ([`key_value_plan`]).
    pub key_value: Option<&'a BackwardPlan>,
}

/// The tensors the passes read, validated against [`Passes`].
pub(crate) struct PassInputs<'a> {
    pub q: &'a DeviceTensor,
    pub k: &'a DeviceTensor,
    pub v: &'a DeviceTensor,
    pub slopes: &'a DeviceTensor,
    pub d_out: &'a DeviceTensor,
    /// The forward's initial states (rows of its table).
    pub initial: Option<&'a DeviceTensor>,
    /// The gradients of its final states.
    pub d_final: Option<&'a DeviceTensor>,
}

/// Runs the passes of a backward (see the module doc) into dq, dk and dv,
/// and the initial states' gradient into `d_initial` where it is wanted;
/// `scratch` receives the dq and dk passes' final states where their table
/// writes them (else it may be any binding).
pub(crate) fn run_passes(
    passes: &Passes,
    inputs: &PassInputs,
    [dq, dk, dv]: [&DeviceTensor; 3],
    (d_initial, scratch): (Option<&DeviceTensor>, &DeviceTensor),
) {
    let Passes {
        target,
        config,
        heads,
        key_dim: d,
        value_dim: e,
        layout,
        ..
    } = *passes;
    let scale = config.scale.unwrap_or(1.0);
    let unused = crate::device::tensor::unused_binding(target);
    let pass = |[q, k, v, out]: [&DeviceTensor; 4],
                swap: bool,
                (initial, states): (Option<&DeviceTensor>, Option<&DeviceTensor>),
                variant: Variant,
                key_value: KeyValue| {
        let (pass_plan, (key_dim, value_dim)) = if swap {
            (passes.plans[1], (e, d))
        } else {
            (passes.plans[0], (d, e))
        };
        let table = (passes.table)(initial.is_some(), states.is_some(), pass_plan.chunk_walk());
        let workspace = target.empty(pass_plan.block_states_len.max(1) * 4);
        let call = CallLaunch {
            call: Call {
                target,
                q,
                k,
                v,
                slopes: inputs.slopes,
                out,
                heads,
                key_dim,
                value_dim,
                config,
                layout,
                table: &table,
                initial,
                states: states.unwrap_or(scratch),
                workspace: &workspace,
                unused: &unused,
                variant,
            },
            plan: pass_plan,
            decode: None,
            decode_cache: None,
        };
        let key_value_plan = match key_value {
            KeyValue::Separate => {
                call.run(&mut |_, launch| launch());
                return;
            }
            KeyValue::Walk => {
                // The dv pass's walk gives way to the dk and dv walk.
                let fused = pass_plan.fused.as_ref().expect("the dk and dv walk is planned");
                call.run(&mut |stage, launch| match stage {
                    Stage::Fused => fused_launch::launch_key_value(
                        &call.call,
                        &pass_plan.staging(),
                        fused,
                        &pass_plan.kv_parallel,
                        &pass_plan.kv_reduce,
                        [inputs.v, dk],
                    ),
                    _ => launch(),
                });
                return;
            }
            KeyValue::Kernels(plan) => plan,
        };
        let kernels = BackwardLaunch {
            target,
            plan: key_value_plan,
            pass: pass_plan,
            table: &table,
            q: inputs.q,
            k: inputs.k,
            v: inputs.v,
            d_out: inputs.d_out,
            slopes: inputs.slopes,
            dk,
            dv,
            block_states: &workspace,
            heads,
            key_dim: d,
            value_dim: e,
            strides: (layout.head_stride, layout.token_stride),
            config,
        };
        // The pass's kv-parallel and kv-reduce are the reverse sweep; its diag
        // and non-diag give way to the backward kernels, which write dk too.
        call.run(&mut |stage, launch| match stage {
            Stage::Diag => kernels.diag(),
            Stage::NonDiag => kernels.non_diag(),
            _ => launch(),
        });
    };
    // dq = c do S^T: forward in time, state S^T from the initial state transposed.
    pass(
        [inputs.d_out, inputs.v, inputs.k, dq],
        true,
        (inputs.initial, None),
        Variant {
            transpose_initial: true,
            ..Variant::FORWARD
        },
        KeyValue::Separate,
    );
    // dv = k G, backwards in time; its final state gives d_initial = a G_1.
    let reverse = Variant {
        reversed: true,
        initial_scale: 1.0 / scale,
        advance_initial: true,
        ..Variant::FORWARD
    };
    let dv_variant = Variant {
        final_scale: scale,
        retreat_final: true,
        ..reverse
    };
    let dv_operands = [inputs.k, inputs.q, inputs.d_out, dv];
    let together = match passes.key_value {
        // dv and dk together from the one reverse sweep.
        Some(plan) => Some(KeyValue::Kernels(plan)),
        // dv and dk together from the one reverse walk.
        None if passes.plans[0].walks_key_value() => Some(KeyValue::Walk),
        None => None,
    };
    if let Some(key_value) = together {
        pass(
            dv_operands,
            false,
            (inputs.d_final, d_initial),
            dv_variant,
            key_value,
        );
        return;
    }
    pass(
        dv_operands,
        false,
        (inputs.d_final, d_initial),
        dv_variant,
        KeyValue::Separate,
    );
    // dk = v G^T, backwards in time, from dF transposed.
    pass(
        [inputs.v, inputs.d_out, inputs.q, dk],
        true,
        (inputs.d_final, None),
        Variant {
            transpose_initial: true,
            ..reverse
        },
        KeyValue::Separate,
    );
}

/// How a pass of [`run_passes`] gives dk beside its own gradient.
#[derive(Clone, Copy)]
enum KeyValue<'a> {
    /// It does not: the pass runs as a forward pass.
    Separate,
    /// The dv pass's diag and non-diag give way to the backward kernels of dk
    /// and dv ([`key_value_plan`]).
    Kernels(&'a BackwardPlan),
    /// The dv pass's fused walk gives way to the dk and dv walk
    /// (`PrefillPlan::for_key_value`).
    Walk,
}

/// The plans of a backward pass's forward passes: the shape with `d` and
/// `e` swapped (dq's and dk's passes: their state is `d`-wide values of `e`
/// keys), the plan of `shape` and that of the swapped shape.
fn plan_passes(
    shape: &PrefillShape,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<(PrefillShape, PrefillPlan, PrefillPlan)> {
    let swapped = PrefillShape {
        key_dim: shape.value_dim,
        value_dim: shape.key_dim,
        ..*shape
    };
    let [plan, swapped_plan] = plan_work(&PrefillWork::dense(shape, config), config, limits)?;
    Ok((swapped, plan, swapped_plan))
}

/// The plans of the passes of a backward of `work`: as it is (the dv pass,
/// the dk and dv walk where it applies: `PrefillPlan::for_key_value`) and
/// with `d` and `e` swapped (the dq and dk passes).
pub(crate) fn plan_work(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<[PrefillPlan; 2]> {
    let swapped = PrefillWork {
        key_dim: work.value_dim,
        value_dim: work.key_dim,
        ..*work
    };
    Ok([
        PrefillPlan::new(work, config, limits)?.for_key_value(work, config, limits),
        PrefillPlan::new(&swapped, config, limits)?,
    ])
}

/// What a backward pass on inputs of `shape` allocates, in order: the four
/// gradients, the scratch final state of the dq and dk passes, and one
/// pass's work lists and workspace (the larger plan's: the passes run one
/// after another, each freeing its own).
fn gradient_buffers(
    shape: &PrefillShape,
    config: &PrefillConfig,
    plan: &PrefillPlan,
    swapped_plan: &PrefillPlan,
) -> Vec<Buffer> {
    let (b, h, n, d, e) = (
        shape.batch,
        shape.heads,
        shape.seq_len,
        shape.key_dim,
        shape.value_dim,
    );
    let mut buffers = vec![
        Buffer::tensor("dq [b, h, n, d]", &[b, h, n, d], shape.dtype),
        Buffer::tensor("dk [b, h, n, d]", &[b, h, n, d], shape.dtype),
        Buffer::tensor("dv [b, h, n, e]", &[b, h, n, e], shape.dtype),
        Buffer::tensor("d_initial_state [b, h, d, e] f32", &[b, h, d, e], DType::F32),
        Buffer::tensor("scratch final state [b, h, e, d] f32", &[b, h, e, d], DType::F32),
    ];
    // The work lists do not depend on whether a pass has an initial state.
    let table = SequenceTable::dense(b, n, false, config);
    buffers.extend(larger_pass_buffers([plan, swapped_plan], &table, [h, d, e]));
    buffers
}

/// The buffers one pass of a backward over `table` allocates (work lists,
/// workspace), for the larger of the two plans (`plans[0]` the forward's
/// `[h, d, e]`, `plans[1]` with `d` and `e` swapped): the passes run one after
/// another, each freeing its own.
pub(crate) fn larger_pass_buffers(
    [plan, swapped_plan]: [&PrefillPlan; 2],
    table: &SequenceTable,
    [h, d, e]: [usize; 3],
) -> Vec<Buffer> {
    let total = |buffers: &[Buffer]| buffers.iter().map(|buffer| buffer.bytes).sum::<u64>();
    let pass = crate::routines::prefill::buffers::launch_buffers(plan, table, [h, d, e], &[]);
    let swapped_pass = crate::routines::prefill::buffers::launch_buffers(swapped_plan, table, [h, e, d], &[]);
    if total(&pass) >= total(&swapped_pass) {
        pass
    } else {
        swapped_pass
    }
}

/// 16-bit inputs on f32 copies (see `crate::widen`): the f32 backward on
/// widened copies of q, k, v and d_out, its gradients rounded back to the
/// input dtype.
fn backward_widened(
    target: LaunchTarget,
    inputs: &BackwardInputs,
    shape: &PrefillShape,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Result<Gradients> {
    let elements = [
        ("f32 copy of q", inputs.q),
        ("f32 copy of k", inputs.k),
        ("f32 copy of v", inputs.v),
        ("f32 copy of d_out", inputs.d_out),
    ]
    .map(|(name, t)| (name, t.num_elements()));
    let dtype = inputs.q.dtype;
    widen::check_copies(limits, dtype, config, &elements)?;
    // Everything the call allocates, checked before the copies are: the
    // copies, the f32 backward on them, the gradients rounded back.
    let wide_config = config.with_precision(copies_precision(dtype));
    let wide_shape = PrefillShape {
        dtype: DType::F32,
        ..*shape
    };
    let (_, plan, swapped_plan) = plan_passes(&wide_shape, &wide_config, limits)?;
    let mut buffers: Vec<Buffer> = elements
        .iter()
        .map(|&(name, elements)| Buffer::elements(name, elements, DType::F32))
        .collect();
    buffers.extend(gradient_buffers(&wide_shape, &wide_config, &plan, &swapped_plan));
    buffers.extend([
        Buffer::elements("dq rounded back", inputs.q.num_elements(), dtype),
        Buffer::elements("dk rounded back", inputs.k.num_elements(), dtype),
        Buffer::elements("dv rounded back", inputs.v.num_elements(), dtype),
    ]);
    target.check_memory(&buffers)?;
    let [q, k, v, d_out] = [inputs.q, inputs.k, inputs.v, inputs.d_out].map(|t| widen::widened(target, t));
    let wide = backward_on(
        target,
        &BackwardInputs {
            q: &q,
            k: &k,
            v: &v,
            d_out: &d_out,
            ..*inputs
        },
        &wide_config,
    )?;
    let narrowed = |g: &DeviceTensor| {
        let t = target.empty_tensor(&g.shape, dtype);
        widen::narrow_into(target, g, &t);
        t
    };
    Ok(Gradients {
        dq: narrowed(&wide.dq),
        dk: narrowed(&wide.dk),
        dv: narrowed(&wide.dv),
        d_initial_state: wide.d_initial_state,
    })
}
