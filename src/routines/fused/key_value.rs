//! Planning of the backward's dk and dv walk (`kernels::fused_key_value`):
//! the dv pass's tensor-core walk with the dk pass folded in, one cube per
//! (walk, head) holding all of `e`.

use super::plan::{FRAGMENT_CHUNKS, FragmentWalk, FusedPlan, MAX_FRAGMENT_KEY_DIM, PLANE, walk_grid};
use crate::PrefillConfig;
use crate::device::limits::DeviceLimits;
use crate::routines::table::PrefillWork;

/// Shared memory of the walk, bytes (the kernel's module doc): per set `K`,
/// `Q` (`C x d16`) and `DO`, `V` (`C x 16 planes`); the two score tiles; the
/// state's copy (`16 planes x d16`); the chunk's dv and dk tiles; all in the
/// staged type (rows padded by 8 on tensor cores); the decay tables and the
/// emulation's scratch in f32.
fn shared_bytes(
    chunk: usize,
    key_dim: usize,
    planes: usize,
    element: usize,
    emulated: bool,
    sets: usize,
) -> usize {
    let pad = if emulated { 0 } else { 8 };
    let key_stride = key_dim.div_ceil(16) * 16 + pad;
    let value_tile = 16 * planes;
    let value_stride = value_tile + pad;
    let scratch = if emulated { planes * (16 * 16 + 16 * 8) } else { 1 };
    element
        * (sets * 2 * chunk * (key_stride + value_stride)
            + 2 * chunk * (chunk + pad)
            + value_tile * key_stride
            + chunk * (value_stride + key_stride))
        + 4 * (5 * chunk + 1 + scratch)
}

/// Plans the dk and dv walk for the dv pass of a backward over `work`, whose
/// forward walk `walk` the prefill plan chose (its chunk, products and
/// vectors are kept), or `None` where it does not apply: the forward walk is
/// the portable one, the config asks for separate walks
/// ([`crate::Tuning::fused_separate_key_value`]), `d` or `e` is past 128, the
/// chunk is wider than `e` rounded up to 16, or the tiles do not fit (then
/// the two walks run, as before). Its segments follow the forward walk's
/// rule on one cube per (walk, head).
pub(crate) fn plan(
    work: &PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
    walk: &FusedPlan,
) -> Option<FusedPlan> {
    let fragments = walk.fragments?;
    let (chunk, d, e) = (walk.chunk, work.key_dim, work.value_dim);
    if config.tuning.fused_separate_key_value
        || d > MAX_FRAGMENT_KEY_DIM
        || e > MAX_FRAGMENT_KEY_DIM
        || !FRAGMENT_CHUNKS.contains(&chunk)
    {
        return None;
    }
    let planes = e.div_ceil(16);
    if 16 * planes < chunk || planes * PLANE > limits.max_units as usize {
        return None;
    }
    let emulated = fragments.emulated;
    let element = if emulated { work.dtype.size() } else { 2 };
    // The ring copies 16 bytes at a time into rows with no padding column.
    let ring = config.tuning.fused_stages != Some(1)
        && !emulated
        && fragments.vector * element == 16
        && d % 16 == 0
        && e % 16 == 0;
    let bytes = |sets: usize| shared_bytes(chunk, d, planes, element, emulated, sets);
    let stages = if ring && bytes(2) <= limits.shared_memory {
        2
    } else {
        1
    };
    if bytes(stages) > limits.shared_memory {
        return None;
    }
    let (dims, segment_blocks, split) = walk_grid(
        work,
        1,
        planes * PLANE,
        bytes(stages),
        config.tuning.fused_split.unwrap_or(1),
        "fused dk and dv (tensor cores)",
        limits,
    )
    .ok()?;
    Some(FusedPlan {
        dims,
        segment_blocks,
        split,
        fragments: Some(FragmentWalk {
            planes,
            stages,
            key_value: true,
            ..fragments
        }),
        ..*walk
    })
}
