//! The prefill host API: validate, plan, then launch diag, kv-parallel, kv-reduce and non-diag.

use std::time::Duration;

use cubecl::prelude::*;
use lightning_attention_kernels as kernels;

use crate::plan::{DeviceLimits, PrefillPlan};
use crate::shapes::{PrefillShape, check_tensor, expect_shape, validate_prefill};
use crate::{DType, DeviceTensor, LightningError, PrefillConfig, Result};

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
    config.validate()?;
    let shape = validate_prefill(inputs.q, inputs.k, inputs.v, inputs.slopes, inputs.initial_state)?;
    if !shape.dtype.is_supported(client) {
        return Err(LightningError::UnsupportedDType {
            dtype: shape.dtype,
            runtime: client.name(),
        });
    }
    let plan = PrefillPlan::new(&shape, config, &DeviceLimits::of(client))?;
    Ok((shape, plan))
}

/// Runs the prefill, allocating the output and the final state.
pub fn prefill(client: &Client, inputs: &PrefillInputs, config: &PrefillConfig) -> Result<PrefillOutput> {
    let planned = plan_prefill(client, inputs, config)?;
    let (shape, _) = planned;
    let out = DeviceTensor::empty(client, &shape.out_shape(), shape.dtype);
    let final_state = DeviceTensor::empty(client, &shape.state_shape(), DType::F32);
    launch_planned(
        client,
        inputs,
        config,
        planned,
        &out,
        &final_state,
        &mut |_, launch| launch(),
    )?;
    Ok(PrefillOutput { out, final_state })
}

/// Runs the prefill into caller-owned `out` `[b, h, n, e]` (dtype of q) and
/// `final_state` `[b, h, d, e]` f32. Every element of both is written.
pub fn prefill_into(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    out: &DeviceTensor,
    final_state: &DeviceTensor,
) -> Result<()> {
    run_stages(client, inputs, config, out, final_state, &mut |_, launch| {
        launch()
    })
}

/// Device time of each prefill kernel, as measured by [`profile_prefill_into`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// diag: the intra-block causal part.
    pub diag: Duration,
    /// kv-parallel: each block's decayed `K^T V`.
    pub kv_parallel: Duration,
    /// kv-reduce: the prefix over blocks.
    pub kv_reduce: Duration,
    /// non-diag: queries against the incoming states.
    pub non_diag: Duration,
}

impl StageTimes {
    /// The four stages together.
    pub fn total(&self) -> Duration {
        self.diag + self.kv_parallel + self.kv_reduce + self.non_diag
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
                Stage::NonDiag => times.non_diag = time,
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

/// The four prefill kernels, in launch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Diag,
    KvParallel,
    KvReduce,
    NonDiag,
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

/// Checks the outputs against a problem [`plan_prefill`] accepted, then hands
/// each stage's launch to `hook` in order.
fn launch_planned(
    client: &Client,
    inputs: &PrefillInputs,
    config: &PrefillConfig,
    (shape, plan): (PrefillShape, PrefillPlan),
    out: &DeviceTensor,
    final_state: &DeviceTensor,
    hook: &mut dyn FnMut(Stage, &dyn Fn()),
) -> Result<()> {
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
    expect_shape(final_state, "final_state", &shape.state_shape(), "[b, h, d, e]")?;
    let launch = Launch {
        client,
        inputs,
        config,
        shape,
        plan,
        out,
        final_state,
    };
    match shape.dtype {
        DType::F32 => launch.run::<f32>(hook),
        DType::F16 => launch.run::<half::f16>(hook),
        DType::BF16 => launch.run::<half::bf16>(hook),
    }
    Ok(())
}

pub(crate) fn arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: validation checked that the buffer holds `num_elements` of its dtype.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements()) }
}

/// One validated, planned prefill, ready to launch.
struct Launch<'a> {
    client: &'a Client,
    inputs: &'a PrefillInputs<'a>,
    config: &'a PrefillConfig,
    shape: PrefillShape,
    plan: PrefillPlan,
    out: &'a DeviceTensor,
    final_state: &'a DeviceTensor,
}

impl Launch<'_> {
    fn run<F: Float + CubeElement>(&self, hook: &mut dyn FnMut(Stage, &dyn Fn())) {
        let Self {
            client,
            inputs,
            config,
            shape,
            plan,
            out,
            final_state,
        } = self;
        let (n, h) = (shape.seq_len as u32, shape.heads as u32);
        let (d, e) = (shape.key_dim, shape.value_dim);
        let (block, cb) = (config.block, config.sub_block);
        let scale = config.scale.unwrap_or(1.0);
        let block_states = client.empty(plan.block_states_len * 4);
        // SAFETY: the workspace was allocated with exactly this many f32.
        let states_arg = || unsafe { BufferArg::from_raw_parts(block_states.clone(), plan.block_states_len) };
        // A bound buffer is required even when there is no initial state; the
        // kernel is compiled without the read in that case.
        let dummy;
        let initial = match inputs.initial_state {
            Some(state) => state,
            None => {
                dummy = DeviceTensor::empty(client, &[1], DType::F32);
                &dummy
            }
        };
        // SAFETY (every launch below): each size, tile and grid was validated and
        // planned against the device's limits; each kernel bounds-checks the tails
        // of n, d and e.
        hook(Stage::Diag, &|| unsafe {
            kernels::diag::diag::launch_unchecked::<F>(
                client,
                plan.diag.cube_count(),
                plan.diag.cube_dim(),
                arg(inputs.q),
                arg(inputs.k),
                arg(inputs.v),
                arg(inputs.slopes),
                arg(out),
                n,
                h,
                scale,
                d,
                e,
                block,
                cb,
                plan.diag_key_chunk,
                plan.diag_rows_per_unit,
                plan.diag_cols_per_unit,
            )
        });
        hook(Stage::KvParallel, &|| unsafe {
            kernels::kv_parallel::kv_parallel::launch_unchecked::<F>(
                client,
                plan.kv_parallel.cube_count(),
                plan.kv_parallel.cube_dim(),
                arg(inputs.k),
                arg(inputs.v),
                arg(inputs.slopes),
                states_arg(),
                n,
                h,
                d,
                e,
                block,
                plan.kv_stage,
                plan.kv_rows_per_unit,
                plan.kv_cols_per_unit,
            )
        });
        hook(Stage::KvReduce, &|| unsafe {
            kernels::kv_reduce::kv_reduce::launch_unchecked(
                client,
                plan.kv_reduce.cube_count(),
                plan.kv_reduce.cube_dim(),
                arg(inputs.slopes),
                arg(initial),
                states_arg(),
                arg(final_state),
                n,
                h,
                d,
                e,
                block,
                inputs.initial_state.is_some(),
            )
        });
        hook(Stage::NonDiag, &|| unsafe {
            kernels::non_diag::non_diag::launch_unchecked::<F>(
                client,
                plan.non_diag.cube_count(),
                plan.non_diag.cube_dim(),
                arg(inputs.q),
                arg(inputs.slopes),
                states_arg(),
                arg(out),
                n,
                h,
                scale,
                d,
                e,
                block,
                cb,
                plan.non_diag_key_chunk,
                plan.non_diag_rows_per_unit,
                plan.non_diag_cols_per_unit,
            )
        });
    }
}
