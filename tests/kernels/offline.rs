//! The offline build (`lightning_attention::offline`, what the CUDA compile
//! without a GPU runs on) records exactly the kernels the real launches run:
//! each call is launched on the test device with cubecl collecting the id of
//! every kernel launched, then built offline against the same device's
//! properties; the two sets of ids (compile-time arguments, cube dim, dtypes,
//! execution mode) must be equal. The device is held alone, so no other
//! test's launch lands in a collection.

use std::collections::HashSet;

use lightning_attention::cubecl::launched::LaunchedKernels;
use lightning_attention::offline::{OfflineBuild, build_backward, build_decode, build_prefill, build_varlen};
use lightning_attention::shapes::{DecodeShape, PrefillShape};
use lightning_attention::{
    BackwardInputs, DType, DecodeInputs, PrefillConfig, PrefillInputs, Routines, Snapshots, VarlenBatch,
    VarlenInputs, backward, decode_into, prefill, prefill_varlen_into,
};

use crate::common::*;

/// The stable hashes of the kernels `build` recorded, asserting that each
/// one's definition expands.
fn recorded(build: &OfflineBuild) -> HashSet<u128> {
    let kernels = build.take_kernels();
    assert!(!kernels.is_empty(), "the offline build recorded no kernel");
    for kernel in &kernels {
        if let Err(err) = kernel.definition() {
            panic!("{} ({}) does not expand: {err:?}", kernel.stage, kernel.label);
        }
    }
    kernels.iter().map(|kernel| kernel.id().stable_hash()).collect()
}

/// What `launch` launched on the device, as stable hashes.
fn launched(client: &TestClient, launch: impl FnOnce()) -> HashSet<u128> {
    let collection = LaunchedKernels::new();
    launch();
    lightning_attention::cubecl::future::block_on(client.sync()).expect("the launches ran");
    collection.finish().into_iter().collect()
}

fn shape(dtype: DType) -> PrefillShape {
    PrefillShape {
        batch: 2,
        heads: 2,
        seq_len: 70,
        key_dim: 16,
        value_dim: 8,
        dtype,
    }
}

#[test]
fn offline_prefill_records_what_prefill_launches() {
    let client = exclusive_client();
    let mut rng = SeededRng::new(27);
    for dtype in input_dtypes() {
        for routines in [
            Routines::Auto,
            Routines::Portable,
            Routines::ChunkRecurrent,
            Routines::Fused,
        ] {
            let shape = shape(dtype);
            let config = PrefillConfig::new(32, 16).with_routines(routines);
            let qk = [shape.batch, shape.heads, shape.seq_len, shape.key_dim];
            let v = [shape.batch, shape.heads, shape.seq_len, shape.value_dim];
            let state = [shape.batch, shape.heads, shape.key_dim, shape.value_dim];
            let q = upload(&client, &rng.values(qk.iter().product(), dtype), &qk, dtype);
            let k = upload(&client, &rng.values(qk.iter().product(), dtype), &qk, dtype);
            let v = upload(&client, &rng.values(v.iter().product(), dtype), &v, dtype);
            let slopes = upload(&client, &rng.slopes(shape.heads), &[shape.heads], DType::F32);
            let initial = upload(
                &client,
                &rng.values(state.iter().product(), DType::F32),
                &state,
                DType::F32,
            );
            let inputs = PrefillInputs {
                q: &q,
                k: &k,
                v: &v,
                slopes: &slopes,
                initial_state: Some(&initial),
            };
            let on_device = launched(&client, || {
                prefill(&client, &inputs, &config).expect("prefill");
            });
            let build = OfflineBuild::like(&client);
            build_prefill(&build, &shape, true, &config).expect("offline prefill");
            assert_eq!(recorded(&build), on_device, "prefill {dtype:?} {routines:?}");
        }
    }
}

