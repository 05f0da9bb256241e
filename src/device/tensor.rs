//! A device buffer with its shape and dtype: what the host API takes and returns.

use super::target::{LaunchTarget, launch_kernel};
use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels::fill::{copy_span, fill_words, zero_tail, zero_tail_words};

use super::limits::{bf16_words, grid_stride};
use super::memory::{Buffer, DeviceMemory, read_error};
use crate::problem::shapes::Arg;
use crate::{DType, LightningError, Result};

/// What the errors of a tensor's creation call it.
const CREATED: &str = "tensor being created";
/// What the errors of a read call the tensor read: an allocation failure a
/// read reports is its own or that of a buffer the work writing it needed.
const READ: &str = "tensor read back (it, or a buffer the work writing it needed, could not be allocated)";

/// A contiguous row-major tensor on a CubeCL device.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    /// The device buffer.
    pub handle: Handle,
    /// The shape, outermost first.
    pub shape: Vec<usize>,
    /// The element type.
    pub dtype: DType,
}

impl DeviceTensor {
    /// Elements in the tensor.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Uploads `data` (given as f32) converted to `dtype`; returns
    /// [`LightningError::OutOfMemory`] where the device cannot hold it.
    pub fn from_f32(client: &Client, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(LightningError::Shape {
                tensor: "data",
                expected: vec![data.len()],
                layout: "the product of the shape",
                actual: shape.to_vec(),
            });
        }
        DeviceMemory::of(client).check(&[Buffer::tensor(CREATED, shape, dtype)])?;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => f32::as_bytes(data).to_vec(),
            DType::F16 => {
                let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                half::f16::as_bytes(&v).to_vec()
            }
            DType::BF16 => {
                let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                half::bf16::as_bytes(&v).to_vec()
            }
        };
        Ok(Self {
            handle: client.create_from_slice(&bytes),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A tensor of `shape` with every element `value` (NaN to poison an
    /// output), written on the device: nothing of its size is built on the
    /// host or uploaded (a zeroed cache of many GiB costs one fill kernel).
    /// Returns [`LightningError::OutOfMemory`], allocating nothing, where the
    /// device cannot hold it (see [`crate::memory`]).
    pub fn filled(client: &Client, shape: &[usize], dtype: DType, value: f32) -> Result<Self> {
        DeviceMemory::of(client).check(&[Buffer::tensor(CREATED, shape, dtype)])?;
        let len: usize = shape.iter().product();
        let words = len * dtype.size() / 4;
        // A 16-bit tensor of odd length ends inside a word, whose other half
        // the kernel must not write; the host fills those (small) ones.
        if len == 0 || !(len * dtype.size()).is_multiple_of(4) || words > u32::MAX as usize {
            return Self::from_f32(client, &vec![value; len], shape, dtype);
        }
        let pattern = match dtype {
            DType::F32 => value.to_bits(),
            DType::F16 => u32::from(half::f16::from_f32(value).to_bits()) * 0x1_0001,
            DType::BF16 => u32::from(half::bf16::from_f32(value).to_bits()) * 0x1_0001,
        };
        let tensor = Self::empty(client, shape, dtype);
        let (count, dim) = grid_stride(LaunchTarget::Device(client), words);
        // SAFETY: the buffer holds `words` whole 32-bit words, and the kernel
        // writes only words below `words`.
        unsafe {
            launch_kernel!(LaunchTarget::Device(client), fill_words[],
                count,
                dim,
                BufferArg::from_raw_parts(tensor.handle.clone(), words),
                pattern,
                words as u32,
            );
        }
        Ok(tensor)
    }

    /// An uninitialized tensor of `shape`, or [`LightningError::OutOfMemory`]
    /// (allocating nothing) where the device cannot hold it: larger than the
    /// runtime allocates in one buffer, or than the device has left where the
    /// runtime reports that (see [`crate::memory`]).
    pub fn try_empty(client: &Client, shape: &[usize], dtype: DType) -> Result<Self> {
        DeviceMemory::of(client).check(&[Buffer::tensor(CREATED, shape, dtype)])?;
        Ok(Self::empty(client, shape, dtype))
    }

    /// An uninitialized tensor of `shape`, unchecked: where the device cannot
    /// allocate it, cubecl attaches the failure to the buffer (it does not
    /// panic), skips the kernels that use it, and the next read of their
    /// outputs returns [`LightningError::OutOfMemory`]. [`DeviceTensor::try_empty`]
    /// refuses what cannot fit before allocating.
    pub fn empty(client: &Client, shape: &[usize], dtype: DType) -> Self {
        LaunchTarget::Device(client).empty_tensor(shape, dtype)
    }

    /// Reads the tensor back, widened to f32. Waits for the work writing it;
    /// an allocation that failed on the way (the tensor's, or a buffer that
    /// work needed) is returned as [`LightningError::OutOfMemory`].
    pub fn to_f32_vec(&self, client: &Client) -> Result<Vec<f32>> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| read_error(client, READ, e))?;
        let len = self.num_elements();
        Ok(match self.dtype {
            DType::F32 => f32::from_bytes(&bytes)[..len].to_vec(),
            DType::F16 => half::f16::from_bytes(&bytes)[..len]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::BF16 => half::bf16::from_bytes(&bytes)[..len]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        })
    }

    /// Reads the raw bytes back (for byte-exact comparisons); errors as for
    /// [`DeviceTensor::to_f32_vec`].
    pub fn to_bytes(&self, client: &Client) -> Result<Vec<u8>> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| read_error(client, READ, e))?;
        Ok(bytes[..self.num_elements() * self.dtype.size()].to_vec())
    }
}

