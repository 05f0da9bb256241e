//! Non-finite results: what comes out when an f16 output passes 65504 (±inf,
//! in an `Ok` result, as documented), the opt-in check that turns it into
//! `LightningError::NonFinite`, and `check_finite` itself on tensors of every
//! dtype holding one or two non-finite elements at random places, or none.

use lightning_attention::cubecl::prelude::*;
use lightning_attention::reference::{Dims, recurrence};
use lightning_attention::{
    DType, DeviceTensor, FiniteScan, LightningError, PrefillConfig, PrefillInputs, VarlenBatch, VarlenInputs,
    check_finite, plan_prefill, prefill, prefill_varlen, slopes,
};

use crate::common::*;

/// f16's overflow threshold: a value of at least this magnitude rounds to ±inf.
const F16_OVERFLOW: f64 = 65520.0;

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| t.as_nanos() as u64)
}

/// Uniform in `[0, n)`.
fn index(rng: &mut SeededRng, n: usize) -> usize {
    (((rng.unit() * 0.5 + 0.5) as f64 * n as f64) as usize).min(n - 1)
}

/// The case, small: f16 inputs of magnitude up to 10 and the last
/// layer's slopes (almost no decay), so the outputs grow with the token index
/// past f16's range. Returns the inputs (as rounded to f16) and the f64 outputs.
struct Overflow {
    dims: Dims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    slopes: Vec<f32>,
    reference: Vec<f64>,
}

fn overflow_case(seed: u64) -> Overflow {
    let dims = Dims {
        batch: 1,
        heads: 2,
        seq_len: 4096,
        key_dim: 128,
        value_dim: 128,
    };
    let mut rng = SeededRng::new(seed);
    let mut big = |len| -> Vec<f32> { (0..len).map(|_| round(10.0 * rng.unit(), DType::F16)).collect() };
    let (q, k, v) = (big(dims.qk_len()), big(dims.qk_len()), big(dims.v_len()));
    let slopes = slopes::layer_slopes(dims.heads, 79, 80).expect("slopes");
    let reference = recurrence(dims, &f64s(&q), &f64s(&k), &f64s(&v), &f64s(&slopes), None).out;
    Overflow {
        dims,
        q,
        k,
        v,
        slopes,
        reference,
    }
}

#[test]
fn f16_overflow_gives_infinities_unless_checked() {
    let client = client();
    let seed = seed();
    let case = overflow_case(seed);
    let Dims {
        batch: b,
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
    } = case.dims;
    // Genuinely overflowing, yet not everywhere: the early tokens stay in range.
    let over = case.reference.iter().filter(|x| x.abs() > F16_OVERFLOW).count();
    assert!(
        over > 0 && over < case.reference.len(),
        "seed {seed}: {over} of {} reference outputs past f16's range",
        case.reference.len()
    );
    let q = upload(&client, &case.q, &[b, h, n, d], DType::F16);
    let k = upload(&client, &case.k, &[b, h, n, d], DType::F16);
    let v = upload(&client, &case.v, &[b, h, n, e], DType::F16);
    let s = upload(&client, &case.slopes, &[h], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
    };
    // Off (the default): Ok, and every output past the threshold (with room
    // for f32's rounding against f64) is an infinity of its sign; every one
    // clearly inside is finite.
    let config = PrefillConfig::default();
    assert!(!config.check_finite, "the check is opt-in");
    // Where f16 runs on tensor cores (CUDA), its products and per-block
    // states are f16 too, so outputs near the range may overflow early: only
    // the portable routines (f32 inside) promise finite outputs in range.
    let (_, plan) = plan_prefill(&client, &inputs, &config).expect("a valid problem");
    let f32_inside = plan.widened;
    let result = prefill(&client, &inputs, &config).expect("an overflow is not refused without the check");
    let out = read(&client, &result.out);
    let mut first = None;
    let mut count = 0u64;
    for (i, (&got, &want)) in out.iter().zip(&case.reference).enumerate() {
        if want.abs() > F16_OVERFLOW * 1.001 {
            if f32_inside {
                assert!(
                    got.is_infinite() && got.signum() == want.signum(),
                    "seed {seed}: out[{i}] = {got}, reference {want}: expected an infinity of its sign"
                );
            } else {
                assert!(
                    !got.is_finite(),
                    "seed {seed}: out[{i}] = {got}, reference {want}"
                );
            }
        } else if f32_inside && want.abs() < F16_OVERFLOW * 0.999 {
            assert!(got.is_finite(), "seed {seed}: out[{i}] = {got}, reference {want}");
        }
        if !got.is_finite() {
            first.get_or_insert(i as u64);
            count += 1;
        }
    }
    // The state is f32: far from its range.
    check_finite(&client, &result.final_state, "final_state").expect("the f32 state stays finite");
    // On: the typed error, naming `out`, with what the read-back showed.
    let checked = prefill(&client, &inputs, &config.with_check_finite(true));
    match checked {
        Err(LightningError::NonFinite {
            tensor,
            dtype,
            count: c,
            elements,
            first_index,
            hint,
        }) => {
            assert_eq!(tensor, "out", "seed {seed}");
            assert_eq!(dtype, DType::F16, "seed {seed}");
            assert_eq!(c, count, "seed {seed}: count");
            assert_eq!(elements, out.len() as u64, "seed {seed}");
            assert_eq!(Some(first_index), first, "seed {seed}: first index");
            assert!(hint.contains("65504"), "the hint names f16's range: {hint}");
        }
        other => panic!("seed {seed}: expected NonFinite for out, got {other:?}"),
    }
}

