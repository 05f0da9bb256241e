//! Device memory: the buffers a call allocates, checked against what the
//! device can give before anything is allocated, and allocation failures
//! that surface later turned into the same typed error.
//!
//! Every entry point lists the buffers it will allocate (outputs, final
//! states, the per-block workspace, f32 copies of 16-bit inputs, the
//! chunk-recurrent routine's segment states, its work lists) and checks them
//! with [`DeviceMemory::check`] before its first allocation: each against the
//! largest buffer the runtime allocates (`max_page_size`: wgpu's binding
//! limit, 128 MiB on lavapipe; a quarter of the device on CUDA), then, in the
//! order they are allocated, against what the device has left where the
//! runtime reports its capacity (CUDA; wgpu only through Vulkan's SPIR-V
//! compiler or Metal, not WGSL): the capacity less the bytes the runtime's
//! pools hold. A refused call returns [`LightningError::OutOfMemory`] naming
//! the buffer and its bytes, and has allocated and launched nothing.
//!
//! The check is optimistic: it refuses only what cannot fit. Memory it cannot
//! see (other processes, other allocators, pages the pools cannot reuse) can
//! still fail an allocation. cubecl 0.11 does not panic then: the allocation
//! is asynchronous, the failure is attached to the buffer, every kernel that
//! touches the buffer is skipped and its outputs inherit the failure, and the
//! next read of any of them returns it (wgpu on lavapipe, a buffer past
//! `max_page_size`: `Several [Unwritten { root: Io(BufferTooBig { size }) }]`).
//! The reads of [`crate::DeviceTensor`] turn that into the same
//! [`LightningError::OutOfMemory`] (`read_error`); the client keeps running.

use cubecl::MemoryScope;
use cubecl::prelude::*;
use cubecl::server::{IoError, ServerError};

pub use crate::problem::error::MemoryLimit;
use crate::{DType, LightningError, Result};

/// One buffer a call allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// What it holds, as the error names it.
    pub tensor: &'static str,
    /// Its size.
    pub bytes: u64,
}

impl Buffer {
    /// A buffer of `bytes` bytes.
    pub fn new(tensor: &'static str, bytes: u64) -> Self {
        Self { tensor, bytes }
    }

    /// The buffer of a tensor of `shape` and `dtype`.
    pub fn tensor(tensor: &'static str, shape: &[usize], dtype: DType) -> Self {
        Self::elements(tensor, shape.iter().product(), dtype)
    }

    /// The buffer of `elements` elements of `dtype`.
    pub fn elements(tensor: &'static str, elements: usize, dtype: DType) -> Self {
        Self::new(tensor, elements as u64 * dtype.size() as u64)
    }
}

/// What a device can give one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The most bytes the runtime allocates in one buffer.
    pub max_buffer: u64,
    /// Bytes the device can still allocate: its capacity less what the
    /// runtime's pools hold; `None` where the runtime reports no capacity
    /// (then only [`DeviceMemory::max_buffer`] is checked).
    pub available: Option<u64>,
}

impl DeviceMemory {
    /// What `client`'s device reports now. Where the runtime states a
    /// capacity this asks its memory pools what they hold (one round trip to
    /// the device's server thread, no device sync); elsewhere it asks nothing.
    pub fn of(client: &Client) -> Self {
        let memory = &client.properties().memory;
        let available = memory.max_memory().map(|capacity| {
            // Bytes in use, not reserved: a page reserved and free is reused
            // by the next allocation (or released by a cleanup), so counting
            // it would refuse calls that fit.
            let held = client.memory_report(MemoryScope::Device).usage().bytes_in_use;
            capacity.saturating_sub(held)
        });
        Self {
            max_buffer: memory.max_page_size,
            available,
        }
    }

