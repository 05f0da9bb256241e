//! The work lists of dense prefills, uploaded once per device and shape.
//!
//! A dense call's table (`SequenceTable::dense`) is a function of the batch,
//! `n`, whether an initial state is read, the block config and the planned
//! walk; its thirteen lists are read-only on the device. Uploading them is
//! host work inside every call (thirteen buffers created and copied): on an
//! H100 a whole call ran 0.09-0.11 ms longer than its kernel at every bench
//! shape (BENCHMARKS.md, 2026-12-05 night), a third of the call at the
//! shortest. So each device keeps the lists of the shapes it has run, and a
//! call of a known shape binds them as they are; the dense backward's passes
//! bind theirs the same way (the same function of the same shape). Offline
//! builds upload as before (nothing is allocated there).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::device::runtime::device_key;
use crate::device::target::LaunchTarget;
use crate::routines::table::{ChunkWalk, DeviceTable, SequenceTable};

/// Shapes kept per process before the cache starts over (a few KiB each:
/// a dense table holds a few entries per block).
const MAX_TABLES: usize = 256;

/// What a dense table is a function of: `SequenceTable::dense(batch,
/// seq_len, with_initial, config)` with this block and sub-block, and the
/// plan's walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DenseShape {
    pub batch: usize,
    pub seq_len: usize,
    pub with_initial: bool,
    pub block: usize,
    pub sub_block: usize,
    pub walk: Option<ChunkWalk>,
}

/// The tables uploaded so far.
static TABLES: Mutex<Option<HashMap<(String, DenseShape), DeviceTable>>> = Mutex::new(None);

/// `table` (the dense table of `shape`) on the device with the runs of its
/// walk: the one uploaded by an earlier call of the shape on this device,
/// else uploaded now and kept.
pub(crate) fn dense_device_table(
    target: LaunchTarget,
    table: &SequenceTable,
    shape: DenseShape,
) -> DeviceTable {
    let LaunchTarget::Device(client) = target else {
        return table.upload(target, shape.walk);
    };
    let key = (device_key(client), shape);
    let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
    let tables = tables.get_or_insert_with(HashMap::new);
    if let Some(uploaded) = tables.get(&key) {
        return uploaded.clone();
    }
    if tables.len() >= MAX_TABLES {
        tables.clear();
    }
    let uploaded = table.upload(target, shape.walk);
    tables.insert(key, uploaded.clone());
    uploaded
}
