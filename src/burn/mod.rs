//! Lightning attention on Burn tensors (feature `burn`).
//!
//! [`LightningAttentionBackend`] is a Burn backend extension: the CubeCL backend
//! (wgpu and CUDA runtimes) runs the library's kernels, and `Autodiff<B>`
//! registers a backward pass that calls [`crate::backward`] (gradients of q, k,
//! v and the initial state; slopes are not differentiated). The functions
//! [`lightning_attention`], [`lightning_attention_with_config`],
//! [`fla_lightning_attention`] and [`lightning_decode`] take Burn [`Tensor`]s,
//! validate the whole problem through the library first and return a typed
//! [`LightningError`](crate::LightningError) instead of panicking.
//!
//! Tensors on a device without the extension (Flex, NdArray, ...) are not
//! supported: Burn's dispatch panics there. The Fusion backend is not covered.

mod autodiff;
mod cube;

use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, ExtensionType, backend_extension};
use burn::tensor::Tensor;

use crate::{PrefillConfig, Result};

/// An optional tensor argument of [`LightningAttentionBackend`] (Burn's
/// extension dispatch takes optional tensors as this enum).
#[derive(ExtensionType)]
pub enum OptionalTensor<B: Backend> {
    /// A tensor.
    Present(FloatTensor<B>),
    /// No tensor (zeros, where the operation says so).
    Absent,
}

impl<B: Backend> OptionalTensor<B> {
    /// `Present` for `Some`, `Absent` for `None`.
    pub fn new(tensor: Option<FloatTensor<B>>) -> Self {
        match tensor {
            Some(tensor) => Self::Present(tensor),
            None => Self::Absent,
        }
    }

    /// The tensor, if present.
    pub fn into_option(self) -> Option<FloatTensor<B>> {
        match self {
            Self::Present(tensor) => Some(tensor),
            Self::Absent => None,
        }
    }
}

