//! Out of device memory is a typed error, never a crash (issue 18): calls
//! whose buffers the device cannot hold are refused before anything is
//! allocated, an allocation that fails anyway surfaces at the next read as
//! the same error, and the client keeps running afterwards.
//!
//! Nothing here fills host memory: the problems past the device are planned
//! from shapes alone or fail on the per-buffer limit before any allocation,
//! and the allocation that fails on purpose is refused by cubecl's pools
//! (larger than any page) without touching the host.

use lightning_attention::memory::{Buffer, DeviceMemory};
use lightning_attention::plan::{DeviceLimits, PrefillPlan, PrefillWork, TensorCores, plan_prefill_shapes};
use lightning_attention::reference::{Dims, recurrence};
use lightning_attention::shapes::TensorShape;
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, LightningError, MemoryLimit, PrefillConfig, PrefillInputs, Routines,
    decode, prefill,
};

use crate::common::*;

/// Bytes 32-bit indexing addresses in one f32 buffer: a workspace past this
/// is refused as `TooLarge` before its bytes are weighed.
const MAX_F32_BYTES: u64 = u32::MAX as u64 * 4;

fn shape(dims: &[usize], dtype: DType) -> TensorShape {
    TensorShape {
        shape: dims.to_vec(),
        dtype,
    }
}

/// Plans a dense f16 prefill of `[1, h, n, d]` from shapes alone.
fn plan_shapes(
    client: &lightning_attention::cubecl::prelude::Client,
    [h, n, d]: [usize; 3],
    config: &PrefillConfig,
) -> lightning_attention::Result<()> {
    let qk = shape(&[1, h, n, d], DType::F16);
    let v = shape(&[1, h, n, d], DType::F16);
    let slopes = shape(&[h], DType::F32);
    plan_prefill_shapes(client, &qk, &qk, &v, &slopes, None, config).map(|_| ())
}

/// The problem, h = 64, d = e = 128, BLOCK 128, planned from its
/// shapes: at a million tokens q itself is past 32-bit indexing; at the
/// largest n 32-bit indexing allows with h = 32 the per-block workspace alone
/// is 17 GB (the output as much again: 34 GB, past this machine's memory),
/// refused where the device's largest buffer is smaller (every wgpu device;
/// CUDA allocates up to a quarter of the device in one).
#[test]
fn a_prefill_past_the_device_is_refused_from_its_shapes() {
    let client = client();
    let config = PrefillConfig::new(128, 32);
    let err = plan_shapes(&client, [64, 1 << 20, 128], &config).unwrap_err();
    assert!(
        matches!(err, LightningError::TooLarge { tensor: "q", .. }),
        "{err}"
    );

    let (h, d, n) = (32, 128, (1 << 20) - 128);
    let blocks = n / 128;
    let workspace = (blocks * h * d * d * 4) as u64;
    let max_buffer = DeviceMemory::of(&client).max_buffer;
    let planned = plan_shapes(&client, [h, n, d], &config);
    if workspace > max_buffer {
        let err = planned.unwrap_err();
        assert_eq!(
            err,
            LightningError::OutOfMemory {
                tensor: "per-block state workspace [blocks, h, d, e] f32",
                bytes: workspace,
                available: Some(max_buffer),
                limit: MemoryLimit::Buffer,
            }
        );
        let message = err.to_string();
        for part in ["per-block state workspace", &workspace.to_string(), "split"] {
            assert!(message.contains(part), "{message}");
        }
    } else {
        planned.expect("a 17 GB workspace fits one buffer of this device");
    }
}