#[test]
fn varlen_check_names_the_overflowing_output() {
    let client = client();
    let seed = seed();
    let case = overflow_case(seed);
    let Dims {
        heads: h,
        seq_len: n,
        key_dim: d,
        value_dim: e,
        ..
    } = case.dims;
    // One sequence, packed `[n, h, x]`: the same values in another order
    // overflow as surely (no decay to speak of; the magnitudes are what count).
    let q = upload(&client, &case.q, &[n, h, d], DType::F16);
    let k = upload(&client, &case.k, &[n, h, d], DType::F16);
    let v = upload(&client, &case.v, &[n, h, e], DType::F16);
    let s = upload(&client, &case.slopes, &[h], DType::F32);
    let cache = DeviceTensor::filled(&client, &[1, h, d, e], DType::F32, 0.0).expect("cache");
    let cu_seqlens = [0, n as u32];
    let inputs = VarlenInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        cache: &cache,
        batch: VarlenBatch {
            cu_seqlens: &cu_seqlens,
            slots: &[0],
            has_initial_state: &[false],
            snapshots: None,
        },
    };
    let config = PrefillConfig::default();
    let out = prefill_varlen(&client, &inputs, &config).expect("no check, no error");
    let non_finite = read(&client, &out).iter().filter(|x| !x.is_finite()).count();
    assert!(non_finite > 0, "seed {seed}: the packed case overflows too");
    match prefill_varlen(&client, &inputs, &config.with_check_finite(true)) {
        Err(LightningError::NonFinite { tensor, count, .. }) => {
            assert_eq!(tensor, "out", "seed {seed}");
            assert_eq!(count, non_finite as u64, "seed {seed}");
        }
        other => panic!("seed {seed}: expected NonFinite for out, got {other:?}"),
    }
}

#[test]
fn checked_prefill_of_ordinary_inputs_passes_and_changes_nothing() {
    let client = client();
    let seed = seed();
    let mut rng = SeededRng::new(seed);
    let (b, h, n, d, e) = (2, 2, 300, 32, 24);
    for dtype in input_dtypes() {
        let q = upload(&client, &rng.values(b * h * n * d, dtype), &[b, h, n, d], dtype);
        let k = upload(&client, &rng.values(b * h * n * d, dtype), &[b, h, n, d], dtype);
        let v = upload(&client, &rng.values(b * h * n * e, dtype), &[b, h, n, e], dtype);
        let s = upload(&client, &rng.slopes(h), &[h], DType::F32);
        let inputs = PrefillInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &s,
            initial_state: None,
        };
        let config = PrefillConfig::new(64, 16);
        let plain = prefill(&client, &inputs, &config).expect("prefill");
        let checked = prefill(&client, &inputs, &config.with_check_finite(true))
            .unwrap_or_else(|err| panic!("{dtype} seed {seed}: {err}"));
        assert_eq!(
            plain.out.to_bytes(&client).unwrap(),
            checked.out.to_bytes(&client).unwrap(),
            "{dtype} seed {seed}: the check changed the output"
        );
        assert_eq!(
            plain.final_state.to_bytes(&client).unwrap(),
            checked.final_state.to_bytes(&client).unwrap(),
            "{dtype} seed {seed}: the check changed the state"
        );
    }
}

/// The bits of `dtype`'s elements: how they are laid out, which are finite.
struct Bits {
    dtype: DType,
}

impl Bits {
    fn width(&self) -> u32 {
        8 * self.dtype.size() as u32
    }
    fn exponent(&self) -> u32 {
        match self.dtype {
            DType::F32 => 0x7f80_0000,
            DType::F16 => 0x7c00,
            DType::BF16 => 0x7f80,
        }
    }
    fn sign(&self) -> u32 {
        1 << (self.width() - 1)
    }
    fn is_finite(&self, bits: u32) -> bool {
        bits & self.exponent() != self.exponent()
    }
    /// The lowest bit of the exponent: one past the mantissa.
    fn unit_exponent(&self) -> u32 {
        1 << self.exponent().trailing_zeros()
    }
    /// +inf, -inf, a quiet NaN, a NaN with only the lowest mantissa bit, a negative NaN.
    fn specials(&self) -> [u32; 5] {
        let (inf, sign) = (self.exponent(), self.sign());
        let quiet = inf | self.unit_exponent() >> 1;
        [inf, sign | inf, quiet, inf | 1, sign | quiet]
    }
    /// The largest finite value, its negative, the smallest subnormal, zero, -0.
    fn edges(&self) -> [u32; 5] {
        let max = (self.exponent() - self.unit_exponent()) | (self.unit_exponent() - 1);
        [max, self.sign() | max, 1, 0, self.sign()]
    }
    /// A random finite element: random bits, drawn again while all exponent bits are set.
    fn finite(&self, rng: &mut SeededRng) -> u32 {
        loop {
            let hi = index(rng, 1 << 16) as u32;
            let lo = index(rng, 1 << 16) as u32;
            let bits = if self.width() == 32 { hi << 16 | lo } else { lo };
            if self.is_finite(bits) {
                return bits;
            }
        }
    }
    /// A tensor of `shape` whose buffer holds `elements` (at least the
    /// shape's elements; the rest lie past the tensor), little-endian.
    fn upload(&self, client: &Client, elements: &[u32], shape: &[usize]) -> DeviceTensor {
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => elements.iter().flat_map(|b| b.to_le_bytes()).collect(),
            _ => elements.iter().flat_map(|&b| (b as u16).to_le_bytes()).collect(),
        };
        DeviceTensor {
            handle: client.create_from_slice(&bytes),
            shape: shape.to_vec(),
            dtype: self.dtype,
        }
    }
}

