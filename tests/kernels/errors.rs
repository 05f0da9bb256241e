//! Every bad input gets its typed error, before anything launches.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::{
    DType, DecodeInputs, DeviceTensor, LightningError, PrefillConfig, PrefillInputs, decode, plan_prefill,
    prefill, slopes,
};

use crate::common::*;

struct Prefill {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    slopes: DeviceTensor,
    state: DeviceTensor,
}

fn tensor(client: &Client, shape: &[usize], dtype: DType) -> DeviceTensor {
    let len = shape.iter().product();
    upload(
        client,
        &SeededRng::new(len as u64).values(len, dtype),
        shape,
        dtype,
    )
}

/// A valid prefill problem (b=2, h=3, n=40, d=8, e=12) to break one piece of.
fn valid(client: &Client) -> Prefill {
    Prefill {
        q: tensor(client, &[2, 3, 40, 8], DType::F32),
        k: tensor(client, &[2, 3, 40, 8], DType::F32),
        v: tensor(client, &[2, 3, 40, 12], DType::F32),
        slopes: tensor(client, &[3], DType::F32),
        state: tensor(client, &[2, 3, 8, 12], DType::F32),
    }
}

fn run(client: &Client, p: &Prefill, config: PrefillConfig) -> Result<(), LightningError> {
    let inputs = PrefillInputs {
        q: &p.q,
        k: &p.k,
        v: &p.v,
        slopes: &p.slopes,
        initial_state: Some(&p.state),
    };
    prefill(client, &inputs, &config).map(|_| ())
}

fn small() -> PrefillConfig {
    PrefillConfig::new(16, 8)
}

#[test]
fn the_valid_problem_runs() {
    let client = client();
    run(&client, &valid(&client), small()).expect("the baseline must be valid");
}

#[test]
fn wrong_rank() {
    let client = client();
    let mut p = valid(&client);
    p.q = tensor(&client, &[3, 40, 8], DType::F32);
    assert!(matches!(
        run(&client, &p, small()),
        Err(LightningError::Rank {
            tensor: "q",
            expected: 4,
            ..
        })
    ));
    let mut p = valid(&client);
    p.slopes = tensor(&client, &[1, 3], DType::F32);
    assert!(matches!(
        run(&client, &p, small()),
        Err(LightningError::Rank { tensor: "slopes", .. })
    ));
}

/// Replaces one argument of a valid problem with a wrong one.
type Breaker = fn(&Client, &mut Prefill);

#[test]
fn mismatched_dims() {
    let client = client();
    let cases: [(&str, Breaker); 5] = [
        ("k", |c, p| p.k = tensor(c, &[2, 3, 41, 8], DType::F32)),
        ("v", |c, p| p.v = tensor(c, &[1, 3, 40, 12], DType::F32)),
        ("v", |c, p| p.v = tensor(c, &[2, 3, 39, 12], DType::F32)),
        ("slopes", |c, p| p.slopes = tensor(c, &[4], DType::F32)),
        ("initial_state", |c, p| {
            p.state = tensor(c, &[2, 3, 12, 8], DType::F32)
        }),
    ];
    for (name, break_it) in cases {
        let mut p = valid(&client);
        break_it(&client, &mut p);
        match run(&client, &p, small()) {
            Err(LightningError::Shape { tensor, .. }) => assert_eq!(tensor, name),
            other => panic!("{name}: expected a shape error, got {other:?}"),
        }
    }
}

