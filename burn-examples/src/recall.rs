//! The synthetic recall task, the small model that learns it, and the training
//! loop; shared by the example (`examples/minimax_layer.rs`) and the
//! training test (`tests/burn/training.rs`), so that the test checks the code the example runs.
//!
//! The task: a sequence of `seq_len` random tokens; every position after
//! `recall_at` must name the token seen at `recall_at`. Every other token is
//! noise, independent of the answer, so the loss can only fall below chance
//! (`ln vocab`) if the attention carries the token from `recall_at` forward,
//! across 1 to `seq_len - recall_at - 1` positions of decay. Asking it of
//! every later position rather than only the last gives ~27 targets per
//! sequence instead of one, so the loss is smooth enough to judge from a few
//! steps. Batches are fresh every step: a falling loss is recall, not
//! memorization.

use burn::config::Config;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use lightning_attention::LightningError;
use lightning_attention::reference::random::SeededRng;
use lightning_attention::reference::relative_error;

use lightning_attention::burn::{MiniMaxLinearAttention, MiniMaxLinearAttentionConfig};

/// The task, the model's shape and the training run.
#[derive(Config, Debug)]
pub struct RecallConfig {
    /// Distinct tokens.
    #[config(default = 16)]
    pub vocab: usize,
    /// Tokens per sequence.
    #[config(default = 32)]
    pub seq_len: usize,
    /// The position whose token every later position must name.
    #[config(default = 4)]
    pub recall_at: usize,
    /// Sequences per step.
    #[config(default = 16)]
    pub batch: usize,
    /// Width of the residual stream.
    #[config(default = 32)]
    pub hidden: usize,
    /// Heads per layer.
    #[config(default = 2)]
    pub heads: usize,
    /// Head dimension.
    #[config(default = 16)]
    pub head_dim: usize,
    /// MiniMax linear-attention layers (at least 2: the slope ladder needs them).
    #[config(default = 2)]
    pub layers: usize,
    /// `BLOCK` of the prefill kernels.
    #[config(default = 16)]
    pub block: usize,
    /// `CBLOCK` of the prefill kernels.
    #[config(default = 16)]
    pub sub_block: usize,
    /// AdamW steps.
    #[config(default = 100)]
    pub steps: usize,
    /// AdamW learning rate.
    #[config(default = 1e-2)]
    pub lr: f64,
    /// Seeds the parameters (through the device's generator) and the batches.
    #[config(default = 1)]
    pub seed: u64,
}

/// Embedding (token + learned position) -> MiniMax linear-attention layers,
/// each with a residual connection -> RMS norm -> a linear head.
#[derive(Module, Debug)]
pub struct RecallModel {
    /// Token embedding.
    pub tokens: Embedding,
    /// Learned position embedding: the attention has no notion of position
    /// beyond its decay, and the task asks for a fixed position.
    pub positions: Embedding,
    /// The layers under test.
    pub layers: Vec<MiniMaxLinearAttention>,
    /// Final norm before the head.
    pub norm: RmsNorm,
    /// `hidden -> vocab` logits.
    pub head: Linear,
}

