//! Validation of a packed (varlen) call: the tensors, `cu_seqlens`, slots,
//! initial-state flags and snapshot slots, before anything is uploaded.

use std::collections::HashMap;

use super::shapes::{Arg, check_state_dtype, check_tensor, expect_shape};
use crate::{DType, LightningError, Result};

/// Sizes of a validated packed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VarlenShape {
    /// Tokens of all sequences, `T`.
    pub total_tokens: usize,
    /// Sequences, `N`.
    pub sequences: usize,
    /// `h`.
    pub heads: usize,
    /// `d`.
    pub key_dim: usize,
    /// `e`.
    pub value_dim: usize,
    /// Slots in the state cache.
    pub slots: usize,
    /// dtype of q, k, v and the output.
    pub dtype: DType,
    /// dtype of the state cache (f32 where the call has none): f32 or bf16.
    pub state_dtype: DType,
}

impl VarlenShape {
    /// Shape of the output `[T, h, e]`.
    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.total_tokens, self.heads, self.value_dim]
    }
}

/// Checks q, k `[T, h, d]`, v `[T, h, e]` of one dtype, slopes `[h]` f32 and
/// the cache `[slots, h, d, e]` f32 or bf16.
pub(crate) fn check_tensors<T: Arg>(q: &T, k: &T, v: &T, slopes: &T, cache: &T) -> Result<VarlenShape> {
    const CACHE: &str = "[slots, h, d, e]";
    let shape = check_packed_tensors(q, k, v, slopes)?;
    check_tensor(cache, "cache", &["slots", "h", "d", "e"], CACHE, None)?;
    let state_dtype = check_state_dtype(cache, "cache")?;
    let slots = cache.dims()[0];
    expect_shape(
        cache,
        "cache",
        &[slots, shape.heads, shape.key_dim, shape.value_dim],
        CACHE,
    )?;
    Ok(VarlenShape {
        slots,
        state_dtype,
        ..shape
    })
}

/// Checks q, k `[T, h, d]`, v `[T, h, e]` of one dtype and slopes `[h]` f32
/// (a call with no slot cache: `slots` is 0).
pub(crate) fn check_packed_tensors<T: Arg>(q: &T, k: &T, v: &T, slopes: &T) -> Result<VarlenShape> {
    // The layouts and dimension names of `VarlenInputs`' docs.
    const QK: &str = "[T, h, d]";
    const V: &str = "[T, h, e]";
    check_tensor(q, "q", &["T", "h", "d"], QK, None)?;
    let (total_tokens, heads, key_dim) = (q.dims()[0], q.dims()[1], q.dims()[2]);
    check_tensor(k, "k", &["T", "h", "d"], QK, Some(q.elem()))?;
    expect_shape(k, "k", q.dims(), QK)?;
    check_tensor(v, "v", &["T", "h", "e"], V, Some(q.elem()))?;
    let value_dim = v.dims()[2];
    expect_shape(v, "v", &[total_tokens, heads, value_dim], V)?;
    check_tensor(slopes, "slopes", &["h"], "[h]", Some(DType::F32))?;
    expect_shape(slopes, "slopes", &[heads], "[h]")?;
    Ok(VarlenShape {
        total_tokens,
        sequences: 0,
        heads,
        key_dim,
        value_dim,
        slots: 0,
        dtype: q.elem(),
        state_dtype: DType::F32,
    })
}

/// Checks `tensor` (if given): dimensions named `names`, shape `expected`
/// (`layout` as the caller's docs write it), dtype `dtype`.
pub(crate) fn check_optional<T: Arg>(
    tensor: Option<&T>,
    name: &'static str,
    (names, layout): (&[&'static str], &'static str),
    expected: &[usize],
    dtype: DType,
) -> Result<()> {
    let Some(tensor) = tensor else {
        return Ok(());
    };
    check_tensor(tensor, name, names, layout, Some(dtype))?;
    expect_shape(tensor, name, expected, layout)
}

/// `cu_seqlens` starts at 0, increases strictly and ends at `total_tokens`.
/// Returns the number of sequences.
pub(crate) fn check_offsets(cu_seqlens: &[u32], total_tokens: usize) -> Result<usize> {
    let last = check_offset_list(cu_seqlens, total_tokens, false)?;
    if cu_seqlens[last] as usize != total_tokens {
        return Err(LightningError::OffsetPastEnd {
            index: last,
            value: cu_seqlens[last] as u64,
            total_tokens,
        });
    }
    Ok(last)
}

/// Packed training's `cu_seqlens`: starts at 0, does not decrease (a
/// document may be empty) and ends at most at `total_tokens` (a packed
/// training buffer may hold padding rows past the last document). Returns
/// the number of documents.
pub(crate) fn check_offsets_within(cu_seqlens: &[u32], total_tokens: usize) -> Result<usize> {
    check_offset_list(cu_seqlens, total_tokens, true)
}

/// `cu_seqlens` starts at 0, increases (strictly, unless `allow_empty`)
/// and ends at most at `total_tokens`. Returns the number of sequences.
fn check_offset_list(cu_seqlens: &[u32], total_tokens: usize, allow_empty: bool) -> Result<usize> {
    if cu_seqlens.len() < 2 {
        return Err(LightningError::LengthMismatch {
            what: "cu_seqlens",
            expected: 2,
            rule: "at least one sequence: N + 1 offsets",
            actual: cu_seqlens.len(),
        });
    }
    if cu_seqlens[0] != 0 {
        return Err(LightningError::FirstOffset {
            value: cu_seqlens[0] as u64,
        });
    }
    for index in 1..cu_seqlens.len() {
        let (previous, value) = (cu_seqlens[index - 1], cu_seqlens[index]);
        if value as usize > total_tokens {
            return Err(LightningError::OffsetPastEnd {
                index,
                value: value as u64,
                total_tokens,
            });
        }
        if value < previous && allow_empty {
            return Err(LightningError::OffsetsDecreasing {
                index,
                previous: previous as u64,
                value: value as u64,
            });
        }
        if value <= previous && !allow_empty {
            return Err(LightningError::OffsetsNotIncreasing {
                index,
                previous: previous as u64,
                value: value as u64,
            });
        }
    }
    Ok(cu_seqlens.len() - 1)
}

/// A per-sequence list holds one entry per sequence.
pub(crate) fn check_len(what: &'static str, actual: usize, sequences: usize) -> Result<()> {
    if actual != sequences {
        return Err(LightningError::LengthMismatch {
            what,
            expected: sequences,
            rule: "one per sequence",
            actual,
        });
    }
    Ok(())
}

/// Every slot written in one call (each sequence's own, and each snapshot's)
/// is in range and distinct, so no two units race on a slot.
pub(crate) struct SlotRegistry {
    slots: usize,
    owners: HashMap<i32, usize>,
}

impl SlotRegistry {
    pub fn new(slots: usize) -> Self {
        Self {
            slots,
            owners: HashMap::new(),
        }
    }

    /// Registers `slot` for `sequence`; -1 (padding, or no snapshot) is skipped.
    pub fn claim(&mut self, sequence: usize, slot: i32) -> Result<()> {
        if slot == -1 {
            return Ok(());
        }
        if slot < 0 || slot as usize >= self.slots {
            return Err(LightningError::SlotOutOfRange {
                index: sequence,
                slot: slot as i64,
                slots: self.slots,
            });
        }
        if let Some(first) = self.owners.insert(slot, sequence) {
            return Err(LightningError::DuplicateSlot {
                slot: slot as i64,
                first,
                second: sequence,
            });
        }
        Ok(())
    }
}
