//! Shared helpers: the client, seeded random inputs, uploads, the error measure.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::plan::{DeviceLimits, TensorCores};
use lightning_attention::{
    DType, DeviceTensor, FusedChoice, FusedProducts, Precision, Tuning, reference, runtime,
};

pub use lightning_attention::reference::relative_error;

/// Tests share the device; a test that captures a graph must have it alone,
/// because a capture takes over the stream (CUDA refuses other tests'
/// allocations and launches on it meanwhile). Every other test holds a read
/// lock while it uses the device.
static DEVICE: RwLock<()> = RwLock::new(());

/// The client of the device under test, with this test's share of the device.
pub struct TestClient {
    client: Client,
    _share: Share,
}

enum Share {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

impl std::ops::Deref for TestClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The client of the device under test; panics (fails the test) if there is none.
pub fn client() -> TestClient {
    // A panicking test poisons nothing a reader relies on: the lock guards no data.
    let share = DEVICE.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    TestClient {
        client: runtime::best_client(),
        _share: Share::Shared(share),
    }
}

/// The client with the device to this test alone (for graph captures).
pub fn exclusive_client() -> TestClient {
    let share = DEVICE.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    TestClient {
        client: runtime::best_client(),
        _share: Share::Exclusive(share),
    }
}

/// Bound on `||out - ref|| / ||ref||` for outputs of `dtype` inputs.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

/// The bound f32 inputs hold under `precision`, as [`Precision`] documents
/// it (16-bit inputs: their dtype's, whatever the precision): the split and
/// the exact products hold f32's, rounding to bf16 holds bf16's.
pub fn tolerance_for(dtype: DType, precision: Precision) -> f64 {
    match (dtype, precision) {
        (DType::F32, Precision::Rounded) => tolerance(DType::BF16),
        _ => tolerance(dtype),
    }
}

/// Every [`Precision`], for the property tests to draw from.
pub fn precisions() -> Vec<Precision> {
    vec![Precision::Split, Precision::Rounded, Precision::Exact]
}

/// Input dtypes of the property tests: every dtype on every runtime (bf16
/// natively on CUDA, as words widened to f32 elsewhere).
pub fn input_dtypes() -> Vec<DType> {
    vec![DType::F32, DType::F16, DType::BF16]
}

/// The reference crate's seeded generator, with what the tests draw from it.
pub struct SeededRng(reference::random::SeededRng);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(reference::random::SeededRng::new(seed))
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        self.0.unit() as f32
    }

    /// `len` values in `[-1, 1)`, rounded to `dtype` so the reference sees what the kernel sees.
    pub fn values(&mut self, len: usize, dtype: DType) -> Vec<f32> {
        (0..len).map(|_| round(self.unit(), dtype)).collect()
    }

    /// Slopes in `[0.001, 0.92]`, the range of MiniMax's models, and one head
    /// in six at zero: flash-linear-attention's ladder starts at a head that
    /// never decays (`reference::slopes::fla_slopes`), so every property
    /// test runs the no-decay case too.
    pub fn slopes(&mut self, heads: usize) -> Vec<f32> {
        self.decaying_slopes(heads)
            .into_iter()
            .map(|slope| if self.unit() < -2.0 / 3.0 { 0.0 } else { slope })
            .collect()
    }

    /// Slopes in `[0.001, 0.92]`, every head decaying.
    pub fn decaying_slopes(&mut self, heads: usize) -> Vec<f32> {
        (0..heads)
            .map(|_| 0.001 + 0.919 * (self.unit() * 0.5 + 0.5))
            .collect()
    }
}

/// `x` as the nearest value of `dtype`.
pub fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

pub fn upload(client: &Client, data: &[f32], shape: &[usize], dtype: DType) -> DeviceTensor {
    DeviceTensor::from_f32(client, data, shape, dtype).expect("upload")
}

/// A tensor of NaN, so that any element a kernel does not write fails.
pub fn poisoned(client: &Client, shape: &[usize], dtype: DType) -> DeviceTensor {
    DeviceTensor::filled(client, shape, dtype, f32::NAN).expect("poison")
}

