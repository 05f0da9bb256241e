//! The decode kernel's launch (`kernels::decode`), planned beside it in
//! `plan.rs`: once per part of the state cache, bf16 inputs on f32 copies
//! where the runtime has no bf16 type. A bf16 cache is streamed by the kernel
//! itself, as words, on every runtime (see `kernels::decode`).

use lightning_attention_kernels as kernels;

use super::plan::DecodePlan;
use crate::device::limits::bf16_words;
use crate::device::target::{LaunchTarget, launch_kernel};
use crate::device::tensor::arg;
use crate::routines::table::IndexBuffer;
use crate::routines::widen;
use crate::{DType, DeviceTensor};

/// Launches the decode kernel, once per part of the cache: `caches` pairs
/// each part `[slots, h, d, e]` with the slot of every entry in it (-1 padding,
/// written as zeros by exactly one part's launch; below -1, an entry another
/// part serves). With `indexed`, entry `b` is packed token `tokens[b]`;
/// without, rows are dense `[b, h, ...]` and `tokens` (bound, never read) may
/// be any buffer other than the slots: wgpu refuses one buffer bound twice in
/// a dispatch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_decode(
    target: LaunchTarget,
    plan: &DecodePlan,
    [q, k, v, slopes]: [&DeviceTensor; 4],
    caches: &[(&DeviceTensor, &IndexBuffer)],
    tokens: &IndexBuffer,
    indexed: bool,
    out: &DeviceTensor,
    heads: usize,
    scale: f32,
    key_dim: usize,
    value_dim: usize,
) {
    if bf16_words(q.dtype, target) {
        // bf16 on a runtime without bf16: the f32 kernel on widened copies,
        // every part into one f32 output, rounded back once.
        let [q, k, v] = [q, k, v].map(|t| widen::widened(target, t));
        let wide_out = target.empty_tensor(&out.shape, DType::F32);
        launch_decode(
            target,
            plan,
            [&q, &k, &v, slopes],
            caches,
            tokens,
            indexed,
            &wide_out,
            heads,
            scale,
            key_dim,
            value_dim,
        );
        widen::narrow_into(target, &wide_out, out);
        return;
    }
    // The cache's element and vector size: f32 vectors as v's, or (bf16) the
    // words holding a vector's elements in pairs.
    let state_words = caches
        .first()
        .is_some_and(|(cache, _)| cache.dtype == DType::BF16);
    let state_vector = if state_words {
        plan.vector_size / 2
    } else {
        plan.vector_size
    };
    let cache_arg = |cache: &DeviceTensor| {
        if state_words {
            widen::words_arg(cache)
        } else {
            arg(cache)
        }
    };
    macro_rules! launch {
        ($f:ty, $s:ty, $cache:expr, $slots:expr) => {
            // SAFETY: shapes, slots, tokens and the grid were validated and
            // planned; a bf16 cache's vectors of words cover its elements exactly
            // (the plan's vectors are even where the cache is bf16).
            unsafe {
                launch_kernel!(
                    target,
                    kernels::decode::decode[$f, $s],
                    plan.dims.cube_count(),
                    plan.dims.cube_dim(),
                    plan.vector_size,
                    state_vector,
                    arg(q),
                    arg(k),
                    arg(v),
                    arg(slopes),
                    $slots.arg(),
                    tokens.arg(),
                    cache_arg($cache),
                    arg(out),
                    heads as u32,
                    scale,
                    key_dim,
                    value_dim,
                    plan.column_tile,
                    plan.row_groups,
                    plan.rows_in_flight,
                    indexed,
                    state_words,
                )
            }
        };
    }
    for &(cache, slots) in caches {
        // The kernel's element type is the dtype of q (validated equal to k, v, out).
        match (q.dtype, state_words) {
            (DType::F32, false) => launch!(f32, f32, cache, slots),
            (DType::F16, false) => launch!(half::f16, f32, cache, slots),
            (DType::BF16, false) => launch!(half::bf16, f32, cache, slots),
            (DType::F32, true) => launch!(f32, u32, cache, slots),
            (DType::F16, true) => launch!(half::f16, u32, cache, slots),
            (DType::BF16, true) => launch!(half::bf16, u32, cache, slots),
        }
    }
}