#[test]
fn zero_length_sequence() {
    let client = client();
    let mut p = valid(&client);
    p.q = DeviceTensor::empty(&client, &[2, 3, 0, 8], DType::F32);
    let err = run(&client, &p, small()).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::EmptyDimension {
                tensor: "q",
                dim: "n",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn mismatched_dtypes() {
    let client = client();
    let mut p = valid(&client);
    p.k = tensor(&client, &[2, 3, 40, 8], DType::F16);
    let err = run(&client, &p, small()).unwrap_err();
    assert_eq!(
        err,
        LightningError::DType {
            tensor: "k",
            expected: DType::F32,
            actual: DType::F16
        }
    );
    let mut p = valid(&client);
    p.slopes = tensor(&client, &[3], DType::F16);
    assert!(matches!(
        run(&client, &p, small()),
        Err(LightningError::DType { tensor: "slopes", .. })
    ));
    let mut p = valid(&client);
    p.state = tensor(&client, &[2, 3, 8, 12], DType::F16);
    assert!(matches!(
        run(&client, &p, small()),
        Err(LightningError::DType {
            tensor: "initial_state",
            ..
        })
    ));
}

#[test]
fn bad_block_configs() {
    let client = client();
    let p = valid(&client);
    for (block, sub_block) in [(48, 16), (64, 24), (16, 32), (0, 8), (64, 0), (256, 12)] {
        let err = run(&client, &p, PrefillConfig::new(block, sub_block)).unwrap_err();
        assert!(
            matches!(err, LightningError::InvalidBlock { .. }),
            "{block}/{sub_block}: {err:?}"
        );
    }
    let err = run(&client, &p, small().with_scale(f32::NAN)).unwrap_err();
    assert!(matches!(err, LightningError::InvalidScale(_)), "{err:?}");
}

#[test]
fn tile_too_big_for_shared_memory() {
    let client = client();
    let p = valid(&client);
    // diag stages sub_block^2 f32 scores: 256 KiB for 256, more than any device offers per cube.
    let err = run(&client, &p, PrefillConfig::new(256, 256)).unwrap_err();
    assert!(
        matches!(err, LightningError::DoesNotFit { kernel: "diag", .. }),
        "{err:?}"
    );
}

#[test]
fn buffer_smaller_than_shape() {
    let client = client();
    let mut p = valid(&client);
    p.v = DeviceTensor {
        handle: client.empty(16),
        shape: vec![2, 3, 40, 12],
        dtype: DType::F32,
    };
    assert!(matches!(
        run(&client, &p, small()),
        Err(LightningError::BufferTooSmall { tensor: "v", .. })
    ));
}

#[test]
fn too_many_elements_for_32_bit_indexing() {
    let client = client();
    let huge = |e| DeviceTensor {
        handle: client.empty(16),
        shape: vec![1, 1, 1 << 20, e],
        dtype: DType::F32,
    };
    let (q, k, v) = (huge(4096), huge(4096), huge(4096));
    let s = tensor(&client, &[1], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
    };
    let err = plan_prefill(&client, &inputs, &small()).unwrap_err();
    assert!(
        matches!(err, LightningError::TooLarge { tensor: "q", .. }),
        "{err:?}"
    );
}

#[test]
fn bf16_runs_on_every_runtime() {
    let client = client();
    assert!(DType::BF16.is_supported(&client), "{}", client.name());
    let p = Prefill {
        q: tensor(&client, &[1, 1, 20, 8], DType::BF16),
        k: tensor(&client, &[1, 1, 20, 8], DType::BF16),
        v: tensor(&client, &[1, 1, 20, 8], DType::BF16),
        slopes: tensor(&client, &[1], DType::F32),
        state: tensor(&client, &[1, 1, 8, 8], DType::F32),
    };
    run(&client, &p, small()).expect("bf16 runs natively or as words on every runtime");
}

struct Decode {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    cache: DeviceTensor,
    slopes: DeviceTensor,
}

fn valid_decode(client: &Client) -> Decode {
    Decode {
        q: tensor(client, &[3, 2, 1, 8], DType::F32),
        k: tensor(client, &[3, 2, 1, 8], DType::F32),
        v: tensor(client, &[3, 2, 1, 4], DType::F32),
        cache: tensor(client, &[5, 2, 8, 4], DType::F32),
        slopes: tensor(client, &[2], DType::F32),
    }
}

fn run_decode(client: &Client, p: &Decode, slots: &[i32]) -> Result<(), LightningError> {
    let inputs = DecodeInputs {
        q: &p.q,
        k: &p.k,
        v: &p.v,
        cache: &p.cache,
        slopes: &p.slopes,
        slots,
        scale: None,
        rows_in_flight: decode_rows_in_flight(),
    };
    decode(client, &inputs).map(|_| ())
}

#[test]
fn decode_slots() {
    let client = client();
    let p = valid_decode(&client);
    run_decode(&client, &p, &[4, -1, 0]).expect("the baseline must be valid");
    let err = run_decode(&client, &p, &[5, 1, 0]).unwrap_err();
    assert_eq!(
        err,
        LightningError::SlotOutOfRange {
            index: 0,
            slot: 5,
            slots: 5
        }
    );
    let err = run_decode(&client, &p, &[1, -2, 0]).unwrap_err();
    assert!(
        matches!(
            err,
            LightningError::SlotOutOfRange {
                index: 1,
                slot: -2,
                ..
            }
        ),
        "{err:?}"
    );
    let err = run_decode(&client, &p, &[1, 3, 1]).unwrap_err();
    assert_eq!(
        err,
        LightningError::DuplicateSlot {
            slot: 1,
            first: 0,
            second: 2
        }
    );
    let err = run_decode(&client, &p, &[1, 3]).unwrap_err();
    assert!(
        matches!(err, LightningError::Shape { tensor: "slots", .. }),
        "{err:?}"
    );
}

#[test]
fn decode_shapes_and_dtypes() {
    let client = client();
    let mut p = valid_decode(&client);
    p.q = tensor(&client, &[3, 2, 2, 8], DType::F32);
    assert!(matches!(
        run_decode(&client, &p, &[0, 1, 2]),
        Err(LightningError::Shape { tensor: "q", .. })
    ));
    let mut p = valid_decode(&client);
    p.cache = tensor(&client, &[5, 2, 8, 5], DType::F32);
    assert!(matches!(
        run_decode(&client, &p, &[0, 1, 2]),
        Err(LightningError::Shape { tensor: "cache", .. })
    ));
    let mut p = valid_decode(&client);
    p.cache = tensor(&client, &[5, 2, 8, 4], DType::F16);
    assert!(matches!(
        run_decode(&client, &p, &[0, 1, 2]),
        Err(LightningError::DType { tensor: "cache", .. })
    ));
    let mut p = valid_decode(&client);
    p.v = tensor(&client, &[3, 2, 4], DType::F32);
    assert!(matches!(
        run_decode(&client, &p, &[0, 1, 2]),
        Err(LightningError::Rank { tensor: "v", .. })
    ));
}

#[test]
fn slope_helpers() {
    assert!(matches!(
        slopes::layer_slopes(8, 0, 1),
        Err(LightningError::Slopes(_))
    ));
    assert!(matches!(
        slopes::layer_slopes(8, 3, 3),
        Err(LightningError::Slopes(_))
    ));
    assert!(matches!(slopes::base_slopes(0), Err(LightningError::Slopes(_))));
    let all = slopes::layer_slopes(64, 2, 80).unwrap();
    assert!(matches!(
        slopes::rank_slice(&all, 0, 3),
        Err(LightningError::Slopes(_))
    ));
    assert!(matches!(
        slopes::rank_slice(&all, 4, 4),
        Err(LightningError::Slopes(_))
    ));
    let rank1 = slopes::rank_slice(&all, 1, 4).unwrap();
    assert_eq!(rank1, all[16..32].to_vec());
    // flash-linear-attention's ladder: 8 h (1 - layer / layers) / H, head 0 at zero.
    assert_eq!(slopes::fla_layer_slopes(4, 1, 2).unwrap(), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(slopes::fla_layer_slopes(8, 0, 24).unwrap()[7], 7.0);
    assert!(matches!(
        slopes::fla_layer_slopes(0, 0, 2),
        Err(LightningError::Slopes(_))
    ));
    assert!(matches!(
        slopes::fla_layer_slopes(4, 2, 2),
        Err(LightningError::Slopes(_))
    ));
}
