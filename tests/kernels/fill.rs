//! `DeviceTensor::filled`, which writes its value on the device: every
//! element's bits against the host's conversion, for each dtype, at lengths
//! that end inside a word (the host path), fit one cube, and need each unit of
//! the capped grid to loop.

use lightning_attention::{DType, DeviceTensor};

use crate::common::*;

/// The bits of `value` converted to `dtype`, little-endian, as `filled` must store them.
fn element_bytes(value: f32, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => value.to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(value).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
    }
}

#[test]
fn filled_tensors_hold_their_value_in_every_element() {
    let client = client();
    // A fresh value each run; the seed is in every failure's message.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| t.as_nanos() as u64);
    let mut rng = SeededRng::new(seed);
    // 3 is odd (16-bit: the host path); 2^22 + 6 f32 words is more than the
    // grid's 8192 cubes of 256 units, so each unit writes several words.
    let lengths = [1usize, 3, 2, 1000, 4097, (1 << 22) + 6];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &len in &lengths {
            for value in [0.0f32, -1.5, rng.unit() * 1000.0, f32::NAN, f32::INFINITY] {
                let t = DeviceTensor::filled(&client, &[len], dtype, value).unwrap();
                let bytes = client.read_one(t.handle.clone()).expect("read back");
                let expected = element_bytes(value, dtype);
                let size = expected.len();
                assert!(bytes.len() >= len * size, "{dtype} len {len}: buffer too short");
                for (i, element) in bytes[..len * size].chunks(size).enumerate() {
                    assert_eq!(
                        element,
                        &expected[..],
                        "{dtype} len {len} value {value} (seed {seed}): element {i} is {element:?}"
                    );
                }
            }
        }
    }
}