/// The lightning-attention operations on a Burn backend's primitive tensors.
///
/// Layouts are the library's: q, k `[b, h, n, d]`, v and the output
/// `[b, h, n, e]`, states `[b, h, d, e]` f32, slopes `[h]` f32, and for decode
/// a slot-indexed cache `[slots, h, d, e]` f32. The `check_*` methods validate
/// a call through the library (shapes, dtypes, block config, device limits)
/// and the others assume a call that passed them (they panic otherwise): use
/// the functions of this module, which check first.
#[backend_extension(Cube: cfg(any(feature = "wgpu", feature = "cuda")), Autodiff)]
pub trait LightningAttentionBackend: Backend {
    /// Validates a prefill without launching it.
    fn lightning_check_prefill(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        #[extension_type] initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> Result<()>;

    /// Runs a prefill: returns the output `[b, h, n, e]` and the final state `[b, h, d, e]`.
    fn lightning_prefill(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        #[extension_type] initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The backward pass of [`lightning_prefill`](Self::lightning_prefill):
    /// returns `(dq, dk, dv, d_initial_state)`. A `None` upstream gradient is zero.
    #[allow(clippy::too_many_arguments)]
    fn lightning_prefill_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        #[extension_type] initial_state: OptionalTensor<Self>,
        #[extension_type] d_out: OptionalTensor<Self>,
        #[extension_type] d_final_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// Validates a decode step without launching it.
    fn lightning_check_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cache: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> Result<()>;

    /// Runs one decode step: returns the output `[b, h, 1, e]` and the updated
    /// cache (the input cache's buffer, updated in place, where Burn allows it;
    /// else a copy). Not differentiable.
    fn lightning_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cache: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// Lightning attention over `[b, h, n, *]` tensors with the default block
/// configuration ([`PrefillConfig::default`]); see [`lightning_attention_with_config`].
pub fn lightning_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    initial_state: Option<Tensor<4>>,
) -> Result<(Tensor<4>, Tensor<4>)> {
    lightning_attention_with_config(q, k, v, slopes, initial_state, PrefillConfig::default())
}

/// Lightning attention over Burn tensors: q, k `[b, h, n, d]`, v `[b, h, n, e]`
/// (f32, f16 or bf16, one dtype), slopes `[h]` f32, an optional initial state
/// `[b, h, d, e]` f32. Returns the output `[b, h, n, e]` (dtype of q) and the
/// final state `[b, h, d, e]` f32.
///
/// On an autodiff device both results are differentiable with respect to q,
/// k, v and the initial state (not the slopes). Non-contiguous inputs (e.g.
/// permuted views) are made contiguous first.
///
/// # Errors
///
/// The library's [`LightningError`](crate::LightningError) for any shape,
/// dtype, block configuration or device limit it cannot run; nothing is
/// launched then.
pub fn lightning_attention_with_config(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    initial_state: Option<Tensor<4>>,
    config: PrefillConfig,
) -> Result<(Tensor<4>, Tensor<4>)> {
    <Dispatch as LightningAttentionBackend>::lightning_check_prefill(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        slopes.clone().into_dispatch(),
        OptionalTensor::new(initial_state.clone().map(Tensor::into_dispatch)),
        config,
    )?;
    let (out, state) = <Dispatch as LightningAttentionBackend>::lightning_prefill(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        slopes.into_dispatch(),
        OptionalTensor::new(initial_state.map(Tensor::into_dispatch)),
        config,
    );
    Ok((Tensor::from_dispatch(out), Tensor::from_dispatch(state)))
}

/// Lightning attention in the flash-linear-attention (FLA) convention:
/// q, k `[B, T, H, D]`, v `[B, T, H, E]`, slopes `[H]` f32, an optional initial
/// state `[B, H, D, E]` f32. Returns the output `[B, T, H, E]` and, when
/// `output_final_state` is set, the final state `[B, H, D, E]` f32.
///
/// The inputs are permuted to `[B, H, T, *]` with Burn ops (and made
/// contiguous by the kernels' wrapper), the output permuted back (a view).
/// Differentiable as [`lightning_attention_with_config`].
///
/// # Errors
///
/// As [`lightning_attention_with_config`]; tensor names and layouts in the
/// error are those of the `[B, H, T, *]` call.
pub fn fla_lightning_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    initial_state: Option<Tensor<4>>,
    output_final_state: bool,
    config: PrefillConfig,
) -> Result<(Tensor<4>, Option<Tensor<4>>)> {
    let swap = [0, 2, 1, 3];
    let (out, state) = lightning_attention_with_config(
        q.permute(swap),
        k.permute(swap),
        v.permute(swap),
        slopes,
        initial_state,
        config,
    )?;
    Ok((out.permute(swap), output_final_state.then_some(state)))
}

/// One decode step on Burn tensors: q, k `[b, h, 1, d]`, v `[b, h, 1, e]`, the
/// cache `[slots, h, d, e]` f32, slopes `[h]` f32, and one cache slot per
/// sequence (`-1` pads: its output is zeros and no slot is touched).
/// Returns the output `[b, h, 1, e]` and the updated cache. Not differentiable.
///
/// # Errors
///
/// The library's [`LightningError`](crate::LightningError) (shapes, dtypes,
/// slots out of range or repeated, device limits).
pub fn lightning_decode(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    cache: Tensor<4>,
    slopes: Tensor<1>,
    slots: &[i32],
    scale: Option<f32>,
) -> Result<(Tensor<4>, Tensor<4>)> {
    <Dispatch as LightningAttentionBackend>::lightning_check_decode(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        cache.clone().into_dispatch(),
        slopes.clone().into_dispatch(),
        slots.to_vec(),
        scale,
    )?;
    let (out, cache) = <Dispatch as LightningAttentionBackend>::lightning_decode(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        cache.into_dispatch(),
        slopes.into_dispatch(),
        slots.to_vec(),
        scale,
    );
    Ok((Tensor::from_dispatch(out), Tensor::from_dispatch(cache)))
}
