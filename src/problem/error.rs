//! The typed error every public entry point returns instead of panicking.

use crate::DType;

/// Why a lightning-attention call was refused. Each variant says what was
/// wrong and what was expected; nothing is launched once one is returned,
/// except [`LightningError::NonFinite`], which an opt-in check returns after
/// the launches, about what they wrote.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LightningError {
    /// A tensor has the wrong number of dimensions.
    #[error("{tensor}: expected rank {expected} ({layout}), got rank {actual} with shape {shape:?}")]
    Rank {
        /// Which argument.
        tensor: &'static str,
        /// The rank expected.
        expected: usize,
        /// The layout expected, e.g. `[b, h, n, d]`.
        layout: &'static str,
        /// The rank given.
        actual: usize,
        /// The shape given.
        shape: Vec<usize>,
    },
    /// A tensor's shape disagrees with the others (b, h, n, d or e).
    #[error("{tensor}: expected shape {expected:?} ({layout}), got {actual:?}")]
    Shape {
        /// Which argument.
        tensor: &'static str,
        /// The shape implied by the other arguments.
        expected: Vec<usize>,
        /// The layout, e.g. `[b, h, n, e]`.
        layout: &'static str,
        /// The shape given.
        actual: Vec<usize>,
    },
    /// A dimension is zero: empty batches, heads, head dims or zero-length sequences.
    #[error("{tensor}: dimension `{dim}` is 0 in shape {shape:?}; every dimension must be at least 1")]
    EmptyDimension {
        /// Which argument.
        tensor: &'static str,
        /// The name of the empty dimension.
        dim: &'static str,
        /// The shape given.
        shape: Vec<usize>,
    },
    /// A tensor has a dtype other than the one required.
    #[error("{tensor}: expected dtype {expected}, got {actual}")]
    DType {
        /// Which argument.
        tensor: &'static str,
        /// The dtype required (slopes are always f32, a state cache f32 or
        /// bf16, other states f32; k and v match q).
        expected: DType,
        /// The dtype given.
        actual: DType,
    },
    /// A state cache of a dtype other than the one its owner holds: a
    /// [`crate::LightningBackend`] built with another
    /// [`crate::BackendConfig::state_dtype`], a [`crate::SplitCache`] part
    /// unlike the first.
    #[error("{tensor}: expected a state cache of {expected}, got one of {actual}")]
    StateDType {
        /// Which argument.
        tensor: &'static str,
        /// The dtype the owner holds its caches in.
        expected: DType,
        /// The dtype given.
        actual: DType,
    },
    /// A bf16 state cache with an odd `e`: its elements travel in pairs as
    /// 32-bit words, and an odd `e` would put one word across two states.
    #[error(
        "{tensor}: a bf16 state cache needs an even e (its elements travel in pairs as 32-bit words), got e = {value_dim}"
    )]
    OddStateWidth {
        /// Which argument.
        tensor: &'static str,
        /// The `e` given.
        value_dim: usize,
    },
    /// A tensor's buffer is smaller than its shape and dtype require.
    #[error("{tensor}: buffer holds {actual} bytes, shape and dtype need {expected}")]
    BufferTooSmall {
        /// Which argument.
        tensor: &'static str,
        /// Bytes needed.
        expected: u64,
        /// Bytes in the buffer.
        actual: u64,
    },
    /// The block configuration is not valid.
    #[error("block {block} / sub-block {sub_block}: {reason}")]
    InvalidBlock {
        /// `BLOCK`.
        block: usize,
        /// `CBLOCK`.
        sub_block: usize,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// The output scale is not a finite number.
    #[error("scale {0} is not finite; expected a finite multiplier (or None for 1)")]
    InvalidScale(String),
    /// A measuring knob of [`crate::Tuning`] is out of its range.
    #[error(
        "tuning knob {knob} = {value} is out of range; expected {expected} (or None for the measured default)"
    )]
    InvalidTuning {
        /// The knob's name.
        knob: &'static str,
        /// The value given.
        value: usize,
        /// Its range.
        expected: &'static str,
    },
    /// A decode slot index is neither padding (-1) nor a slot of the cache.
    #[error("slots[{index}] = {slot}: expected -1 (padding) or a slot in 0..{slots}")]
    SlotOutOfRange {
        /// The sequence (row) whose slot is wrong.
        index: usize,
        /// The slot given.
        slot: i64,
        /// Slots in the cache.
        slots: usize,
    },
    /// Two sequences of one call update the same cache slot.
    #[error("slot {slot} is used by sequences {first} and {second}; each slot may appear once per call")]
    DuplicateSlot {
        /// The slot.
        slot: i64,
        /// First sequence using it.
        first: usize,
        /// Second sequence using it.
        second: usize,
    },
    /// `cu_seqlens` does not start at 0.
    #[error("cu_seqlens[0] = {value}: expected 0 (offsets of each sequence's first token)")]
    FirstOffset {
        /// The first offset given.
        value: u64,
    },
    /// An offset is not greater than the one before it: a sequence of no tokens.
    #[error(
        "cu_seqlens[{index}] = {value} is not greater than cu_seqlens[{}] = {previous}; offsets must increase (every sequence holds at least one token)",
        index - 1
    )]
    OffsetsNotIncreasing {
        /// Position of the offending offset.
        index: usize,
        /// The offset before it.
        previous: u64,
        /// The offset given.
        value: u64,
    },
    /// Two arguments share a buffer where one is read while the other is
    /// written (the kernels would read states already overwritten).
    #[error("{first} and {second} share one buffer; give them separate tensors")]
    AliasedBuffers {
        /// The argument read.
        first: &'static str,
        /// The argument written.
        second: &'static str,
    },
    /// An offset is less than the one before it (packed training, whose
    /// documents may be empty: offsets must not decrease).
    #[error(
        "cu_seqlens[{index}] = {value} is less than cu_seqlens[{}] = {previous}; offsets must not decrease",
        index - 1
    )]
    OffsetsDecreasing {
        /// Position of the offending offset.
        index: usize,
        /// The offset before it.
        previous: u64,
        /// The offset given.
        value: u64,
    },
    /// An offset runs past the tokens of q, k and v, or stops short of them.
    #[error(
        "cu_seqlens[{index}] = {value}: q, k and v hold {total_tokens} tokens, which the last offset must equal"
    )]
    OffsetPastEnd {
        /// Position of the offending offset.
        index: usize,
        /// The offset given.
        value: u64,
        /// Tokens in q, k and v.
        total_tokens: usize,
    },
    /// A per-sequence list has the wrong length.
    #[error("{what}: expected {expected} entries ({rule}), got {actual}")]
    LengthMismatch {
        /// Which list.
        what: &'static str,
        /// Entries expected.
        expected: usize,
        /// Why that many.
        rule: &'static str,
        /// Entries given.
        actual: usize,
    },
    /// More snapshots were asked for than a sequence has tokens.
    #[error("sequence {sequence} holds {tokens} tokens, fewer than the {snapshots} snapshots asked of it")]
    SnapshotsExceedSequence {
        /// The sequence.
        sequence: usize,
        /// Its length.
        tokens: usize,
        /// Snapshots asked for (K).
        snapshots: usize,
    },
    /// A finite scale that this operation cannot take.
    #[error("scale {scale}: {reason}")]
    UnsupportedScale {
        /// The scale given (as text: the error type is `Eq`).
        scale: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// A call made for one kind of step was given another.
    #[error("{0}")]
    WrongStep(String),
    /// The runtime cannot store or convert this input dtype.
    #[error(
        "the {runtime} runtime cannot run {dtype} inputs (it reports no buffer/conversion support); use f32 or f16 there"
    )]
    UnsupportedDType {
        /// The dtype asked for.
        dtype: DType,
        /// The runtime's name.
        runtime: &'static str,
    },
    /// A kernel's tiles do not fit the device.
    #[error("{kernel}: needs {required} {resource}, the device offers {available}")]
    DoesNotFit {
        /// Which kernel.
        kernel: &'static str,
        /// Which resource: shared memory bytes, units per cube, cubes per grid dimension.
        resource: &'static str,
        /// Amount needed.
        required: u64,
        /// Amount the device reports.
        available: u64,
    },
    /// A tensor has more elements than 32-bit indexing addresses.
    #[error("{tensor}: {elements} elements exceed the {max} that 32-bit indexing addresses")]
    TooLarge {
        /// Which tensor (or workspace).
        tensor: &'static str,
        /// Its element count.
        elements: u64,
        /// The limit.
        max: u64,
    },
    /// Slopes cannot be built as asked.
    #[error("slopes: {0}")]
    Slopes(String),
    /// The device reported an error while reading back results.
    #[error("device error: {0}")]
    Device(String),
    /// A Burn tensor has an element type the kernels do not take (they take
    /// f32, f16 and bf16).
    #[error("{tensor}: Burn dtype {dtype} is not supported; expected f32, f16 or bf16")]
    UnsupportedBurnDType {
        /// Which argument.
        tensor: &'static str,
        /// The Burn dtype given, as Burn prints it.
        dtype: String,
    },
    /// A buffer the call needs cannot be allocated on the device: larger
    /// than the runtime allocates in one buffer, or than the device has left.
    /// Nothing of the call was allocated when this is returned before the
    /// launch; returned by a read, it reports an allocation that failed after
    /// it (see [`crate::memory`]). Either way the client keeps running: shed
    /// the request, or split it.
    #[error("{tensor}: {bytes} bytes {}", memory_advice(*bytes, *available, *limit))]
    OutOfMemory {
        /// Which tensor or workspace; for a failure reported by a read, the
        /// tensor read (the failed buffer is it or one its writer needed).
        tensor: &'static str,
        /// Bytes asked for.
        bytes: u64,
        /// For [`MemoryLimit::Buffer`], the most bytes the runtime allocates
        /// in one buffer; for [`MemoryLimit::Device`], the bytes the device
        /// had left, or `None` where the runtime reports no figure.
        available: Option<u64>,
        /// Which limit refused it.
        limit: MemoryLimit,
    },
    /// An opt-in check found infinities or NaN in a tensor
    /// ([`crate::check_finite`], [`crate::PrefillConfig::check_finite`]).
    #[error(
        "{tensor}: {count} of its {elements} {dtype} elements are not finite (the first at flat index {first_index}); {hint}"
    )]
    NonFinite {
        /// Which tensor (`out`, `final_state`, or the name given to the check).
        tensor: &'static str,
        /// Its dtype.
        dtype: DType,
        /// How many elements are ±inf or NaN.
        count: u64,
        /// Elements in the tensor.
        elements: u64,
        /// The row-major index of the first of them.
        first_index: u64,
        /// Why values of this dtype leave the representable range, and what to do.
        hint: &'static str,
    },
    /// The ranks of a sequence-parallel call disagree on something every rank
    /// must share (batch, heads, head dims, dtype, scale).
    #[error(
        "sequence parallel: rank {rank} has {what} = {actual}, rank 0 has {expected}; every rank must hold the same batch, heads, head dims, dtype and scale"
    )]
    SequenceParallelMismatch {
        /// What disagrees.
        what: &'static str,
        /// The first rank that disagrees with rank 0.
        rank: usize,
        /// Rank 0's value.
        expected: String,
        /// That rank's value.
        actual: String,
    },
    /// Another rank of a sequence-parallel call refused its own arguments (its
    /// call returns why); every rank stops instead of waiting on it.
    #[error("sequence parallel: rank {rank} refused its arguments (its own call says why), so no rank runs")]
    SequenceParallelPeer {
        /// The first rank that refused.
        rank: usize,
    },
    /// A sequence-parallel argument given on a rank that may not take it.
    #[error("sequence parallel: {what} given on rank {rank}; {rule}")]
    SequenceParallelArgument {
        /// Which argument.
        what: &'static str,
        /// The rank it was given on.
        rank: usize,
        /// Which ranks take it.
        rule: &'static str,
    },
    /// A communicator of a sequence-parallel call is inconsistent or failed.
    #[error("sequence parallel communicator: {0}")]
    Communicator(String),
}

