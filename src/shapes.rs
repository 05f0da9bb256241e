//! Shape, dtype and buffer validation of every argument, before anything launches.

use crate::{DType, DeviceTensor, LightningError, Result};

/// The largest element count a kernel addresses (indices are 32-bit on wgpu).
pub(crate) const MAX_ELEMENTS: u64 = u32::MAX as u64;

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
    t: &DeviceTensor,
    tensor: &'static str,
    expected: usize,
    layout: &'static str,
) -> Result<()> {
    if t.shape.len() != expected {
        return Err(LightningError::Rank {
            tensor,
            expected,
            layout,
            actual: t.shape.len(),
            shape: t.shape.clone(),
        });
    }
    Ok(())
}

pub(crate) fn expect_nonzero(t: &DeviceTensor, tensor: &'static str, names: &[&'static str]) -> Result<()> {
    for (&size, &dim) in t.shape.iter().zip(names) {
        if size == 0 {
            return Err(LightningError::EmptyDimension {
                tensor,
                dim,
                shape: t.shape.clone(),
            });
        }
    }
    Ok(())
}

pub(crate) fn expect_shape(
    t: &DeviceTensor,
    tensor: &'static str,
    expected: &[usize],
    layout: &'static str,
) -> Result<()> {
    if t.shape != expected {
        return Err(LightningError::Shape {
            tensor,
            expected: expected.to_vec(),
            layout,
            actual: t.shape.clone(),
        });
    }
    Ok(())
}

pub(crate) fn expect_dtype(t: &DeviceTensor, tensor: &'static str, expected: DType) -> Result<()> {
    if t.dtype != expected {
        return Err(LightningError::DType {
            tensor,
            expected,
            actual: t.dtype,
        });
    }
    Ok(())
}

/// The buffer holds the shape, and the shape is addressable with 32-bit indices.
pub(crate) fn expect_buffer(t: &DeviceTensor, tensor: &'static str) -> Result<()> {
    let elements = t.num_elements() as u64;
    if elements > MAX_ELEMENTS {
        return Err(LightningError::TooLarge {
            tensor,
            elements,
            max: MAX_ELEMENTS,
        });
    }
    let expected = elements * t.dtype.size() as u64;
    let actual = t.handle.size();
    if actual < expected {
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
    t: &DeviceTensor,
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

/// Validates the arguments of a prefill: q, k `[b, h, n, d]`, v `[b, h, n, e]`
/// of one dtype, slopes `[h]` f32, the optional initial state `[b, h, d, e]` f32.
pub fn validate_prefill(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    slopes: &DeviceTensor,
    initial_state: Option<&DeviceTensor>,
) -> Result<PrefillShape> {
    const QK: &str = "[b, h, n, d]";
    const V: &str = "[b, h, n, e]";
    check_tensor(q, "q", &["b", "h", "n", "d"], QK, None)?;
    let (batch, heads, seq_len, key_dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    check_tensor(k, "k", &["b", "h", "n", "d"], QK, Some(q.dtype))?;
    expect_shape(k, "k", &q.shape, QK)?;
    check_tensor(v, "v", &["b", "h", "n", "e"], V, Some(q.dtype))?;
    let value_dim = v.shape[3];
    expect_shape(v, "v", &[batch, heads, seq_len, value_dim], V)?;
    check_tensor(slopes, "slopes", &["h"], "[h]", Some(DType::F32))?;
    expect_shape(slopes, "slopes", &[heads], "[h]")?;
    let shape = PrefillShape {
        batch,
        heads,
        seq_len,
        key_dim,
        value_dim,
        dtype: q.dtype,
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
}

/// Validates the arguments of a decode step: q, k `[b, h, 1, d]`, v `[b, h, 1, e]`,
/// cache `[slots, h, d, e]` f32, slopes `[h]` f32, and `b` slot indices, each -1
/// (padding) or a distinct slot of the cache.
pub fn validate_decode(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    cache: &DeviceTensor,
    slopes: &DeviceTensor,
    slots: &[i32],
) -> Result<DecodeShape> {
    const QK: &str = "[b, h, 1, d]";
    const V: &str = "[b, h, 1, e]";
    check_tensor(q, "q", &["b", "h", "n", "d"], QK, None)?;
    let (batch, heads, key_dim) = (q.shape[0], q.shape[1], q.shape[3]);
    expect_shape(q, "q", &[batch, heads, 1, key_dim], QK)?;
    check_tensor(k, "k", &["b", "h", "n", "d"], QK, Some(q.dtype))?;
    expect_shape(k, "k", &q.shape, QK)?;
    check_tensor(v, "v", &["b", "h", "n", "e"], V, Some(q.dtype))?;
    let value_dim = v.shape[3];
    expect_shape(v, "v", &[batch, heads, 1, value_dim], V)?;
    check_tensor(slopes, "slopes", &["h"], "[h]", Some(DType::F32))?;
    expect_shape(slopes, "slopes", &[heads], "[h]")?;
    const CACHE: &str = "[slots, h, d, e]";
    check_tensor(cache, "cache", &["slots", "h", "d", "e"], CACHE, Some(DType::F32))?;
    let num_slots = cache.shape[0];
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
        dtype: q.dtype,
    })
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