#[test]
fn offline_backward_records_what_backward_launches() {
    let client = exclusive_client();
    let mut rng = SeededRng::new(28);
    for dtype in input_dtypes() {
        let shape = shape(dtype);
        let config = PrefillConfig::new(32, 16);
        let qk = [shape.batch, shape.heads, shape.seq_len, shape.key_dim];
        let v = [shape.batch, shape.heads, shape.seq_len, shape.value_dim];
        let state = [shape.batch, shape.heads, shape.key_dim, shape.value_dim];
        let tensor = |rng: &mut SeededRng, dims: &[usize], dtype| {
            upload(&client, &rng.values(dims.iter().product(), dtype), dims, dtype)
        };
        let (q, k, values, d_out) = (
            tensor(&mut rng, &qk, dtype),
            tensor(&mut rng, &qk, dtype),
            tensor(&mut rng, &v, dtype),
            tensor(&mut rng, &v, dtype),
        );
        let (initial, d_final) = (
            tensor(&mut rng, &state, DType::F32),
            tensor(&mut rng, &state, DType::F32),
        );
        let slopes = upload(&client, &rng.slopes(shape.heads), &[shape.heads], DType::F32);
        let inputs = BackwardInputs {
            q: &q,
            k: &k,
            v: &values,
            slopes: &slopes,
            initial_state: Some(&initial),
            d_out: &d_out,
            d_final_state: Some(&d_final),
        };
        let on_device = launched(&client, || {
            backward(&client, &inputs, &config).expect("backward");
        });
        let build = OfflineBuild::like(&client);
        build_backward(&build, &shape, true, &config).expect("offline backward");
        assert_eq!(recorded(&build), on_device, "backward {dtype:?}");
    }
}

#[test]
fn offline_varlen_and_decode_record_what_they_launch() {
    let client = exclusive_client();
    let mut rng = SeededRng::new(29);
    let (heads, d, e, slots) = (2, 16, 8, 12);
    for dtype in input_dtypes() {
        // A mixed batch: two prefills with snapshots, a one-token decode.
        let cu_seqlens = [0u32, 40, 41, 75];
        let batch = VarlenBatch {
            cu_seqlens: &cu_seqlens,
            slots: &[0, 1, 2],
            has_initial_state: &[true, true, false],
            snapshots: Some(Snapshots {
                count: 1,
                slots: &[5, -1, 6],
            }),
        };
        let total = 75;
        let tensor = |rng: &mut SeededRng, dims: &[usize], dtype| {
            upload(&client, &rng.values(dims.iter().product(), dtype), dims, dtype)
        };
        let q = tensor(&mut rng, &[total, heads, d], dtype);
        let k = tensor(&mut rng, &[total, heads, d], dtype);
        let v = tensor(&mut rng, &[total, heads, e], dtype);
        let cache = tensor(&mut rng, &[slots, heads, d, e], DType::F32);
        let slopes = upload(&client, &rng.slopes(heads), &[heads], DType::F32);
        let out = poisoned(&client, &[total, heads, e], dtype);
        let config = PrefillConfig::new(16, 8);
        let inputs = VarlenInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &slopes,
            cache: &cache,
            batch,
        };
        let on_device = launched(&client, || {
            prefill_varlen_into(&client, &inputs, &config, &out).expect("varlen");
        });
        let build = OfflineBuild::like(&client);
        build_varlen(&build, [heads, d, e], dtype, DType::F32, slots, &batch, &config)
            .expect("offline varlen");
        assert_eq!(recorded(&build), on_device, "varlen {dtype:?}");

        // A decode step of three sequences.
        let step = |rng: &mut SeededRng, x| tensor(rng, &[3, heads, 1, x], dtype);
        let (q, k, v) = (step(&mut rng, d), step(&mut rng, d), step(&mut rng, e));
        let out = poisoned(&client, &[3, heads, 1, e], dtype);
        let inputs = DecodeInputs {
            q: &q,
            k: &k,
            v: &v,
            cache: &cache,
            slopes: &slopes,
            slots: &[0, 1, 2],
            scale: None,
            rows_in_flight: decode_rows_in_flight(),
        };
        let on_device = launched(&client, || decode_into(&client, &inputs, &out).expect("decode"));
        let build = OfflineBuild::like(&client);
        let shape = DecodeShape {
            batch: 3,
            heads,
            key_dim: d,
            value_dim: e,
            slots,
            dtype,
            state_dtype: DType::F32,
        };
        build_decode(&build, &shape, decode_rows_in_flight()).expect("offline decode");
        assert_eq!(recorded(&build), on_device, "decode {dtype:?}");
    }
}
