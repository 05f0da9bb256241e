//! Lightning attention on Burn tensors (feature `burn`).
//!
//! [`LightningAttentionBackend`] is a Burn backend extension: the CubeCL backend
//! (wgpu and CUDA runtimes) runs the library's kernels, and `Autodiff<B>`
//! registers a backward pass that calls [`crate::backward`] (gradients of q, k,
//! v and the initial state; slopes are not differentiated). The functions
//! [`lightning_attention`], [`lightning_attention_with_config`],
//! [`fla_lightning_attention`], [`fla_lightning_attention_packed`] (packed
//! documents with `cu_seqlens`, for training) and [`lightning_decode`] take Burn [`Tensor`]s,
//! validate the whole problem through the library first and return a typed
//! [`LightningError`] instead of panicking.
//!
//! With the feature `fusion` (which turns on Burn's `fusion`), Burn's Fusion
//! backend (`Fusion<CubeBackend>`, what `Device::wgpu` and `Device::cuda`
//! tensors live on when Burn's `fusion` feature is on) is covered too: each
//! operation is registered as a lazy custom operation whose outputs' shapes and
//! dtypes are known at once, and the kernels run on the inner CubeCL backend
//! when Fusion executes its stream. Fusion does not merge them with
//! neighbouring operations. Turn this feature on whenever Burn's `fusion` is on
//! (Burn's default features turn it on): without it the extension has no
//! implementation for Fusion and the build fails.
//!
//! The checks ([`LightningAttentionBackend::lightning_check_prefill`],
//! [`LightningAttentionBackend::lightning_check_packed`] and
//! [`LightningAttentionBackend::lightning_check_decode`]) read only the
//! tensors' shapes, dtypes and device (the device's limits through its CubeCL
//! client): they launch nothing, read nothing back and run the same on the
//! CubeCL backend, on Fusion (where no buffer exists yet) and under autodiff.
//!
//! Tensors on a device without the extension (Flex, NdArray, ...) are not
//! supported: Burn's dispatch panics there.

mod autodiff;
mod caller_layout;
mod cube;
pub mod layer;

pub use layer::{MiniMaxLinearAttention, MiniMaxLinearAttentionConfig};

use std::any::Any;

use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType as BurnDType, ExtensionType, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use cubecl::prelude::Client;

use crate::problem::shapes::TensorShape;
// `Result` is spelled `crate::Result` here: the `ExtensionType` derive's
// generated code names `Result<(), ExecutionError>` unqualified.
use crate::{DType, LightningError, PrefillConfig};

/// The library's dtype of a Burn dtype, if the kernels take it.
fn dtype_of(tensor: &'static str, dtype: BurnDType) -> crate::Result<DType> {
    match dtype {
        BurnDType::F32 => Ok(DType::F32),
        BurnDType::F16 => Ok(DType::F16),
        BurnDType::BF16 => Ok(DType::BF16),
        other => Err(LightningError::UnsupportedBurnDType {
            tensor,
            dtype: format!("{other:?}"),
        }),
    }
}

/// The library's description of a tensor argument, from Burn's metadata alone.
fn arg(tensor: &impl TensorMetadata, name: &'static str) -> crate::Result<TensorShape> {
    Ok(TensorShape {
        shape: tensor.shape().to_vec(),
        dtype: dtype_of(name, tensor.dtype())?,
    })
}

/// The CubeCL client of `tensor`'s device (the CubeCL backend's device type,
/// `cubecl::Device`, is also Fusion's and autodiff's over it).
fn client_of(tensor: &impl TensorMetadata) -> crate::Result<Client> {
    let device = tensor.device();
    match (&device as &dyn Any).downcast_ref::<cubecl::Device>() {
        Some(device) => Ok(device.client()),
        None => Err(LightningError::Device(format!(
            "{device:?} is not a CubeCL device: the lightning-attention kernels run on CubeCL runtimes"
        ))),
    }
}

