//! Errors of a call made on reordered tensors, told in the caller's layout.
//!
//! A wrapper that permutes or reshapes its arguments before calling the
//! library (the FLA convention's `[B, T, H, *]` permuted to `[B, H, T, *]`,
//! its packed `[1, T, H, *]` reshaped to `[T, H, *]`) or passes them on
//! under other names (the MiniMax layer's `state`) gets errors about the
//! tensors the library saw. [`in_caller_layout`] maps such an error back:
//! shapes in the caller's axis order, the caller's layout string, dimension
//! and tensor names, so the message describes what the caller passed.

use crate::LightningError;

/// How one argument of the inner call reads in the caller's terms.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallerArg {
    /// The argument's name in the inner call.
    pub inner: &'static str,
    /// The name the caller knows it by.
    pub name: &'static str,
    /// The caller's layout, e.g. `[B, T, H, D]`.
    pub layout: &'static str,
    /// The caller's axis `i` is the inner call's axis `axes[i]`, or an axis
    /// of size 1 that the inner call does not have ([`UNIT`]).
    pub axes: &'static [usize],
    /// The inner call's dimension names, each with the caller's name for it.
    pub dims: &'static [(&'static str, &'static str)],
}

impl CallerArg {
    /// `shape` (the inner call's order) in the caller's axis order; a shape
    /// of another rank than the inner call's layout is the caller's already
    /// (nothing was permuted or reshaped).
    fn shape(&self, shape: Vec<usize>) -> Vec<usize> {
        let inner_rank = self.axes.iter().filter(|&&axis| axis != UNIT).count();
        if shape.len() != inner_rank {
            return shape;
        }
        self.axes
            .iter()
            .map(|&axis| if axis == UNIT { 1 } else { shape[axis] })
            .collect()
    }

