//! One decode step against a slot-indexed state cache.

/// The slot index that marks a padding row: its cache is untouched and its output is zero.
pub const PADDING_SLOT: i64 = -1;

/// One token per sequence: `cache[slot, h] = exp(-s_h) cache[slot, h] + k^T v`, `o = q cache[slot, h]`.
///
/// q, k `[b, h, d]`, v `[b, h, e]`, cache `[slots, h, d, e]` (updated in place),
/// `slots[b]` an index into the cache or [`PADDING_SLOT`]. Returns out `[b, h, e]`.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cache: &mut [f64],
    slopes: &[f64],
    slots: &[i64],
) -> Vec<f64> {
    let (h, d, e) = (heads, key_dim, value_dim);
    let batch = slots.len();
    assert_eq!(q.len(), batch * h * d, "q length");
    assert_eq!(k.len(), batch * h * d, "k length");
    assert_eq!(v.len(), batch * h * e, "v length");
    assert_eq!(slopes.len(), h, "one slope per head");
    assert_eq!(cache.len() % (h * d * e), 0, "cache length");
    let mut out = vec![0.0; batch * h * e];
    for (b, &slot) in slots.iter().enumerate() {
        if slot == PADDING_SLOT {
            continue;
        }
        let slot = usize::try_from(slot).expect("slot index");
        for head in 0..h {
            let decay = (-slopes[head]).exp();
            let kv = &mut cache[(slot * h + head) * d * e..][..d * e];
            let row = b * h + head;
            for i in 0..d {
                for j in 0..e {
                    kv[i * e + j] = decay * kv[i * e + j] + k[row * d + i] * v[row * e + j];
                }
            }
            for j in 0..e {
                out[row * e + j] = (0..d).map(|i| q[row * d + i] * kv[i * e + j]).sum();
            }
        }
    }
    out
}