    /// Checks `buffers`, listed in the order the call allocates them: each
    /// against [`DeviceMemory::max_buffer`], then each against what is left
    /// of [`DeviceMemory::available`] once the buffers before it are
    /// allocated. The first that does not fit is the error.
    pub fn check(&self, buffers: &[Buffer]) -> Result<()> {
        for &buffer in buffers {
            fits_one_buffer(buffer, self.max_buffer)?;
        }
        let Some(mut left) = self.available else {
            return Ok(());
        };
        for buffer in buffers {
            if buffer.bytes > left {
                return Err(LightningError::OutOfMemory {
                    tensor: buffer.tensor,
                    bytes: buffer.bytes,
                    available: Some(left),
                    limit: MemoryLimit::Device,
                });
            }
            left -= buffer.bytes;
        }
        Ok(())
    }
}

/// `buffer` fits one buffer of at most `max_buffer` bytes.
pub(crate) fn fits_one_buffer(buffer: Buffer, max_buffer: u64) -> Result<()> {
    if buffer.bytes > max_buffer {
        return Err(LightningError::OutOfMemory {
            tensor: buffer.tensor,
            bytes: buffer.bytes,
            available: Some(max_buffer),
            limit: MemoryLimit::Buffer,
        });
    }
    Ok(())
}

/// The f32 copies a widened forward call makes (see the routines' `widen`), as
/// the errors name them, from the elements of q, k, v and the output: what
/// the prefill routines' `launch_buffers` and `widen::check_copies` take.
pub(crate) fn f32_copies([q, k, v, out]: [usize; 4]) -> [(&'static str, usize); 4] {
    [
        ("f32 copy of q", q),
        ("f32 copy of k", k),
        ("f32 copy of v", v),
        ("f32 output before rounding", out),
    ]
}

/// The f32 copies a decode launch makes of bf16 inputs on a runtime without
/// bf16 (`words`): q, k, v and the output, `[elements of q, k, v, out]`.
pub(crate) fn decode_copies(words: bool, elements: [usize; 4]) -> Vec<Buffer> {
    if !words {
        return Vec::new();
    }
    f32_copies(elements)
        .iter()
        .map(|&(name, elements)| Buffer::elements(name, elements, DType::F32))
        .collect()
}

/// A failed read as the library reports it: an allocation failure (of the
/// tensor read, or of a buffer the work writing it needed) as
/// [`LightningError::OutOfMemory`] naming `tensor` and the bytes cubecl
/// reports, anything else as [`LightningError::Device`].
pub(crate) fn read_error(client: &Client, tensor: &'static str, error: ServerError) -> LightningError {
    match allocation_failure(&error) {
        Some((bytes, MemoryLimit::Buffer)) => LightningError::OutOfMemory {
            tensor,
            bytes,
            available: Some(client.properties().memory.max_page_size),
            limit: MemoryLimit::Buffer,
        },
        Some((bytes, MemoryLimit::Device)) => LightningError::OutOfMemory {
            tensor,
            bytes,
            available: None,
            limit: MemoryLimit::Device,
        },
        None => LightningError::Device(error.to_string()),
    }
}

/// The size and kind of the first allocation failure behind `error`: a read
/// reports the failure at the root of what left its buffers unwritten,
/// possibly among several.
fn allocation_failure(error: &ServerError) -> Option<(u64, MemoryLimit)> {
    match error {
        ServerError::Io(io) => io_allocation_failure(io),
        ServerError::Unwritten { root, .. } => allocation_failure(root),
        ServerError::Several { errors, .. } => errors.iter().find_map(allocation_failure),
        _ => None,
    }
}

fn io_allocation_failure(error: &IoError) -> Option<(u64, MemoryLimit)> {
    match error {
        IoError::BufferTooBig { size, .. } => Some((*size, MemoryLimit::Buffer)),
        // Out of memory now, or every page size the pools track still in use:
        // either may pass once other work frees memory.
        IoError::OutOfMemory { size, .. } | IoError::PageSizesExhausted { size, .. } => {
            Some((*size, MemoryLimit::Device))
        }
        IoError::StorageMappingFailed { source, .. } => io_allocation_failure(source),
        _ => None,
    }
}
