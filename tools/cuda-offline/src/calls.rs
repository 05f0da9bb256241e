//! The calls whose kernels the offline compile builds: the benchmark's
//! prefill shapes under every block config, routine and precision a caller
//! can ask for, a spread of head dims, a mixed packed batch with snapshots,
//! decode steps and backward passes. Each call runs the library's own
//! validation and planning (`lightning_attention::offline`), so what gets
//! built is what the plans launch; calls a plan refuses are reported, not
//! built.

use lightning_attention::offline::{OfflineBuild, build_backward, build_decode, build_prefill, build_varlen};
use lightning_attention::plan::FusedVariant;
use lightning_attention::shapes::{DecodeShape, PrefillShape};
use lightning_attention::{
    DType, FusedChoice, Precision, PrefillConfig, Result, Routines, Snapshots, Tuning, VarlenBatch,
};

/// Records one call's kernels.
type Build = Box<dyn Fn(&OfflineBuild) -> Result<()>>;

/// One call to build, named for the report.
pub struct Call {
    /// What the report calls it.
    pub label: String,
    run: Build,
}

impl Call {
    fn new(label: String, run: impl Fn(&OfflineBuild) -> Result<()> + 'static) -> Self {
        Self {
            label,
            run: Box::new(run),
        }
    }

    /// Records the call's kernels in `build`.
    pub fn build(&self, build: &OfflineBuild) -> Result<()> {
        build.set_label(&self.label);
        (self.run)(build)
    }
}

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// The benchmark's prefill shapes `[b, h, n, d]` (d = e), benches/lightning.
const BENCH_SHAPES: [[usize; 4]; 6] = [
    [1, 64, 4096, 128],
    [1, 64, 16384, 128],
    [4, 64, 8192, 128],
    [1, 8, 65536, 128],
    [16, 8, 4096, 128],
    [1, 64, 16384, 64],
];

/// (BLOCK, CBLOCK): CUDA's default (`PrefillConfig::for_client`), the
/// configuration Nsight Compute read on the H200, vLLM's default.
const CONFIGS: [(usize, usize); 3] = [(64, 64), (128, 64), (256, 32)];

fn name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

fn routine_name(routines: Routines) -> &'static str {
    match routines {
        Routines::Auto => "auto",
        Routines::Portable => "portable",
        Routines::ChunkRecurrent => "chunk-recurrent",
        Routines::Fused => "fused",
    }
}

/// Every precision an f32 call may ask for; 16-bit inputs ignore it.
fn precisions(dtype: DType) -> Vec<Precision> {
    match dtype {
        DType::F32 => vec![Precision::Split, Precision::Rounded, Precision::Exact],
        _ => vec![Precision::Split],
    }
}

fn shape([batch, heads, seq_len, key_dim]: [usize; 4], value_dim: usize, dtype: DType) -> PrefillShape {
    PrefillShape {
        batch,
        heads,
        seq_len,
        key_dim,
        value_dim,
        dtype,
    }
}

