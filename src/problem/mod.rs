//! Layer 1, what the caller asked: shapes, dtypes, the block config with its
//! precision and tuning, the typed errors, the packed-batch checks and the
//! decay slopes. Nothing here knows a device or a kernel.

pub(crate) mod config;
pub(crate) mod dtype;
pub(crate) mod error;
pub(crate) mod packed;
pub(crate) mod shapes;
pub mod slopes;
