//! bf16 as 32-bit words (runtimes without bf16): the conversion kernels bit
//! for bit against `half`, and a bf16 call that leaves the bytes past its
//! output alone. They run on every runtime: CUDA takes the same kernels.

use lightning_attention::cubecl::prelude::*;
use lightning_attention::reference::{Dims, recurrence};
use lightning_attention::{DType, DeviceTensor, PrefillConfig, PrefillInputs, prefill_into};
use lightning_attention_kernels::widen::{narrow_bf16, widen_bf16};

use crate::common::*;

/// Two bytes a kernel must not touch, after a bf16 tensor of odd length.
const SENTINEL: [u8; 2] = [0xab, 0xcd];

/// A bf16 tensor of `len` elements from `bits`, followed in its buffer by [`SENTINEL`].
fn bf16_with_sentinel(client: &Client, bits: &[u16], shape: &[usize]) -> DeviceTensor {
    let mut bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    bytes.extend_from_slice(&SENTINEL);
    DeviceTensor {
        handle: client.create_from_slice(&bytes),
        shape: shape.to_vec(),
        dtype: DType::BF16,
    }
}

/// The whole buffer behind `t`, sentinel included.
fn raw_bytes(client: &Client, t: &DeviceTensor) -> Vec<u8> {
    client.read_one(t.handle.clone()).expect("read back").to_vec()
}

fn grid(len: usize) -> (CubeCount, CubeDim) {
    // Few cubes, so that each unit loops over several words.
    (
        CubeCount::Static(3, 1, 1),
        CubeDim::new_1d(64.min(len.div_ceil(2)) as u32),
    )
}

#[test]
fn widening_is_exact_for_every_bf16() {
    let client = client();
    // Every 16-bit pattern (NaNs, infinities, subnormals included), plus one: an odd length.
    let bits: Vec<u16> = (0..=u16::MAX).chain([0x3f80]).collect();
    let len = bits.len();
    let words = bf16_with_sentinel(&client, &bits, &[len]);
    let wide = DeviceTensor::filled(&client, &[len], DType::F32, f32::NAN).unwrap();
    let (count, dim) = grid(len);
    // SAFETY: `words` holds `len` bf16 and `wide` `len` f32.
    unsafe {
        widen_bf16::launch_unchecked(
            &client,
            count,
            dim,
            BufferArg::from_raw_parts(words.handle.clone(), len.div_ceil(2)),
            BufferArg::from_raw_parts(wide.handle.clone(), len),
            len as u32,
        )
    }
    let got = wide.to_f32_vec(&client).unwrap();
    for (i, (&b, g)) in bits.iter().zip(got).enumerate() {
        let want = half::bf16::from_bits(b).to_f32();
        if want.is_nan() {
            // `half` quiets a signalling NaN; a shift keeps its payload. Both are NaN.
            assert!(
                g.is_nan() && g.is_sign_negative() == want.is_sign_negative(),
                "element {i}: bf16 {b:#06x} gave {g}"
            );
        } else {
            assert_eq!(g.to_bits(), want.to_bits(), "element {i}: bf16 {b:#06x}");
        }
    }
}

#[test]
fn narrowing_rounds_to_nearest_even_and_keeps_nan() {
    let client = client();
    let mut rng = SeededRng::new(0x6b16);
    let mut values: Vec<f32> = Vec::new();
    // Ties below and above an even and an odd bf16, their neighbours, the
    // largest finite f32 (rounds to infinity), NaNs with payloads in the low
    // half alone, subnormals, signed zeros.
    for base in [0x3f80_0000u32, 0x3f81_0000, 0xbf80_0000, 0x0001_0000, 0x7f7f_0000] {
        for low in [0x7fffu32, 0x8000, 0x8001, 0xffff, 0x0001] {
            values.push(f32::from_bits(base | low));
        }
    }
    values.extend([
        f32::MAX,
        -f32::MAX,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xff80_0001),
    ]);
    values.extend([
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::from_bits(1),
    ]);
    // Random bit patterns: every class of float, uniformly over the bits.
    values.extend(
        rng.values(4001, DType::F32)
            .iter()
            .map(|x| f32::from_bits(x.to_bits().rotate_left(13) ^ 0x9e37_79b9)),
    );
    values.extend(rng.values(4001, DType::F32));
    if values.len().is_multiple_of(2) {
        values.push(1.0 + f32::EPSILON);
    }
    let len = values.len();
    let src = DeviceTensor::from_f32(&client, &values, &[len], DType::F32).unwrap();
    let dst = bf16_with_sentinel(&client, &vec![0x7fc1; len], &[len]);
    let (count, dim) = grid(len);
    // SAFETY: `src` holds `len` f32 and `dst` `len` bf16.
    unsafe {
        narrow_bf16::launch_unchecked(
            &client,
            count,
            dim,
            BufferArg::from_raw_parts(src.handle.clone(), len),
            BufferArg::from_raw_parts(dst.handle.clone(), len.div_ceil(2)),
            len as u32,
        )
    }
    let bytes = raw_bytes(&client, &dst);
    assert_eq!(
        bytes[2 * len..2 * len + 2],
        SENTINEL,
        "the bytes past the tensor were written"
    );
    for (i, &x) in values.iter().enumerate() {
        let got = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        let want = half::bf16::from_f32(x).to_bits();
        assert_eq!(got, want, "element {i}: f32 {:#010x}", x.to_bits());
    }
}

/// A bf16 prefill whose output has an odd number of elements: every element
/// within the bf16 bound of the reference, the two bytes after it untouched.
#[test]
fn bf16_prefill_of_odd_length_keeps_the_bytes_past_its_output() {
    let client = client();
    let (h, n, d, e) = (1, 37, 5, 3);
    let mut rng = SeededRng::new(0x0dd);
    let [q, k] = [(); 2].map(|_| rng.values(h * n * d, DType::BF16));
    let v = rng.values(h * n * e, DType::BF16);
    let slopes = rng.slopes(h);
    let upload = |x: &[f32], shape: &[usize]| DeviceTensor::from_f32(&client, x, shape, DType::BF16).unwrap();
    let out = bf16_with_sentinel(&client, &vec![0x7fc1; h * n * e], &[1, h, n, e]);
    let final_state = DeviceTensor::filled(&client, &[1, h, d, e], DType::F32, f32::NAN).unwrap();
    let slopes_t = DeviceTensor::from_f32(&client, &slopes, &[h], DType::F32).unwrap();
    let config = PrefillConfig::new(16, 16);
    prefill_into(
        &client,
        &PrefillInputs {
            q: &upload(&q, &[1, h, n, d]),
            k: &upload(&k, &[1, h, n, d]),
            v: &upload(&v, &[1, h, n, e]),
            slopes: &slopes_t,
            initial_state: None,
        },
        &config,
        &out,
        &final_state,
    )
    .unwrap();
    let bytes = raw_bytes(&client, &out);
    assert_eq!(bytes[2 * h * n * e..2 * h * n * e + 2], SENTINEL);
    let wide = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let dims = Dims {
        batch: 1,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    };
    let want = recurrence(dims, &wide(&q), &wide(&k), &wide(&v), &wide(&slopes), None).out;
    let err = relative_error(&read(&client, &out), &want);
    assert!(err < tolerance(DType::BF16), "relative error {err}");
}