/// What Fusion is told of each operation's outputs before it runs them.
#[cfg(feature = "fusion")]
mod fusion_meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::DType;

    use super::OptionalTensorMetadata;
    use crate::PrefillConfig;

    /// `[b, h, d, e]` f32 from q `[b, h, n, d]` and v `[b, h, n, e]`.
    fn state(q: &TensorSpec, v: &TensorSpec) -> TensorSpec {
        TensorSpec::new(
            [q.shape[0], q.shape[1], q.shape[3], v.shape[3]].into(),
            DType::F32,
        )
    }

    /// The output `[b, h, n, e]` (q's dtype) and the final state.
    pub(super) fn prefill(
        q: &TensorSpec,
        _k: &TensorSpec,
        v: &TensorSpec,
        _slopes: &TensorSpec,
        _initial_state: &OptionalTensorMetadata,
        _config: &PrefillConfig,
    ) -> (TensorSpec, TensorSpec) {
        let out = TensorSpec::new([q.shape[0], q.shape[1], q.shape[2], v.shape[3]].into(), q.dtype);
        (out, state(q, v))
    }

    /// dq, dk, dv like q, k, v, and the initial state's gradient `[b, h, d, e]` f32.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefill_backward(
        q: &TensorSpec,
        k: &TensorSpec,
        v: &TensorSpec,
        _slopes: &TensorSpec,
        _initial_state: &OptionalTensorMetadata,
        _d_out: &OptionalTensorMetadata,
        _d_final_state: &OptionalTensorMetadata,
        _config: &PrefillConfig,
    ) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
        (q.clone(), k.clone(), v.clone(), state(q, v))
    }

    /// `[N, h, d, e]` f32 from `cu_seqlens` (`N + 1` offsets), q `[T, h, d]` and v `[T, h, e]`.
    fn packed_states(cu_seqlens: &[u32], q: &TensorSpec, v: &TensorSpec) -> TensorSpec {
        TensorSpec::new(
            [cu_seqlens.len() - 1, q.shape[1], q.shape[2], v.shape[2]].into(),
            DType::F32,
        )
    }

    /// The output `[T, h, e]` (q's dtype) and, where asked for, the final states.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefill_packed(
        q: &TensorSpec,
        _k: &TensorSpec,
        v: &TensorSpec,
        _slopes: &TensorSpec,
        cu_seqlens: &[u32],
        _initial_states: &OptionalTensorMetadata,
        final_states: &bool,
        _config: &PrefillConfig,
    ) -> (TensorSpec, OptionalTensorMetadata) {
        let out = TensorSpec::new([q.shape[0], q.shape[1], v.shape[2]].into(), q.dtype);
        let finals = if *final_states {
            OptionalTensorMetadata::Present(packed_states(cu_seqlens, q, v))
        } else {
            OptionalTensorMetadata::Absent
        };
        (out, finals)
    }

    /// dq, dk, dv like q, k, v, and the initial states' gradient where the
    /// forward had initial states.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn packed_backward(
        q: &TensorSpec,
        k: &TensorSpec,
        v: &TensorSpec,
        _slopes: &TensorSpec,
        cu_seqlens: &[u32],
        initial_states: &OptionalTensorMetadata,
        _d_out: &OptionalTensorMetadata,
        _d_final_states: &OptionalTensorMetadata,
        _config: &PrefillConfig,
    ) -> (TensorSpec, TensorSpec, TensorSpec, OptionalTensorMetadata) {
        let d_initial = match initial_states {
            OptionalTensorMetadata::Present(_) => {
                OptionalTensorMetadata::Present(packed_states(cu_seqlens, q, v))
            }
            OptionalTensorMetadata::Absent => OptionalTensorMetadata::Absent,
        };
        (q.clone(), k.clone(), v.clone(), d_initial)
    }

    /// The output `[b, h, 1, e]` (q's dtype) and the cache, like the input's.
    pub(super) fn decode(
        q: &TensorSpec,
        _k: &TensorSpec,
        v: &TensorSpec,
        cache: &TensorSpec,
        _slopes: &TensorSpec,
        _slots: &[i32],
        _scale: &Option<f32>,
    ) -> (TensorSpec, TensorSpec) {
        let out = TensorSpec::new([q.shape[0], q.shape[1], 1, v.shape[3]].into(), q.dtype);
        (out, cache.clone())
    }
}

/// An optional tensor argument of [`LightningAttentionBackend`] (Burn's
/// extension dispatch takes optional tensors as this enum).
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "fusion"))]
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
///
/// The checks have default bodies that read the tensors' metadata and their
/// device's CubeCL client (any backend whose device is a `cubecl::Device`);
/// they are what the CubeCL and Fusion backends use. On Fusion the other
/// methods are lazy custom operations (feature `fusion`).
#[backend_extension(
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Autodiff,
    Fusion: cfg(feature = "fusion")
)]
pub trait LightningAttentionBackend: Backend {
    /// Validates a prefill without launching it, from the tensors' shapes,
    /// dtypes and device alone.
    #[fusion(default)]
    fn lightning_check_prefill(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        #[extension_type] initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> crate::Result<()> {
        let client = client_of(&q)?;
        let (q, k, v, slopes) = (
            arg(&q, "q")?,
            arg(&k, "k")?,
            arg(&v, "v")?,
            arg(&slopes, "slopes")?,
        );
        let initial_state = initial_state
            .into_option()
            .map(|state| arg(&state, "initial_state"))
            .transpose()?;
        crate::plan::plan_prefill_shapes(&client, &q, &k, &v, &slopes, initial_state.as_ref(), &config)
            .map(|_| ())
    }

