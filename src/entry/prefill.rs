//! The prefill host API: validate, plan, then launch diag, kv-parallel, kv-reduce and non-diag.

use std::sync::Arc;
use std::time::Duration;

use cubecl::prelude::*;

use crate::device::limits::DeviceLimits;
use crate::device::memory::fits_one_buffer;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::entry::fused_tune;
use crate::problem::shapes::{
    PrefillShape, TensorShape, check_tensor, expect_shape, prefill_args, validate_prefill_shapes,
};
use crate::routines::common::{Call, Layout, Stage, Variant};
use crate::routines::dense_tables::{DenseShape, dense_device_table};
use crate::routines::fused::variants::FusedVariant;
use crate::routines::prefill::launch::CallLaunch;
use crate::routines::prefill::plan::PrefillPlan;
use crate::routines::table::PrefillWork;
use crate::routines::table::SequenceTable;
use crate::routines::widen;
use crate::{
    DType, DeviceTensor, FusedChoice, LightningError, PrefillConfig, Result, Routines, check_finite,
};

/// The arguments of a prefill.
#[derive(Clone, Copy, Debug)]
pub struct PrefillInputs<'a> {
    /// Queries `[b, h, n, d]`.
    pub q: &'a DeviceTensor,
    /// Keys `[b, h, n, d]`, same dtype as q.
    pub k: &'a DeviceTensor,
    /// Values `[b, h, n, e]`, same dtype as q.
    pub v: &'a DeviceTensor,
    /// One slope per head, `[h]` f32 (see [`crate::slopes`]).
    pub slopes: &'a DeviceTensor,
    /// The state before the first token, `[b, h, d, e]` f32; `None` for zeros.
    pub initial_state: Option<&'a DeviceTensor>,
}

/// What a prefill returns.
#[derive(Clone, Debug)]
pub struct PrefillOutput {
    /// `[b, h, n, e]`, dtype of q.
    pub out: DeviceTensor,
    /// The state after the last token, `[b, h, d, e]` f32.
    pub final_state: DeviceTensor,
}

