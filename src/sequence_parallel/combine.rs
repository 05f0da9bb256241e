//! The decayed sums over gathered states (`kernels::decayed_sum`): the state
//! entering a rank's segment, the gradient leaving it, and a rank's tensor
//! placed in its slot of a gather.

use crate::device::target::{LaunchTarget, launch_kernel};
use std::ops::Range;

use cubecl::prelude::*;
use lightning_attention_kernels::decayed_sum::decayed_sum;

use crate::device::tensor::arg;
use crate::{DType, DeviceTensor};

/// `sum_{j in sources} exp(-s gaps[j]) states[j]` per head, into a new
/// `[b, h, d, e]` f32 tensor; `states` is `[world, b, h, d, e]` f32 (checked
/// to fit 32-bit indexing when the ranks agreed) and `gaps` has one entry per
/// rank.
pub(crate) fn decayed_sum_of(
    client: &Client,
    states: &DeviceTensor,
    slopes: &DeviceTensor,
    gaps: &[f32],
    sources: Range<usize>,
) -> DeviceTensor {
    let shape = &states.shape;
    let out = DeviceTensor::empty(client, &shape[1..], DType::F32);
    let sizes = Sizes {
        heads: shape[2],
        head_len: shape[3] * shape[4],
        len: out.num_elements(),
    };
    launch(client, states, slopes, gaps, sources, sizes, &out, 0);
    out
}

/// `[world, ..local.shape]` f32, zeros but for `local` (f32, of fewer than
/// 2^32 elements in all) in slot `rank`: a rank's part of a gather through a sum.
#[cfg(feature = "cuda")]
pub(crate) fn placed(
    client: &Client,
    local: &DeviceTensor,
    rank: usize,
    world: usize,
) -> crate::Result<DeviceTensor> {
    let shape: Vec<usize> = [world].into_iter().chain(local.shape.iter().copied()).collect();
    let slots = DeviceTensor::filled(client, &shape, DType::F32, 0.0)?;
    // One source decayed over no tokens by one zero slope: a copy.
    let slope = DeviceTensor::filled(client, &[1], DType::F32, 0.0)?;
    let len = local.num_elements();
    let sizes = Sizes {
        heads: 1,
        head_len: len,
        len,
    };
    launch(client, local, &slope, &[0.0], 0..1, sizes, &slots, rank);
    Ok(slots)
}

/// How the kernel reads one source.
#[derive(Clone, Copy)]
struct Sizes {
    heads: usize,
    /// Elements per head (`d e`).
    head_len: usize,
    /// Elements per source.
    len: usize,
}

/// `decayed_sum` over `sources` of `states`, into slot `out_slot` of `out`.
#[allow(clippy::too_many_arguments)]
fn launch(
    client: &Client,
    states: &DeviceTensor,
    slopes: &DeviceTensor,
    gaps: &[f32],
    sources: Range<usize>,
    sizes: Sizes,
    out: &DeviceTensor,
    out_slot: usize,
) {
    // Four at least: wgpu refuses a binding smaller than one vector.
    let mut padded = gaps.to_vec();
    padded.resize(gaps.len().max(4), 0.0);
    let gaps = client.create_from_slice(f32::as_bytes(&padded));
    let (count, dim) = crate::device::limits::grid_stride(LaunchTarget::Device(client), sizes.len);
    // SAFETY: `states` holds `sources.end * len` f32 at least, `gaps` covers
    // `sources`, `slopes` holds `heads` f32, `out` holds `(out_slot + 1) * len`
    // f32; every index is below 2^32 (checked when the ranks agreed), and the
    // kernel writes only `out_slot * len .. (out_slot + 1) * len`.
    unsafe {
        launch_kernel!(LaunchTarget::Device(client), decayed_sum[],
            count,
            dim,
            arg(states),
            arg(slopes),
            BufferArg::from_raw_parts(gaps, padded.len()),
            arg(out),
            sources.start as u32,
            sources.end as u32,
            sizes.heads as u32,
            sizes.head_len as u32,
            sizes.len as u32,
            (out_slot * sizes.len) as u32,
        );
    }
}
