//! Shape, dtype and buffer validation of every argument, before anything launches.

use crate::{DType, LightningError, Result};

/// The largest element count a kernel addresses (indices are 32-bit on wgpu).
pub(crate) const MAX_ELEMENTS: u64 = u32::MAX as u64;

/// A tensor argument described by its shape and dtype alone, with no buffer:
/// what [`validate_prefill_shapes`] and [`validate_decode_shapes`] take, for a
/// caller that validates a call before its buffers exist (Burn's lazy Fusion
/// backend). Everything is checked as for a [`crate::DeviceTensor`] but the buffer's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShape {
    /// The shape, outermost first.
    pub shape: Vec<usize>,
    /// The element type.
    pub dtype: DType,
}

/// What validation reads of an argument: a [`crate::DeviceTensor`] (which
/// implements it where it is defined) or a [`TensorShape`].
pub(crate) trait Arg {
    /// The shape, outermost first.
    fn dims(&self) -> &[usize];
    /// The element type.
    fn elem(&self) -> DType;
    /// Bytes in its buffer; `None` where there is no buffer yet.
    fn buffer_bytes(&self) -> Option<u64>;
}

impl Arg for TensorShape {
    fn dims(&self) -> &[usize] {
        &self.shape
    }
    fn elem(&self) -> DType {
        self.dtype
    }
    fn buffer_bytes(&self) -> Option<u64> {
        None
    }
}

/// Sizes of a validated prefill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    /// `b`.
    pub batch: usize,
    /// `h`.
    pub heads: usize,
    /// `n`.
    pub seq_len: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// dtype of q, k, v and the output.
    pub dtype: DType,
}

impl PrefillShape {
    /// `b * h`.
    pub fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }
    /// Shape of q and k `[b, h, n, d]`.
    pub fn qk_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seq_len, self.key_dim]
    }
    /// Shape of v (and the output) `[b, h, n, e]`.
    pub fn v_shape(&self) -> Vec<usize> {
        self.out_shape()
    }
    /// Shape of the output `[b, h, n, e]`.
    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.seq_len, self.value_dim]
    }
    /// Shape of the state `[b, h, d, e]`.
    pub fn state_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.key_dim, self.value_dim]
    }
}