    /// Runs a prefill: returns the output `[b, h, n, e]` and the final state `[b, h, d, e]`.
    #[fusion(meta = fusion_meta::prefill)]
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
    #[fusion(meta = fusion_meta::prefill_backward)]
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

    /// Validates a packed training call (forward and backward) without
    /// launching it, from the tensors' shapes, dtypes and device alone: q, k
    /// `[T, h, d]`, v `[T, h, e]`, slopes `[h]` f32, `cu_seqlens` (`N + 1`
    /// offsets), optional initial states `[N, h, d, e]` f32 (see
    /// [`crate::PackedInputs`]).
    #[fusion(default)]
    fn lightning_check_packed(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        #[extension_type] initial_states: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> crate::Result<()> {
        let client = client_of(&q)?;
        let (q, k, v, slopes) = (
            arg(&q, "q")?,
            arg(&k, "k")?,
            arg(&v, "v")?,
            arg(&slopes, "slopes")?,
        );
        let initial_states = initial_states
            .into_option()
            .map(|states| arg(&states, "initial_states"))
            .transpose()?;
        crate::plan::plan_packed_shapes(
            &client,
            &q,
            &k,
            &v,
            &slopes,
            &cu_seqlens,
            initial_states.as_ref(),
            &config,
        )
        .map(|_| ())
    }

    /// Runs a packed training forward ([`crate::prefill_packed`]): returns
    /// the output `[T, h, e]` and, with `final_states`, each document's
    /// final state `[N, h, d, e]` f32.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = fusion_meta::prefill_packed)]
    fn lightning_prefill_packed(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        #[extension_type] initial_states: OptionalTensor<Self>,
        final_states: bool,
        config: PrefillConfig,
    ) -> (FloatTensor<Self>, OptionalTensor<Self>);