impl RecallConfig {
    /// Builds the model on `device` (seed the device first for repeatable parameters).
    ///
    /// # Errors
    ///
    /// The layers' configuration errors ([`MiniMaxLinearAttentionConfig::init`]).
    pub fn init_model(&self, device: &Device) -> Result<RecallModel, LightningError> {
        let layers = (0..self.layers)
            .map(|layer| {
                MiniMaxLinearAttentionConfig::new(self.hidden, self.heads, self.head_dim, layer, self.layers)
                    .with_block(self.block)
                    .with_sub_block(self.sub_block)
                    .init(device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecallModel {
            tokens: EmbeddingConfig::new(self.vocab, self.hidden).init(device),
            positions: EmbeddingConfig::new(self.seq_len, self.hidden).init(device),
            layers,
            norm: RmsNormConfig::new(self.hidden).init(device),
            head: LinearConfig::new(self.hidden, self.vocab).init(device),
        })
    }

    /// One batch of the task from `rng`: tokens `[batch, seq_len]` and the
    /// targets `[batch, seq_len - recall_at - 1]` (each sequence's token at
    /// `recall_at`, once per later position).
    pub fn batch(&self, rng: &mut SeededRng, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let tokens: Vec<i64> = (0..self.batch * self.seq_len)
            .map(|_| (((rng.unit() + 1.0) / 2.0 * self.vocab as f64) as i64).min(self.vocab as i64 - 1))
            .collect();
        let later = self.seq_len - self.recall_at - 1;
        let targets: Vec<i64> = tokens
            .chunks(self.seq_len)
            .flat_map(|sequence| std::iter::repeat_n(sequence[self.recall_at], later))
            .collect();
        (
            Tensor::from_data(TensorData::new(tokens, [self.batch, self.seq_len]), device),
            Tensor::from_data(TensorData::new(targets, [self.batch, later]), device),
        )
    }
}

impl RecallModel {
    /// Logits `[batch, seq, vocab]` of `tokens [batch, seq]`.
    ///
    /// # Errors
    ///
    /// The layers' errors ([`MiniMaxLinearAttention::forward`]).
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>, LightningError> {
        let [_, seq] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        let mut x = self.tokens.forward(tokens) + self.positions.forward(positions);
        for layer in &self.layers {
            x = x.clone() + layer.forward(x)?;
        }
        Ok(self.head.forward(self.norm.forward(x)))
    }
}

/// One training step's numbers.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// 0-based step.
    pub step: usize,
    /// Cross-entropy of the batch, before the update.
    pub loss: f32,
    /// Fraction of the scored positions whose argmax was the target, before the update.
    pub accuracy: f32,
}

/// Trains a fresh model on `device` (an autodiff device) for `config.steps`
/// AdamW steps, calling `on_step` after each; returns the trained model and
/// every step's numbers.
///
/// Seeds the device's generator (global to the backend on wgpu/CUDA): for
/// repeatable parameters nothing else may draw from it meanwhile.
///
/// # Errors
///
/// The layers' errors; none are expected for a valid config.
pub fn train(
    config: &RecallConfig,
    device: &Device,
    mut on_step: impl FnMut(Step),
) -> Result<(RecallModel, Vec<Step>), LightningError> {
    device.seed(config.seed);
    let mut model = config.init_model(device)?;
    // No weight decay: the batches are fresh every step, so there is nothing
    // to overfit, and a run this short needs no regularization.
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut rng = SeededRng::new(config.seed);
    let mut steps = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        let (tokens, targets) = config.batch(&mut rng, device);
        // Score the positions after `recall_at`, flattened to one row each.
        let [batch, later] = targets.dims();
        let logits = model
            .forward(tokens)?
            .slice([0..batch, config.recall_at + 1..config.seq_len, 0..config.vocab])
            .reshape([batch * later, config.vocab]);
        let targets = targets.reshape([batch * later]);
        let hits = logits
            .clone()
            .argmax(1)
            .reshape([batch * later])
            .equal(targets.clone())
            .int()
            .sum()
            .into_scalar::<i64>();
        let loss = loss_fn.forward(logits, targets);
        let record = Step {
            step,
            loss: loss.clone().into_scalar::<f32>(),
            accuracy: hits as f32 / (batch * later) as f32,
        };
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(config.lr, model, grads);
        on_step(record);
        steps.push(record);
    }
    Ok((model, steps))
}

/// The initial loss (step 0's, an untrained model) and the final one (the
/// mean over the last `window` steps, since single batches are noisy): the
/// numbers the example prints and the test compares.
pub fn initial_and_final(steps: &[Step], window: usize) -> (f32, f32) {
    let window = window.clamp(1, steps.len().max(1));
    let last = &steps[steps.len().saturating_sub(window)..];
    let initial = steps.first().map_or(f32::NAN, |s| s.loss);
    (
        initial,
        last.iter().map(|s| s.loss).sum::<f32>() / last.len().max(1) as f32,
    )
}

/// Runs `layer` over `x [batch, seq, hidden]` at once and in two chunks split at
/// `split` (the state of the first carried into the second), and returns the
/// relative difference `||chunked - whole|| / ||whole||`: chunked inference
/// through [`MiniMaxLinearAttention::forward_with_state`] must reproduce the
/// whole-sequence forward.
///
/// # Errors
///
/// The layer's errors.
pub fn chunked_vs_whole(
    layer: &MiniMaxLinearAttention,
    x: Tensor<3>,
    split: usize,
) -> Result<f64, LightningError> {
    let [batch, seq, hidden] = x.dims();
    let whole = layer.forward(x.clone())?;
    let (first, state) = layer.forward_with_state(x.clone().slice([0..batch, 0..split, 0..hidden]), None)?;
    let (second, _) = layer.forward_with_state(x.slice([0..batch, split..seq, 0..hidden]), Some(state))?;
    let chunked = Tensor::cat(vec![first, second], 1);
    let read = |t: Tensor<3>| -> Vec<f64> {
        t.into_data()
            .try_to_vec::<f32>()
            .expect("the layer computes in f32")
            .into_iter()
            .map(f64::from)
            .collect()
    };
    Ok(relative_error(&read(chunked), &read(whole)))
}
