//! The register-fragment product the fused routine's tensor-core products go
//! through (`kernels::fragments`): emulated on every runtime (what CI runs on
//! lavapipe), real on CUDA, both against the f64 product; and on CUDA, the
//! fragment positions against cubecl's `position_of_nth`.

use lightning_attention::cubecl::prelude::*;
use lightning_attention::{DType, DeviceTensor};
use lightning_attention_kernels::fragments::{K, M, N, PLANE, fragment_product};

use crate::common::*;

/// Planes of the check kernel: two, so that each plane's scratch and
/// fragments are kept apart.
const PLANES: usize = 2;

fn arg(t: &DeviceTensor) -> BufferArg {
    // SAFETY: the tensor holds `num_elements` of its dtype.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.num_elements()) }
}

/// `a b + c` per plane in f64 (`a` 16 x 16, `b` 16 x 8, `c` 16 x 8, row-major).
fn reference(a: &[f32], b: &[f32], c: &[f32]) -> Vec<f64> {
    let mut out = vec![0.0; PLANES * M * N];
    for p in 0..PLANES {
        for i in 0..M {
            for j in 0..N {
                let mut sum = f64::from(c[p * M * N + i * N + j]);
                for x in 0..K {
                    sum += f64::from(a[p * M * K + i * K + x]) * f64::from(b[p * K * N + x * N + j]);
                }
                out[p * M * N + i * N + j] = sum;
            }
        }
    }
    out
}

/// Runs the check kernel on operands of `dtype` and returns its output and
/// the f64 product of the same (rounded) operands.
fn product(client: &TestClient, dtype: DType, emulated: bool, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = SeededRng::new(seed);
    let a = rng.values(PLANES * M * K, dtype);
    let b = rng.values(PLANES * K * N, dtype);
    let c = rng.values(PLANES * M * N, DType::F32);
    let (ta, tb) = (
        upload(client, &a, &[PLANES * M * K], dtype),
        upload(client, &b, &[PLANES * K * N], dtype),
    );
    let tc = upload(client, &c, &[PLANES * M * N], DType::F32);
    let out = poisoned(client, &[PLANES * M * N], DType::F32);
    let (count, dim) = (
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d((PLANES * PLANE) as u32),
    );
    macro_rules! launch {
        ($e:ty) => {
            // SAFETY: every buffer holds what the kernel reads and writes
            // for PLANES planes.
            unsafe {
                fragment_product::launch_unchecked::<$e>(
                    client,
                    count,
                    dim,
                    arg(&ta),
                    arg(&tb),
                    arg(&tc),
                    arg(&out),
                    PLANES,
                    emulated,
                )
            }
        };
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
    }
    (read(client, &out), reference(&a, &b, &c))
}

fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

#[test]
fn emulated_fragment_product_matches_f64() {
    let client = client();
    // The operand types the runtime computes with (f32 everywhere; bf16 not
    // through WGSL, where the fused routine runs on f32 copies).
    let dtypes: Vec<DType> = input_dtypes()
        .into_iter()
        .filter(|d| d.is_native(&client))
        .collect();
    assert!(dtypes.contains(&DType::F32));
    for (i, dtype) in dtypes.into_iter().enumerate() {
        let (got, want) = product(&client, dtype, true, 40 + i as u64);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{dtype:?}: a lane left an element unwritten"
        );
        let error = relative_error(&got, &want);
        // Operands exact in f32, products summed in f32 over 16 terms.
        assert!(error < 1e-6, "{dtype:?}: emulated product error {error:e}");
    }
}

