//! Every bad packed call gets its typed error, before anything launches.

use lightning_attention::cubecl::prelude::Client;
use lightning_attention::{
    DType, DeviceTensor, LightningError, PrefillConfig, Snapshots, VarlenBatch, VarlenInputs, plan_varlen,
};

use crate::common::*;

/// A valid packed call: 3 sequences (5, 1 and 4 tokens), h=2, d=8, e=4, 6 slots.
struct Packed {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    slopes: DeviceTensor,
    cache: DeviceTensor,
    cu: Vec<u32>,
    slots: Vec<i32>,
    has_initial: Vec<bool>,
    snapshot_slots: Vec<i32>,
    snapshot_count: usize,
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

fn valid(client: &Client) -> Packed {
    Packed {
        q: tensor(client, &[10, 2, 8], DType::F32),
        k: tensor(client, &[10, 2, 8], DType::F32),
        v: tensor(client, &[10, 2, 4], DType::F32),
        slopes: tensor(client, &[2], DType::F32),
        cache: tensor(client, &[6, 2, 8, 4], DType::F32),
        cu: vec![0, 5, 6, 10],
        slots: vec![3, 0, -1],
        has_initial: vec![true, true, false],
        snapshot_slots: vec![4, 5, -1, -1, -1, -1],
        snapshot_count: 2,
    }
}

fn check(client: &Client, p: &Packed) -> Result<(), LightningError> {
    let inputs = VarlenInputs {
        q: &p.q,
        k: &p.k,
        v: &p.v,
        slopes: &p.slopes,
        cache: &p.cache,
        batch: VarlenBatch {
            cu_seqlens: &p.cu,
            slots: &p.slots,
            has_initial_state: &p.has_initial,
            snapshots: Some(Snapshots {
                count: p.snapshot_count,
                slots: &p.snapshot_slots,
            }),
        },
    };
    plan_varlen(client, &inputs, &PrefillConfig::new(16, 8)).map(|_| ())
}

/// Breaks one piece of the valid call and expects `expected` back.
fn refused(break_it: impl FnOnce(&Client, &mut Packed), expected: impl Fn(&LightningError) -> bool) {
    let client = client();
    let mut p = valid(&client);
    check(&client, &p).expect("the baseline must be valid");
    break_it(&client, &mut p);
    let err = check(&client, &p).expect_err("a broken call must be refused");
    assert!(expected(&err), "unexpected error: {err}");
}

#[test]
fn offsets_must_start_at_zero_increase_and_end_at_the_tokens() {
    refused(
        |_, p| p.cu[0] = 1,
        |e| matches!(e, LightningError::FirstOffset { value: 1 }),
    );
    refused(
        |_, p| p.cu = vec![0, 5, 5, 10],
        |e| matches!(e, LightningError::OffsetsNotIncreasing { index: 2, .. }),
    );
    refused(
        |_, p| p.cu = vec![0, 6, 5, 10],
        |e| matches!(e, LightningError::OffsetsNotIncreasing { index: 2, .. }),
    );
    refused(
        |_, p| p.cu = vec![0, 5, 6, 11],
        |e| {
            matches!(
                e,
                LightningError::OffsetPastEnd {
                    index: 3,
                    value: 11,
                    total_tokens: 10
                }
            )
        },
    );
    refused(
        |_, p| p.cu = vec![0, 5, 6, 9],
        |e| {
            matches!(
                e,
                LightningError::OffsetPastEnd {
                    index: 3,
                    value: 9,
                    ..
                }
            )
        },
    );
    refused(
        |_, p| p.cu = vec![0],
        |e| {
            matches!(
                e,
                LightningError::LengthMismatch {
                    what: "cu_seqlens",
                    ..
                }
            )
        },
    );
}

#[test]
fn slots_must_be_in_range_and_used_once() {
    refused(
        |_, p| p.slots[1] = 6,
        |e| {
            matches!(
                e,
                LightningError::SlotOutOfRange {
                    index: 1,
                    slot: 6,
                    ..
                }
            )
        },
    );
    refused(
        |_, p| p.slots[1] = -2,
        |e| {
            matches!(
                e,
                LightningError::SlotOutOfRange {
                    index: 1,
                    slot: -2,
                    ..
                }
            )
        },
    );
    refused(
        |_, p| p.slots[1] = 3,
        |e| {
            matches!(
                e,
                LightningError::DuplicateSlot {
                    slot: 3,
                    first: 0,
                    second: 1
                }
            )
        },
    );
    // A snapshot may not land on a slot another sequence reads or writes.
    refused(
        |_, p| p.snapshot_slots[1] = 0,
        |e| matches!(e, LightningError::DuplicateSlot { slot: 0, .. }),
    );
    refused(
        |_, p| p.snapshot_slots[0] = 9,
        |e| matches!(e, LightningError::SlotOutOfRange { slot: 9, .. }),
    );
}

#[test]
fn per_sequence_lists_must_have_one_entry_per_sequence() {
    refused(
        |_, p| p.slots.push(1),
        |e| {
            matches!(
                e,
                LightningError::LengthMismatch {
                    what: "slots",
                    expected: 3,
                    actual: 4,
                    ..
                }
            )
        },
    );
    refused(
        |_, p| {
            p.has_initial.pop();
        },
        |e| {
            matches!(
                e,
                LightningError::LengthMismatch {
                    what: "has_initial_state",
                    expected: 3,
                    actual: 2,
                    ..
                }
            )
        },
    );
    refused(
        |_, p| {
            p.snapshot_slots.pop();
        },
        |e| {
            matches!(
                e,
                LightningError::LengthMismatch {
                    what: "snapshot slots",
                    expected: 6,
                    ..
                }
            )
        },
    );
}

#[test]
fn snapshots_may_not_outnumber_a_sequences_tokens() {
    // Sequence 1 holds one token; two snapshots of it cannot exist.
    refused(
        |_, p| p.snapshot_slots[2] = 1,
        |e| {
            matches!(
                e,
                LightningError::SnapshotsExceedSequence {
                    sequence: 1,
                    tokens: 1,
                    snapshots: 2
                }
            )
        },
    );
}

#[test]
fn tensors_must_agree() {
    refused(
        |c, p| p.q = tensor(c, &[10, 2, 1, 8], DType::F32),
        |e| {
            matches!(
                e,
                LightningError::Rank {
                    tensor: "q",
                    expected: 3,
                    ..
                }
            )
        },
    );
    refused(
        |c, p| p.k = tensor(c, &[10, 2, 8], DType::F16),
        |e| matches!(e, LightningError::DType { tensor: "k", .. }),
    );
    refused(
        |c, p| p.v = tensor(c, &[9, 2, 4], DType::F32),
        |e| matches!(e, LightningError::Shape { tensor: "v", .. }),
    );
    refused(
        |c, p| p.cache = tensor(c, &[6, 2, 4, 8], DType::F32),
        |e| matches!(e, LightningError::Shape { tensor: "cache", .. }),
    );
    refused(
        |c, p| p.cache = tensor(c, &[6, 2, 8, 4], DType::F16),
        |e| matches!(e, LightningError::DType { tensor: "cache", .. }),
    );
}
