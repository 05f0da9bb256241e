//! Where a token of a sequence sits in q, k, v and the output, for both layouts.
//!
//! Every prefill kernel addresses a token through a table of sequences instead
//! of a fixed `[b, h, n, ...]` shape, so that one kernel serves a dense batch of
//! equal lengths and a packed (varlen) batch of many lengths alike:
//!
//! - dense `[b, h, n, x]`: sequence `b` starts at token `b * n`, rows step by 1
//!   per token and by `n` per head (`head_stride = n`, `token_stride = 1`);
//! - packed `[total_tokens, h, x]`: sequence `i` starts at `cu_seqlens[i]`, rows
//!   step by `h` per token and by 1 per head (`head_stride = 1`, `token_stride = h`).
//!
//! In both, the row of token `t` of sequence `seq` in head `head` is
//! `start(seq) * h + head * head_stride + t * token_stride`, and element `x` of
//! it is at `row * width + x`.

use cubecl::prelude::*;

/// The row of token 0 of a sequence starting at token `seq_start`, in head `head`.
#[cube]
pub fn first_row(seq_start: usize, head: usize, heads: usize, head_stride: usize) -> usize {
    seq_start * heads + head * head_stride
}