/// On CUDA: the real product (f16 and bf16 operands, one `mma.sync` per
/// plane) against the f64 product, and the positions of every fragment
/// element against cubecl's `position_of_nth`.
#[cfg(feature = "cuda")]
#[test]
fn real_fragment_product_and_positions_match_cubecl_on_cuda() {
    use lightning_attention_kernels::fragments::{A_ELEMS, fragment_positions};
    let client = client();
    assert!(
        client.name().starts_with("cuda"),
        "the real fragment product runs on CUDA only, and this build's device is {}",
        client.name()
    );
    for (i, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        let (got, want) = product(&client, dtype, false, 50 + i as u64);
        let error = relative_error(&got, &want);
        assert!(error < 1e-6, "{dtype:?}: tensor-core product error {error:e}");
        let (emulated, _) = product(&client, dtype, true, 50 + i as u64);
        assert!(
            relative_error(&emulated, &got) < 1e-6,
            "{dtype:?}: emulated and real differ"
        );
    }
    let len = 3 * PLANE * A_ELEMS * 4;
    let out = DeviceTensor::filled(&client, &[len], DType::F32, 0.0).expect("positions buffer");
    // SAFETY: `out` holds `len` 32-bit words, the kernel writes below `len`.
    unsafe {
        fragment_positions::launch_unchecked::<half::f16>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(PLANE as u32),
            BufferArg::from_raw_parts(out.handle.clone(), len),
        )
    }
    let words = out.to_bytes(&client).expect("read back");
    let words: Vec<u32> = words
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    for (ident, elems) in [("A", 8), ("B", 4), ("C", 4)].into_iter().enumerate() {
        for lane in 0..PLANE {
            for nth in 0..elems.1 {
                let at = ((ident * PLANE + lane) * A_ELEMS + nth) * 4;
                assert_eq!(
                    (words[at], words[at + 1]),
                    (words[at + 2], words[at + 3]),
                    "{} element {nth} of lane {lane}: cubecl's (row, col) against ours",
                    elems.0
                );
            }
        }
    }
}

/// What `fragment_loads_check` must write: each operand's elements read from
/// the row-major tile (`A` and the `N`-major `B`: row `n` of the tile holds
/// column `n` of `B`; the `K`-major `B`: row `k` holds row `k`).
fn loads_expected(tile: &[f32]) -> Vec<f32> {
    use lightning_attention_kernels::fragment_loads::{CHECK_LEN, CHECK_STRIDE};
    let at = |row: usize, col: usize| tile[row * CHECK_STRIDE + col];
    let mut want = vec![0.0; CHECK_LEN];
    for r in 0..16 {
        for c in 0..16 {
            want[r * 16 + c] = at(r, c);
            want[256 + r * 16 + c] = at(c, r);
            want[512 + r * 16 + c] = at(r, c);
        }
        for c in 0..8 {
            want[768 + r * 8 + c] = at(c, r);
        }
    }
    want
}

/// Runs `fragment_loads_check` on a fresh tile and returns what it wrote and
/// what it must write.
fn loads(client: &TestClient, dtype: DType, emulated: bool, seed: u64) -> (Vec<f64>, Vec<f32>) {
    use lightning_attention_kernels::fragment_loads::{CHECK_LEN, CHECK_STRIDE, fragment_loads_check};
    let tile = SeededRng::new(seed).values(16 * CHECK_STRIDE, dtype);
    let t = upload(client, &tile, &[16 * CHECK_STRIDE], dtype);
    let out = poisoned(client, &[CHECK_LEN], dtype);
    macro_rules! launch {
        ($e:ty) => {
            // SAFETY: `t` holds 16 rows of CHECK_STRIDE and `out` CHECK_LEN
            // elements, what the kernel reads and writes.
            unsafe {
                fragment_loads_check::launch_unchecked::<$e>(
                    client,
                    CubeCount::Static(1, 1, 1),
                    CubeDim::new_1d(PLANE as u32),
                    arg(&t),
                    arg(&out),
                    emulated,
                )
            }
        };
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
    }
    (read(client, &out), loads_expected(&tile))
}

/// Every fragment element the loads give is the tile's element at its
/// position, exactly (a copy): emulated here, and on CUDA below through
/// `ldmatrix` (where a wrong lane address would move whole rows).
#[test]
fn emulated_fragment_loads_place_every_element() {
    let client = client();
    for (i, dtype) in input_dtypes()
        .into_iter()
        .filter(|d| d.is_native(&client))
        .enumerate()
    {
        let (got, want) = loads(&client, dtype, true, 60 + i as u64);
        for (at, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(*g, f64::from(*w), "{dtype:?}: element {at} of the emulated loads");
        }
    }
}

/// On CUDA: the `ldmatrix` loads (f16 and bf16) place every element where
/// the emulated ones do.
#[cfg(feature = "cuda")]
#[test]
fn real_fragment_loads_place_every_element_on_cuda() {
    let client = client();
    assert!(
        client.name().starts_with("cuda"),
        "ldmatrix runs on CUDA only, and this build's device is {}",
        client.name()
    );
    for (i, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        let (got, want) = loads(&client, dtype, false, 70 + i as u64);
        for (at, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(*g, f64::from(*w), "{dtype:?}: element {at} of the ldmatrix loads");
        }
    }
}
