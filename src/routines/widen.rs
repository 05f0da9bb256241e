//! 16-bit inputs on f32 copies: widen, run the f32 launches, round back.
//!
//! Two cases take this path, decided where every routine is chosen
//! ([`crate::plan::PrefillPlan::new`], `widens`):
//! - **bf16 without a bf16 type** (WGSL; SPIR-V, which holds bf16 for storage
//!   and conversion only): the tensor is bound as the 32-bit words that hold
//!   its elements in pairs and widened by a shift (`kernels::widen`).
//! - **16-bit inputs whose products run portable** (no tensor cores for the
//!   dtype, or `Routines::Portable`): the portable routines compute in f32
//!   anyway, and under WGSL on an H200 they ran f16 inputs at half their f32
//!   speed (SPEED_NOTES.md, variant 16), so the inputs are converted once.
//!
//! The call then runs its f32 plan on the copies: bf16 values with
//! `Precision::Rounded` (bf16 parts of bf16 values are exact, on tensor cores
//! where the device has bf16 ones), f16 values with `Precision::Exact`. The f32
//! output is rounded to nearest even into the caller's tensor. The copies
//! cost one read of each input and a write of twice its bytes, plus one pass
//! over the output, and `4 x` the elements in bytes of device memory; no byte
//! of the caller's buffers past the tensor is touched. Decode widens only
//! bf16 without a bf16 type: its q, k, v are small beside the state it
//! streams, and four more launches would cost more than they save.

use cubecl::prelude::*;
use lightning_attention_kernels::widen::{narrow_bf16, narrow_cast, widen_bf16, widen_cast};

use crate::device::limits::{DeviceLimits, bf16_words, grid_stride};
use crate::device::memory::{Buffer, fits_one_buffer};
use crate::device::target::{LaunchTarget, launch_kernel};
use crate::device::tensor::arg;
use crate::routines::prefill::plan::widens;
use crate::{DType, DeviceTensor, PrefillConfig, Result};

/// Checks that the f32 copies of `tensors` (name, elements) of `dtype` fit one
/// buffer of a device with `limits`, where a call with `config` takes copies.
pub(crate) fn check_copies(
    limits: &DeviceLimits,
    dtype: DType,
    config: &PrefillConfig,
    tensors: &[(&'static str, usize)],
) -> Result<()> {
    if !widens(dtype, config, limits) {
        return Ok(());
    }
    for &(name, elements) in tensors {
        fits_one_buffer(Buffer::elements(name, elements, DType::F32), limits.max_buffer)?;
    }
    Ok(())
}

/// The bf16 tensor's words, as a kernel argument.
pub(crate) fn words_arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: a bf16 tensor holds `num_elements * 2` bytes; bindings are
    // padded to 4 bytes, and the kernels touch only the elements' halves.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements().div_ceil(2)) }
}

/// An f32 copy of the 16-bit tensor `t`.
pub(crate) fn widened(target: LaunchTarget, t: &DeviceTensor) -> DeviceTensor {
    let wide = target.empty_tensor(&t.shape, DType::F32);
    widen_into(target, t, &wide);
    wide
}

/// Widens the 16-bit tensor `src` into the f32 tensor `dst` of as many elements.
pub(crate) fn widen_into(target: LaunchTarget, src: &DeviceTensor, dst: &DeviceTensor) {
    let len = src.num_elements();
    if len == 0 {
        return;
    }
    let dst_arg = arg(dst);
    // SAFETY (each launch): both buffers hold `len` elements; the kernels
    // bound every access by `len`.
    unsafe {
        if bf16_words(src.dtype, target) {
            let (count, dim) = grid_stride(target, len.div_ceil(2));
            launch_kernel!(target, widen_bf16[], count, dim, words_arg(src), dst_arg, len as u32)
        } else {
            let (count, dim) = grid_stride(target, len);
            let src_arg = arg(src);
            match src.dtype {
                DType::F16 => launch_kernel!(
                    target,
                    widen_cast[half::f16],
                    count,
                    dim,
                    src_arg,
                    dst_arg,
                    len as u32,
                ),
                _ => launch_kernel!(
                    target,
                    widen_cast[half::bf16],
                    count,
                    dim,
                    src_arg,
                    dst_arg,
                    len as u32,
                ),
            }
        }
    }
}

/// Rounds the f32 tensor `src` into the 16-bit tensor `dst` of as many elements.
pub(crate) fn narrow_into(target: LaunchTarget, src: &DeviceTensor, dst: &DeviceTensor) {
    let len = src.num_elements();
    if len == 0 {
        return;
    }
    let src_arg = arg(src);
    // SAFETY: as in `widen_into`.
    unsafe {
        if bf16_words(dst.dtype, target) {
            let (count, dim) = grid_stride(target, len.div_ceil(2));
            launch_kernel!(target, narrow_bf16[], count, dim, src_arg, words_arg(dst), len as u32)
        } else {
            let (count, dim) = grid_stride(target, len);
            let dst_arg = arg(dst);
            match dst.dtype {
                DType::F16 => launch_kernel!(
                    target,
                    narrow_cast[half::f16],
                    count,
                    dim,
                    src_arg,
                    dst_arg,
                    len as u32,
                ),
                _ => launch_kernel!(
                    target,
                    narrow_cast[half::bf16],
                    count,
                    dim,
                    src_arg,
                    dst_arg,
                    len as u32,
                ),
            }
        }
    }
}