    /// The backward pass of [`lightning_prefill_packed`](Self::lightning_prefill_packed)
    /// ([`crate::backward_packed`]): returns `(dq, dk, dv, d_initial_states)`,
    /// the last present where the forward had initial states. A `None`
    /// upstream gradient is zero.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = fusion_meta::packed_backward)]
    fn lightning_packed_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        cu_seqlens: Vec<u32>,
        #[extension_type] initial_states: OptionalTensor<Self>,
        #[extension_type] d_out: OptionalTensor<Self>,
        #[extension_type] d_final_states: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        OptionalTensor<Self>,
    );

    /// Validates a decode step without launching it, from the tensors' shapes,
    /// dtypes and device alone.
    #[fusion(default)]
    fn lightning_check_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cache: FloatTensor<Self>,
        slopes: FloatTensor<Self>,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> crate::Result<()> {
        let client = client_of(&q)?;
        let (q, k, v) = (arg(&q, "q")?, arg(&k, "k")?, arg(&v, "v")?);
        let (cache, slopes) = (arg(&cache, "cache")?, arg(&slopes, "slopes")?);
        crate::plan::plan_decode_shapes(&client, &q, &k, &v, &cache, &slopes, &slots, scale).map(|_| ())
    }

    /// Runs one decode step: returns the output `[b, h, 1, e]` and the updated
    /// cache. The kernel writes the cache's buffer in place where no other
    /// tensor shares it, else a copy of it: on Fusion the returned cache is a
    /// new tensor either way, and the input cache tensor, if still held,
    /// keeps its values. Not differentiable.
    #[fusion(meta = fusion_meta::decode)]
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
) -> crate::Result<(Tensor<4>, Tensor<4>)> {
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
/// The library's [`LightningError`] for any shape,
/// dtype, block configuration or device limit it cannot run; nothing is
/// launched then.
pub fn lightning_attention_with_config(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    initial_state: Option<Tensor<4>>,
    config: PrefillConfig,
) -> crate::Result<(Tensor<4>, Tensor<4>)> {
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
/// As [`lightning_attention_with_config`], told in this function's layout:
/// shapes in the order given (`[B, T, H, *]` for q, k and v), layouts
/// `[B, T, H, D]`, `[B, T, H, E]`, `[H]` and `[B, H, D, E]`, dimensions named
/// `B`, `T`, `H`, `D` and `E`. A key of head dim 8 among queries of 16, say
/// q `[2, 77, 3, 16]` and k `[2, 77, 3, 8]`, is
/// `k: expected shape [2, 77, 3, 16] ([B, T, H, D]), got [2, 77, 3, 8]`.
pub fn fla_lightning_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    initial_state: Option<Tensor<4>>,
    output_final_state: bool,
    config: PrefillConfig,
) -> crate::Result<(Tensor<4>, Option<Tensor<4>>)> {
    let swap = [0, 2, 1, 3];
    let (out, state) = lightning_attention_with_config(
        q.permute(swap),
        k.permute(swap),
        v.permute(swap),
        slopes,
        initial_state,
        config,
    )
    // The library judged the permuted views: its errors are mapped back to
    // the tensors as the caller gave them.
    .map_err(|err| caller_layout::in_caller_layout(err, &caller_layout::FLA))?;
    Ok((out.permute(swap), output_final_state.then_some(state)))
}

/// Lightning attention over packed documents in the flash-linear-attention
/// (FLA) convention, as FLA's `chunk_simple_gla(..., cu_seqlens=...)` takes
/// them: q, k `[1, T, H, D]` and v `[1, T, H, E]` hold `N` documents back
/// to back, `cu_seqlens` (`N + 1` offsets, from 0, non-decreasing, at most
/// `T`) says where each starts, slopes `[H]` f32, an optional initial state
/// per document `[N, H, D, E]` f32. Returns the output `[1, T, H, E]` and,
/// when `output_final_state` is set, each document's final state
/// `[N, H, D, E]` f32.
///
/// No state crosses a boundary: each document's output, final state and
/// gradients are those of [`fla_lightning_attention`] on that document
/// alone. Rows past `cu_seqlens[N]` are padding: zeros in the output and in
/// every gradient. On an autodiff device both results are differentiable
/// with respect to q, k, v and the initial states (not the slopes); the
/// forward is [`crate::prefill_packed`], the backward
/// [`crate::backward_packed`], one launch for all documents (no loop over
/// them). `cu_seqlens` is read on the host, as the kernels' table of
/// documents is built there.
///
/// # Errors
///
/// As [`fla_lightning_attention`], told in this function's layout (`[1, T,
/// H, D]`, `[1, T, H, E]`, `[H]`, `[N, H, D, E]`): a batch other than 1 is a
/// [`LightningError::Shape`] of the tensor, and `cu_seqlens` that does not
/// start at 0 ([`LightningError::FirstOffset`]), decreases
/// ([`LightningError::OffsetsDecreasing`]), passes `T`
/// ([`LightningError::OffsetPastEnd`]) or has fewer than 2 entries
/// ([`LightningError::LengthMismatch`]) is reported before anything runs,
/// as is an initial state of another count than `N`.
#[allow(clippy::too_many_arguments)]
pub fn fla_lightning_attention_packed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    slopes: Tensor<1>,
    cu_seqlens: &[u32],
    initial_state: Option<Tensor<4>>,
    output_final_state: bool,
    config: PrefillConfig,
) -> crate::Result<(Tensor<4>, Option<Tensor<4>>)> {
    // FLA takes packed documents as one batch row: refused otherwise, as FLA does.
    let mut packed = Vec::with_capacity(3);
    let named = [
        ("q", "[1, T, H, D]", q),
        ("k", "[1, T, H, D]", k),
        ("v", "[1, T, H, E]", v),
    ];
    for (name, layout, tensor) in named {
        let [batch, tokens, heads, dim] = tensor.dims();
        if batch != 1 {
            return Err(LightningError::Shape {
                tensor: name,
                expected: vec![1, tokens, heads, dim],
                layout,
                actual: vec![batch, tokens, heads, dim],
            });
        }
        packed.push(tensor.reshape([tokens, heads, dim]));
    }
    let [q, k, v]: [Tensor<3>; 3] = packed.try_into().expect("three tensors");
    let in_caller = |err| caller_layout::in_caller_layout(err, &caller_layout::FLA_PACKED);
    <Dispatch as LightningAttentionBackend>::lightning_check_packed(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        slopes.clone().into_dispatch(),
        cu_seqlens.to_vec(),
        OptionalTensor::new(initial_state.clone().map(Tensor::into_dispatch)),
        config,
    )
    .map_err(in_caller)?;
    let (out, final_states) = <Dispatch as LightningAttentionBackend>::lightning_prefill_packed(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        slopes.into_dispatch(),
        cu_seqlens.to_vec(),
        OptionalTensor::new(initial_state.map(Tensor::into_dispatch)),
        output_final_state,
        config,
    );
    let out: Tensor<3> = Tensor::from_dispatch(out);
    let final_states = final_states.into_option().map(Tensor::from_dispatch);
    Ok((out.unsqueeze_dim(0), final_states))
}

/// One decode step on Burn tensors: q, k `[b, h, 1, d]`, v `[b, h, 1, e]`, the
/// cache `[slots, h, d, e]` f32, slopes `[h]` f32, and one cache slot per
/// sequence (`-1` pads: its output is zeros and no slot is touched).
/// Returns the output `[b, h, 1, e]` and the updated cache. Not differentiable.
///
/// # Errors
///
/// The library's [`LightningError`] (shapes, dtypes,
/// slots out of range or repeated, device limits).
pub fn lightning_decode(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    cache: Tensor<4>,
    slopes: Tensor<1>,
    slots: &[i32],
    scale: Option<f32>,
) -> crate::Result<(Tensor<4>, Tensor<4>)> {
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