impl Arg for DeviceTensor {
    fn dims(&self) -> &[usize] {
        &self.shape
    }
    fn elem(&self) -> DType {
        self.dtype
    }
    fn buffer_bytes(&self) -> Option<u64> {
        Some(self.handle.size())
    }
}

/// A kernel argument over a whole validated tensor.
pub(crate) fn arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: validation checked that the buffer holds `num_elements` of its dtype.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements()) }
}

/// The tensor bound where a kernel's optional input is absent: four f32, one
/// vector of the widest binding that may receive it (kv-reduce reads
/// `initial` in vectors of 4), or wgpu refuses a binding smaller than one
/// vector.
pub(crate) fn unused_binding(target: LaunchTarget) -> DeviceTensor {
    target.empty_tensor(&[4], DType::F32)
}

/// Sets elements `first..` of the validated tensor `t` to zero on the device
/// (the rows of a packed tensor past its last sequence); no byte outside
/// those elements is written.
pub(crate) fn zero_from(target: LaunchTarget, t: &DeviceTensor, first: usize) {
    let len = t.num_elements();
    if first >= len {
        return;
    }
    // SAFETY (each launch): the kernels write only elements `first..len` of
    // a buffer holding `len` (bf16 words: the halves of those elements).
    unsafe {
        if bf16_words(t.dtype, target) {
            let (count, dim) = grid_stride(target, (len - first).div_ceil(2) + 1);
            launch_kernel!(target, zero_tail_words[], count, dim,
                BufferArg::from_raw_parts(t.handle.clone(), len.div_ceil(2)),
                first as u32,
                len as u32,
            )
        } else {
            let (count, dim) = grid_stride(target, len - first);
            match t.dtype {
                DType::F32 => launch_kernel!(
                    target,
                    zero_tail[f32],
                    count,
                    dim,
                    arg(t),
                    first as u32,
                    len as u32
                ),
                DType::F16 => launch_kernel!(
                    target,
                    zero_tail[half::f16],
                    count,
                    dim,
                    arg(t),
                    first as u32,
                    len as u32
                ),
                DType::BF16 => launch_kernel!(
                    target,
                    zero_tail[half::bf16],
                    count,
                    dim,
                    arg(t),
                    first as u32,
                    len as u32
                ),
            }
        }
    }
}

/// Sets elements `first..end` of the validated f32 tensor `dst` to those of
/// `src` (an f32 tensor of as many elements), or to zeros without `src`; no
/// other element is written.
pub(crate) fn copy_or_zero(
    target: LaunchTarget,
    src: Option<&DeviceTensor>,
    dst: &DeviceTensor,
    (first, end): (usize, usize),
) {
    if first >= end {
        return;
    }
    let (count, dim) = grid_stride(target, end - first);
    // SAFETY (each launch): both buffers hold at least `end` f32 elements
    // (validated by the caller), and the kernels touch only `first..end`.
    unsafe {
        match src {
            Some(src) => {
                launch_kernel!(target, copy_span[], count, dim, arg(src), arg(dst), first as u32, end as u32)
            }
            None => launch_kernel!(
                target,
                zero_tail[f32],
                count,
                dim,
                arg(dst),
                first as u32,
                end as u32
            ),
        }
    }
}

/// `read` and `written`, where both are given, are different buffers: a
/// call that reads one while it writes the other refuses them aliased.
pub(crate) fn check_distinct(
    (read_name, read): (&'static str, Option<&DeviceTensor>),
    (written_name, written): (&'static str, Option<&DeviceTensor>),
) -> Result<()> {
    if let (Some(read), Some(written)) = (read, written)
        && read.handle.memory.descriptor().id == written.handle.memory.descriptor().id
    {
        return Err(LightningError::AliasedBuffers {
            first: read_name,
            second: written_name,
        });
    }
    Ok(())
}
