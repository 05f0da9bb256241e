//! Every kernel an entry point would launch, built without a device: the
//! entry points' own validation, planning and launch code run against an
//! [`OfflineBuild`] (see `device::target`), whose tensors have no memory
//! behind them and whose launches are recorded instead of run.
//!
//! What this is for: compiling a runtime's kernels where it has no device,
//! e.g. the CUDA kernels through NVRTC and ptxas on a machine without a GPU
//! (`tools/cuda-offline`), with exactly the compile-time arguments, cube
//! dims, dtypes and execution mode the launches use. Nothing here keeps a
//! planning rule of its own.

use crate::device::target::{LaunchTarget, OfflineBuild};
use crate::entry::varlen::{DeviceBatch, PlannedBatch, VarlenBatch};
use crate::problem::packed::check_tensors;
use crate::problem::shapes::{DecodeShape, PrefillShape};
use crate::routines::common::Stage;
use crate::{BackwardInputs, DType, DecodeInputs, DeviceTensor, PrefillConfig, PrefillInputs, Result};

/// Tensors of the given shapes on `build` (no memory behind them).
fn tensors<const N: usize>(build: &OfflineBuild, shapes: [(&[usize], DType); N]) -> [DeviceTensor; N] {
    shapes.map(|(shape, dtype)| LaunchTarget::Offline(build).empty_tensor(shape, dtype))
}

/// The tensors of a dense call of `shape`: q, k, v, slopes, a state, an
/// output-shaped tensor and another state (a prefill's initial state, output
/// and final state; a backward pass's initial state, `d_out` and final-state
/// gradient).
fn dense_tensors(build: &OfflineBuild, shape: &PrefillShape) -> [DeviceTensor; 7] {
    let (qk, v) = (shape.qk_shape(), shape.v_shape());
    tensors(
        build,
        [
            (&qk, shape.dtype),
            (&qk, shape.dtype),
            (&v, shape.dtype),
            (&[shape.heads], DType::F32),
            (&shape.state_shape(), DType::F32),
            (&shape.out_shape(), shape.dtype),
            (&shape.state_shape(), DType::F32),
        ],
    )
}

/// Labels each launch with its stage, then records it.
fn record(build: &OfflineBuild) -> impl FnMut(Stage, &dyn Fn()) + '_ {
    move |stage, launch| {
        build.set_stage(stage.name());
        launch();
    }
}

/// Records the kernels a dense prefill ([`crate::prefill`]) of `shape` with
/// `config` launches, with an initial state where `initial_state`.
pub fn build_prefill(
    build: &OfflineBuild,
    shape: &PrefillShape,
    initial_state: bool,
    config: &PrefillConfig,
) -> Result<()> {
    let target = LaunchTarget::Offline(build);
    let [q, k, v, slopes, initial, out, final_state] = dense_tensors(build, shape);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: initial_state.then_some(&initial),
    };
    let planned = super::prefill::plan_on(target, &inputs, config)?;
    let table = super::prefill::dense_table(&planned.0, &inputs, config);
    super::prefill::launch_checked(
        target,
        &inputs,
        config,
        planned,
        &table,
        &out,
        &final_state,
        &mut record(build),
    );
    Ok(())
}

/// Records the kernels a packed call ([`crate::prefill_varlen`]) of `batch`
/// launches on tensors of `total_tokens` rows of `heads` heads, dims
/// `key_dim` and `value_dim`, against a cache of `slots` states of
/// `state_dtype`: sequences of one token without snapshots go to the decode
/// kernel (a mixed batch).
#[allow(clippy::too_many_arguments)]
pub fn build_varlen(
    build: &OfflineBuild,
    [heads, key_dim, value_dim]: [usize; 3],
    dtype: DType,
    state_dtype: DType,
    slots: usize,
    batch: &VarlenBatch,
    config: &PrefillConfig,
) -> Result<()> {
    let target = LaunchTarget::Offline(build);
    let total = batch.cu_seqlens.last().copied().unwrap_or(0) as usize;
    let [q, k, v, slopes, cache, out] = tensors(
        build,
        [
            (&[total, heads, key_dim], dtype),
            (&[total, heads, key_dim], dtype),
            (&[total, heads, value_dim], dtype),
            (&[heads], DType::F32),
            (&[slots, heads, key_dim, value_dim], state_dtype),
            (&[total, heads, value_dim], dtype),
        ],
    );
    let shape = check_tensors(&q, &k, &v, &slopes, &cache)?;
    let planned = PlannedBatch::new(target, shape, batch, config)?;
    build.set_stage("varlen");
    DeviceBatch::upload_checked(target, planned).launch(
        target,
        [&q, &k, &v, &slopes],
        (None, &cache),
        config,
        &out,
    );
    Ok(())
}

/// Records the kernel a decode step ([`crate::decode`]) of `shape` launches,
/// with `rows_in_flight` as [`DecodeInputs::rows_in_flight`].
pub fn build_decode(build: &OfflineBuild, shape: &DecodeShape, rows_in_flight: Option<usize>) -> Result<()> {
    let target = LaunchTarget::Offline(build);
    let (b, h) = (shape.batch, shape.heads);
    let [q, k, v, cache, slopes, out] = tensors(
        build,
        [
            (&[b, h, 1, shape.key_dim], shape.dtype),
            (&[b, h, 1, shape.key_dim], shape.dtype),
            (&[b, h, 1, shape.value_dim], shape.dtype),
            (
                &[shape.slots, h, shape.key_dim, shape.value_dim],
                shape.state_dtype,
            ),
            (&[h], DType::F32),
            (&[b, h, 1, shape.value_dim], shape.dtype),
        ],
    );
    let slots: Vec<i32> = (0..b as i32).collect();
    let inputs = DecodeInputs {
        q: &q,
        k: &k,
        v: &v,
        cache: &cache,
        slopes: &slopes,
        slots: &slots,
        scale: None,
        rows_in_flight,
    };
    let (shape, plan) = super::decode::plan_step(target, &inputs)?;
    build.set_stage(Stage::Decode.name());
    super::decode::launch_checked(target, &inputs, shape, plan, &out);
    Ok(())
}

/// Records the kernels the backward pass ([`crate::backward`]) of a dense
/// prefill of `shape` with `config` launches, with an initial state and a
/// final-state gradient where `with_states`.
pub fn build_backward(
    build: &OfflineBuild,
    shape: &PrefillShape,
    with_states: bool,
    config: &PrefillConfig,
) -> Result<()> {
    let [q, k, v, slopes, initial, d_out, d_final] = dense_tensors(build, shape);
    let inputs = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &slopes,
        initial_state: with_states.then_some(&initial),
        d_out: &d_out,
        d_final_state: with_states.then_some(&d_final),
    };
    build.set_stage("backward");
    super::backward::backward_on(LaunchTarget::Offline(build), &inputs, config).map(|_| ())
}
