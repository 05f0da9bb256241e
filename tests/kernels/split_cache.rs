//! Decode against a state cache split over several buffers (`SplitCache`),
//! against the reference on one cache: each entry served by its part alone.

use lightning_attention::reference::decode as reference_decode;
use lightning_attention::{DType, DecodeInputs, PADDING_SLOT, SplitCache, decode_split_into};
use proptest::prelude::*;

use crate::common::*;
use crate::decode::{Case, case, shuffled_slots};

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn split_cache_decode_matches_reference(case in case(), part_slots in 1usize..=4, steps in 1usize..=2) {
        let client = client();
        let Case { batch: b, heads: h, key_dim: d, value_dim: e, dtype, .. } = case;
        let num_slots = b + case.spare_slots;
        let mut rng = SeededRng::new(case.seed);
        let slopes = rng.slopes(h);
        let cache = rng.values(num_slots * h * d * e, DType::F32);
        let slots = shuffled_slots(&mut rng, num_slots, &case.padding);
        let state = h * d * e;
        let parts = cache
            .chunks(part_slots * state)
            .map(|chunk| upload(&client, chunk, &[chunk.len() / state, h, d, e], DType::F32))
            .collect();
        let split = SplitCache::from_parts(parts).expect("valid parts");
        prop_assert_eq!(split.slots(), num_slots);
        prop_assert_eq!(split.parts().len(), num_slots.div_ceil(part_slots));
        let before: Vec<Vec<u8>> = split.parts().iter().map(|p| p.to_bytes(&client).unwrap()).collect();
        let s_t = upload(&client, &slopes, &[h], DType::F32);
        let mut expected_cache = f64s(&cache);
        let slots64: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        for step in 0..steps {
            // Fresh inputs each step; the cache carries over.
            let q = rng.values(b * h * d, dtype);
            let k = rng.values(b * h * d, dtype);
            let v = rng.values(b * h * e, dtype);
            let q_t = upload(&client, &q, &[b, h, 1, d], dtype);
            let k_t = upload(&client, &k, &[b, h, 1, d], dtype);
            let v_t = upload(&client, &v, &[b, h, 1, e], dtype);
            let out = poisoned(&client, &[b, h, 1, e], dtype);
            // `cache` is ignored by the split decode: bind any tensor there.
            let inputs = DecodeInputs { q: &q_t, k: &k_t, v: &v_t, cache: &s_t, slopes: &s_t, slots: &slots, scale: None, rows_in_flight: decode_rows_in_flight() };
            decode_split_into(&client, &inputs, &split, &out).expect("a valid decode");
            let expected = reference_decode(h, d, e, &f64s(&q), &f64s(&k), &f64s(&v), &mut expected_cache, &f64s(&slopes), &slots64);
            let actual = read(&client, &out);
            let out_err = relative_error(&actual, &expected);
            prop_assert!(out_err < tolerance(dtype) || expected.iter().all(|&x| x == 0.0), "step {step}: output error {out_err:e} for {case:?}");
            for (row, &slot) in slots.iter().enumerate() {
                if slot == PADDING_SLOT {
                    prop_assert!(actual[row * h * e..(row + 1) * h * e].iter().all(|&x| x == 0.0), "padding row {row}: {case:?}");
                }
            }
        }
        let actual_cache: Vec<f64> = split.parts().iter().flat_map(|p| read(&client, p)).collect();
        let cache_err = relative_error(&actual_cache, &expected_cache);
        prop_assert!(cache_err < 1e-5, "cache error {cache_err:e} for {case:?}");
        // Slots no live row names are byte-identical, in whichever part they sit.
        for slot in (0..num_slots).filter(|&s| !slots.contains(&(s as i32))) {
            let (part, local) = split.locate(slot).expect("a slot of the cache");
            let range = local * state * 4..(local + 1) * state * 4;
            let after = split.parts()[part].to_bytes(&client).unwrap();
            prop_assert!(before[part][range.clone()] == after[range], "slot {slot} changed: {case:?}");
        }
    }
}

#[test]
fn split_cache_parts_and_slots() {
    let client = client();
    let split = SplitCache::zeros_in_parts(&client, 10, 4, 2, 8, 8).unwrap();
    let lens: Vec<usize> = split.parts().iter().map(|p| p.shape[0]).collect();
    assert_eq!(lens, [4, 4, 2]);
    assert_eq!(split.locate(0), Some((0, 0)));
    assert_eq!(split.locate(5), Some((1, 1)));
    assert_eq!(split.locate(9), Some((2, 1)));
    assert_eq!(split.locate(10), None);
    let one = SplitCache::zeros(&client, 3, 2, 8, 8).unwrap();
    assert_eq!(one.parts().len(), 1, "three small states fit one buffer");
    // Parts must agree on h, d, e.
    let parts = vec![
        upload(&client, &[0.0; 2 * 8 * 8], &[1, 2, 8, 8], DType::F32),
        upload(&client, &[0.0; 2 * 8 * 4], &[1, 2, 8, 4], DType::F32),
    ];
    let err = SplitCache::from_parts(parts).unwrap_err();
    assert!(err.to_string().contains("cache part"), "{err}");
    // A slot past every part is refused before any launch.
    let q = upload(&client, &[0.5; 2 * 8], &[1, 2, 1, 8], DType::F32);
    let s = upload(&client, &[0.1; 2], &[2], DType::F32);
    let inputs = DecodeInputs {
        q: &q,
        k: &q,
        v: &q,
        cache: &s,
        slopes: &s,
        slots: &[10],
        scale: None,
        rows_in_flight: decode_rows_in_flight(),
    };
    assert!(
        decode_split_into(
            &client,
            &inputs,
            &split,
            &poisoned(&client, &[1, 2, 1, 8], DType::F32)
        )
        .is_err()
    );
}