    /// The caller's name of the inner dimension `dim`.
    fn dim(&self, dim: &'static str) -> &'static str {
        self.dims
            .iter()
            .find(|(inner, _)| *inner == dim)
            .map_or(dim, |&(_, caller)| caller)
    }
}

/// `err`, from an inner call whose arguments `args` describe, told in the
/// caller's layout. Errors about no listed argument are returned unchanged.
pub(crate) fn in_caller_layout(err: LightningError, args: &[CallerArg]) -> LightningError {
    let arg = |tensor: &'static str| args.iter().find(|arg| arg.inner == tensor);
    match err {
        LightningError::Rank {
            tensor,
            expected,
            layout,
            actual,
            shape,
        } => match arg(tensor) {
            Some(arg) => LightningError::Rank {
                tensor: arg.name,
                expected,
                layout: arg.layout,
                actual,
                shape: arg.shape(shape),
            },
            None => LightningError::Rank {
                tensor,
                expected,
                layout,
                actual,
                shape,
            },
        },
        LightningError::Shape {
            tensor,
            expected,
            layout,
            actual,
        } => match arg(tensor) {
            Some(arg) => LightningError::Shape {
                tensor: arg.name,
                expected: arg.shape(expected),
                layout: arg.layout,
                actual: arg.shape(actual),
            },
            None => LightningError::Shape {
                tensor,
                expected,
                layout,
                actual,
            },
        },
        LightningError::EmptyDimension { tensor, dim, shape } => match arg(tensor) {
            Some(arg) => LightningError::EmptyDimension {
                tensor: arg.name,
                dim: arg.dim(dim),
                shape: arg.shape(shape),
            },
            None => LightningError::EmptyDimension { tensor, dim, shape },
        },
        // The variants below name a tensor but carry no shape.
        LightningError::DType {
            tensor,
            expected,
            actual,
        } => LightningError::DType {
            tensor: arg(tensor).map_or(tensor, |arg| arg.name),
            expected,
            actual,
        },
        LightningError::BufferTooSmall {
            tensor,
            expected,
            actual,
        } => LightningError::BufferTooSmall {
            tensor: arg(tensor).map_or(tensor, |arg| arg.name),
            expected,
            actual,
        },
        LightningError::TooLarge {
            tensor,
            elements,
            max,
        } => LightningError::TooLarge {
            tensor: arg(tensor).map_or(tensor, |arg| arg.name),
            elements,
            max,
        },
        LightningError::UnsupportedBurnDType { tensor, dtype } => LightningError::UnsupportedBurnDType {
            tensor: arg(tensor).map_or(tensor, |arg| arg.name),
            dtype,
        },
        other => other,
    }
}

/// In [`CallerArg::axes`]: a caller's axis of size 1 that the inner call
/// does not have (the batch row of FLA's packed `[1, T, H, *]`).
pub(crate) const UNIT: usize = usize::MAX;

/// `[B, T, H, *]` is `[b, h, n, *]` with the middle axes swapped (its own inverse).
const SWAP: &[usize] = &[0, 2, 1, 3];

/// The library's names of `[b, h, n, *]` dimensions and the FLA convention's.
const FLA_DIMS: &[(&str, &str)] = &[("b", "B"), ("h", "H"), ("n", "T"), ("d", "D"), ("e", "E")];

/// One of q, k, v in the FLA convention.
const fn fla_token_arg(name: &'static str, layout: &'static str) -> CallerArg {
    CallerArg {
        inner: name,
        name,
        layout,
        axes: SWAP,
        dims: FLA_DIMS,
    }
}

/// The FLA convention's arguments ([`super::fla_lightning_attention`]): q, k,
/// v `[B, T, H, *]` permuted to the library's `[b, h, n, *]`, slopes and the
/// initial state passed as they are.
pub(crate) const FLA: [CallerArg; 5] = [
    fla_token_arg("q", "[B, T, H, D]"),
    fla_token_arg("k", "[B, T, H, D]"),
    fla_token_arg("v", "[B, T, H, E]"),
    CallerArg {
        inner: "slopes",
        name: "slopes",
        layout: "[H]",
        axes: &[0],
        dims: FLA_DIMS,
    },
    CallerArg {
        inner: "initial_state",
        name: "initial_state",
        layout: "[B, H, D, E]",
        axes: &[0, 1, 2, 3],
        dims: FLA_DIMS,
    },
];

/// The packed library's names of `[T, h, *]` and `[N, h, d, e]` dimensions
/// and the FLA convention's.
const FLA_PACKED_DIMS: &[(&str, &str)] = &[("h", "H"), ("d", "D"), ("e", "E")];

/// One of q, k, v of FLA's packed layout: `[1, T, H, *]`, its batch row
/// dropped for the library's `[T, h, *]`.
const fn fla_packed_token_arg(name: &'static str, layout: &'static str) -> CallerArg {
    CallerArg {
        inner: name,
        name,
        layout,
        axes: &[UNIT, 0, 1, 2],
        dims: FLA_PACKED_DIMS,
    }
}

/// The arguments of [`super::fla_lightning_attention_packed`]: q, k, v
/// `[1, T, H, *]` reshaped to the library's `[T, h, *]`, slopes as they
/// are, and the initial states (FLA's `initial_state`) `[N, H, D, E]`.
pub(crate) const FLA_PACKED: [CallerArg; 5] = [
    fla_packed_token_arg("q", "[1, T, H, D]"),
    fla_packed_token_arg("k", "[1, T, H, D]"),
    fla_packed_token_arg("v", "[1, T, H, E]"),
    CallerArg {
        inner: "slopes",
        name: "slopes",
        layout: "[H]",
        axes: &[0],
        dims: FLA_PACKED_DIMS,
    },
    CallerArg {
        inner: "initial_states",
        name: "initial_state",
        layout: "[N, H, D, E]",
        axes: &[0, 1, 2, 3],
        dims: FLA_PACKED_DIMS,
    },
];
