//! [`LightningAttentionBackend`] for Burn's CubeCL backend: converts
//! `CubeTensor`s to the library's [`DeviceTensor`]s (same cubecl client and
//! buffers, no copy for contiguous inputs) and calls the host API. The checks
//! are the trait's default bodies. On Fusion (feature `fusion`) these same
//! methods run when Fusion executes the lazy operation, on the tensors its
//! handles resolve to.

use burn::backend::{DType as BurnDType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl::prelude::Client;

use super::{LightningAttentionBackend, OptionalTensor, dtype_of};
use crate::{
    BackwardInputs, DType, DecodeInputs, DeviceTensor, PackedBackwardInputs, PackedInputs, PrefillConfig,
    PrefillInputs, Result,
};

/// Burn's dtype of a library dtype.
fn burn_dtype(dtype: DType) -> BurnDType {
    match dtype {
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
    }
}

/// A contiguous view of `tensor` as a [`DeviceTensor`] (copied only if it is not contiguous).
fn to_device(tensor: CubeTensor, name: &'static str) -> Result<DeviceTensor> {
    let dtype = dtype_of(name, tensor.dtype)?;
    let tensor = if tensor.is_contiguous() {
        tensor
    } else {
        into_contiguous(tensor)
    };
    let shape = tensor.shape().to_vec();
    Ok(DeviceTensor {
        handle: tensor.handle,
        shape,
        dtype,
    })
}

/// Wraps a library result as a contiguous `CubeTensor` on `device`.
fn from_device(tensor: DeviceTensor, client: &Client, device: &CubeDevice) -> CubeTensor {
    CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        tensor.shape.into(),
        tensor.handle,
        burn_dtype(tensor.dtype),
    )
}

/// The library's view of a prefill's arguments.
struct Prefill {
    client: Client,
    device: CubeDevice,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    slopes: DeviceTensor,
    initial_state: Option<DeviceTensor>,
}

impl Prefill {
    fn new(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        slopes: CubeTensor,
        initial_state: Option<CubeTensor>,
    ) -> Result<Self> {
        let client = q.client.clone();
        let device = q.device.clone();
        Ok(Self {
            client,
            device,
            q: to_device(q, "q")?,
            k: to_device(k, "k")?,
            v: to_device(v, "v")?,
            slopes: to_device(slopes, "slopes")?,
            initial_state: initial_state.map(|s| to_device(s, "initial_state")).transpose()?,
        })
    }

    fn inputs(&self) -> PrefillInputs<'_> {
        PrefillInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            slopes: &self.slopes,
            initial_state: self.initial_state.as_ref(),
        }
    }

    /// The arguments of a packed call over `cu_seqlens` (the initial state
    /// is the per-document `[N, h, d, e]`).
    fn packed<'a>(&'a self, cu_seqlens: &'a [u32]) -> PackedInputs<'a> {
        PackedInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            slopes: &self.slopes,
            cu_seqlens,
            initial_states: self.initial_state.as_ref(),
        }
    }

    /// `d_out` as the library takes it: zeros like v (dtype of q) where absent.
    fn d_out(&self, d_out: OptionalTensor<CubeBackend>) -> DeviceTensor {
        match d_out.into_option() {
            Some(d_out) => checked(to_device(d_out, "d_out")),
            None => checked(DeviceTensor::filled(
                &self.client,
                &self.v.shape,
                self.q.dtype,
                0.0,
            )),
        }
    }

    fn wrap(&self, tensor: DeviceTensor) -> CubeTensor {
        from_device(tensor, &self.client, &self.device)
    }
}

/// The library's view of a decode step's arguments.
struct Decode {
    client: Client,
    device: CubeDevice,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    cache: DeviceTensor,
    slopes: DeviceTensor,
}

impl Decode {
    fn new(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        cache: CubeTensor,
        slopes: CubeTensor,
    ) -> Result<Self> {
        let client = q.client.clone();
        let device = q.device.clone();
        Ok(Self {
            client,
            device,
            q: to_device(q, "q")?,
            k: to_device(k, "k")?,
            v: to_device(v, "v")?,
            cache: to_device(cache, "cache")?,
            slopes: to_device(slopes, "slopes")?,
        })
    }

