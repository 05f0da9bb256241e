//! The bf16 state cache beyond the property tests of decode and varlen: a
//! split cache, the serving backend's memory figure and check, and the typed
//! errors for a cache of the wrong dtype or width.

use lightning_attention::memory::DeviceMemory;
use lightning_attention::{
    BackendConfig, DType, DecodeInputs, DeviceTensor, LightningBackend, LightningError, MemoryLimit,
    PrefillConfig, SplitCache, VarlenBatch, VarlenInputs, decode_into, decode_split_into, prefill_varlen,
};

use crate::common::*;

fn config(value_dim: usize, slots: usize, state_dtype: DType) -> BackendConfig {
    BackendConfig {
        heads: 4,
        key_dim: 16,
        value_dim,
        layers: 2,
        slots,
        max_batch: 4,
        tensor_parallel: (0, 1),
        dtype: DType::F32,
        prefill: PrefillConfig::new(16, 16),
        state_dtype,
    }
}

/// A bf16 cache split in parts of two slots decodes exactly as one buffer
/// does: the same kernel, each entry served by its part alone.
#[test]
fn split_bf16_cache_matches_one_buffer_byte_for_byte() {
    let client = client();
    let (b, h, d, e, slots) = (3, 2, 16, 6, 5);
    let mut rng = SeededRng::new(3);
    let cache = rng.values(slots * h * d * e, DType::BF16);
    let one = upload(&client, &cache, &[slots, h, d, e], DType::BF16);
    let state = h * d * e;
    let parts = cache
        .chunks(2 * state)
        .map(|chunk| upload(&client, chunk, &[chunk.len() / state, h, d, e], DType::BF16))
        .collect();
    let split = SplitCache::from_parts(parts).expect("bf16 parts");
    assert_eq!(split.state_dtype(), DType::BF16);
    let s = upload(&client, &rng.slopes(h), &[h], DType::F32);
    let slot_ids = [4, -1, 1];
    for _ in 0..2 {
        let q = upload(
            &client,
            &rng.values(b * h * d, DType::F32),
            &[b, h, 1, d],
            DType::F32,
        );
        let k = upload(
            &client,
            &rng.values(b * h * d, DType::F32),
            &[b, h, 1, d],
            DType::F32,
        );
        let v = upload(
            &client,
            &rng.values(b * h * e, DType::F32),
            &[b, h, 1, e],
            DType::F32,
        );
        let (out_one, out_split) = (
            poisoned(&client, &[b, h, 1, e], DType::F32),
            poisoned(&client, &[b, h, 1, e], DType::F32),
        );
        let mut inputs = DecodeInputs {
            q: &q,
            k: &k,
            v: &v,
            cache: &one,
            slopes: &s,
            slots: &slot_ids,
            scale: None,
            rows_in_flight: decode_rows_in_flight(),
        };
        decode_into(&client, &inputs, &out_one).expect("one buffer");
        inputs.cache = &s;
        decode_split_into(&client, &inputs, &split, &out_split).expect("split");
        assert_eq!(
            out_one.to_bytes(&client).unwrap(),
            out_split.to_bytes(&client).unwrap()
        );
    }
    let parts: Vec<u8> = split
        .parts()
        .iter()
        .flat_map(|p| p.to_bytes(&client).unwrap())
        .collect();
    assert_eq!(one.to_bytes(&client).unwrap(), parts, "the states");
}

/// The backend's caches and its memory check are in its state dtype: half
/// the bytes in bf16, refused before any allocation by those bytes.
#[test]
fn backend_counts_its_cache_in_its_dtype() {
    let client = client();
    let f32_config = config(24, 6, DType::F32);
    let bf16_config = config(24, 6, DType::BF16);
    assert_eq!(f32_config.cache_bytes(), 2 * 6 * 4 * 16 * 24 * 4);
    assert_eq!(bf16_config.cache_bytes() * 2, f32_config.cache_bytes());
    assert_eq!(
        bf16_config.state_bytes_per_sequence() * 2,
        f32_config.state_bytes_per_sequence()
    );
    let backend = LightningBackend::new(&client, bf16_config).expect("a bf16 backend");
    assert_eq!(backend.cache(1).unwrap().dtype, DType::BF16);
    assert!(read(&client, backend.cache(0).unwrap()).iter().all(|&x| x == 0.0));
    // One layer's cache past the largest buffer by half in bf16: the error
    // names the bf16 bytes, not the f32 ones.
    let max_buffer = DeviceMemory::of(&client).max_buffer;
    let slot_bytes = (4 * 16 * 24 * 2) as u64;
    let slots = (max_buffer * 3 / 2 / slot_bytes) as usize;
    let err = LightningBackend::new(&client, config(24, slots, DType::BF16)).unwrap_err();
    assert!(
        matches!(err, LightningError::OutOfMemory { bytes, limit: MemoryLimit::Buffer, .. } if bytes == slots as u64 * slot_bytes),
        "{err}"
    );
}

