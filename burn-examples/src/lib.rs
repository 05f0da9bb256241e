//! The Burn examples and tests of lightning-attention (not published).
//!
//! A workspace member of its own so that Burn's optimizers are built only
//! here: the library's quickstart and kernel tests never compile them. The
//! model is [`lightning_attention::burn::MiniMaxLinearAttention`], the
//! library's public layer; this crate adds the recall task it learns.

pub mod recall;
