//! The decode kernel's launch (`kernels::decode`), planned beside it in
//! `plan.rs`: once per part of the state cache, bf16 on f32 copies where the
//! runtime has no bf16 type.

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
    macro_rules! launch {
        ($f:ty, $cache:expr, $slots:expr) => {
            // SAFETY: shapes, slots, tokens and the grid were validated and planned.
            unsafe {
                launch_kernel!(
                    target,
                    kernels::decode::decode[$f],
                    plan.dims.cube_count(),
                    plan.dims.cube_dim(),
                    plan.vector_size,
                    arg(q),
                    arg(k),
                    arg(v),
                    arg(slopes),
                    $slots.arg(),
                    tokens.arg(),
                    arg($cache),
                    arg(out),
                    heads as u32,
                    scale,
                    key_dim,
                    value_dim,
                    plan.column_tile,
                    plan.row_groups,
                    plan.rows_in_flight,
                    indexed,
                )
            }
        };
    }
    for &(cache, slots) in caches {
        // The kernel's element type is the dtype of q (validated equal to k, v, out).
        match q.dtype {
            DType::F32 => launch!(f32, cache, slots),
            DType::F16 => launch!(half::f16, cache, slots),
            DType::BF16 => launch!(half::bf16, cache, slots),
        }
    }
}