/// The rest of [`LightningError::OutOfMemory`]'s message: what refused the
/// bytes, and what a caller can do about it.
fn memory_advice(bytes: u64, available: Option<u64>, limit: MemoryLimit) -> String {
    const SPLIT: &str = "split the request (fewer tokens or sequences per call; a prefill carries its \
                         state from one call to the next through initial_state)";
    match (limit, available) {
        (MemoryLimit::Buffer, Some(max)) => format!(
            "in one buffer, more than the {max} the runtime allocates in one: this never fits on this \
             device, whatever is freed; shed the request or {SPLIT}"
        ),
        (MemoryLimit::Buffer, None) => format!(
            "in one buffer, more than the runtime allocates in one: this never fits on this device, \
             whatever is freed; shed the request or {SPLIT}"
        ),
        (MemoryLimit::Device, Some(left)) if left < bytes => format!(
            "of device memory, and the device has {left} left (its capacity less what it holds and \
             this call's buffers before this one); shed the request, retry it once other work has \
             freed memory, or {SPLIT}"
        ),
        (MemoryLimit::Device, left) => format!(
            "of device memory could not be allocated{}; shed the request, retry it once other work \
             has freed memory, or {SPLIT}",
            match left {
                Some(left) => format!(" (the device reported {left} left before the call)"),
                None => " (the runtime reports no figure of what is left)".to_string(),
            }
        ),
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = core::result::Result<T, LightningError>;

/// Which limit refused an allocation (see [`LightningError::OutOfMemory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryLimit {
    /// The most bytes the runtime allocates in one buffer: the request never
    /// fits on this device, whatever is freed; it must be split.
    Buffer,
    /// The device's memory left: the request may fit once other work has
    /// freed memory.
    Device,
}
