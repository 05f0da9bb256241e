//! Input dtypes and what a runtime can do with them.

use cubecl::ir::features::TypeUsage;
use cubecl::prelude::*;

use crate::{LightningError, Result};

/// The float type of q, k, v and the output. States are f32, but for a
/// serving state cache, which may be bf16 (see [`crate::DecodeInputs::cache`]).
///
/// Every kernel computes in f32 and rounds to this type on store, to nearest
/// even, as IEEE 754 says: a value past the type's range becomes ±inf (f16's
/// largest finite magnitude is 65504; bf16 has f32's range, about 3.4e38),
/// and NaN stays NaN. Nothing is checked unless asked for
/// ([`crate::check_finite`], [`crate::PrefillConfig::check_finite`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half: magnitudes up to 65504 (a larger result is ±inf).
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

    /// Whether `client`'s runtime takes this dtype. f32 and f16 need buffers of
    /// the type and conversion to and from f32, which is all the kernels ask
    /// of them (they compute in f32). bf16 runs on every runtime: natively
    /// where the runtime computes with it ([`DType::is_native`]), elsewhere
    /// as 32-bit words widened to f32 in a kernel and rounded back to nearest
    /// even (`kernels::widen`).
    pub fn is_supported(self, client: &Client) -> bool {
        self.is_supported_in(client.properties())
    }

    /// [`DType::is_supported`] by a device reporting `properties`.
    pub(crate) fn is_supported_in(self, properties: &DeviceProperties) -> bool {
        match self {
            DType::BF16 => {
                self.is_native_in(properties)
                    || properties
                        .type_usage(<u32 as Scalar>::elem_type_native())
                        .contains(TypeUsage::Buffer)
            }
            _ => self.is_native_in(properties),
        }
    }

    /// [`DType::is_supported`] as a check on a device reporting `properties`
    /// under `runtime`: `Ok`, or [`LightningError::UnsupportedDType`] naming
    /// the dtype and the runtime.
    pub(crate) fn check_supported(self, properties: &DeviceProperties, runtime: &'static str) -> Result<()> {
        if self.is_supported_in(properties) {
            Ok(())
        } else {
            Err(LightningError::UnsupportedDType { dtype: self, runtime })
        }
    }

    /// Whether `client`'s kernels take this dtype as a type of their own: f32
    /// and f16 wherever the runtime holds and converts them; bf16 only where the
    /// runtime also computes with it (CUDA). WGSL has no bf16, and SPIR-V
    /// offers it for storage and conversion only, where kernels using it
    /// failed to compile (`../shared/TOOLCHAIN.md`): there bf16 travels as
    /// words instead.
    pub fn is_native(self, client: &Client) -> bool {
        self.is_native_in(client.properties())
    }

    /// [`DType::is_native`] on a device reporting `properties`.
    pub(crate) fn is_native_in(self, properties: &DeviceProperties) -> bool {
        let elem = match self {
            DType::F32 => <f32 as Scalar>::elem_type_native(),
            DType::F16 => <half::f16 as Scalar>::elem_type_native(),
            DType::BF16 => <half::bf16 as Scalar>::elem_type_native(),
        };
        let uses = properties.type_usage(elem);
        let holds = uses.contains(TypeUsage::Buffer) && uses.contains(TypeUsage::Conversion);
        match self {
            DType::BF16 => holds && uses.contains(TypeUsage::Arithmetic),
            _ => holds,
        }
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
