//! Opt-in checks that a tensor holds only finite values.
//!
//! The kernels follow IEEE 754 and never check: a result past the range of
//! its dtype rounds to ±inf (f16's largest finite value is 65504), `inf -
//! inf` and `0 * inf` give NaN, and NaN or inf inputs propagate. The state is
//! f32 whatever the input dtype, so it overflows only past f32's range (about
//! 3.4e38). A check costs one launch over the tensor (one read of its bytes)
//! and a read-back of two `u32`, which waits for the device: cheap beside a
//! prefill, not beside a decode step (whose calls never wait), which is why
//! [`crate::PrefillConfig::check_finite`] is off by default and decode takes
//! no such option. [`FiniteScan`] splits the launch from the read-back, so a
//! caller can scan every step's output and wait once.

use super::target::{LaunchTarget, launch_kernel};
use cubecl::prelude::*;
use cubecl::server::Handle;
use lightning_attention_kernels::finite::count_non_finite;

use super::limits::grid_stride;
use crate::problem::shapes::expect_buffer;
use crate::{DType, DeviceTensor, LightningError, Result};

/// A scan of one tensor for non-finite elements, launched and not yet read.
#[derive(Clone, Debug)]
pub struct FiniteScan {
    /// `[count, first index]`, as `kernels::finite` writes them.
    report: Option<Handle>,
    tensor: &'static str,
    dtype: DType,
    elements: u64,
}

impl FiniteScan {
    /// Launches the scan of `tensor` (named `name` in the error) without
    /// waiting for it. Fails only if the tensor's buffer is smaller than its
    /// shape, or the tensor has more elements than 32-bit indexing addresses.
    pub fn launch(client: &Client, tensor: &DeviceTensor, name: &'static str) -> Result<Self> {
        expect_buffer(tensor, name)?;
        let len = tensor.num_elements();
        let mut scan = Self {
            report: None,
            tensor: name,
            dtype: tensor.dtype,
            elements: len as u64,
        };
        if len == 0 {
            return Ok(scan);
        }
        // The mask of the exponent bits in each element's own bits.
        let (exponent, pairs) = match tensor.dtype {
            DType::F32 => (0x7f80_0000u32, false),
            DType::F16 => (0x7c00, true),
            DType::BF16 => (0x7f80, true),
        };
        let words = if pairs { len.div_ceil(2) } else { len };
        let report = client.create_from_slice(u32::as_bytes(&[0, u32::MAX]));
        let (count, dim) = grid_stride(LaunchTarget::Device(client), words);
        // SAFETY: the buffer holds `len` elements (checked above), that is
        // `words` whole 32-bit words (bindings are padded to 4 bytes; the
        // kernel reads the half past an odd 16-bit tensor but counts only
        // elements below `len`); `report` holds the two words the kernel
        // updates.
        unsafe {
            launch_kernel!(LaunchTarget::Device(client), count_non_finite[],
                count,
                dim,
                BufferArg::from_raw_parts(tensor.handle.clone(), words),
                BufferArg::from_raw_parts(report.clone(), 2),
                len as u32,
                words as u32,
                exponent,
                pairs,
            );
        }
        scan.report = Some(report);
        Ok(scan)
    }

    /// Waits for the scan and reads its report: `Ok` if every element is
    /// finite, else [`LightningError::NonFinite`] with the count and the
    /// first flat (row-major) index.
    pub fn result(self, client: &Client) -> Result<()> {
        let Some(report) = self.report else {
            return Ok(());
        };
        let bytes = client
            .read_one(report)
            .map_err(|e| super::memory::read_error(client, self.tensor, e))?;
        let report = u32::from_bytes(&bytes);
        let (count, first) = (report[0], report[1]);
        if count == 0 {
            return Ok(());
        }
        Err(LightningError::NonFinite {
            tensor: self.tensor,
            dtype: self.dtype,
            count: u64::from(count),
            elements: self.elements,
            first_index: u64::from(first),
            hint: hint(self.dtype),
        })
    }
}

/// Checks that every element of `tensor` is finite (neither ±inf nor NaN),
/// returning [`LightningError::NonFinite`] naming it `name` otherwise. Costs a
/// launch over the tensor and a wait for the device (see the module doc);
/// [`FiniteScan`] launches without waiting.
///
/// ```no_run
/// # use lightning_attention::{DType, DeviceTensor, check_finite, runtime};
/// let client = runtime::best_client();
/// let t = DeviceTensor::from_f32(&client, &[1.0, 70000.0], &[2], DType::F16)?;
/// // 70000 is past f16's 65504: it was stored as +inf.
/// assert!(check_finite(&client, &t, "t").is_err());
/// # Ok::<(), lightning_attention::LightningError>(())
/// ```
pub fn check_finite(client: &Client, tensor: &DeviceTensor, name: &'static str) -> Result<()> {
    FiniteScan::launch(client, tensor, name)?.result(client)
}

/// Why a tensor of `dtype` holds non-finite values, and what to do about it.
fn hint(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => {
            "f16 holds magnitudes up to 65504: a result past that rounds to ±inf (IEEE) and inf - \
             inf gives NaN (or a non-finite input propagated); use bf16 or f32 inputs, scale the \
             inputs down, or give an output scale below 1"
        }
        DType::BF16 => {
            "bf16 has f32's range (about 3.4e38), so an input (or the initial state) was not \
             finite or a sum passed f32's range; check the inputs"
        }
        DType::F32 => {
            "a value passed f32's range (about 3.4e38), or an input (or the initial state) was \
             not finite; check the inputs"
        }
    }
}
