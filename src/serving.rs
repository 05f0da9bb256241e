//! The serving backend: what an inference engine holds per model, in the shape
//! of SGLang's `LightningAttnBackend`.
//!
//! Built once with the model's heads, head dims, layer count, block sizes, slot
//! count and tensor-parallel rank, it owns each layer's slopes (MiniMax's
//! per-layer ladder, sliced to the rank's heads) and each layer's state
//! cache `[slots, h_rank, d, e]`, f32 or bf16 ([`BackendConfig::state_dtype`]).
//! Per engine step the batch metadata is given
//! once ([`LightningBackend::prepare_decode`] or
//! [`LightningBackend::prepare_extend`], SGLang's `init_forward_metadata`),
//! then every layer calls [`LightningBackend::forward_decode`] or
//! [`LightningBackend::forward_extend`] on its packed q, k, v.
//!
//! A decode step is CUDA-graph friendly: `prepare_decode` writes the slots
//! into one buffer allocated at construction (same device pointer every step,
//! as a captured graph needs), and `forward_decode` checks shapes on the host
//! and launches, allocating nothing and never waiting on the device. An extend
//! (or mixed) step uploads its tables and workspace once in `prepare_extend`;
//! its per-layer calls then allocate nothing either.

use cubecl::bytes::Bytes;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device::limits::DeviceLimits;
use crate::device::memory::{Buffer, DeviceMemory};
use crate::device::target::LaunchTarget;
use crate::entry::varlen::{DeviceBatch, PlannedBatch};
use crate::problem::packed::VarlenShape;
use crate::problem::shapes::{
    DecodeShape, TensorShape, check_slots, check_state_dtype, check_tensor, expect_shape,
};
use crate::problem::slopes::{layer_slopes, rank_slice};
use crate::routines::decode::launch_decode;
use crate::routines::decode::{DecodePlan, plan_decode};
use crate::routines::table::{IndexBuffer, upload};
use crate::{DType, DeviceTensor, LightningError, PrefillConfig, Result, VarlenBatch};

/// How a [`LightningBackend`] is built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackendConfig {
    /// Attention heads of the whole model (all tensor-parallel ranks).
    pub heads: usize,
    /// `d`, the query/key head dim.
    pub key_dim: usize,
    /// `e`, the value head dim.
    pub value_dim: usize,
    /// Linear-attention layers (each has its own slopes and cache).
    pub layers: usize,
    /// Slots in each layer's state cache (concurrent requests).
    pub slots: usize,
    /// Most sequences in one decode step (sizes the persistent slot buffer).
    pub max_batch: usize,
    /// This rank and the tensor-parallel world size; heads are split evenly.
    pub tensor_parallel: (usize, usize),
    /// dtype of q, k, v and the outputs.
    pub dtype: DType,
    /// BLOCK, CBLOCK and the output scale of prefills.
    pub prefill: PrefillConfig,
    /// dtype of every layer's state cache: [`DType::F32`] (exact f32 states,
    /// as the math says) or [`DType::BF16`] (half the memory and half the
    /// bytes a decode step streams; every kernel still computes in f32 and
    /// rounds each state once, to nearest even, when it writes it back, at a
    /// price in accuracy measured in the README's "bf16 state cache").
    /// [`DType::F16`] is refused: its range is too short for a state.
    pub state_dtype: DType,
}

impl BackendConfig {
    /// Heads on `tensor_parallel`'s rank (they split evenly: see [`rank_slice`]).
    fn local_heads(&self) -> usize {
        self.heads / self.tensor_parallel.1.max(1)
    }

    /// Bytes of one sequence's states over all layers on this rank, in
    /// [`BackendConfig::state_dtype`]: `layers h_rank d e` elements
    /// (MiniMax-Text-01's 70 lightning layers of 64 heads on one rank, d = e
    /// = 128: 280 MiB in f32, 140 MiB in bf16).
    pub fn state_bytes_per_sequence(&self) -> u64 {
        (self.layers * self.local_heads() * self.key_dim * self.value_dim * self.state_dtype.size()) as u64
    }

    /// Bytes of every layer's cache (all slots) on this rank.
    pub fn cache_bytes(&self) -> u64 {
        self.state_bytes_per_sequence() * self.slots as u64
    }
}

/// The layouts a step's layer calls document: `tokens` is the step's token
/// axis (`B` sequences of a decode, `T` packed tokens of an extend).
struct StepLayout {
    tokens: &'static str,
    qk: &'static str,
    ve: &'static str,
}