pub fn read(client: &Client, t: &DeviceTensor) -> Vec<f64> {
    t.to_f32_vec(client)
        .expect("read back")
        .into_iter()
        .map(f64::from)
        .collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Property-test cases: `PROPTEST_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `||a - b|| / ||magnitude||`: the error relative to the size of what was
/// summed (the same problem on absolute values), so that an output that cancels
/// to almost nothing is judged by the rounding its terms allow. NaN never passes.
pub fn bounded_error(a: &[f64], b: &[f64], magnitude: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "bounded_error: length mismatch");
    let difference = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm = magnitude.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        return if difference == 0.0 { 0.0 } else { f64::INFINITY };
    }
    difference / norm
}

/// The decode's rows in flight the tests run with: `TEST_DECODE_ROWS_IN_FLIGHT`
/// (1 to 32), so that `scripts/test.sh` runs the decode tests a second time
/// with CUDA's 16 on any device; unset, the library's default for the device.
/// The tests pass it explicitly: the library reads no environment variable.
pub fn decode_rows_in_flight() -> Option<usize> {
    std::env::var("TEST_DECODE_ROWS_IN_FLIGHT")
        .ok()
        .map(|rows| rows.parse().expect("TEST_DECODE_ROWS_IN_FLIGHT is a number"))
}

/// The measuring knobs the fused routine's tests draw: its walk (tensor
/// cores where the device has them, the portable one, or the tensor-core
/// walk emulated: the code that runs on tensor cores, on any runtime) and a
/// value tile (the plan's, or a forced narrow one).
pub fn fused_tuning() -> impl proptest::strategy::Strategy<Value = Tuning> {
    use proptest::prelude::*;
    (
        prop::sample::select(vec![
            FusedProducts::Auto,
            FusedProducts::Portable,
            FusedProducts::Emulated,
            FusedProducts::Emulated,
        ]),
        prop::sample::select(vec![None, None, Some(16), Some(32), Some(64)]),
    )
        .prop_map(|(fused_products, fused_value_tile)| Tuning {
            fused_products,
            fused_value_tile,
            ..tuning()
        })
}

/// The measuring knobs the tests run with (see [`decode_rows_in_flight`]):
/// the fused walk's variant by the plan's rule, so that each case runs the
/// variant it draws (the autotuner has its own test, `tests/kernels/fused.rs`).
pub fn tuning() -> Tuning {
    Tuning {
        decode_rows_in_flight: decode_rows_in_flight(),
        fused_choice: FusedChoice::Rule,
        ..Tuning::default()
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as a kernel writes a bf16 state.
pub fn round_bf16(x: f64) -> f64 {
    half::bf16::from_f64(x).to_f64()
}

/// The first element of `actual` more than one bf16 step (of the larger of
/// the two values) from `rounded`, beyond the f32 error of computing it, as
/// `(index, actual, rounded)`. A kernel that computes in f32 and rounds once
/// may land on the neighbour of the f64 result's rounding, never further;
/// where the update cancels (`magnitude`, the same update on absolute values,
/// far above the result), its f32 error of a few 2^-24 of `magnitude` may
/// exceed a bf16 step of the small result. NaN fails.
pub fn beyond_one_bf16_step(actual: &[f64], rounded: &[f64], magnitude: &[f64]) -> Option<(usize, f64, f64)> {
    actual
        .iter()
        .zip(rounded)
        .zip(magnitude)
        .enumerate()
        .find_map(|(i, ((&a, &r), &m))| {
            // bf16 keeps 8 significant bits: one step is at most 2^-7 of the value.
            let allowed = a.abs().max(r.abs()) * 2f64.powi(-7) + m * 2f64.powi(-21);
            let within = a == r || (a - r).abs() <= allowed;
            (!within).then_some((i, a, r))
        })
}

/// Limits like an H100's under CUDA: 2^31 - 1 cubes along x, 65535 along y
/// and z, tensor cores for 16-bit inputs (so `Auto` would take the
/// chunk-recurrent pass or the fused walk, whose walks run along z).
pub fn cuda_like_limits() -> DeviceLimits {
    let tensor_cores = TensorCores {
        f16: true,
        bf16: true,
    };
    DeviceLimits {
        shared_memory: 227 * 1024,
        max_units: 1024,
        max_cube_count: (i32::MAX as u32, 65535, 65535),
        max_buffer: 1 << 40,
        plane_size: Some(32),
        tensor_cores,
        fragments: tensor_cores,
        max_vector: 8,
        multiprocessors: Some(132),
        bf16_words: false,
        cuda: true,
    }
}
