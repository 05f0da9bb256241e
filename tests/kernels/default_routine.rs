//! What `Routines::Auto` plans, from limits alone (no device): the fused
//! routine's tensor-core walk on CUDA-like limits for 16-bit inputs at the
//! dims it was measured faster at (issue 32), and the routines it took
//! before everywhere else: f32 inputs, other dims, calls with snapshots,
//! products the config fixes, devices without register fragments.

use lightning_attention::plan::{DeviceLimits, PrefillPlan, PrefillWork, TensorCores};
use lightning_attention::{DType, FusedProducts, PrefillConfig, Routines};

use crate::common::cuda_like_limits;

/// One sequence of 16384 tokens over 64 heads in `config`'s blocks.
fn work(dtype: DType, key_dim: usize, value_dim: usize, config: &PrefillConfig) -> PrefillWork {
    let n: usize = 16384;
    PrefillWork {
        dtype,
        heads: 64,
        key_dim,
        value_dim,
        sub_blocks: n.div_ceil(config.sub_block),
        blocks: n.div_ceil(config.block),
        sequences: 1,
        snapshots: 0,
    }
}

/// Whether the plan runs the fused routine's tensor-core walk natively.
fn native_walk(plan: &PrefillPlan) -> bool {
    plan.fused
        .and_then(|fused| fused.fragments)
        .is_some_and(|walk| !walk.emulated)
}

fn plan(work: &PrefillWork, config: &PrefillConfig, limits: &DeviceLimits) -> PrefillPlan {
    PrefillPlan::new(work, config, limits).unwrap_or_else(|err| panic!("{work:?} {config:?}: {err}"))
}

#[test]
fn auto_takes_the_fused_walk_for_16_bit_inputs_on_cuda() {
    let limits = cuda_like_limits();
    for dtype in [DType::BF16, DType::F16] {
        for (d, e) in [(128, 128), (64, 64), (128, 64), (64, 128)] {
            for config in [
                PrefillConfig::default(),
                PrefillConfig::new(64, 64),
                PrefillConfig::new(64, 32),
            ] {
                let planned = plan(&work(dtype, d, e, &config), &config, &limits);
                assert!(
                    native_walk(&planned),
                    "{dtype:?} d{d} e{e} {config:?}: {planned:?}"
                );
                assert!(planned.chunk_state.is_none(), "the walk replaces the state pass");
                assert_eq!(planned.block_states_len, 0, "no per-block workspace");
            }
        }
    }
}

#[test]
fn auto_keeps_the_other_routines_where_the_walk_was_not_measured_faster() {
    let cuda = cuda_like_limits();
    let config = PrefillConfig::new(64, 64);
    let bf16 = work(DType::BF16, 128, 128, &config);
    // f32 inputs: the walk has no f32 products; the chunk-recurrent routine.
    let f32_plan = plan(&work(DType::F32, 128, 128, &config), &config, &cuda);
    assert!(
        f32_plan.fused.is_none() && f32_plan.chunk_state.is_some(),
        "{f32_plan:?}"
    );
    // Dims the walk was not measured at.
    for (d, e) in [(96, 96), (32, 32), (128, 96)] {
        let planned = plan(&work(DType::BF16, d, e, &config), &config, &cuda);
        assert!(planned.fused.is_none(), "d{d} e{e}: {planned:?}");
    }
    // A call with snapshots.
    let with_snapshots = PrefillWork { snapshots: 3, ..bf16 };
    assert!(plan(&with_snapshots, &config, &cuda).fused.is_none());
    // Products the config fixes: those are asked of `Routines::Fused`.
    for products in [FusedProducts::Portable, FusedProducts::Emulated] {
        let mut fixed = config;
        fixed.tuning.fused_products = products;
        assert!(plan(&bf16, &fixed, &cuda).fused.is_none(), "{products:?}");
    }
    // Chunks the walk does not take (128 tokens).
    let wide = PrefillConfig::new(128, 128);
    assert!(
        plan(&work(DType::BF16, 128, 128, &wide), &wide, &cuda)
            .fused
            .is_none()
    );
    // A device without register fragments (wgpu, lavapipe).
    let no_fragments = DeviceLimits {
        fragments: TensorCores::default(),
        ..cuda
    };
    assert!(plan(&bf16, &config, &no_fragments).fused.is_none());
    // Routines the caller names stay named.
    for routines in [Routines::ChunkRecurrent, Routines::Portable] {
        let named = plan(&bf16, &config.with_routines(routines), &cuda);
        assert!(named.fused.is_none(), "{routines:?}");
    }
    assert!(native_walk(&plan(
        &bf16,
        &config.with_routines(Routines::Fused),
        &cuda
    )));
}