/// [`LightningBackend::forward_decode`]'s layouts.
const DECODE: StepLayout = StepLayout {
    tokens: "B",
    qk: "[B, h_rank, d]",
    ve: "[B, h_rank, e]",
};

/// [`LightningBackend::forward_extend`]'s layouts.
const EXTEND: StepLayout = StepLayout {
    tokens: "T",
    qk: "[T, h_rank, d]",
    ve: "[T, h_rank, e]",
};

/// The step the backend was last prepared for.
#[derive(Debug)]
enum Step {
    None,
    Decode { batch: usize, plan: DecodePlan },
    Extend(Box<DeviceBatch>),
}

/// Per-model lightning-attention state and launches for a serving engine (see the module doc).
pub struct LightningBackend {
    client: Client,
    config: BackendConfig,
    local_heads: usize,
    slopes: Vec<DeviceTensor>,
    caches: Vec<DeviceTensor>,
    decode_slots: Handle,
    unused_tokens: IndexBuffer,
    step: Step,
}

impl std::fmt::Debug for LightningBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LightningBackend")
            .field("config", &self.config)
            .field("local_heads", &self.local_heads)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// What one layer's cache `[slots, h, d, e]` is called in errors.
const CACHE: &str = "state cache [slots, h, d, e] of one layer";

/// The layout [`LightningBackend::from_caches`] documents.
const CACHE_LAYOUT: &str = "[slots, h_rank, d, e]";

/// A layer's cache must be addressable with 32-bit indices: refused here
/// with a typed error (its bytes are checked with every other buffer of the
/// backend, see [`LightningBackend::new`]).
fn check_cache_indexing(shape: &[usize; 4]) -> Result<()> {
    crate::problem::shapes::expect_addressable(CACHE, shape.iter().product::<usize>() as u64)
}

impl LightningBackend {
    /// Validates `config`, builds each layer's slopes and allocates each
    /// layer's cache in [`BackendConfig::state_dtype`] (zeros: no slot holds
    /// a state until a request writes it). Returns
    /// [`LightningError::OutOfMemory`], having allocated nothing, where the
    /// device cannot hold every layer's cache (see [`crate::memory`]).
    pub fn new(client: &Client, config: BackendConfig) -> Result<Self> {
        let (local_slopes, cache_shape) = Self::validate(client, &config)?;
        // Every buffer of the backend, checked together before the first is
        // allocated: one layer's cache may fit where seventy do not.
        let mut buffers = Self::own_buffers(&config, cache_shape[1]);
        for _ in 0..config.layers {
            buffers.push(Buffer::tensor(CACHE, &cache_shape, config.state_dtype));
        }
        DeviceMemory::of(client).check(&buffers)?;
        let caches = (0..config.layers)
            .map(|_| DeviceTensor::filled(client, &cache_shape, config.state_dtype, 0.0))
            .collect::<Result<Vec<_>>>()?;
        Self::build(client, config, local_slopes, caches)
    }

    /// [`LightningBackend::new`] on caches the engine allocated itself (a
    /// memory pool of its own), one per layer, each `[slots, h_rank, d, e]` in
    /// [`BackendConfig::state_dtype`]; their contents are kept (states a
    /// previous backend left are continued). A cache of another dtype is
    /// [`LightningError::StateDType`], of another shape
    /// [`LightningError::Shape`], a count other than `layers`
    /// [`LightningError::LengthMismatch`].
    pub fn from_caches(client: &Client, config: BackendConfig, caches: Vec<DeviceTensor>) -> Result<Self> {
        let (local_slopes, cache_shape) = Self::validate(client, &config)?;
        if caches.len() != config.layers {
            return Err(LightningError::LengthMismatch {
                what: "caches",
                expected: config.layers,
                rule: "one state cache per layer",
                actual: caches.len(),
            });
        }
        for cache in &caches {
            check_tensor(cache, "cache", &["slots", "h_rank", "d", "e"], CACHE_LAYOUT, None)?;
            if cache.dtype != config.state_dtype {
                return Err(LightningError::StateDType {
                    tensor: "cache",
                    expected: config.state_dtype,
                    actual: cache.dtype,
                });
            }
            expect_shape(cache, "cache", &cache_shape, CACHE_LAYOUT)?;
        }
        DeviceMemory::of(client).check(&Self::own_buffers(&config, cache_shape[1]))?;
        Self::build(client, config, local_slopes, caches)
    }

