//! Input dtypes and what a runtime can do with them.

use cubecl::ir::features::TypeUsage;
use cubecl::prelude::*;

/// The float type of q, k, v and the output. The state is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether `client`'s runtime can hold this type in buffers and convert it
    /// to and from f32, which is all the kernels ask of it (they compute in f32).
    pub fn is_supported(self, client: &Client) -> bool {
        let uses = match self {
            DType::F32 => <f32 as Scalar>::supported_uses(client),
            DType::F16 => <half::f16 as Scalar>::supported_uses(client),
            DType::BF16 => <half::bf16 as Scalar>::supported_uses(client),
        };
        uses.contains(TypeUsage::Buffer) && uses.contains(TypeUsage::Conversion)
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}