/// The entry point refuses a prefill whose inputs are small (16 MiB each on
/// lavapipe) but whose per-block workspace is past the largest buffer
/// (BLOCK 16: 4 KiB of workspace per token at h = 1, d = e = 128), before
/// allocating its output.
#[test]
fn a_prefill_whose_workspace_is_past_the_largest_buffer_returns_the_typed_error() {
    let client = client();
    let max_buffer = DeviceMemory::of(&client).max_buffer;
    let (h, d) = (1, 128);
    let per_block = (h * d * d * 4) as u64;
    let block = 16;
    let blocks = max_buffer / per_block + 1;
    let n = blocks as usize * block;
    let workspace = blocks * per_block;
    if workspace > MAX_F32_BYTES {
        // A device whose buffers outgrow 32-bit indexing: that refuses first
        // (planned from shapes: the inputs would be 4 GiB each).
        let qk = shape(&[1, h, n, d], DType::F32);
        let err = plan_prefill_shapes(
            &client,
            &qk,
            &qk,
            &qk,
            &shape(&[h], DType::F32),
            None,
            &PrefillConfig::new(block, block),
        )
        .unwrap_err();
        assert!(matches!(err, LightningError::TooLarge { .. }), "{err}");
        return;
    }
    let mut rng = SeededRng::new(18);
    let q = upload(&client, &rng.values(n * d, DType::F32), &[1, h, n, d], DType::F32);
    let slopes = upload(&client, &rng.slopes(h), &[h], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &q,
        v: &q,
        slopes: &slopes,
        initial_state: None,
    };
    let err = prefill(&client, &inputs, &PrefillConfig::new(block, block)).unwrap_err();
    assert_eq!(
        err,
        LightningError::OutOfMemory {
            tensor: "per-block state workspace [blocks, h, d, e] f32",
            bytes: workspace,
            available: Some(max_buffer),
            limit: MemoryLimit::Buffer,
        }
    );
}

/// The fused routine allocates no per-block state workspace, so a workspace
/// past the largest buffer refuses the other routines but not the fused
/// walk (wgpu on an H100 refused it at (4,64,8192,128) for 2 GiB it would
/// never allocate). On a device with the tensor-core walk, f32 fused calls
/// are planned as the chunk-recurrent routine and refused as it is.
#[test]
fn a_workspace_past_the_largest_buffer_does_not_refuse_the_fused_walk() {
    let client = client();
    let limits = DeviceLimits::of(&client);
    let (h, d) = (1, 128);
    let per_block = (h * d * d * 4) as u64;
    let blocks = (limits.max_buffer / per_block + 1) as usize;
    let work = PrefillWork {
        dtype: DType::F32,
        heads: h,
        key_dim: d,
        value_dim: d,
        sub_blocks: blocks,
        blocks,
        sequences: 1,
        snapshots: 0,
    };
    let config = PrefillConfig::new(16, 16);
    let refused = PrefillPlan::new(&work, &config, &limits).unwrap_err();
    assert!(
        matches!(
            refused,
            LightningError::OutOfMemory { .. } | LightningError::TooLarge { .. }
        ),
        "{refused}"
    );
    let fused = PrefillPlan::new(&work, &config.with_routines(Routines::Fused), &limits);
    let has_walk = TensorCores::fragments_of(&client).supports(DType::BF16)
        || TensorCores::fragments_of(&client).supports(DType::F16);
    if has_walk {
        assert!(fused.is_err(), "planned as the chunk-recurrent routine");
    } else {
        let plan = fused.expect("the fused walk needs no per-block workspace");
        assert!(plan.fused.is_some());
        assert_eq!(plan.block_states_len, 0);
    }
}

/// 16-bit inputs whose f32 copies (twice their bytes) are past the largest
/// buffer while they fit: refused naming the copy, on a device where f16
/// prefills run on copies (portable products: lavapipe).
#[test]
fn a_widened_copy_past_the_largest_buffer_names_the_copy() {
    let client = client();
    let config = PrefillConfig::new(64, 16);
    let max_buffer = DeviceMemory::of(&client).max_buffer;
    // v holds e = 64 values per token, q and k d = 16 (their copies fit).
    let (h, d, e) = (1, 16, 64);
    let n = (max_buffer / (e as u64 * 4) + 1) as usize;
    let copy = (n * e * 4) as u64;
    let half_bytes = (n * e * 2) as u64;
    assert!(half_bytes <= max_buffer && copy > max_buffer);
    let qk = shape(&[1, h, n, d], DType::F16);
    let v = shape(&[1, h, n, e], DType::F16);
    let planned = plan_prefill_shapes(&client, &qk, &qk, &v, &shape(&[h], DType::F32), None, &config);
    if (n * e) as u64 > u32::MAX as u64 {
        // A device whose largest buffer holds more f32 than 32-bit indexing
        // addresses (CUDA: a quarter of an H200's 141 GB): v itself is refused
        // first, typed, and no copy is reached.
        assert!(
            matches!(planned, Err(LightningError::TooLarge { tensor: "v", .. })),
            "{planned:?}"
        );
        return;
    }
    let (_, plan) = planned.expect("plans from shapes: the copies are checked by the entry points");
    if !plan.widened {
        // f16 on tensor cores: no copies to refuse.
        assert!(client.name().starts_with("cuda"), "only CUDA runs f16 natively");
        return;
    }
    let mut rng = SeededRng::new(rng_seed());
    let q = upload(
        &client,
        &rng.values(n * h * d, DType::F16),
        &[1, h, n, d],
        DType::F16,
    );
    let v = upload(
        &client,
        &rng.values(n * h * e, DType::F16),
        &[1, h, n, e],
        DType::F16,
    );
    let slopes = upload(&client, &rng.slopes(h), &[h], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &q,
        v: &v,
        slopes: &slopes,
        initial_state: None,
    };
    let err = prefill(&client, &inputs, &config).unwrap_err();
    assert_eq!(
        err,
        LightningError::OutOfMemory {
            tensor: "f32 copy of v",
            bytes: copy,
            available: Some(max_buffer),
            limit: MemoryLimit::Buffer,
        }
    );
}