pub(crate) fn expect_rank(
    t: &impl Arg,
    tensor: &'static str,
    expected: usize,
    layout: &'static str,
) -> Result<()> {
    if t.dims().len() != expected {
        return Err(LightningError::Rank {
            tensor,
            expected,
            layout,
            actual: t.dims().len(),
            shape: t.dims().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn expect_nonzero(t: &impl Arg, tensor: &'static str, names: &[&'static str]) -> Result<()> {
    for (&size, &dim) in t.dims().iter().zip(names) {
        if size == 0 {
            return Err(LightningError::EmptyDimension {
                tensor,
                dim,
                shape: t.dims().to_vec(),
            });
        }
    }
    Ok(())
}

pub(crate) fn expect_shape(
    t: &impl Arg,
    tensor: &'static str,
    expected: &[usize],
    layout: &'static str,
) -> Result<()> {
    if t.dims() != expected {
        return Err(LightningError::Shape {
            tensor,
            expected: expected.to_vec(),
            layout,
            actual: t.dims().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn expect_dtype(t: &impl Arg, tensor: &'static str, expected: DType) -> Result<()> {
    if t.elem() != expected {
        return Err(LightningError::DType {
            tensor,
            expected,
            actual: t.elem(),
        });
    }
    Ok(())
}

/// `elements` are addressable with the kernels' 32-bit indices.
pub(crate) fn expect_addressable(tensor: &'static str, elements: u64) -> Result<()> {
    if elements > MAX_ELEMENTS {
        return Err(LightningError::TooLarge {
            tensor,
            elements,
            max: MAX_ELEMENTS,
        });
    }
    Ok(())
}

/// The buffer (where there is one) holds the shape, and the shape is
/// addressable with 32-bit indices.
pub(crate) fn expect_buffer(t: &impl Arg, tensor: &'static str) -> Result<()> {
    let elements = t.dims().iter().product::<usize>() as u64;
    expect_addressable(tensor, elements)?;
    let expected = elements * t.elem().size() as u64;
    if let Some(actual) = t.buffer_bytes()
        && actual < expected
    {
        return Err(LightningError::BufferTooSmall {
            tensor,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Checks one argument fully: rank, no empty dimension, dtype, buffer.
pub(crate) fn check_tensor(
    t: &impl Arg,
    tensor: &'static str,
    names: &[&'static str],
    layout: &'static str,
    dtype: Option<DType>,
) -> Result<()> {
    expect_rank(t, tensor, names.len(), layout)?;
    expect_nonzero(t, tensor, names)?;
    if let Some(dtype) = dtype {
        expect_dtype(t, tensor, dtype)?;
    }
    expect_buffer(t, tensor)
}

/// [`crate::shapes::validate_prefill`] on shapes and dtypes alone (no buffers, so no buffer-size check).
pub fn validate_prefill_shapes(
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    slopes: &TensorShape,
    initial_state: Option<&TensorShape>,
) -> Result<PrefillShape> {
    prefill_args(q, k, v, slopes, initial_state)
}

pub(crate) fn prefill_args<T: Arg>(
    q: &T,
    k: &T,
    v: &T,
    slopes: &T,
    initial_state: Option<&T>,
) -> Result<PrefillShape> {
    const QK: &str = "[b, h, n, d]";
    const V: &str = "[b, h, n, e]";
    check_tensor(q, "q", &["b", "h", "n", "d"], QK, None)?;
    let (dtype, dims) = (q.elem(), q.dims());
    let (batch, heads, seq_len, key_dim) = (dims[0], dims[1], dims[2], dims[3]);
    check_tensor(k, "k", &["b", "h", "n", "d"], QK, Some(dtype))?;
    expect_shape(k, "k", dims, QK)?;
    check_tensor(v, "v", &["b", "h", "n", "e"], V, Some(dtype))?;
    let value_dim = v.dims()[3];
    expect_shape(v, "v", &[batch, heads, seq_len, value_dim], V)?;
    check_tensor(slopes, "slopes", &["h"], "[h]", Some(DType::F32))?;
    expect_shape(slopes, "slopes", &[heads], "[h]")?;
    let shape = PrefillShape {
        batch,
        heads,
        seq_len,
        key_dim,
        value_dim,
        dtype,
    };
    if let Some(state) = initial_state {
        check_tensor(
            state,
            "initial_state",
            &["b", "h", "d", "e"],
            "[b, h, d, e]",
            Some(DType::F32),
        )?;
        expect_shape(state, "initial_state", &shape.state_shape(), "[b, h, d, e]")?;
    }
    Ok(shape)
}

/// Sizes of a validated decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Sequences in the step.
    pub batch: usize,
    /// `h`.
    pub heads: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// Slots in the cache.
    pub slots: usize,
    /// dtype of q, k, v and the output.
    pub dtype: DType,
    /// dtype of the state cache: f32 or bf16 (see [`crate::DecodeInputs::cache`]).
    pub state_dtype: DType,
}

/// [`crate::shapes::validate_decode`] on shapes and dtypes alone (no buffers, so no buffer-size check).
pub fn validate_decode_shapes(
    q: &TensorShape,
    k: &TensorShape,
    v: &TensorShape,
    cache: &TensorShape,
    slopes: &TensorShape,
    slots: &[i32],
) -> Result<DecodeShape> {
    decode_args(q, k, v, cache, slopes, slots)
}

pub(crate) fn decode_args<T: Arg>(
    q: &T,
    k: &T,
    v: &T,
    cache: &T,
    slopes: &T,
    slots: &[i32],
) -> Result<DecodeShape> {
    const QK: &str = "[b, h, 1, d]";
    const V: &str = "[b, h, 1, e]";
    // The token axis is 1 in the layout, not a size of the caller's: each
    // tensor's shape is checked before its empty dimensions, so a token axis
    // of 0 (or 2) is a shape error against `[b, h, 1, *]`, never a dimension
    // name the layout does not have.
    expect_rank(q, "q", 4, QK)?;
    let (dtype, dims) = (q.elem(), q.dims());
    let (batch, heads, key_dim) = (dims[0], dims[1], dims[3]);
    expect_shape(q, "q", &[batch, heads, 1, key_dim], QK)?;
    check_tensor(q, "q", &["b", "h", "1", "d"], QK, None)?;
    expect_rank(k, "k", 4, QK)?;
    expect_shape(k, "k", dims, QK)?;
    check_tensor(k, "k", &["b", "h", "1", "d"], QK, Some(dtype))?;
    expect_rank(v, "v", 4, V)?;
    let value_dim = v.dims()[3];
    expect_shape(v, "v", &[batch, heads, 1, value_dim], V)?;
    check_tensor(v, "v", &["b", "h", "1", "e"], V, Some(dtype))?;
    check_tensor(slopes, "slopes", &["h"], "[h]", Some(DType::F32))?;
    expect_shape(slopes, "slopes", &[heads], "[h]")?;
    const CACHE: &str = "[slots, h, d, e]";
    check_tensor(cache, "cache", &["slots", "h", "d", "e"], CACHE, None)?;
    let state_dtype = check_state_dtype(cache, "cache")?;
    let num_slots = cache.dims()[0];
    expect_shape(cache, "cache", &[num_slots, heads, key_dim, value_dim], CACHE)?;
    if slots.len() != batch {
        return Err(LightningError::Shape {
            tensor: "slots",
            expected: vec![batch],
            layout: "[b]",
            actual: vec![slots.len()],
        });
    }
    check_slots(slots, num_slots)?;
    Ok(DecodeShape {
        batch,
        heads,
        key_dim,
        value_dim,
        slots: num_slots,
        dtype,
        state_dtype,
    })
}

/// The dtype of a state cache `[slots, h, d, e]` of checked rank: f32, or
/// bf16 with an even `e`, whose elements travel in pairs as 32-bit words (an
/// odd `e` would put one word across two slots' states). f16 is refused as
/// [`LightningError::DType`] (f32 expected): its 65504 ceiling is too low for
/// a state that sums a long history.
pub(crate) fn check_state_dtype(cache: &impl Arg, tensor: &'static str) -> Result<DType> {
    match cache.elem() {
        DType::F32 => Ok(DType::F32),
        DType::BF16 => {
            let value_dim = cache.dims()[cache.dims().len() - 1];
            if value_dim % 2 == 1 {
                return Err(LightningError::OddStateWidth { tensor, value_dim });
            }
            Ok(DType::BF16)
        }
        actual => Err(LightningError::DType {
            tensor,
            expected: DType::F32,
            actual,
        }),
    }
}

/// Each slot is -1 (padding) or in `0..num_slots`, and no slot appears twice.
pub(crate) fn check_slots(slots: &[i32], num_slots: usize) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (index, &slot) in slots.iter().enumerate() {
        if slot == -1 {
            continue;
        }
        if slot < 0 || slot as usize >= num_slots {
            return Err(LightningError::SlotOutOfRange {
                index,
                slot: slot as i64,
                slots: num_slots,
            });
        }
        if let Some(first) = seen.insert(slot, index) {
            return Err(LightningError::DuplicateSlot {
                slot: slot as i64,
                first,
                second: index,
            });
        }
    }
    Ok(())
}