/// What `check_finite` reported: `None` for Ok, else (count, first index).
fn report(client: &Client, t: &DeviceTensor) -> Option<(u64, u64)> {
    match check_finite(client, t, "t") {
        Ok(()) => None,
        Err(LightningError::NonFinite {
            tensor,
            dtype,
            count,
            elements,
            first_index,
            ..
        }) => {
            assert_eq!((tensor, dtype), ("t", t.dtype));
            assert_eq!(elements, t.num_elements() as u64);
            Some((count, first_index))
        }
        Err(other) => panic!("expected Ok or NonFinite, got {other}"),
    }
}

#[test]
fn check_finite_finds_each_non_finite_element() {
    let client = client();
    let seed = seed();
    let mut rng = SeededRng::new(seed);
    // Odd lengths end inside a word for 16-bit dtypes; 2^21 + 3 is more words
    // than the capped grid has units, so each unit loops.
    let lengths = [1usize, 2, 3, 8, 1001, 4096, (1 << 21) + 3];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let bits = Bits { dtype };
        for &len in &lengths {
            let what = format!("{dtype} len {len} seed {seed}");
            let mut elements: Vec<u32> = (0..len).map(|_| bits.finite(&mut rng)).collect();
            // The edges of the finite range, at random places.
            for edge in bits.edges() {
                elements[index(&mut rng, len)] = edge;
            }
            let finite = bits.upload(&client, &elements, &[len]);
            assert_eq!(report(&client, &finite), None, "{what}: a finite tensor");
            for special in bits.specials() {
                assert!(!bits.is_finite(special));
                let at = index(&mut rng, len);
                let mut one = elements.clone();
                one[at] = special;
                let t = bits.upload(&client, &one, &[len]);
                assert_eq!(
                    report(&client, &t),
                    Some((1, at as u64)),
                    "{what}: {special:#x} at {at}"
                );
                if len > 1 {
                    // Two: the count is 2, the first is the smaller index.
                    let other = (at + 1 + index(&mut rng, len - 1)) % len;
                    one[other] = bits.specials()[index(&mut rng, 5)];
                    let t = bits.upload(&client, &one, &[len]);
                    assert_eq!(
                        report(&client, &t),
                        Some((2, at.min(other) as u64)),
                        "{what}: {special:#x} at {at} and another at {other}"
                    );
                }
            }
            // Past the tensor: a buffer one element longer whose last element
            // is infinite, the high half of the last word for odd 16-bit
            // lengths. It is not an element and must not be counted.
            let mut longer = elements.clone();
            longer.push(bits.specials()[0]);
            let t = bits.upload(&client, &longer, &[len]);
            assert_eq!(
                report(&client, &t),
                None,
                "{what}: an inf past the tensor was counted"
            );
        }
    }
}

#[test]
fn scans_launch_without_waiting_and_report_on_reading() {
    let client = client();
    let t = DeviceTensor::from_f32(&client, &[1.0, 7.0e4, -2.0], &[3], DType::F16).unwrap();
    let u = DeviceTensor::from_f32(&client, &[1.0, 7.0e4, -2.0], &[3], DType::F32).unwrap();
    // Both launched before either is read.
    let scans = [
        FiniteScan::launch(&client, &t, "f16").unwrap(),
        FiniteScan::launch(&client, &u, "f32").unwrap(),
    ];
    let [half_result, single_result] = scans.map(|scan| scan.result(&client));
    match half_result {
        Err(err @ LightningError::NonFinite { .. }) => {
            let message = err.to_string();
            assert!(
                message
                    .starts_with("f16: 1 of its 3 f16 elements are not finite (the first at flat index 1)"),
                "{message}"
            );
        }
        other => panic!("70000 in f16 is +inf, expected NonFinite, got {other:?}"),
    }
    assert_eq!(single_result, Ok(()), "70000 is finite in f32");
    // A buffer smaller than the shape is refused before any launch.
    let short = DeviceTensor {
        shape: vec![1 << 20],
        ..u
    };
    assert!(matches!(
        check_finite(&client, &short, "short"),
        Err(LightningError::BufferTooSmall { tensor: "short", .. })
    ));
}