fn rng_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |t| t.as_nanos() as u64)
}

/// The budget itself, with stated figures: each buffer against the largest,
/// then in order against what the device has left; the first that does not
/// fit is named, with what was left for it.
#[test]
fn the_budget_names_the_first_buffer_that_does_not_fit() {
    let buffers = [
        Buffer::new("out", 100),
        Buffer::new("final_state", 100),
        Buffer::new("workspace", 60),
    ];
    let memory = |available| DeviceMemory {
        max_buffer: 100,
        available,
    };
    assert_eq!(memory(Some(260)).check(&buffers), Ok(()));
    assert_eq!(memory(None).check(&buffers), Ok(()));
    let err = memory(Some(250)).check(&buffers).unwrap_err();
    assert_eq!(
        err,
        LightningError::OutOfMemory {
            tensor: "workspace",
            bytes: 60,
            available: Some(50),
            limit: MemoryLimit::Device,
        }
    );
    let message = err.to_string();
    assert!(
        message.starts_with("workspace: 60 bytes of device memory, and the device has 50 left"),
        "{message}"
    );
    let err = memory(Some(50)).check(&buffers).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::OutOfMemory {
                tensor: "out",
                available: Some(50),
                ..
            }
        ),
        "{err}"
    );
    // One buffer past the largest is refused whatever the device has left.
    let err = memory(Some(10_000))
        .check(&[Buffer::new("small", 1), Buffer::new("big", 101)])
        .unwrap_err();
    assert_eq!(
        err,
        LightningError::OutOfMemory {
            tensor: "big",
            bytes: 101,
            available: Some(100),
            limit: MemoryLimit::Buffer,
        }
    );
    assert!(err.to_string().contains("never fits"), "{err}");
}

/// What the runtime reports: its largest buffer, and what it has left where
/// it states a capacity (CUDA; not wgpu under WGSL, lavapipe included). With
/// a figure, a serving backend whose caches each fit a buffer but together
/// exceed the device is refused before any is allocated.
#[test]
fn the_device_figures_are_the_runtimes() {
    let client = client();
    let memory = DeviceMemory::of(&client);
    let properties = &client.properties().memory;
    assert_eq!(memory.max_buffer, properties.max_page_size);
    let Some(capacity) = properties.max_memory() else {
        assert_eq!(memory.available, None);
        return;
    };
    let available = memory
        .available
        .expect("a runtime with a capacity has a figure left");
    assert!(available <= capacity);
    // Caches of at most half a buffer each, enough layers to pass what is left.
    let (heads, dim) = (8, 64);
    let slot = (heads * dim * dim * 4) as u64;
    let slots = (memory.max_buffer / 2 / slot).clamp(1, (u32::MAX as u64 / (slot / 4)).max(1));
    let layers = available / (slots * slot) + 2;
    let config = lightning_attention::BackendConfig {
        heads,
        key_dim: dim,
        value_dim: dim,
        layers: layers as usize,
        slots: slots as usize,
        max_batch: 4,
        tensor_parallel: (0, 1),
        dtype: DType::F32,
        prefill: PrefillConfig::default(),
        state_dtype: DType::F32,
    };
    let err = lightning_attention::LightningBackend::new(&client, config).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::OutOfMemory {
                limit: MemoryLimit::Device,
                ..
            }
        ),
        "{err}"
    );
}

