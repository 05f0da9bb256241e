//! Layer 4, the entry points: [`crate::prefill`], [`crate::prefill_varlen`],
//! [`crate::prefill_packed`] and [`crate::backward_packed`] (packed training),
//! [`crate::decode`], [`crate::backward`] and the split cache. Each validates
//! its arguments (layer 1), asks the device what it can hold (layer 2), lets
//! the routines choose and plan (layer 3), then allocates, launches and
//! returns. `fused_tune` runs cubecl's autotuner over the fused routine's
//! variants for the dense prefill.

pub(crate) mod backward;
pub(crate) mod decode;
pub(crate) mod fused_tune;
pub(crate) mod offline;
pub(crate) mod packed;
pub(crate) mod prefill;
pub(crate) mod split_cache;
pub(crate) mod varlen;