/// Every call, in report order.
pub fn calls() -> Vec<Call> {
    let mut calls = Vec::new();
    // Prefill at the benchmark's shapes.
    for dims in BENCH_SHAPES {
        for dtype in DTYPES {
            for (block, sub_block) in CONFIGS {
                for routines in [
                    Routines::Auto,
                    Routines::Portable,
                    Routines::ChunkRecurrent,
                    Routines::Fused,
                ] {
                    for precision in precisions(dtype) {
                        let config = PrefillConfig::new(block, sub_block)
                            .with_routines(routines)
                            .with_precision(precision);
                        let shape = shape(dims, dims[3], dtype);
                        // As the bench calls it: no initial state.
                        calls.push(Call::new(
                            format!(
                                "prefill {} {dims:?} {block}/{sub_block} {} {precision:?}",
                                name(dtype),
                                routine_name(routines)
                            ),
                            move |build| build_prefill(build, &shape, false, &config),
                        ));
                        // And with one (the state pass and kv-reduce read it).
                        calls.push(Call::new(
                            format!(
                                "prefill {} {dims:?} {block}/{sub_block} {} {precision:?} with initial state",
                                name(dtype),
                                routine_name(routines)
                            ),
                            move |build| build_prefill(build, &shape, true, &config),
                        ));
                    }
                }
            }
        }
    }
    // A spread of head dims (d, e), CUDA's default block config.
    for (d, e) in [
        (32, 32),
        (64, 64),
        (96, 96),
        (128, 128),
        (256, 256),
        (128, 64),
        (64, 128),
    ] {
        for dtype in DTYPES {
            for routines in [Routines::Auto, Routines::Portable, Routines::Fused] {
                let config = PrefillConfig::new(64, 64).with_routines(routines);
                let shape = shape([2, 16, 4096, d], e, dtype);
                calls.push(Call::new(
                    format!(
                        "prefill {} d{d} e{e} 64/64 {}",
                        name(dtype),
                        routine_name(routines)
                    ),
                    move |build| build_prefill(build, &shape, false, &config),
                ));
            }
        }
    }
    // The fused walk's ring (two sets of tiles, the next chunk copied in
    // asynchronously: `Tuning::fused_stages`), at the bench's shapes.
    for dims in BENCH_SHAPES {
        for dtype in [DType::BF16, DType::F16] {
            let config = PrefillConfig::new(64, 64)
                .with_routines(Routines::Fused)
                .with_tuning(Tuning {
                    fused_stages: Some(2),
                    ..Tuning::default()
                });
            let shape = shape(dims, dims[3], dtype);
            calls.push(Call::new(
                format!("prefill {} {dims:?} 64/64 fused ring", name(dtype)),
                move |build| build_prefill(build, &shape, false, &config),
            ));
        }
    }
    // Every variant the fused walk's autotuner may pick (`FusedVariant::all`,
    // `FusedChoice::Tuned`), bf16, at d = e = 128 and 64 (tiles past `e` are
    // never picked).
    for dims in [[4, 64, 8192, 128], [1, 64, 16384, 64]] {
        for variant in FusedVariant::all()
            .into_iter()
            .filter(|v| v.value_tile <= dims[3])
        {
            let config = variant.apply(&PrefillConfig::new(64, 64).with_routines(Routines::Fused));
            let shape = shape(dims, dims[3], DType::BF16);
            calls.push(Call::new(
                format!("prefill bf16 {dims:?} fused tuned {variant}"),
                move |build| build_prefill(build, &shape, false, &config),
            ));
        }
    }
    // A mixed packed batch: prefills, two decodes (one-token sequences),
    // snapshots; and the same batch against a bf16 state cache (the f32
    // scratch's gather and scatter, the decode rows on the bf16 cache).
    for dtype in DTYPES {
        for (block, sub_block, cache_dtype) in [
            (64, 64, DType::F32),
            (256, 32, DType::F32),
            (256, 32, DType::BF16),
        ] {
            let config = PrefillConfig::new(block, sub_block);
            let cache = if cache_dtype == DType::BF16 {
                ", bf16 cache"
            } else {
                ""
            };
            calls.push(Call::new(
                format!(
                    "varlen {} h32 d128 e128 {block}/{sub_block} mixed + snapshots{cache}",
                    name(dtype)
                ),
                move |build| {
                    let cu_seqlens = [0, 300, 301, 1301, 1302, 1366];
                    let slots = [0, 1, 2, 3, 4];
                    let has_initial = [true, true, false, true, false];
                    let snapshot_slots = [5, 6, -1, -1, 7, 8, -1, -1, -1, -1];
                    let batch = VarlenBatch {
                        cu_seqlens: &cu_seqlens,
                        slots: &slots,
                        has_initial_state: &has_initial,
                        snapshots: Some(Snapshots {
                            count: 2,
                            slots: &snapshot_slots,
                        }),
                    };
                    build_varlen(build, [32, 128, 128], dtype, cache_dtype, 16, &batch, &config)
                },
            ));
        }
    }
    // Decode steps: the default rows in flight (16 on CUDA) and one row,
    // against an f32 cache and (the batch does not change the kernel) a bf16 one.
    for dtype in DTYPES {
        for (batch, dim, state_dtype) in [
            (16, 128, DType::F32),
            (128, 128, DType::F32),
            (128, 64, DType::F32),
            (128, 128, DType::BF16),
            (128, 64, DType::BF16),
        ] {
            for rows in [None, Some(1)] {
                let shape = DecodeShape {
                    batch,
                    heads: 64,
                    key_dim: dim,
                    value_dim: dim,
                    slots: 512,
                    dtype,
                    state_dtype,
                };
                let cache = if state_dtype == DType::BF16 {
                    ", bf16 cache"
                } else {
                    ""
                };
                calls.push(Call::new(
                    format!("decode {} b{batch} h64 d{dim} rows {rows:?}{cache}", name(dtype)),
                    move |build| build_decode(build, &shape, rows),
                ));
            }
        }
    }
    // Backward passes: with tensor cores (the forward kernels on other
    // operands) and portable (with the key and value gradient kernels).
    for dims in [[1, 64, 4096, 128], [2, 16, 1024, 64]] {
        for dtype in DTYPES {
            for (block, sub_block) in [(64, 64), (256, 32)] {
                for routines in [Routines::Auto, Routines::Portable] {
                    let config = PrefillConfig::new(block, sub_block).with_routines(routines);
                    let shape = shape(dims, dims[3], dtype);
                    calls.push(Call::new(
                        format!(
                            "backward {} {dims:?} {block}/{sub_block} {}",
                            name(dtype),
                            routine_name(routines)
                        ),
                        move |build| build_backward(build, &shape, true, &config),
                    ));
                }
            }
        }
    }
    // The fused backward (issue 31): dq on the fused forward walk, dk and dv
    // on the one reverse walk (`kernels::fused_key_value`) with the ring and
    // with one set, chunks of 64 and 32, and the separate walks; bf16 and
    // f16 at the bench's head dims.
    for dims in [[1, 64, 16384, 128], [1, 64, 16384, 64]] {
        for dtype in [DType::BF16, DType::F16] {
            for sub_block in [64, 32] {
                for (stages, separate) in [(None, false), (Some(1), false), (None, true)] {
                    let config = PrefillConfig::new(64, sub_block)
                        .with_routines(Routines::Fused)
                        .with_tuning(Tuning {
                            fused_stages: stages,
                            fused_separate_key_value: separate,
                            fused_choice: FusedChoice::Rule,
                            ..Tuning::default()
                        });
                    let shape = shape(dims, dims[3], dtype);
                    calls.push(Call::new(
                        format!(
                            "backward {} {dims:?} 64/{sub_block} fused stages {stages:?}{}",
                            name(dtype),
                            if separate { " separate" } else { "" }
                        ),
                        move |build| build_backward(build, &shape, true, &config),
                    ));
                }
            }
        }
    }
    // The register-fragment product the fused routine's tensor-core products
    // go through, on tensor cores (no plan launches it yet).
    for dtype in [DType::F16, DType::BF16] {
        calls.push(Call::new(
            format!("fragment product {} (mma.m16n8k16, real)", name(dtype)),
            move |build| {
                record_fragment_product(build, dtype);
                Ok(())
            },
        ));
    }
    calls
}

/// Records `kernels::fragments::fragment_product` with real products on
/// operands of `dtype`, as the tests launch it (two planes).
fn record_fragment_product(build: &OfflineBuild, dtype: DType) {
    use lightning_attention::cubecl::prelude::{CubeCount, CubeDim};
    use lightning_attention_kernels::fragments::{K, M, N, PLANE, fragment_product};
    const PLANES: usize = 2;
    let count = CubeCount::Static(1, 1, 1);
    let dim = CubeDim::new_1d((PLANES * PLANE) as u32);
    let [a, b] = [M * K, K * N].map(|len| build.buffer(PLANES * len, 2));
    let [c, out] = [0; 2].map(|_| build.buffer(PLANES * M * N, 4));
    macro_rules! record {
        ($e:ty) => {
            build.record(
                count.clone(),
                fragment_product::create_dummy_kernel::<$e>(
                    build.properties_shared(),
                    build.target_properties_shared(),
                    count,
                    dim,
                    a,
                    b,
                    c,
                    out,
                    PLANES,
                    false,
                ),
            )
        };
    }
    match dtype {
        DType::BF16 => record!(half::bf16),
        _ => record!(half::f16),
    }
}