/// A buffer past the largest page, allocated unchecked: cubecl attaches the
/// failure to the buffer (no panic) and the read reports it as the typed
/// error with the bytes asked; a decode against a cache whose allocation
/// failed is skipped, and the read of its output reports the cache's bytes.
/// The checked constructors refuse the same sizes before allocating. Then
/// the client runs a prefill correctly.
#[test]
fn a_failed_allocation_surfaces_at_the_read_and_the_client_keeps_running() {
    let client = client();
    let max_buffer = DeviceMemory::of(&client).max_buffer;
    let elements = (max_buffer / 4 + 256) as usize;
    let bytes = elements as u64 * 4;

    let err = DeviceTensor::try_empty(&client, &[elements], DType::F32).unwrap_err();
    assert!(
        matches!(err, LightningError::OutOfMemory { bytes: b, limit: MemoryLimit::Buffer, .. } if b == bytes),
        "{err}"
    );
    let err = DeviceTensor::filled(&client, &[elements], DType::F32, 0.0).unwrap_err();
    assert!(
        matches!(err, LightningError::OutOfMemory { bytes: b, .. } if b == bytes),
        "{err}"
    );

    let unallocated = DeviceTensor::empty(&client, &[elements], DType::F32);
    for read in [
        unallocated.to_f32_vec(&client).map(|_| ()),
        unallocated.to_bytes(&client).map(|_| ()),
    ] {
        let err = read.unwrap_err();
        assert!(
            matches!(
                err,
                LightningError::OutOfMemory { bytes: b, limit: MemoryLimit::Buffer, available: Some(max), .. }
                    if b == bytes && max == max_buffer
            ),
            "{err}"
        );
    }

    // A cache [slots, h, d, e] one slot past the largest buffer.
    let (b, h, d, e) = (2, 4, 32, 32);
    let slot = (h * d * e * 4) as u64;
    let slots = (max_buffer / slot + 1) as usize;
    // Where that many f32 pass 32-bit indexing (CUDA's largest buffer is a
    // quarter of the device), the step is refused before any launch instead.
    let indexable = (slots * h * d * e) as u64 <= u32::MAX as u64;
    let cache = DeviceTensor::empty(&client, &[slots, h, d, e], DType::F32);
    let mut rng = SeededRng::new(rng_seed());
    let q = upload(
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
    let slopes = upload(&client, &rng.slopes(h), &[h], DType::F32);
    let step = decode(
        &client,
        &DecodeInputs {
            q: &q,
            k: &q,
            v: &v,
            cache: &cache,
            slopes: &slopes,
            slots: &[0, 1],
            scale: None,
            rows_in_flight: decode_rows_in_flight(),
        },
    );
    if indexable {
        let out = step.expect("the step is valid: the cache's failure is the device's to report");
        let err = out.to_f32_vec(&client).unwrap_err();
        assert!(
            matches!(
                err,
                LightningError::OutOfMemory { bytes: b, limit: MemoryLimit::Buffer, .. }
                    if b == slots as u64 * slot
            ),
            "{err}"
        );
    } else {
        assert!(
            matches!(step, Err(LightningError::TooLarge { tensor: "cache", .. })),
            "{step:?}"
        );
    }
    drop((unallocated, cache));

    // The engine keeps running: a small prefill on the same client.
    let dims = Dims {
        batch: 1,
        heads: 2,
        seq_len: 40,
        key_dim: 16,
        value_dim: 16,
    };
    let [qv, kv, vv] = [dims.qk_len(), dims.qk_len(), dims.v_len()].map(|len| rng.values(len, DType::F32));
    let slope_values = rng.slopes(dims.heads);
    let shape_qk = [1, dims.heads, dims.seq_len, dims.key_dim];
    let shape_v = [1, dims.heads, dims.seq_len, dims.value_dim];
    let (q, k, v) = (
        upload(&client, &qv, &shape_qk, DType::F32),
        upload(&client, &kv, &shape_qk, DType::F32),
        upload(&client, &vv, &shape_v, DType::F32),
    );
    let slopes = upload(&client, &slope_values, &[dims.heads], DType::F32);
    let output = prefill(
        &client,
        &PrefillInputs {
            q: &q,
            k: &k,
            v: &v,
            slopes: &slopes,
            initial_state: None,
        },
        &PrefillConfig::new(16, 8),
    )
    .expect("a small prefill after the failures");
    let exact = recurrence(
        dims,
        &f64s(&qv),
        &f64s(&kv),
        &f64s(&vv),
        &f64s(&slope_values),
        None,
    );
    assert!(relative_error(&read(&client, &output.out), &exact.out) < tolerance(DType::F32));
    assert!(relative_error(&read(&client, &output.final_state), &exact.state) < tolerance(DType::F32));
}