    fn inputs<'a>(&'a self, slots: &'a [i32], scale: Option<f32>) -> DecodeInputs<'a> {
        DecodeInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            cache: &self.cache,
            slopes: &self.slopes,
            slots,
            scale,
            rows_in_flight: None,
        }
    }
}

/// Unwraps a result the caller validated first (see the trait's docs).
fn checked<T>(result: Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("lightning attention (call check_* first): {e}"))
}

impl LightningAttentionBackend for CubeBackend {
    fn lightning_prefill(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        slopes: CubeTensor,
        initial_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (CubeTensor, CubeTensor) {
        let args = checked(Prefill::new(q, k, v, slopes, initial_state.into_option()));
        let result = checked(crate::prefill(&args.client, &args.inputs(), &config));
        (args.wrap(result.out), args.wrap(result.final_state))
    }

    fn lightning_prefill_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        slopes: CubeTensor,
        initial_state: OptionalTensor<Self>,
        d_out: OptionalTensor<Self>,
        d_final_state: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let args = checked(Prefill::new(q, k, v, slopes, initial_state.into_option()));
        let d_out = args.d_out(d_out);
        let d_final_state = d_final_state
            .into_option()
            .map(|d| checked(to_device(d, "d_final_state")));
        let inputs = BackwardInputs {
            q: &args.q,
            k: &args.k,
            v: &args.v,
            slopes: &args.slopes,
            initial_state: args.initial_state.as_ref(),
            d_out: &d_out,
            d_final_state: d_final_state.as_ref(),
        };
        let grads = checked(crate::backward(&args.client, &inputs, &config));
        (
            args.wrap(grads.dq),
            args.wrap(grads.dk),
            args.wrap(grads.dv),
            args.wrap(grads.d_initial_state),
        )
    }

    fn lightning_prefill_packed(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        slopes: CubeTensor,
        cu_seqlens: Vec<u32>,
        initial_states: OptionalTensor<Self>,
        final_states: bool,
        config: PrefillConfig,
    ) -> (CubeTensor, OptionalTensor<Self>) {
        let args = checked(Prefill::new(q, k, v, slopes, initial_states.into_option()));
        let result = checked(crate::prefill_packed(
            &args.client,
            &args.packed(&cu_seqlens),
            &config,
            final_states,
        ));
        let finals = result.final_states.map(|states| args.wrap(states));
        (args.wrap(result.out), OptionalTensor::new(finals))
    }

    fn lightning_packed_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        slopes: CubeTensor,
        cu_seqlens: Vec<u32>,
        initial_states: OptionalTensor<Self>,
        d_out: OptionalTensor<Self>,
        d_final_states: OptionalTensor<Self>,
        config: PrefillConfig,
    ) -> (CubeTensor, CubeTensor, CubeTensor, OptionalTensor<Self>) {
        let args = checked(Prefill::new(q, k, v, slopes, initial_states.into_option()));
        let d_out = args.d_out(d_out);
        let d_final_states = d_final_states
            .into_option()
            .map(|d| checked(to_device(d, "d_final_states")));
        let inputs = PackedBackwardInputs {
            forward: args.packed(&cu_seqlens),
            d_out: &d_out,
            d_final_states: d_final_states.as_ref(),
        };
        let grads = checked(crate::backward_packed(&args.client, &inputs, &config));
        let d_initial = grads.d_initial_states.map(|d| args.wrap(d));
        (
            args.wrap(grads.dq),
            args.wrap(grads.dk),
            args.wrap(grads.dv),
            OptionalTensor::new(d_initial),
        )
    }

    fn lightning_decode(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        cache: CubeTensor,
        slopes: CubeTensor,
        slots: Vec<i32>,
        scale: Option<f32>,
    ) -> (CubeTensor, CubeTensor) {
        // The kernel updates the cache in place: only where no other tensor
        // shares its buffer. Under Fusion, that is where the operation holds the
        // cache tensor's last reference (its handle is handed over, not cloned).
        let cache = if cache.can_mut() && cache.is_contiguous() {
            cache
        } else {
            cache.copy()
        };
        let args = checked(Decode::new(q, k, v, cache, slopes));
        let out = checked(crate::decode(&args.client, &args.inputs(&slots, scale)));
        let out = from_device(out, &args.client, &args.device);
        let cache = from_device(args.cache.clone(), &args.client, &args.device);
        (out, cache)
    }
}