/// Validates the whole problem and plans its launches without launching anything.
pub fn plan_prefill(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> Result<(PrefillShape, PrefillPlan)> {
    plan_on(LaunchTarget::Device(client), inputs, config)
}

/// [`plan_prefill`] on `target`'s device.
pub(crate) fn plan_on(
    target: LaunchTarget,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> Result<(PrefillShape, PrefillPlan)> {
    config.validate()?;
    let shape = validate_prefill(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.initial_state)?;
    shape
        .dtype
        .check_supported(target.properties(), target.runtime_name())?;
    let limits = DeviceLimits::of_target(target);
    widen::check_copies(&limits, shape.dtype, config, &copies(inputs)[..3])?;
    let plan = PrefillPlan::new(&PrefillWork::dense(&shape, config), config, &limits)?;
    Ok((shape, plan))
}

/// The f32 copies a widened call makes (see `routines::widen`): the name and
/// elements of q, k, v and out (as many as v: `e` per row).
fn copies(inputs: &PrefillInputs) -> [(&'static str, usize); 4] {
    crate::device::memory::f32_copies(
        [inputs.q, inputs.k, inputs.v, inputs.v].map(DeviceTensor::num_elements),
    )
}

/// Runs the prefill, allocating the output and the final state. Returns
/// [`LightningError::OutOfMemory`], having allocated nothing, where the
/// device cannot hold the call's buffers (see [`crate::memory`]).
///
/// # Non-finite results
///
/// The kernels compute in f32 and round the output to the dtype of q on
/// store, as IEEE 754 says: an f16 output past ±65504 comes back as ±inf (NaN
/// where inf - inf meets), in an `Ok` result; so do NaN or inf inputs
/// propagate. (MiniMax's last layers decay weakly, so over thousands of tokens
/// f16 inputs of magnitude 10 overflow.) Where f16 runs on tensor cores
/// (CUDA), the products and per-block states inside are f16 too, so outputs
/// near the range can overflow before the exact result does (measured on the
/// H200: an output of 47229 came back inf); the portable routines compute in
/// f32 inside. The final state is f32 and overflows only past f32's range.
/// With [`PrefillConfig::check_finite`] the call checks `out` and then
/// `final_state` and returns [`LightningError::NonFinite`] naming the first
/// that holds a non-finite value.
pub fn prefill(client: &Client, inputs: &PrefillInputs, config: &PrefillConfig) -> Result<PrefillOutput> {
    let (shape, plan) = plan_prefill(client, inputs, config)?;
    let table = dense_table(&shape, inputs, config);
    let mut buffers = vec![
        Buffer::tensor("out [b, h, n, e]", &shape.out_shape(), shape.dtype),
        Buffer::tensor("final_state [b, h, d, e] f32", &shape.state_shape(), DType::F32),
    ];
    buffers.extend(launch_buffers(&shape, &plan, &table, inputs));
    DeviceMemory::of(client).check(&buffers)?;
    let out = DeviceTensor::empty(client, &shape.out_shape(), shape.dtype);
    let final_state = DeviceTensor::empty(client, &shape.state_shape(), DType::F32);
    if tuned(client, inputs, config, &out, &final_state)?.is_some() {
        check_outputs(client, config, &out, &final_state)?;
        return Ok(PrefillOutput { out, final_state });
    }
    launch_checked(
        LaunchTarget::Device(client),
        inputs,
        config,
        (shape, plan),
        &table,
        &out,
        &final_state,
        &mut |_, launch| launch(),
    );
    check_outputs(client, config, &out, &final_state)?;
    Ok(PrefillOutput { out, final_state })
}

/// The work lists of a dense prefill.
pub(crate) fn dense_table(
    shape: &PrefillShape,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> SequenceTable {
    SequenceTable::dense(shape.batch, shape.seq_len, inputs.initial_state.is_some(), config)
}

/// What a dense prefill allocates around the caller's tensors.
fn launch_buffers(
    shape: &PrefillShape,
    plan: &PrefillPlan,
    table: &SequenceTable,
    inputs: &PrefillInputs,
) -> Vec<Buffer> {
    crate::routines::prefill::buffers::launch_buffers(
        plan,
        table,
        [shape.heads, shape.key_dim, shape.value_dim],
        &copies(inputs),
    )
}

/// Runs the prefill into caller-owned `out` `[b, h, n, e]` (dtype of q) and
/// `final_state` `[b, h, d, e]` f32. Every element of both is written.
/// The call's own buffers (workspace, work lists, f32 copies) are checked
/// against the device's memory first, as in [`prefill`].
///
/// Non-finite results: as [`prefill`].
pub fn prefill_into(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
) -> Result<()> {
    if tuned(client, inputs, config, out, final_state)?.is_some() {
        return check_outputs(client, config, out, final_state);
    }
    run_stages(client, inputs, config, out, final_state, &mut |_, launch| {
        launch()
    })
}

/// Where `config` leaves the fused routine's tensor-core walk to the
/// autotuner ([`FusedChoice::Tuned`]) and more than one variant applies:
/// validates the call and its outputs, runs the fastest variant into `out`
/// and `final_state` (timing every one first on a new shape bucket) and
/// returns it. Else `None`, having launched nothing. The finite check is
/// left to the caller.
fn tuned(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
) -> Result<Option<FusedVariant>> {
    if config.routines != Routines::Fused || config.tuning.fused_choice != FusedChoice::Tuned {
        return Ok(None);
    }
    let (shape, _) = plan_prefill(client, inputs, config)?;
    check_output_tensors(&shape, out, final_state)?;
    // What the tuner keeps: owned handles of the call's tensors.
    let (client_owned, out, final_state) = (client.clone(), out.clone(), final_state.clone());
    let (q, k, v, slopes) = (
        inputs.q.clone(),
        inputs.k.clone(),
        inputs.v.clone(),
        inputs.slopes.clone(),
    );
    let initial_state = inputs.initial_state.cloned();
    let launch: fused_tune::Launch = Arc::new(move |config: &PrefillConfig| {
        let inputs = PrefillInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &slopes,
            initial_state: initial_state.as_ref(),
        };
        prefill_into(&client_owned, &inputs, config, &out, &final_state)
    });
    let work_for = |config: &PrefillConfig| PrefillWork::dense(&shape, config);
    Ok(fused_tune::launch_tuned(
        client,
        fused_tune::TunedCall::Prefill,
        &work_for,
        config,
        inputs.initial_state.is_some(),
        launch,
    ))
}

/// The variant of the fused routine's tensor-core walk the autotuner
/// settled on for calls like this one on `client`'s device (see
/// [`FusedChoice::Tuned`]): `None` before the first call of its shape
/// bucket in this process (unless the on-disk cache of the `autotune-cache`
/// feature holds it and a call has read it back), or where nothing is tuned
/// (another routine, the fixed rule, or one variant that applies).
pub fn tuned_fused_variant(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
) -> Result<Option<FusedVariant>> {
    let (shape, _) = plan_prefill(client, inputs, config)?;
    let work_for = |config: &PrefillConfig| PrefillWork::dense(&shape, config);
    Ok(fused_tune::settled(
        client,
        fused_tune::TunedCall::Prefill,
        &work_for,
        config,
        inputs.initial_state.is_some(),
    ))
}

/// Device time of each prefill kernel, as measured by [`profile_prefill_into`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// diag: the intra-block causal part (with non-diag's part where the
    /// tensor-core routine fuses it, see [`crate::routines::five_kernels::diag::DiagRoutine`]).
    pub diag: Duration,
    /// kv-parallel: each block's decayed `K^T V`.
    pub kv_parallel: Duration,
    /// kv-reduce: the prefix over blocks.
    pub kv_reduce: Duration,
    /// non-diag: queries against the incoming states; zero where diag fused it.
    pub non_diag: Duration,
    /// The chunk-recurrent state pass; zero where kv-parallel and kv-reduce
    /// ran instead (and they are zero where it ran).
    pub chunk_state: Duration,
    /// The fused routine ([`crate::Routines::Fused`]), the whole prefill;
    /// every stage above is zero where it ran.
    pub fused: Duration,
    /// 16-bit inputs on f32 copies (bf16 without a bf16 type, or portable
    /// products): widening q, k, v and rounding the output back; zero elsewhere.
    pub widening: Duration,
}

impl StageTimes {
    /// The stages together.
    pub fn total(&self) -> Duration {
        self.diag
            + self.kv_parallel
            + self.kv_reduce
            + self.non_diag
            + self.chunk_state
            + self.fused
            + self.widening
    }
}

/// [`prefill_into`] with each kernel timed on the device on its own (for
/// benchmarks: it waits for each stage, so it is slower than a plain call).
pub fn profile_prefill_into(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
) -> Result<StageTimes> {
    // The tuned variant, timed alone: the one already kept for the bucket,
    // else tuned now (which runs it once more, untimed).
    let kept = match tuned_fused_variant(client, inputs, config)? {
        Some(variant) => Some(variant),
        None => tuned(client, inputs, config, out, final_state)?,
    };
    let config = &kept.map_or(*config, |variant| variant.apply(config));
    let mut times = StageTimes::default();
    let mut failure = None;
    run_stages(
        client,
        inputs,
        config,
        out,
        final_state,
        &mut |stage, launch| match time_on_device(client, launch) {
            Ok(time) => match stage {
                Stage::Diag => times.diag = time,
                Stage::KvParallel => times.kv_parallel = time,
                Stage::KvReduce => times.kv_reduce = time,
                Stage::ChunkState => times.chunk_state = time,
                Stage::NonDiag => times.non_diag = time,
                Stage::Fused => times.fused = time,
                Stage::Widen => times.widening += time,
                // A dense prefill takes no snapshot and routes nothing to decode.
                Stage::KvSnapshot | Stage::Decode => {}
            },
            Err(err) => failure = Some(err),
        },
    )?;
    match failure {
        Some(err) => Err(err),
        None => Ok(times),
    }
}

fn time_on_device(client: &Client, launch: &dyn Fn()) -> Result<Duration> {
    let device_error = |e: &dyn std::fmt::Display| LightningError::Device(e.to_string());
    let window = client.profile_start().map_err(|e| device_error(&e))?;
    launch();
    let profile = client.profile_end(window).map_err(|e| device_error(&e))?;
    cubecl::future::block_on(profile.resolve())
        .map(|ticks| ticks.duration())
        .ok_or_else(|| LightningError::Device("the device measured no time for a stage".into()))
}

/// Validates, plans, and hands each stage's launch to `hook` in order.
fn run_stages(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
    hook: &mut dyn FnMut(Stage, &dyn Fn()),
) -> Result<()> {
    let planned = plan_prefill(client, inputs, config)?;
    launch_planned(client, inputs, config, planned, out, final_state, hook)
}

/// Checks the outputs against a problem [`plan_prefill`] accepted, and the
/// call's own buffers against the device's memory, then hands each stage's
/// launch to `hook` in order.
fn launch_planned(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    (shape, plan): (PrefillShape, PrefillPlan),
    out: &DeviceTensor,
    final_state: &DeviceTensor,
    hook: &mut dyn FnMut(Stage, &dyn Fn()),
) -> Result<()> {
    check_output_tensors(&shape, out, final_state)?;
    let table = dense_table(&shape, inputs, config);
    DeviceMemory::of(client).check(&launch_buffers(&shape, &plan, &table, inputs))?;
    launch_checked(
        LaunchTarget::Device(client),
        inputs,
        config,
        (shape, plan),
        &table,
        out,
        final_state,
        hook,
    );
    check_outputs(client, config, out, final_state)
}

/// `out` `[b, h, n, e]` in the call's dtype and `final_state` `[b, h, d, e]`
/// f32, as `shape` says.
fn check_output_tensors(shape: &PrefillShape, out: &DeviceTensor, final_state: &DeviceTensor) -> Result<()> {
    check_tensor(
        out,
        "out",
        &["b", "h", "n", "e"],
        "[b, h, n, e]",
        Some(shape.dtype),
    )?;
    expect_shape(out, "out", &shape.out_shape(), "[b, h, n, e]")?;
    check_tensor(
        final_state,
        "final_state",
        &["b", "h", "d", "e"],
        "[b, h, d, e]",
        Some(DType::F32),
    )?;
    expect_shape(final_state, "final_state", &shape.state_shape(), "[b, h, d, e]")
}

/// With [`PrefillConfig::check_finite`], the opt-in check of what the call
/// wrote: `out`, then `final_state`.
fn check_outputs(
    client: &Client,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
) -> Result<()> {
    if config.check_finite {
        check_finite(client, out, "out")?;
        check_finite(client, final_state, "final_state")?;
    }
    Ok(())
}

/// Launches a call whose tensors were checked and whose buffers fit the
/// device: binds the dense work lists (`table`, uploaded by the first call
/// of its shape on the device: `routines::dense_tables`), allocates the
/// workspace, then hands each stage's launch to `hook` in order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_checked(
    target: LaunchTarget,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    (shape, plan): (PrefillShape, PrefillPlan),
    table: &SequenceTable,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
    hook: &mut dyn FnMut(Stage, &dyn Fn()),
) {
    let dense = DenseShape {
        batch: shape.batch,
        seq_len: shape.seq_len,
        with_initial: inputs.initial_state.is_some(),
        block: config.block,
        sub_block: config.sub_block,
        walk: plan.chunk_walk(),
    };
    let table = dense_device_table(target, table, dense);
    let workspace = target.empty(plan.block_states_len.max(1) * 4);
    let unused = crate::device::tensor::unused_binding(target);
    CallLaunch {
        call: Call {
            target,
            q: inputs.q,
            k: inputs.k,
            v: inputs.v,
            slopes: inputs.slopes,
            out,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            config,
            layout: Layout::dense(shape.seq_len),
            table: &table,
            initial: inputs.initial_state,
            states: final_state,
            workspace: &workspace,
            unused: &unused,
            variant: Variant::FORWARD,
        },
        plan: &plan,
        decode: None,
        decode_cache: None,
    }
    .run(hook);
}

/// Validates the arguments of a prefill: q, k `[b, h, n, d]`, v `[b, h, n, e]`
/// of one dtype, slopes `[h]` f32, the optional initial state `[b, h, d, e]` f32.
pub fn validate_prefill(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    slopes: &DeviceTensor,
    initial_state: Option<&DeviceTensor>,
) -> Result<PrefillShape> {
    prefill_args(q, k, v, slopes, initial_state)
}

/// Validates and plans a dense prefill from its arguments' shapes and dtypes
/// alone: every check of [`crate::plan_prefill`] (block config, shapes,
/// dtypes, the runtime's dtype support, the device's limits) but the buffers'
/// sizes, for a caller whose buffers do not exist yet (Burn's Fusion backend);
/// the output and final state it will allocate are checked against the
/// largest buffer the device allocates
/// ([`crate::LightningError::OutOfMemory`]).
pub fn plan_prefill_shapes(
    client: &Client,
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    slopes: &TensorShape,
    initial_state: Option<&TensorShape>,
    config: &PrefillConfig,
) -> Result<(PrefillShape, PrefillPlan)> {
    config.validate()?;
    let shape = validate_prefill_shapes(q, k, v, slopes, initial_state)?;
    shape.dtype.check_supported(client.properties(), client.name())?;
    let limits = DeviceLimits::of(client);
    let plan = PrefillPlan::new(&PrefillWork::dense(&shape, config), config, &limits)?;
    // The buffers the caller will allocate must each fit one buffer too.
    for output in [
        Buffer::tensor("out [b, h, n, e]", &shape.out_shape(), shape.dtype),
        Buffer::tensor("final_state [b, h, d, e] f32", &shape.state_shape(), DType::F32),
    ] {
        fits_one_buffer(output, limits.max_buffer)?;
    }
    Ok((shape, plan))
}
