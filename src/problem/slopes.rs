//! Per-head decay slopes: MiniMax's ALiBi-style ladder scaled per layer
//! ([`layer_slopes`], MiniMax-Text-01 and models trained with MiniMax's
//! code), flash-linear-attention's linear ladder ([`fla_layer_slopes`],
//! models trained with FLA's `chunk_lightning_attn`), sliced per rank.

use lightning_attention_reference::slopes as formula;

use crate::{LightningError, Result};

/// The base slopes of `heads` heads (`2^(-8 (h+1) / H)` for a power of two `H`,
/// MiniMax's interleaving rule otherwise).
pub fn base_slopes(heads: usize) -> Result<Vec<f32>> {
    check_heads(heads)?;
    Ok(formula::base_slopes(heads)
        .into_iter()
        .map(|s| s as f32)
        .collect())
}

/// The slopes of `layer` (0-based) in a model of `layers` layers: the base
/// slopes times `1 - layer / (layers - 1) + 1e-5`.
pub fn layer_slopes(heads: usize, layer: usize, layers: usize) -> Result<Vec<f32>> {
    check_heads(heads)?;
    if layers < 2 {
        return Err(LightningError::Slopes(format!(
            "the layer factor 1 - layer/(layers-1) needs at least 2 layers, got {layers}"
        )));
    }
    check_layer(layer, layers)?;
    Ok(formula::layer_slopes(heads, layer, layers)
        .into_iter()
        .map(|s| s as f32)
        .collect())
}

/// flash-linear-attention's slopes of `layer` (0-based) in a model of
/// `layers` layers: head `h` of `heads` gets `8 h (1 - layer / layers) /
/// heads` (its `g_gamma` negated), so head 0 does not decay at all.
pub fn fla_layer_slopes(heads: usize, layer: usize, layers: usize) -> Result<Vec<f32>> {
    check_heads(heads)?;
    check_layer(layer, layers)?;
    Ok(formula::fla_slopes(heads, layer, layers)
        .into_iter()
        .map(|s| s as f32)
        .collect())
}

/// At least one head.
fn check_heads(heads: usize) -> Result<()> {
    if heads == 0 {
        return Err(LightningError::Slopes("heads must be at least 1".into()));
    }
    Ok(())
}

/// `layer` is one of the `layers`.
fn check_layer(layer: usize, layers: usize) -> Result<()> {
    if layer >= layers {
        return Err(LightningError::Slopes(format!(
            "layer {layer} is not in 0..{layers}"
        )));
    }
    Ok(())
}

/// The contiguous share of `slopes` that tensor-parallel `rank` of `world_size` holds.
pub fn rank_slice(slopes: &[f32], rank: usize, world_size: usize) -> Result<Vec<f32>> {
    if world_size == 0 || rank >= world_size {
        return Err(LightningError::Slopes(format!(
            "rank {rank} is not in 0..{world_size}"
        )));
    }
    if !slopes.len().is_multiple_of(world_size) {
        return Err(LightningError::Slopes(format!(
            "{} heads do not split evenly over {world_size} ranks",
            slopes.len()
        )));
    }
    let per_rank = slopes.len() / world_size;
    Ok(slopes[rank * per_rank..(rank + 1) * per_rank].to_vec())
}
