//! The serving backend as an engine drives it: the engine example's workload,
//! a decode step captured once and replayed as a graph, and its typed errors.

#[path = "../../examples/engine/simulation.rs"]
#[allow(dead_code)]
mod simulation;

use lightning_attention::cubecl::bytes::Bytes;
use lightning_attention::cubecl::prelude::*;
use lightning_attention::plan::DeviceLimits;
use lightning_attention::reference::{PADDING_SLOT, decode as reference_decode};
use lightning_attention::{
    BackendConfig, DType, DeviceTensor, LightningBackend, LightningError, PrefillConfig, VarlenBatch,
};

use crate::common::*;

#[test]
fn engine_workload_matches_reference_step_by_step() {
    engine_workload(DType::F32, 1e-4);
}

/// The same workload with a bf16 state cache: prefills from and into it, mixed
/// batches, decodes, against the reference rounded to bf16 after each step.
#[test]
fn engine_workload_with_a_bf16_cache_matches_rounded_reference() {
    engine_workload(DType::BF16, simulation::BF16_CACHE_BOUND);
}

fn engine_workload(state_dtype: DType, bound: f64) {
    let client = client();
    let config = simulation::EngineConfig {
        heads: 3,
        dim: 32,
        layers: 2,
        slots: 6,
        steps: 20,
        max_prompt: 200,
        seed: 11,
        state_dtype,
    };
    let mut kinds = Vec::new();
    let mut reused = 0;
    let worst = simulation::run(&client, config, |r| {
        kinds.push(r.kind);
        reused += r.reused_slots;
    })
    .expect("a valid engine run");
    assert!(
        worst < bound,
        "worst relative error {worst:e} ({state_dtype:?} cache)"
    );
    // The workload must have exercised what it claims to.
    assert!(
        kinds.contains(&"decode") && kinds.contains(&"extend"),
        "{kinds:?}"
    );
    assert!(reused > 0, "no slot was reused by a new request");
}

fn backend(client: &Client, layers: usize, slots: usize) -> LightningBackend {
    LightningBackend::new(
        client,
        BackendConfig {
            heads: 4,
            key_dim: 16,
            value_dim: 24,
            layers,
            slots,
            max_batch: 4,
            tensor_parallel: (1, 2),
            dtype: DType::F32,
            prefill: PrefillConfig::new(16, 16).with_tuning(tuning()),
            state_dtype: DType::F32,
        },
    )
    .expect("a valid backend")
}

/// Overwrites a tensor's buffer in place (same device pointer, as a captured graph needs).
fn write(client: &Client, t: &DeviceTensor, values: &[f32]) {
    client.write(&t.handle, Bytes::from_bytes_vec(f32::as_bytes(values).to_vec()));
}

#[test]
fn decode_step_replays_as_a_captured_graph() {
    // A capture takes over the stream: no other test may use the device meanwhile.
    let client = exclusive_client();
    let mut backend = backend(&client, 2, 5);
    let (h, d, e) = (backend.local_heads(), 16, 24);
    assert_eq!(h, 2, "rank 1 of 2 holds half of the 4 heads");
    let mut rng = SeededRng::new(5);
    let batch = 3;
    let (q, k, v) = (
        upload(
            &client,
            &rng.values(batch * h * d, DType::F32),
            &[batch, h, d],
            DType::F32,
        ),
        upload(
            &client,
            &rng.values(batch * h * d, DType::F32),
            &[batch, h, d],
            DType::F32,
        ),
        upload(
            &client,
            &rng.values(batch * h * e, DType::F32),
            &[batch, h, e],
            DType::F32,
        ),
    );
    let outs: Vec<DeviceTensor> = (0..2)
        .map(|_| poisoned(&client, &[batch, h, e], DType::F32))
        .collect();
    let step = |backend: &LightningBackend| {
        for (layer, out) in outs.iter().enumerate() {
            backend
                .forward_decode(layer, &q, &k, &v, out)
                .expect("a prepared decode step");
        }
    };

    // Warm up once (the caches start at zeros), then record the same step.
    backend.prepare_decode(&[2, 0, 4]).unwrap();
    client.graph_prepare().expect("graph capture on this runtime");
    step(&backend);
    client.start_capture().expect("start capture");
    step(&backend);
    let graph = client.stop_capture().expect("stop capture");

    // Replay with fresh inputs and a new slot assignment, written in place.
    let mut caches: Vec<Vec<f64>> = (0..2).map(|l| read(&client, backend.cache(l).unwrap())).collect();
    for (round, slots) in [[4, 2, 0], [1, PADDING_SLOT as i32, 3], [0, 1, 2]]
        .iter()
        .enumerate()
    {
        let (qs, ks, vs) = (
            rng.values(batch * h * d, DType::F32),
            rng.values(batch * h * d, DType::F32),
            rng.values(batch * h * e, DType::F32),
        );
        write(&client, &q, &qs);
        write(&client, &k, &ks);
        write(&client, &v, &vs);
        backend.prepare_decode(slots).unwrap();
        // SAFETY: every buffer the graph recorded (inputs, outputs, caches,
        // slopes, slots) is alive and only this client's stream touches it.
        unsafe { graph.replay() }.expect("replay");
        let slots64: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        for (layer, cache) in caches.iter_mut().enumerate() {
            let slopes = read(&client, backend.slopes(layer).unwrap());
            let expected = reference_decode(
                h,
                d,
                e,
                &f64s(&qs),
                &f64s(&ks),
                &f64s(&vs),
                cache,
                &slopes,
                &slots64,
            );
            let out_err = relative_error(&read(&client, &outs[layer]), &expected);
            let cache_err = relative_error(&read(&client, backend.cache(layer).unwrap()), cache);
            assert!(
                out_err < 1e-5 && cache_err < 1e-5,
                "round {round} layer {layer}: {out_err:e} {cache_err:e}"
            );
        }
    }
}