    /// Checks `config` and builds each layer's slopes on this rank; returns
    /// them with the shape of one layer's cache.
    fn validate(client: &Client, config: &BackendConfig) -> Result<(Vec<Vec<f32>>, [usize; 4])> {
        config.prefill.validate()?;
        let (rank, world) = config.tensor_parallel;
        for (what, value) in [
            ("heads", config.heads),
            ("key_dim", config.key_dim),
            ("value_dim", config.value_dim),
            ("layers", config.layers),
            ("slots", config.slots),
            ("max_batch", config.max_batch),
        ] {
            if value == 0 {
                return Err(LightningError::EmptyDimension {
                    tensor: "BackendConfig",
                    dim: what,
                    shape: vec![value],
                });
            }
        }
        config.dtype.check_supported(client.properties(), client.name())?;
        let local_slopes = (0..config.layers)
            .map(|layer| rank_slice(&layer_slopes(config.heads, layer, config.layers)?, rank, world))
            .collect::<Result<Vec<_>>>()?;
        let local_heads = local_slopes[0].len();
        let cache_shape = [config.slots, local_heads, config.key_dim, config.value_dim];
        check_cache_indexing(&cache_shape)?;
        check_state_dtype(
            &TensorShape {
                shape: cache_shape.to_vec(),
                dtype: config.state_dtype,
            },
            "BackendConfig::state_dtype",
        )?;
        Ok((local_slopes, cache_shape))
    }

    /// The buffers the backend allocates beside the caches: the decode slot
    /// buffer and each layer's slopes.
    fn own_buffers(config: &BackendConfig, local_heads: usize) -> Vec<Buffer> {
        let mut buffers = vec![Buffer::new("decode slot buffer", config.max_batch as u64 * 4)];
        for _ in 0..config.layers {
            buffers.push(Buffer::elements(
                "slopes [h] f32 of one layer",
                local_heads,
                DType::F32,
            ));
        }
        buffers
    }

