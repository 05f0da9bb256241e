//! MiniMax's linear-attention layer as a Burn [`Module`], on the library's kernels.
//!
//! The layer follows `MiniMaxText01LightningAttention` (MiniMax-01's modeling
//! code) step by step:
//!
//! ```text
//! qkv      = silu(x W_qkv)                      x [b, n, hidden], W_qkv [hidden, 3 h d], no bias
//! q, k, v  = split(qkv viewed as [b, n, h, 3d]) each [b, n, h, d]: per head, q then k then v
//! o, state = lightning_attention(q, k, v, slopes, state)   (FLA layout, no 1/sqrt(d))
//! y        = (sigmoid(x W_gate) * rms_norm(o viewed as [b, n, h d])) W_out
//! ```
//!
//! The decay slopes are MiniMax's ALiBi ladder scaled by the layer's depth
//! ([`crate::slopes::layer_slopes`]): fixed, not learned, so they
//! live in the module as a plain tensor, which Burn treats as a constant (no
//! gradient, not visited by optimizers).
//!
//! The Burn example (`burn-examples/examples/minimax_layer.rs`) and its
//! training test (`burn-examples/tests/burn/training.rs`) build their model on
//! this layer; `burn-examples/tests/burn/layer.rs` checks it against the f64
//! reference, its gradients and its record round trip.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::{Device, Tensor, TensorData};
// Not `lightning_attention::Result`: Burn's `Config` derive expands to code
// that names the prelude's `Result`.
use super::caller_layout::{CallerArg, in_caller_layout};
use super::{fla_lightning_attention, fla_lightning_attention_packed};
use crate::{LightningError, PrefillConfig, slopes};

/// The layer's `state` is [`fla_lightning_attention`]'s initial state: its
/// errors name it as the layer's caller does, in the layer's layout.
const STATE: CallerArg = CallerArg {
    inner: "initial_state",
    name: "state",
    layout: "[batch, h, d, d]",
    axes: &[0, 1, 2, 3],
    dims: &[("B", "batch"), ("H", "h"), ("D", "d"), ("E", "d")],
};

/// The packed forward's `states` are [`fla_lightning_attention_packed`]'s
/// initial states, named as the layer's caller does.
const STATES: CallerArg = CallerArg {
    inner: "initial_state",
    name: "states",
    layout: "[N, h, d, d]",
    axes: &[0, 1, 2, 3],
    dims: &[("H", "h"), ("D", "d"), ("E", "d")],
};

/// The shape of a [`MiniMaxLinearAttention`] layer and its kernels' block configuration.
#[derive(Config, Debug)]
pub struct MiniMaxLinearAttentionConfig {
    /// Width of the residual stream (the input and output's last dimension).
    pub hidden_size: usize,
    /// Attention heads `h`.
    pub heads: usize,
    /// Head dimension `d`, of queries, keys and values alike (as in MiniMax).
    pub head_dim: usize,
    /// This layer's index, 0-based: it sets the decay slopes.
    pub layer: usize,
    /// Layers in the model (at least 2: the slope factor divides by `layers - 1`).
    pub layers: usize,
    /// `BLOCK` of the prefill kernels: tokens per block, a power of two.
    #[config(default = 256)]
    pub block: usize,
    /// `CBLOCK` of the prefill kernels: a power of two dividing `block`.
    #[config(default = 32)]
    pub sub_block: usize,
    /// Epsilon of the RMS norm over the attention output.
    #[config(default = 1e-5)]
    pub norm_epsilon: f64,
}

impl MiniMaxLinearAttentionConfig {
    /// Builds the layer on `device` with Burn's default initializers.
    ///
    /// # Errors
    ///
    /// [`LightningError::Slopes`] for a layer index out of `0..layers` or fewer
    /// than 2 layers, [`LightningError::InvalidBlock`] for a block configuration
    /// the kernels cannot run: checked here so that a bad config fails when the
    /// model is built, not at its first forward.
    pub fn init(&self, device: &Device) -> Result<MiniMaxLinearAttention, LightningError> {
        let attention = PrefillConfig::new(self.block, self.sub_block);
        attention.validate()?;
        let slopes = slopes::layer_slopes(self.heads, self.layer, self.layers)?;
        if self.hidden_size == 0 || self.head_dim == 0 {
            return Err(LightningError::EmptyDimension {
                tensor: "config",
                dim: if self.hidden_size == 0 {
                    "hidden_size"
                } else {
                    "head_dim"
                },
                shape: vec![self.hidden_size, self.heads, self.head_dim],
            });
        }
        let inner = self.heads * self.head_dim;
        // MiniMax's projections carry no bias.
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out).with_bias(false).init(device);
        Ok(MiniMaxLinearAttention {
            qkv: linear(self.hidden_size, 3 * inner),
            gate: linear(self.hidden_size, inner),
            norm: RmsNormConfig::new(inner)
                .with_epsilon(self.norm_epsilon)
                .init(device),
            out: linear(inner, self.hidden_size),
            slopes: Tensor::from_data(TensorData::new(slopes, [self.heads]), device),
            hidden_size: self.hidden_size,
            heads: self.heads,
            head_dim: self.head_dim,
            attention,
        })
    }
}