#[test]
fn backend_errors_are_typed() {
    let client = client();
    let mut backend = backend(&client, 2, 5);
    let (h, d, e) = (2, 16, 24);
    let t = |shape: &[usize]| poisoned(&client, shape, DType::F32);
    let (q, k, v, out) = (t(&[3, h, d]), t(&[3, h, d]), t(&[3, h, e]), t(&[3, h, e]));
    // Nothing prepared yet.
    let err = backend.forward_decode(0, &q, &k, &v, &out).unwrap_err();
    assert!(matches!(err, LightningError::WrongStep(_)), "{err}");
    backend.prepare_decode(&[0, 1, 2]).unwrap();
    let err = backend.forward_extend(0, &q, &k, &v, &out).unwrap_err();
    assert!(matches!(err, LightningError::WrongStep(_)), "{err}");
    let err = backend.forward_decode(2, &q, &k, &v, &out).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::LengthMismatch {
                what: "layer index",
                ..
            }
        ),
        "{err}"
    );
    let (q4, k4) = (t(&[4, h, d]), t(&[4, h, d]));
    let (v4, out4) = (t(&[4, h, e]), t(&[4, h, e]));
    let err = backend.forward_decode(0, &q, &k, &v4, &out).unwrap_err();
    assert!(matches!(err, LightningError::Shape { tensor: "v", .. }), "{err}");
    let err = backend.forward_decode(0, &q4, &k4, &v4, &out4).unwrap_err();
    assert!(matches!(err, LightningError::Shape { tensor: "q", .. }), "{err}");
    let err = backend.prepare_decode(&[0, 1, 2, 3, 4]).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::LengthMismatch {
                what: "decode slots",
                ..
            }
        ),
        "{err}"
    );
    let err = backend.prepare_decode(&[0, 5]).unwrap_err();
    assert!(
        matches!(err, LightningError::SlotOutOfRange { slot: 5, .. }),
        "{err}"
    );
    let err = backend
        .prepare_extend(&VarlenBatch {
            cu_seqlens: &[0, 4, 4],
            slots: &[0, 1],
            has_initial_state: &[false, true],
            snapshots: None,
        })
        .unwrap_err();
    assert!(
        matches!(err, LightningError::OffsetsNotIncreasing { index: 2, .. }),
        "{err}"
    );
    // A head count the tensor-parallel world cannot split.
    let mut config = *backend.config();
    config.tensor_parallel = (0, 3);
    let err = LightningBackend::new(&client, config).unwrap_err();
    assert!(matches!(err, LightningError::Slopes(_)), "{err}");
    // A cache that 32-bit indices cannot address, or that no buffer of the
    // device can hold, is refused before anything is allocated.
    config.tensor_parallel = (0, 1);
    (config.heads, config.key_dim, config.value_dim) = (2, 32, 32);
    let slot_elements = 2 * 32 * 32u64;
    config.slots = (u32::MAX as u64 / slot_elements + 1) as usize;
    let err = LightningBackend::new(&client, config).unwrap_err();
    assert!(matches!(err, LightningError::TooLarge { .. }), "{err}");
    let max_buffer = DeviceLimits::of(&client).max_buffer;
    let slots = max_buffer / (slot_elements * 4) + 1;
    // Where the largest buffer is past 16 GiB, 32-bit indexing refuses first (above).
    if slots * slot_elements <= u32::MAX as u64 {
        config.slots = slots as usize;
        let err = LightningBackend::new(&client, config).unwrap_err();
        assert!(
            matches!(
                err,
                LightningError::OutOfMemory {
                    limit: lightning_attention::MemoryLimit::Buffer,
                    ..
                }
            ),
            "{err}"
        );
    }
}
