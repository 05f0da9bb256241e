//! Decode against the reference: slot-indexed cache updated in place, padding
//! rows skipped; with an f32 cache and with a bf16 one.

use lightning_attention::reference::decode as reference_decode;
use lightning_attention::{DType, DecodeInputs, PADDING_SLOT, decode_into};
use proptest::prelude::*;

use crate::common::*;

#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub spare_slots: usize,
    pub padding: Vec<bool>,
    pub dtype: DType,
    pub seed: u64,
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=6,
        1usize..=3,
        prop::sample::select(vec![
            (64, 128),
            (128, 64),
            (128, 128),
            (24, 40),
            (8, 16),
            (12, 6),
            (16, 30),
        ]),
        0usize..=3,
        prop::sample::select(input_dtypes()),
        any::<u64>(),
    )
        .prop_flat_map(|(batch, heads, (key_dim, value_dim), spare_slots, dtype, seed)| {
            prop::collection::vec(prop::bool::weighted(0.25), batch).prop_map(move |padding| Case {
                batch,
                heads,
                key_dim,
                value_dim,
                spare_slots,
                padding,
                dtype,
                seed,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decode_matches_reference(case in case()) {
        run_case(&case, DType::F32)?;
    }
}

proptest! {
    // Few cases: the bf16 cache shares everything with the f32 one but the
    // kernel's loads and stores of the state.
    #![proptest_config(ProptestConfig { cases: cases(12), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn decode_bf16_cache_matches_rounded_reference(case in case().prop_filter("a bf16 cache needs an even e", |c| c.value_dim % 2 == 0)) {
        run_case(&case, DType::BF16)?;
    }
}

/// One step of `case` against a cache of `state_dtype`. A bf16 cache is judged
/// against the f64 reference run from the same (bf16) states, its written
/// states rounded to bf16 once, as the kernel writes them: each element must
/// be within one bf16 step of that, beyond the f32 error of its update (so
/// the test judges the kernel, not the format), and the output (computed
/// from the state before rounding) is held to the f32 cache's bound.
pub fn run_case(case: &Case, state_dtype: DType) -> Result<(), TestCaseError> {
    let client = client();
    let Case {
        batch: b,
        heads: h,
        key_dim: d,
        value_dim: e,
        dtype,
        ..
    } = *case;
    let num_slots = b + case.spare_slots;
    let mut rng = SeededRng::new(case.seed);
    let q = rng.values(b * h * d, dtype);
    let k = rng.values(b * h * d, dtype);
    let v = rng.values(b * h * e, dtype);
    let slopes = rng.slopes(h);
    let cache = rng.values(num_slots * h * d * e, state_dtype);
    let slots = shuffled_slots(&mut rng, num_slots, &case.padding);

    let q_t = upload(&client, &q, &[b, h, 1, d], dtype);
    let k_t = upload(&client, &k, &[b, h, 1, d], dtype);
    let v_t = upload(&client, &v, &[b, h, 1, e], dtype);
    let s_t = upload(&client, &slopes, &[h], DType::F32);
    let cache_t = upload(&client, &cache, &[num_slots, h, d, e], state_dtype);
    let before = cache_t.to_bytes(&client).unwrap();
    let out = poisoned(&client, &[b, h, 1, e], dtype);
    let inputs = DecodeInputs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        cache: &cache_t,
        slopes: &s_t,
        slots: &slots,
        scale: None,
        rows_in_flight: decode_rows_in_flight(),
    };
    decode_into(&client, &inputs, &out).expect("a valid decode");

    let mut expected_cache = f64s(&cache);
    let slots64: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
    let expected = reference_decode(
        h,
        d,
        e,
        &f64s(&q),
        &f64s(&k),
        &f64s(&v),
        &mut expected_cache,
        &f64s(&slopes),
        &slots64,
    );
    let actual = read(&client, &out);
    let tol = tolerance(dtype);
    let out_err = relative_error(&actual, &expected);
    prop_assert!(
        out_err < tol || expected.iter().all(|&x| x == 0.0),
        "output error {out_err:e} for {case:?}"
    );
    for (row, &slot) in slots.iter().enumerate() {
        if slot == PADDING_SLOT {
            let zeros = &actual[row * h * e..(row + 1) * h * e];
            prop_assert!(
                zeros.iter().all(|&x| x == 0.0),
                "padding row {row} not zero: {case:?}"
            );
        }
    }
    let actual_cache = read(&client, &cache_t);
    if state_dtype == DType::BF16 {
        let rounded: Vec<f64> = expected_cache.iter().map(|&x| round_bf16(x)).collect();
        // The same step on absolute values: the size of what each update sums.
        let abs = |x: &[f32]| x.iter().map(|v| f64::from(v.abs())).collect::<Vec<_>>();
        let mut magnitude = abs(&cache);
        reference_decode(
            h,
            d,
            e,
            &abs(&q),
            &abs(&k),
            &abs(&v),
            &mut magnitude,
            &f64s(&slopes),
            &slots64,
        );
        if let Some((i, a, r)) = beyond_one_bf16_step(&actual_cache, &rounded, &magnitude) {
            prop_assert!(
                false,
                "cache element {i}: {a:e} against the rounded reference {r:e}, for {case:?}"
            );
        }
    } else {
        let cache_err = relative_error(&actual_cache, &expected_cache);
        prop_assert!(cache_err < 1e-5, "cache error {cache_err:e} for {case:?}");
    }
    // Slots no live row names are byte-identical.
    let after = cache_t.to_bytes(&client).unwrap();
    let slot_bytes = h * d * e * state_dtype.size();
    for slot in 0..num_slots {
        if !slots.contains(&(slot as i32)) {
            let range = slot * slot_bytes..(slot + 1) * slot_bytes;
            prop_assert!(
                before[range.clone()] == after[range],
                "slot {slot} changed: {case:?}"
            );
        }
    }
    Ok(())
}

/// A shuffled assignment of distinct slots out of `num_slots`, one per row,
/// [`PADDING_SLOT`] where `padding` says.
pub fn shuffled_slots(rng: &mut SeededRng, num_slots: usize, padding: &[bool]) -> Vec<i32> {
    let mut order: Vec<i32> = (0..num_slots as i32).collect();
    for i in (1..order.len()).rev() {
        let j = ((rng.unit() * 0.5 + 0.5) * (i + 1) as f32) as usize % (i + 1);
        order.swap(i, j);
    }
    padding
        .iter()
        .zip(order)
        .map(|(&pad, slot)| if pad { PADDING_SLOT } else { slot })
        .collect()
}