/// MiniMax's lightning-attention layer: qkv projection with SiLU, lightning
/// attention with per-layer decay, RMS norm, sigmoid output gate, output
/// projection. Build it with [`MiniMaxLinearAttentionConfig::init`].
#[derive(Module, Debug)]
pub struct MiniMaxLinearAttention {
    /// `hidden -> 3 h d`: per head, q, k and v side by side (MiniMax's `qkv_proj`).
    pub qkv: Linear,
    /// `hidden -> h d`: the output gate (MiniMax's `output_gate`).
    pub gate: Linear,
    /// RMS norm over the `h d` attention output, all heads together (MiniMax's `norm`).
    pub norm: RmsNorm,
    /// `h d -> hidden` (MiniMax's `out_proj`).
    pub out: Linear,
    /// Decay slopes `[h]` f32. A plain tensor field is a constant to Burn: it
    /// moves with the module between devices, but gets no gradient and no
    /// optimizer step.
    pub slopes: Tensor<1>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Heads `h`.
    pub heads: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
    /// Block configuration of the prefill kernels (not a module: skipped).
    #[module(skip)]
    pub attention: PrefillConfig,
}

impl MiniMaxLinearAttention {
    /// The layer over a whole sequence from a zero state: `x [batch, seq, hidden]`
    /// to `[batch, seq, hidden]`.
    ///
    /// # Errors
    ///
    /// As [`forward_with_state`](Self::forward_with_state).
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, LightningError> {
        self.forward_with_state(x, None).map(|(y, _)| y)
    }

    /// The layer over one chunk of a sequence: continues from `state`
    /// (`[batch, h, d, d]` f32, the previous chunk's; `None` is zeros) and
    /// returns the output `[batch, seq, hidden]` with the state after the
    /// chunk. Feeding a sequence chunk by chunk gives the same outputs as one
    /// call over all of it; gradients flow through the state too.
    ///
    /// # Errors
    ///
    /// [`LightningError::Shape`] when the last dimension of `x` is not
    /// `hidden_size` (checked here, since Burn's `Linear` would panic);
    /// [`LightningError::EmptyDimension`] for an empty batch or sequence; and
    /// whatever the kernels reject (a state of the wrong shape or dtype, a
    /// device limit), before anything launches. Errors about the state name
    /// it `state`, with its shape as given and the layout `[batch, h, d, d]`.
    pub fn forward_with_state(
        &self,
        x: Tensor<3>,
        state: Option<Tensor<4>>,
    ) -> Result<(Tensor<3>, Tensor<4>), LightningError> {
        let [batch, seq, _] = x.dims();
        let (q, k, v) = self.qkv(&x)?;
        let (attn, state) =
            fla_lightning_attention(q, k, v, self.slopes.clone(), state, true, self.attention)
                .map_err(|err| in_caller_layout(err, &[STATE]))?;
        let state = state.expect("output_final_state was asked for");
        Ok((
            self.output(x, attn.reshape([batch, seq, self.heads * self.head_dim])),
            state,
        ))
    }

    /// The layer over a packed batch of documents from zero states: `x [1, T,
    /// hidden]` holds them back to back, `cu_seqlens` (`N + 1` offsets, from
    /// 0, non-decreasing, at most `T`) says where each starts, as
    /// [`fla_lightning_attention_packed`] takes them. Returns `[1, T, hidden]`:
    /// each document's rows are what [`forward`](Self::forward) gives on that
    /// document alone (the projections, norm and gate are per token; only
    /// the attention sees the boundaries). Rows past `cu_seqlens[N]` are
    /// padding: their attention output is zeros.
    ///
    /// # Errors
    ///
    /// As [`forward_packed_with_states`](Self::forward_packed_with_states).
    pub fn forward_packed(&self, x: Tensor<3>, cu_seqlens: &[u32]) -> Result<Tensor<3>, LightningError> {
        self.packed(x, cu_seqlens, None, false).map(|(y, _)| y)
    }

