//! The variants of the fused routine's tensor-core walk the autotuner
//! chooses among ([`crate::FusedChoice::Tuned`]): chunk, value tile,
//! stages and split, and which of them apply to a call. A variant applies where the
//! plan takes it as it is (the tensor-core walk of the call's kind, with the
//! variant's chunk, tile, stages and split, none narrowed, dropped or without
//! effect) and the
//! caller's forced knobs agree with it. The autotuner's key carries the set
//! (`entry::fused_tune`), so a variant cached as the fastest for a key
//! applies to every call with that key.

use std::fmt;

use crate::device::limits::DeviceLimits;
use crate::routines::fused::plan::{self, FusedPlan};
use crate::routines::table::PrefillWork;
use crate::{PrefillConfig, Routines};

/// One variant of the tensor-core walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FusedVariant {
    /// Tokens per chunk (the config's sub-block while it runs).
    pub chunk: usize,
    /// Columns of `e` one cube holds.
    pub value_tile: usize,
    /// Sets of `Q`, `K`, `V` tiles: 2 is the ring (asynchronous copies).
    pub stages: usize,
    /// Segments per sequence at least ([`crate::Tuning::fused_split`]); 1
    /// is the plan's rule.
    pub split: usize,
}

impl fmt::Display for FusedVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chunk{}-tile{}-stages{}",
            self.chunk, self.value_tile, self.stages
        )?;
        if self.split > 1 {
            write!(f, "-split{}", self.split)?;
        }
        Ok(())
    }
}

/// Chunks the autotuner tries: 16 has never been the fastest (its products
/// are a quarter of an `m16n8k16` row block per plane and its decay tables
/// are reloaded every 16 tokens), so it is left to a forced sub-block.
const CHUNKS: [usize; 2] = [32, 64];
/// Value tiles the autotuner tries: narrower tiles give more cubes (each
/// recomputing the chunk's scores), wider ones fewer.
const VALUE_TILES: [usize; 3] = [32, 64, 128];
/// Sets of tiles: one, or the ring.
const STAGES: [usize; 2] = [1, 2];
/// Segments per sequence at least: the rule's, or two (where the rule's
/// walks fill half the SMs' cube slots, as at (1,64,16384,128) on an H100).
const SPLITS: [usize; 2] = [1, 2];

impl FusedVariant {
    /// Every variant the autotuner may try, in a fixed order (the tuner's
    /// results are indices into it).
    pub fn all() -> Vec<Self> {
        let mut all = Vec::new();
        for split in SPLITS {
            for chunk in CHUNKS {
                for value_tile in VALUE_TILES {
                    for stages in STAGES {
                        all.push(Self {
                            chunk,
                            value_tile,
                            stages,
                            split,
                        });
                    }
                }
            }
        }
        all
    }

    /// `config` with this variant's chunk, tile and stages, and the fixed
    /// rule (no further tuning): the block is widened to the chunk where it
    /// is narrower.
    pub fn apply(&self, config: &PrefillConfig) -> PrefillConfig {
        let mut tuned = *config;
        tuned.sub_block = self.chunk;
        tuned.block = config.block.max(self.chunk);
        tuned.tuning.fused_value_tile = Some(self.value_tile);
        tuned.tuning.fused_stages = Some(self.stages);
        tuned.tuning.fused_split = Some(self.split);
        tuned.tuning.fused_choice = crate::FusedChoice::Rule;
        tuned
    }

    /// The variant a fused plan runs, where it is the tensor-core walk.
    pub(crate) fn of(plan: &FusedPlan) -> Option<Self> {
        let walk = plan.fragments?;
        Some(Self {
            chunk: plan.chunk,
            value_tile: walk.planes * 16,
            stages: walk.stages,
            split: plan.split,
        })
    }
}

/// Which of [`FusedVariant::all`] apply to the call whose work under a
/// config is `work_for(config)` (see the module doc), in their order; all
/// `false` where the call does not take the tensor-core walk, or where its
/// config fixes the rule.
pub(crate) fn applicable(
    work_for: &dyn Fn(&PrefillConfig) -> PrefillWork,
    config: &PrefillConfig,
    limits: &DeviceLimits,
) -> Vec<bool> {
    let all = FusedVariant::all();
    let work = &work_for(config);
    let none = vec![false; all.len()];
    if config.routines != Routines::Fused || config.tuning.fused_choice != crate::FusedChoice::Tuned {
        return none;
    }
    let Ok(Some(base)) = plan::plan(work, config, limits) else {
        return none;
    };
    let Some(base_walk) = base.fragments else {
        return none;
    };
    let forced = config.tuning;
    // Tiles past `e` (rounded up to a power of two) hold only padding.
    let widest = work.value_dim.next_power_of_two().max(16);
    all.iter()
        .map(|variant| {
            let agrees = forced
                .fused_value_tile
                .is_none_or(|tile| tile == variant.value_tile)
                && forced.fused_stages.is_none_or(|stages| stages == variant.stages)
                && forced.fused_split.is_none_or(|split| split == variant.split)
                && (variant.value_tile <= widest || variant.value_tile == variant.chunk);
            if !agrees {
                return false;
            }
            let tuned = variant.apply(config);
            let planned = plan::plan(&work_for(&tuned), &tuned, limits).ok().flatten();
            planned.is_some_and(|p| {
                p.fragments
                    .is_some_and(|walk| walk.emulated == base_walk.emulated)
                    && FusedVariant::of(&p) == Some(*variant)
            })
        })
        .collect()
}
