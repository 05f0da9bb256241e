//! Decode: one token per sequence against a slot-indexed state cache, in one
//! launch (`kernels::decode`). Its plan and its launch.

pub(crate) mod launch;
pub(crate) mod plan;

pub(crate) use launch::launch_decode;
pub use plan::{DecodePlan, plan_decode};