    /// Uploads the slopes and the slot buffer, once every buffer is known to fit.
    fn build(
        client: &Client,
        config: BackendConfig,
        local_slopes: Vec<Vec<f32>>,
        caches: Vec<DeviceTensor>,
    ) -> Result<Self> {
        let local_heads = local_slopes[0].len();
        let slopes = local_slopes
            .iter()
            .map(|local| DeviceTensor::from_f32(client, local, &[local_heads], DType::F32))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            client: client.clone(),
            config,
            local_heads,
            slopes,
            caches,
            decode_slots: client.create_from_slice(i32::as_bytes(&vec![-1; config.max_batch])),
            unused_tokens: upload::<u32>(LaunchTarget::Device(client), &[]),
            step: Step::None,
        })
    }

    /// Heads on this rank.
    pub fn local_heads(&self) -> usize {
        self.local_heads
    }

    /// The configuration the backend was built with.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// Layer `layer`'s state cache `[slots, h_rank, d, e]`, in
    /// [`BackendConfig::state_dtype`].
    pub fn cache(&self, layer: usize) -> Result<&DeviceTensor> {
        self.check_layer(layer)?;
        Ok(&self.caches[layer])
    }

    /// Layer `layer`'s slopes `[h_rank]` f32.
    pub fn slopes(&self, layer: usize) -> Result<&DeviceTensor> {
        self.check_layer(layer)?;
        Ok(&self.slopes[layer])
    }

    /// Prepares a decode step: one token for each of `slots.len()` sequences
    /// (-1 pads), continuing the state in its slot. Writes the slots in place
    /// into the persistent slot buffer.
    pub fn prepare_decode(&mut self, slots: &[i32]) -> Result<()> {
        if slots.is_empty() || slots.len() > self.config.max_batch {
            return Err(LightningError::LengthMismatch {
                what: "decode slots",
                expected: self.config.max_batch,
                rule: "between 1 and max_batch sequences per decode step",
                actual: slots.len(),
            });
        }
        check_slots(slots, self.config.slots)?;
        let shape = self.decode_shape(slots.len());
        let plan = plan_decode(
            &shape,
            &DeviceLimits::of(&self.client),
            self.config.prefill.tuning.decode_rows_in_flight,
        )?;
        self.client.write(
            &self.decode_slots,
            Bytes::from_bytes_vec(i32::as_bytes(slots).to_vec()),
        );
        self.step = Step::Decode {
            batch: slots.len(),
            plan,
        };
        Ok(())
    }

    /// Prepares an extend step: prefills of any lengths, new or continuing,
    /// possibly mixed with decodes and speculative snapshots (see
    /// [`VarlenBatch`]). Validates and uploads the tables once for all layers.
    pub fn prepare_extend(&mut self, batch: &VarlenBatch) -> Result<()> {
        let total_tokens = batch.cu_seqlens.last().copied().unwrap_or(0) as usize;
        let shape = VarlenShape {
            total_tokens,
            sequences: 0,
            heads: self.local_heads,
            key_dim: self.config.key_dim,
            value_dim: self.config.value_dim,
            slots: self.config.slots,
            dtype: self.config.dtype,
            state_dtype: self.config.state_dtype,
        };
        let planned = PlannedBatch::new(
            LaunchTarget::Device(&self.client),
            shape,
            batch,
            &self.config.prefill,
        )?;
        self.step = Step::Extend(Box::new(DeviceBatch::upload(&self.client, planned)?));
        Ok(())
    }

    /// Layer `layer` of the prepared decode step: q, k `[B, h_rank, d]`, v and
    /// out `[B, h_rank, e]`; the layer's cache is updated in place and padding
    /// rows of `out` are zeros.
    pub fn forward_decode(
        &self,
        layer: usize,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        out: &DeviceTensor,
    ) -> Result<()> {
        let Step::Decode { batch, plan } = &self.step else {
            return Err(LightningError::WrongStep(
                "forward_decode: the backend is not prepared for a decode step; call prepare_decode first"
                    .into(),
            ));
        };
        self.check_layer(layer)?;
        self.check_layer_tensors(&DECODE, q, k, v, out, *batch)?;
        let slots = IndexBuffer::new(self.decode_slots.clone(), *batch);
        launch_decode(
            LaunchTarget::Device(&self.client),
            plan,
            [q, k, v, &self.slopes[layer]],
            &[(&self.caches[layer], &slots)],
            &self.unused_tokens,
            false,
            out,
            self.local_heads,
            self.config.prefill.scale.unwrap_or(1.0),
            self.config.key_dim,
            self.config.value_dim,
        );
        Ok(())
    }

    /// Layer `layer` of the prepared extend step: q, k `[T, h_rank, d]`, v and
    /// out `[T, h_rank, e]` packed as the step's `cu_seqlens` says; final
    /// states (and snapshots) go to their slots of the layer's cache.
    pub fn forward_extend(
        &self,
        layer: usize,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        out: &DeviceTensor,
    ) -> Result<()> {
        let Step::Extend(batch) = &self.step else {
            return Err(LightningError::WrongStep(
                "forward_extend: the backend is not prepared for an extend step; call prepare_extend first"
                    .into(),
            ));
        };
        self.check_layer(layer)?;
        self.check_layer_tensors(&EXTEND, q, k, v, out, batch.planned.shape.total_tokens)?;
        batch.launch(
            LaunchTarget::Device(&self.client),
            [q, k, v, &self.slopes[layer]],
            (None, &self.caches[layer]),
            &self.config.prefill,
            out,
        );
        Ok(())
    }

    fn decode_shape(&self, batch: usize) -> DecodeShape {
        DecodeShape {
            batch,
            heads: self.local_heads,
            key_dim: self.config.key_dim,
            value_dim: self.config.value_dim,
            slots: self.config.slots,
            dtype: self.config.dtype,
            state_dtype: self.config.state_dtype,
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.config.layers {
            return Err(LightningError::LengthMismatch {
                what: "layer index",
                expected: self.config.layers,
                rule: "a layer below the backend's layer count",
                actual: layer,
            });
        }
        Ok(())
    }

    /// Host-only checks of one layer's tensors against the prepared step, in
    /// the layouts of the calling method (`layout`). Every shape is known from
    /// the backend and the step (`tokens`), so each tensor is judged on its
    /// own: an error names the tensor the caller passed, in its layout, never
    /// the backend's own slopes or cache.
    fn check_layer_tensors(
        &self,
        layout: &StepLayout,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        out: &DeviceTensor,
        tokens: usize,
    ) -> Result<()> {
        let (h, d, e) = (self.local_heads, self.config.key_dim, self.config.value_dim);
        let (qk_names, ve_names) = ([layout.tokens, "h_rank", "d"], [layout.tokens, "h_rank", "e"]);
        for (tensor, name, names, layout, expected) in [
            (q, "q", &qk_names, layout.qk, [tokens, h, d]),
            (k, "k", &qk_names, layout.qk, [tokens, h, d]),
            (v, "v", &ve_names, layout.ve, [tokens, h, e]),
            (out, "out", &ve_names, layout.ve, [tokens, h, e]),
        ] {
            check_tensor(tensor, name, names, layout, Some(self.config.dtype))?;
            expect_shape(tensor, name, &expected, layout)?;
        }
        Ok(())
    }
}
