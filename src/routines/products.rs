//! How the tensor-core routines take their operands ([`Products`]) and the
//! vectors they move them in. Which [`Products`] a call gets is chosen with
//! every other routine choice, in [`crate::plan::PrefillPlan::new`].

use crate::DType;

/// How the tensor-core routines of a prefill take their operands, from the
/// input dtype, the config's [`crate::Precision`] and the device's tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// No tensor cores: the portable routines, in f32 on CUDA cores (or the
    /// runtime's vector units). Where f32 inputs asked for [`crate::Precision::Split`]
    /// or [`crate::Precision::Rounded`], this is the fallback the plan reports.
    Portable,
    /// 16-bit inputs on tensor cores, as they are.
    Native,
    /// f32 inputs on bf16 tensor cores, each operand split into a high and a
    /// low part, three products ([`crate::Precision::Split`]).
    SplitBf16,
    /// f32 inputs on bf16 tensor cores, rounded to bf16 ([`crate::Precision::Rounded`]).
    RoundedBf16,
}

impl Products {
    /// Bytes a staged operand element takes in shared memory (a split's two
    /// bf16 parts are four).
    pub fn staged_bytes(&self, dtype: DType) -> usize {
        match self {
            Self::SplitBf16 => 4,
            Self::RoundedBf16 => 2,
            Self::Native | Self::Portable => dtype.size(),
        }
    }

    /// Whether f32 operands are split into high and low parts.
    pub fn split(&self) -> bool {
        *self == Self::SplitBf16
    }
}

/// The widest vector (8, 4, 2 or 1 scalars) dividing both `d` and `e`: the
/// tensor-core routines load rows of q, k, v and the block states in vectors
/// of this many scalars, and every row and tile edge falls on a vector
/// boundary (they are planned only where it is [`CMMA_VECTOR`](crate::plan::CMMA_VECTOR)).
pub fn cmma_vector_size(key_dim: usize, value_dim: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|lanes| key_dim.is_multiple_of(*lanes) && value_dim.is_multiple_of(*lanes))
        .unwrap_or(1)
}
