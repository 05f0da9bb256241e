//! The kernels judged against the f64 reference, on the device this build selects.
//!
//! With the default `wgpu` feature and no GPU this is lavapipe (Mesa's software
//! Vulkan); with `--features cuda` and a driver, CUDA. A missing device is a
//! failure, never a skip. Every output is poisoned with NaN before a launch,
//! so an element a kernel forgets to write fails the comparison.

mod backward;
mod common;
mod consistency;
mod decode;
mod default_routine;
mod errors;
mod fill;
mod finite;
mod fragments;
mod fused;
mod fused_backward;
mod layout_errors;
mod memory;
mod offline;
mod packed;
mod prefill;
mod sequence_parallel;
mod serving;
mod split_cache;
mod state_cache;
mod state_drift;
mod varlen;
mod varlen_errors;
mod widen;
