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
//!
//! With `reversed`, a kernel sees each sequence's tokens in reverse order
//! (its token `t` is the sequence's token `n - 1 - t`): the backward pass runs
//! the forward kernels backwards in time this way, without copying anything.

use cubecl::prelude::*;

/// The row of token 0 of a sequence starting at token `seq_start`, in head `head`.
#[cube]
pub fn first_row(seq_start: usize, head: usize, heads: usize, head_stride: usize) -> usize {
    seq_start * heads + head * head_stride
}

/// The row of the kernel's token `t` of a sequence of `n` tokens whose token 0
/// is at `row0`, rows `step` apart; read back to front when `reversed`.
#[cube]
pub fn token_row(row0: usize, t: usize, n: usize, step: usize, #[comptime] reversed: bool) -> usize {
    let mut index = t;
    if comptime!(reversed) {
        index = n - 1 - t;
    }
    row0 + index * step
}
