//! Layer 2, what the device is and holds: [`crate::DeviceTensor`], runtime
//! selection, the device's limits and tensor cores, memory accounting (the
//! buffers a call allocates, checked before any allocation, and read errors),
//! and the finite scan. It knows the problem's types, no routine.

pub(crate) mod finite;
pub(crate) mod limits;
pub(crate) mod memory;
pub mod runtime;
pub(crate) mod target;
pub(crate) mod tensor;
