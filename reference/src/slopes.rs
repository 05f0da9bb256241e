//! MiniMax's ALiBi-style slope ladder and its per-layer scaling, and
//! flash-linear-attention's linear one.

/// The base slopes for `heads` heads, as MiniMax's `get_slopes`.
///
/// For a power of two `H`, `s_h = 2^(-8 (h + 1) / H)`. Otherwise the ladder of
/// the largest power of two `P < H` is followed by every other slope of the
/// ladder for `2P`, as many as are missing.
pub fn base_slopes(heads: usize) -> Vec<f64> {
    assert!(heads > 0, "at least one head");
    if heads.is_power_of_two() {
        return power_of_two_ladder(heads);
    }
    let closest = 1usize << heads.ilog2();
    let mut slopes = power_of_two_ladder(closest);
    slopes.extend(
        base_slopes(2 * closest)
            .into_iter()
            .step_by(2)
            .take(heads - closest),
    );
    slopes
}

fn power_of_two_ladder(heads: usize) -> Vec<f64> {
    let start = 2f64.powf(-8.0 / heads as f64);
    (0..heads).map(|h| start.powi(h as i32 + 1)).collect()
}

/// The per-layer factor `1 - layer / (layers - 1) + 1e-5`; `layers` must be at least 2.
pub fn layer_factor(layer: usize, layers: usize) -> f64 {
    assert!(layers >= 2 && layer < layers, "layer {layer} of {layers}");
    1.0 - layer as f64 / (layers - 1) as f64 + 1e-5
}

/// The slopes of every head of `layer` in a model of `layers` layers.
pub fn layer_slopes(heads: usize, layer: usize, layers: usize) -> Vec<f64> {
    let factor = layer_factor(layer, layers);
    base_slopes(heads).into_iter().map(|s| s * factor).collect()
}

/// flash-linear-attention's slopes (its `fla/ops/lightning_attn`:
/// `g_gamma = -(8 / H) (1 - layer / L) h`, decay `exp(g_gamma)`): head `h` of
/// `layer` (0-based) in a model of `layers` gets `8 h (1 - layer / layers) / H`,
/// so head 0 never decays.
pub fn fla_slopes(heads: usize, layer: usize, layers: usize) -> Vec<f64> {
    assert!(
        heads > 0 && layer < layers,
        "head count {heads}, layer {layer} of {layers}"
    );
    let factor = 8.0 / heads as f64 * (1.0 - layer as f64 / layers as f64);
    (0..heads).map(|h| factor * h as f64).collect()
}
