//! bf16 on runtimes without a bf16 type (WGSL, SPIR-V): widen to f32, run the
//! f32 launches, round back.
//!
//! A bf16 tensor is bound as the 32-bit words that hold its elements in pairs
//! and widened by a shift into an f32 copy (`kernels::bf16_words`); the call
//! then runs its f32 plan on the copies with `Precision::Rounded` (the copies
//! are bf16 values, so bf16 parts of them are exact on tensor cores, and
//! without tensor cores the products are f32), and the f32 output is rounded
//! to nearest even into the caller's bf16 tensor. The copies cost one read of each input and one write
//! of twice its bytes, plus one pass over the output: small beside a prefill,
//! and the same count of launches on every call (no allocation in the caller's
//! buffers, none of the caller's bytes past the tensor touched).

use cubecl::prelude::*;
use lightning_attention_kernels::bf16_words::{narrow_bf16, widen_bf16};

use crate::{DType, DeviceTensor, LightningError, Result};

/// Units per cube of the conversion kernels.
const UNITS: u32 = 256;
/// The most cubes a conversion launches; each unit loops over words beyond.
const MAX_CUBES: u32 = 8192;

/// Whether `dtype` travels as words on `client` (bf16 where the runtime has
/// no bf16 of its own).
pub(crate) fn words(dtype: DType, client: &Client) -> bool {
    dtype == DType::BF16 && !dtype.is_native(client)
}

/// Checks that the f32 copies of `tensors` (name, elements) of `dtype` fit one
/// buffer of the device, where `dtype` travels as words.
pub(crate) fn check_copies(client: &Client, dtype: DType, tensors: &[(&'static str, usize)]) -> Result<()> {
    if !words(dtype, client) {
        return Ok(());
    }
    let available = client.properties().memory.max_page_size;
    for &(name, elements) in tensors {
        let required = elements as u64 * 4;
        if required > available {
            return Err(LightningError::DoesNotFit {
                kernel: name,
                resource: "bytes in one buffer, for the f32 copy of this bf16 tensor (the runtime has no bf16 type)",
                required,
                available,
            });
        }
    }
    Ok(())
}

/// Grid of a conversion over `words` words.
fn dims(client: &Client, words: usize) -> (CubeCount, CubeDim) {
    let max = client.properties().hardware.max_cube_count.0;
    let cubes = words
        .div_ceil(UNITS as usize)
        .clamp(1, MAX_CUBES.min(max) as usize) as u32;
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(UNITS))
}

/// The bf16 tensor's words, as a kernel argument.
fn words_arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: a bf16 tensor holds `num_elements * 2` bytes; bindings are
    // padded to 4 bytes, and the kernels touch only the elements' halves.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements().div_ceil(2)) }
}

/// An f32 copy of the bf16 tensor `t`.
pub(crate) fn widened(client: &Client, t: &DeviceTensor) -> DeviceTensor {
    let wide = DeviceTensor::empty(client, &t.shape, DType::F32);
    widen_into(client, t, &wide);
    wide
}

/// Widens the bf16 tensor `src` into the f32 tensor `dst` of as many elements.
pub(crate) fn widen_into(client: &Client, src: &DeviceTensor, dst: &DeviceTensor) {
    let len = src.num_elements();
    if len == 0 {
        return;
    }
    let (count, dim) = dims(client, len.div_ceil(2));
    // SAFETY: both buffers hold `len` elements; the kernel bounds every access by `len`.
    unsafe {
        widen_bf16::launch_unchecked(
            client,
            count,
            dim,
            words_arg(src),
            crate::launch::arg(dst),
            len as u32,
        )
    }
}

/// Rounds the f32 tensor `src` into the bf16 tensor `dst` of as many elements.
pub(crate) fn narrow_into(client: &Client, src: &DeviceTensor, dst: &DeviceTensor) {
    let len = src.num_elements();
    if len == 0 {
        return;
    }
    let (count, dim) = dims(client, len.div_ceil(2));
    // SAFETY: as in `widen_into`.
    unsafe {
        narrow_bf16::launch_unchecked(
            client,
            count,
            dim,
            crate::launch::arg(src),
            words_arg(dst),
            len as u32,
        )
    }
}
