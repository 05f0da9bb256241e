//! The sizes of one lightning-attention problem.

/// Sizes of a prefill problem: batch, heads, tokens, key dim `d`, value dim `e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch size `b`.
    pub batch: usize,
    /// Number of heads `h`.
    pub heads: usize,
    /// Tokens per sequence `n`.
    pub seq_len: usize,
    /// Query/key head dimension `d`.
    pub key_dim: usize,
    /// Value head dimension `e`.
    pub value_dim: usize,
}

impl Dims {
    /// Elements of q or k: `b * h * n * d`.
    pub fn qk_len(&self) -> usize {
        self.batch * self.heads * self.seq_len * self.key_dim
    }
    /// Elements of v or the output: `b * h * n * e`.
    pub fn v_len(&self) -> usize {
        self.batch * self.heads * self.seq_len * self.value_dim
    }
    /// Elements of the state: `b * h * d * e`.
    pub fn state_len(&self) -> usize {
        self.batch * self.heads * self.key_dim * self.value_dim
    }
}
