//! The first collective of every sequence-parallel pass: each rank states its
//! segment's sizes (or that it refused its arguments), and every rank learns
//! the segments' lengths and checks that the ranks agree, before any state
//! crosses between them.
//!
//! The claims travel as f32 through the same gather as the states (NCCL moves
//! device buffers): each count as three 16-bit parts, exact in f32, so
//! lengths up to 2^48 tokens cross unrounded.

use cubecl::prelude::*;

use super::comm::StateComm;
use crate::problem::shapes::{PrefillShape, expect_addressable};
use crate::{DType, DeviceTensor, LightningError, PrefillConfig, Result};

/// What one rank holds: the sizes every rank must share, and its own length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Claim {
    pub batch: usize,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub seq_len: usize,
    pub dtype: DType,
    /// The output scale (`None` is 1).
    pub scale: f32,
}

impl Claim {
    /// The claim of a validated segment run with `config`.
    pub fn of(shape: &PrefillShape, config: &PrefillConfig) -> Self {
        Self {
            batch: shape.batch,
            heads: shape.heads,
            key_dim: shape.key_dim,
            value_dim: shape.value_dim,
            seq_len: shape.seq_len,
            dtype: shape.dtype,
            scale: config.scale.unwrap_or(1.0),
        }
    }
}

/// Where each rank's segment lies in the whole sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segments {
    /// The first token of each rank's segment.
    pub starts: Vec<usize>,
    /// Tokens in each rank's segment.
    pub lengths: Vec<usize>,
}

impl Segments {
    /// One past the last token of rank `r`'s segment.
    pub fn end(&self, r: usize) -> usize {
        self.starts[r] + self.lengths[r]
    }
}

const OK: f32 = 1.0;
const REFUSED: f32 = 2.0;
/// Status, five counts of three parts, dtype, scale.
const FIELDS: usize = 1 + 5 * 3 + 2;

/// Gathers every rank's claim (`Err` where the rank refused its arguments)
/// and checks them. Every rank gets the same answer but for the refusing
/// rank, which gets its own error back.
pub(crate) fn agree(client: &Client, comm: &dyn StateComm, local: Result<Claim>) -> Result<Segments> {
    let row = encode(local.as_ref().ok());
    let row = DeviceTensor::from_f32(client, &row, &[FIELDS], DType::F32)?;
    let table = comm.all_gather(client, &row)?.to_f32_vec(client)?;
    let claim = local?;
    let world = comm.world_size();
    if table.len() != world * FIELDS {
        return Err(LightningError::Communicator(format!(
            "the gather of {world} ranks' claims returned {} values, expected {}",
            table.len(),
            world * FIELDS
        )));
    }
    let claims = table
        .chunks(FIELDS)
        .enumerate()
        .map(|(rank, row)| decode(row).ok_or(LightningError::SequenceParallelPeer { rank }))
        .collect::<Result<Vec<_>>>()?;
    if claims[comm.rank()] != claim {
        return Err(LightningError::Communicator(format!(
            "rank {} gathered its own claim as {:?}, not {claim:?}",
            comm.rank(),
            claims[comm.rank()]
        )));
    }
    check_shared(&claims)?;
    let state_len = claim.batch * claim.heads * claim.key_dim * claim.value_dim;
    expect_addressable("gathered states [world, b, h, d, e]", (world * state_len) as u64)?;
    let lengths: Vec<usize> = claims.iter().map(|c| c.seq_len).collect();
    let starts = lengths
        .iter()
        .scan(0, |start, &len| {
            let first = *start;
            *start += len;
            Some(first)
        })
        .collect();
    Ok(Segments { starts, lengths })
}

/// Every rank against rank 0.
fn check_shared(claims: &[Claim]) -> Result<()> {
    let first = &claims[0];
    for (rank, claim) in claims.iter().enumerate().skip(1) {
        let counts = [
            ("batch", first.batch, claim.batch),
            ("heads", first.heads, claim.heads),
            ("key dim d", first.key_dim, claim.key_dim),
            ("value dim e", first.value_dim, claim.value_dim),
        ];
        for (what, expected, actual) in counts {
            if expected != actual {
                return Err(mismatch(what, rank, expected, actual));
            }
        }
        if first.dtype != claim.dtype {
            return Err(mismatch("dtype", rank, first.dtype, claim.dtype));
        }
        if first.scale != claim.scale {
            return Err(mismatch("scale", rank, first.scale, claim.scale));
        }
    }
    Ok(())
}

fn mismatch(
    what: &'static str,
    rank: usize,
    expected: impl ToString,
    actual: impl ToString,
) -> LightningError {
    LightningError::SequenceParallelMismatch {
        what,
        rank,
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}

fn encode(claim: Option<&Claim>) -> Vec<f32> {
    let Some(c) = claim else {
        let mut row = vec![0.0; FIELDS];
        row[0] = REFUSED;
        return row;
    };
    let mut row = vec![OK];
    for count in [c.batch, c.heads, c.key_dim, c.value_dim, c.seq_len] {
        row.extend((0..3).map(|part| ((count as u64 >> (16 * part)) & 0xffff) as f32));
    }
    let dtype = DTYPES.iter().position(|&d| d == c.dtype).unwrap_or(0);
    row.extend([dtype as f32, c.scale]);
    row
}

/// The claim of a row, `None` where the rank refused.
fn decode(row: &[f32]) -> Option<Claim> {
    if row[0] != OK {
        return None;
    }
    let count = |field: usize| {
        (0..3).fold(0u64, |sum, part| {
            sum | ((row[1 + 3 * field + part] as u64) << (16 * part))
        }) as usize
    };
    Some(Claim {
        batch: count(0),
        heads: count(1),
        key_dim: count(2),
        value_dim: count(3),
        seq_len: count(4),
        dtype: DTYPES[(row[16] as usize).min(DTYPES.len() - 1)],
        scale: row[17],
    })
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip_through_f32() {
        let claim = Claim {
            batch: 3,
            heads: 64,
            key_dim: 128,
            value_dim: 96,
            seq_len: (1 << 40) + 12345,
            dtype: DType::BF16,
            scale: -0.125,
        };
        assert_eq!(decode(&encode(Some(&claim))), Some(claim));
        assert_eq!(decode(&encode(None)), None);
    }
}