    /// [`forward_packed`](Self::forward_packed) from given states, one per
    /// document (`[N, h, d, d]` f32; `None` is zeros), returning each
    /// document's state after its last token `[N, h, d, d]` with the output;
    /// gradients flow through both.
    ///
    /// # Errors
    ///
    /// As [`forward_with_state`](Self::forward_with_state) (a batch other
    /// than 1 is a [`LightningError::Shape`] of `x`, layout `[1, T, hidden]`),
    /// and [`fla_lightning_attention_packed`]'s errors for `cu_seqlens`.
    /// Errors about the states name them `states`, layout `[N, h, d, d]`.
    pub fn forward_packed_with_states(
        &self,
        x: Tensor<3>,
        cu_seqlens: &[u32],
        states: Option<Tensor<4>>,
    ) -> Result<(Tensor<3>, Tensor<4>), LightningError> {
        self.packed(x, cu_seqlens, states, true)
            .map(|(y, states)| (y, states.expect("output_final_state was asked for")))
    }

    /// The packed forward, with the final states where `final_states`.
    fn packed(
        &self,
        x: Tensor<3>,
        cu_seqlens: &[u32],
        states: Option<Tensor<4>>,
        final_states: bool,
    ) -> Result<(Tensor<3>, Option<Tensor<4>>), LightningError> {
        let [batch, tokens, hidden] = x.dims();
        if batch != 1 {
            return Err(LightningError::Shape {
                tensor: "x",
                expected: vec![1, tokens, hidden],
                layout: "[1, T, hidden]",
                actual: vec![batch, tokens, hidden],
            });
        }
        let (q, k, v) = self.qkv(&x)?;
        let (attn, states) = fla_lightning_attention_packed(
            q,
            k,
            v,
            self.slopes.clone(),
            cu_seqlens,
            states,
            final_states,
            self.attention,
        )
        .map_err(|err| in_caller_layout(err, &[STATES]))?;
        let attn = attn.reshape([1, tokens, self.heads * self.head_dim]);
        Ok((self.output(x, attn), states))
    }

    /// q, k, v `[batch, seq, h, d]` (FLA's layout) of `x [batch, seq,
    /// hidden]`, after checking `x`'s hidden size and that it is not empty.
    fn qkv(&self, x: &Tensor<3>) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>), LightningError> {
        let [batch, seq, hidden] = x.dims();
        if hidden != self.hidden_size {
            return Err(LightningError::Shape {
                tensor: "x",
                expected: vec![batch, seq, self.hidden_size],
                layout: "[batch, seq, hidden]",
                actual: vec![batch, seq, hidden],
            });
        }
        // The projections would run on an empty tensor before the kernels'
        // own check: refuse it first, with the layer's names.
        for (dim, size) in [("batch", batch), ("seq", seq)] {
            if size == 0 {
                return Err(LightningError::EmptyDimension {
                    tensor: "x",
                    dim,
                    shape: vec![batch, seq, hidden],
                });
            }
        }
        let (h, d) = (self.heads, self.head_dim);

        // MiniMax views qkv as [b, n, h, 3d] and splits the last axis, so each
        // head's q, k, v are adjacent columns of the projection. The FLA
        // layout [B, T, H, D] is exactly this view: no transposes here.
        let qkv = silu(self.qkv.forward(x.clone())).reshape([batch, seq, h, 3 * d]);
        let [q, k, v] = <[Tensor<4>; 3]>::try_from(qkv.split(d, 3)).expect("3d columns split into 3 of d");
        Ok((q, k, v))
    }

    /// The layer's output `[batch, seq, hidden]` from its input `x` and the
    /// attention output `attn [batch, seq, h d]`.
    fn output(&self, x: Tensor<3>, attn: Tensor<3>) -> Tensor<3> {
        // Norm over all heads together (MiniMax normalizes the h*d vector), then
        // the gate, computed from the layer's input, scales each channel.
        let attn = self.norm.forward(attn);
        let gated = sigmoid(self.gate.forward(x)) * attn;
        self.out.forward(gated)
    }
}