/// Caches an engine allocates itself must be in the backend's state dtype,
/// and a bf16 cache needs an even `e`; an f16 cache is refused everywhere.
#[test]
fn a_cache_of_the_wrong_dtype_is_a_typed_error() {
    let client = client();
    let (h, d, e) = (4, 16, 24);
    let caches = |dtype| {
        (0..2)
            .map(|_| DeviceTensor::filled(&client, &[6, h, d, e], dtype, 0.0).unwrap())
            .collect::<Vec<_>>()
    };
    let err =
        LightningBackend::from_caches(&client, config(e, 6, DType::BF16), caches(DType::F32)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::StateDType {
                tensor: "cache",
                expected: DType::BF16,
                actual: DType::F32
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("expected a state cache of"), "{err}");
    let err =
        LightningBackend::from_caches(&client, config(e, 6, DType::F32), caches(DType::BF16)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::StateDType {
                expected: DType::F32,
                actual: DType::BF16,
                ..
            }
        ),
        "{err}"
    );
    // The right dtype: the engine's states are kept.
    let kept = caches(DType::BF16);
    let backend =
        LightningBackend::from_caches(&client, config(e, 6, DType::BF16), kept).expect("bf16 caches");
    assert_eq!(backend.cache(0).unwrap().shape, [6, h, d, e]);
    let err = LightningBackend::from_caches(
        &client,
        config(e, 6, DType::BF16),
        caches(DType::BF16)[..1].to_vec(),
    )
    .unwrap_err();
    assert!(
        matches!(err, LightningError::LengthMismatch { what: "caches", .. }),
        "{err}"
    );
    let err = LightningBackend::new(&client, config(7, 6, DType::BF16)).unwrap_err();
    assert!(
        matches!(err, LightningError::OddStateWidth { value_dim: 7, .. }),
        "{err}"
    );
    let err = LightningBackend::new(&client, config(e, 6, DType::F16)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::DType {
                expected: DType::F32,
                actual: DType::F16,
                ..
            }
        ),
        "{err}"
    );

    // A split cache's parts share one dtype.
    let parts = vec![
        DeviceTensor::filled(&client, &[1, h, d, e], DType::BF16, 0.0).unwrap(),
        DeviceTensor::filled(&client, &[1, h, d, e], DType::F32, 0.0).unwrap(),
    ];
    let err = SplitCache::from_parts(parts).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::StateDType {
                tensor: "cache part",
                expected: DType::BF16,
                actual: DType::F32
            }
        ),
        "{err}"
    );

    // Decode and varlen: a bf16 cache with an odd e.
    let cache = DeviceTensor::filled(&client, &[2, 1, 4, 3], DType::BF16, 0.0).unwrap();
    let q = upload(&client, &[0.5; 4], &[1, 1, 1, 4], DType::F32);
    let v = upload(&client, &[0.5; 3], &[1, 1, 1, 3], DType::F32);
    let s = upload(&client, &[0.1], &[1], DType::F32);
    let inputs = DecodeInputs {
        q: &q,
        k: &q,
        v: &v,
        cache: &cache,
        slopes: &s,
        slots: &[0],
        scale: None,
        rows_in_flight: None,
    };
    let err = decode_into(&client, &inputs, &poisoned(&client, &[1, 1, 1, 3], DType::F32)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::OddStateWidth {
                tensor: "cache",
                value_dim: 3
            }
        ),
        "{err}"
    );
    let (q, v) = (
        upload(&client, &[0.5; 4], &[1, 1, 4], DType::F32),
        upload(&client, &[0.5; 3], &[1, 1, 3], DType::F32),
    );
    let inputs = VarlenInputs {
        q: &q,
        k: &q,
        v: &v,
        slopes: &s,
        cache: &cache,
        batch: VarlenBatch {
            cu_seqlens: &[0, 1],
            slots: &[0],
            has_initial_state: &[true],
            snapshots: None,
        },
    };
    let err = prefill_varlen(&client, &inputs, &PrefillConfig::new(16, 16)).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::OddStateWidth {
                tensor: "cache",
                value_dim: 3
            }
        ),
        "{err}"
    );
}
