//! cubecl's autotuner over the fused routine's tensor-core walk
//! ([`crate::FusedChoice::Tuned`]): on the first dense prefill of a shape
//! bucket it times every variant that applies (`routines::fused::variants`)
//! on the call's own tensors and keeps the fastest for the bucket (on disk
//! too, with the `autotune-cache` feature); later calls of the bucket run it
//! at once.
//!
//! The key is the call (a prefill or a backward), the dtype, `d`, `e`, the tokens per sequence, the sequences
//! and the heads rounded up to powers of two, the block, the forced knobs,
//! the products, whether an initial state is read, and which variants apply
//! (so that a cached winner always applies to a call with its key). Each variant writes every element
//! of `out` and `final_state`, so the tuner's runs leave nothing behind but
//! the winner's result, which it runs last.

use std::sync::Arc;

use cubecl::prelude::*;
use cubecl::tune::{LocalTuner, Tunable, TunableSet, local_tuner};

use crate::device::limits::DeviceLimits;
use crate::device::runtime::device_key;
use crate::routines::fused::variants::{FusedVariant, applicable};
use crate::routines::table::PrefillWork;
use crate::{FusedChoice, PrefillConfig, Result};

/// One tuner per process, its sets and results per device.
static TUNER: LocalTuner<String, String> = local_tuner!("fused-walk");

/// How the caller launches its call, validated and its outputs checked,
/// with a config whose choice is the fixed rule (so that it does not come
/// back to the tuner). It owns what it launches on: the tuner keeps it.
pub(crate) type Launch = Arc<dyn Fn(&PrefillConfig) -> Result<()> + Send + Sync>;

/// The work of the call under a config (its blocks follow the config's).
pub(crate) type WorkFor<'a> = &'a dyn Fn(&PrefillConfig) -> PrefillWork;

/// Which call a tuned variant serves: its own buckets, since one variant
/// may be the fastest forward and another the fastest backward of a shape.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TunedCall {
    /// A dense prefill.
    Prefill,
    /// A dense backward pass (its walks take the variant's chunk, stages
    /// and split; the dq walk its value tile).
    Backward,
}

/// What every variant of a call runs on: the call's config and launch, and
/// its key.
#[derive(Clone)]
struct TuneCall {
    config: PrefillConfig,
    launch: Launch,
    applies: Vec<bool>,
    key: String,
}

impl TuneCall {
    /// Launches the call with `config`; a launch that fails runs the
    /// caller's config with the fixed rule instead (it planned before tuning
    /// began), so that a variant chosen for a key never fails a later call of
    /// the key.
    fn run(&self, config: &PrefillConfig) -> std::result::Result<(), String> {
        (self.launch)(config)
            .or_else(|_| {
                let mut rule = self.config;
                rule.tuning.fused_choice = FusedChoice::Rule;
                (self.launch)(&rule)
            })
            .map_err(|err| err.to_string())
    }
}

/// The tuned call of `work_for(config)`: where `config` leaves the
/// tensor-core walk's variant to the tuner and more than one applies, runs
/// the fastest (tuning first on a new key) through `launch` and returns it;
/// else `None`, having launched nothing.
pub(crate) fn launch_tuned(
    client: &Client,
    call: TunedCall,
    work_for: WorkFor,
    config: &PrefillConfig,
    with_state: bool,
    launch: Launch,
) -> Option<FusedVariant> {
    let (key, applies) = tuning_key(client, call, work_for, config, with_state)?;
    let call = TuneCall {
        // The tuner's runs check nothing: the caller checks the winner's.
        config: config.with_check_finite(false),
        launch,
        applies,
        key,
    };
    let id = device_key(client);
    let set = TUNER.init(&id, variant_set);
    TUNER.execute(&id, client, set.clone(), call.clone());
    TUNER.fastest_identity(&id, &set, &call.key)
}

/// The variant the tuner settled on for a validated call of
/// `work_for(config)` on `client`'s device (in this process, or read back
/// from the on-disk cache by an earlier call of the bucket); `None` before
/// the bucket's first call, or where nothing is tuned (see
/// [`crate::FusedChoice`]).
pub(crate) fn settled(
    client: &Client,
    call: TunedCall,
    work_for: WorkFor,
    config: &PrefillConfig,
    with_state: bool,
) -> Option<FusedVariant> {
    let (key, _) = tuning_key(client, call, work_for, config, with_state)?;
    let id = device_key(client);
    let set = TUNER.init(&id, variant_set);
    TUNER.fastest_identity(&id, &set, &key)
}

/// The call's key and the variants that apply, or `None` where fewer than
/// two apply (nothing to choose).
fn tuning_key(
    client: &Client,
    call: TunedCall,
    work_for: WorkFor,
    config: &PrefillConfig,
    with_state: bool,
) -> Option<(String, Vec<bool>)> {
    let work = work_for(config);
    let applies = applicable(work_for, config, &DeviceLimits::of(client));
    if applies.iter().filter(|&&a| a).count() < 2 {
        return None;
    }
    let bits: String = applies.iter().map(|&a| if a { '1' } else { '0' }).collect();
    let sequences = work.sequences.max(1);
    let tokens = work.blocks * config.block / sequences;
    let key = format!(
        "{call:?}-{:?}-d{}-e{}-tokens{}-sequences{}-h{}-block{}-tile{:?}-stages{:?}-split{:?}-{:?}-state{}-variants{bits}",
        work.dtype,
        work.key_dim,
        work.value_dim,
        tokens.next_power_of_two(),
        sequences.next_power_of_two(),
        work.heads.next_power_of_two(),
        config.block,
        config.tuning.fused_value_tile,
        config.tuning.fused_stages,
        config.tuning.fused_split,
        config.tuning.fused_products,
        with_state,
    );
    Some((key, applies))
}

/// Every candidate variant as a tunable: one that does not apply to the
/// call (its key's set) declines at once, the others run the prefill.
fn variant_set() -> TunableSet<String, TuneCall, (), FusedVariant> {
    let mut set = TunableSet::new_cloning_inputs(|call: &TuneCall| call.key.clone());
    for (index, variant) in FusedVariant::all().into_iter().enumerate() {
        set = set.with(Tunable::identified(variant, move |call: TuneCall| {
            if !call.applies[index] {
                return Err(format!("{variant} does not apply to {}", call.key));
            }
            call.run(&variant.apply(&call.config))
        }));
    }
    set
}
