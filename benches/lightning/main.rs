//! Prefill and decode timed on every runtime of this build, side by side.
//!
//! Device-side timing (`client.profile`), warm-up, the median of many runs, on
//! random inputs (never zeros). Per target it measures the device's copy
//! bandwidth first, and reports each shape's time, tokens/s and the fraction of
//! the IO floor (bytes of q, k, v, out and the state once, over that bandwidth).
//! Writes `bench.csv`, `bench.json` and `bench.svg` to `--out` (default
//! `target/bench`).
//!
//! `cargo bench --bench lightning -- [--runtimes cuda,wgpu] [--quick] [--reps N] [--out DIR]`
//! (`LIGHTNING_ATTENTION_RUNTIME` is ignored here: `--runtimes` picks.)
//! `--precisions split,rounded,exact` times f32 inputs under each
//! [`Precision`]; `--accuracy` adds each prefill row's error against the f64
//! recurrence to its note; `--layer I/L` takes layer `I` of `L`'s slopes
//! (default 0/2; the last layer's decay is the weakest).

mod accuracy;
mod backend_decode;
mod chart;
mod decode_step;
mod finite;
mod mixed;
mod packed;
mod report;
mod speculative;

use std::time::Duration;

use lightning_attention::cubecl::future::block_on;
use lightning_attention::cubecl::prelude::*;
use lightning_attention::reference::random::uniform_f32;
use lightning_attention::{
    BackwardInputs, DType, DecodeInputs, DeviceTensor, FusedChoice, FusedProducts, Precision, PrefillConfig,
    PrefillInputs, Routines, SplitCache, StageTimes, Tuning, backward, decode_into, decode_split_into,
    prefill_into, profile_prefill_into, runtime, tuned_backward_variant, tuned_fused_variant,
};
use report::Row;

/// Options from the command line.
struct Options {
    runtimes: Vec<String>,
    quick: bool,
    /// Prefill (BLOCK, CBLOCK) pairs, `--configs 256/32,256/64`.
    configs: Vec<(usize, usize)>,
    /// Prefill routines, `--routines auto,portable,chunk,fused` (auto: tensor cores and
    /// the chunk-recurrent routine where the device has them; chunk: that routine everywhere).
    routines: Vec<Routines>,
    /// Which groups of rows run, `--only prefill,decode,training,mixed,packed,step,verify,finite`
    /// (default: all but `packed`, training on a packed batch of 8 documents,
    /// `step`, the whole decode step of many layers, `verify`, speculative
    /// decoding's verify step against plain steps, and `finite`, the opt-in
    /// finite check beside the prefill and decode it follows).
    only: Vec<String>,
    /// Input dtypes of the prefill, training and mixed rows, `--dtypes f32,bf16,f16`
    /// (default f32,bf16).
    dtypes: Vec<DType>,
    /// State-cache dtypes of the decode and step rows, `--cache-dtypes f32,bf16`
    /// (default both: a bf16 cache's row beside the f32 one).
    cache_dtypes: Vec<DType>,
    /// How f32 inputs are multiplied, `--precisions split,rounded,exact`
    /// (default split); 16-bit rows run once.
    precisions: Vec<Precision>,
    /// Measure each prefill row's error against the f64 recurrence.
    accuracy: bool,
    /// Slopes of layer `.0` of `.1`, `--layer I/L` (default 0/2).
    layer: (usize, usize),
    /// The `step` rows' layer counts, heads and batches, `--step-layers 70,4
    /// --step-heads 8,64 --step-batches 1,16,64,256` (the defaults), so that
    /// one device command can take one group of them.
    step_layers: Vec<usize>,
    step_heads: Vec<usize>,
    step_batches: Vec<usize>,
    /// Which of the six prefill shapes run, `--shapes 0,2,5` (indices into
    /// the list; default all), so that one device command can take a few.
    shapes: Option<Vec<usize>>,
    reps: usize,
    out: std::path::PathBuf,
    /// The measuring knobs every call takes, `--diag-value-tile N` (16 to
    /// 128), `--decode-rows-in-flight N` (1 to 32), `--fused-products
    /// auto|portable|emulated`, `--fused-value-tile N` (16 to 128) and
    /// `--fused-stages N` (1 or 2: the fused routine's walk, tile and ring),
    /// `--fused-choice tuned|rule` (the autotuner picks what the fused knobs
    /// leave open, or the plan's fixed rule does), `--fused-separate-key-value`
    /// (the fused backward's dk and dv as two walks); unset, the measured
    /// defaults (the
    /// library reads no environment variable for them).
    tuning: Tuning,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let default_runtimes = if cfg!(feature = "cuda") {
        "cuda,wgpu"
    } else {
        "wgpu"
    };
    Options {
        runtimes: value("--runtimes")
            .unwrap_or(default_runtimes.into())
            .split(',')
            .map(String::from)
            .collect(),
        quick: args.iter().any(|a| a == "--quick"),
        configs: value("--configs")
            .unwrap_or("256/32".into())
            .split(',')
            .map(|pair| {
                let (block, sub_block) = pair.split_once('/').expect("--configs takes BLOCK/CBLOCK pairs");
                (block.parse().expect("BLOCK"), sub_block.parse().expect("CBLOCK"))
            })
            .collect(),
        routines: value("--routines")
            .unwrap_or("auto".into())
            .split(',')
            .map(|r| match r {
                "auto" => Routines::Auto,
                "portable" => Routines::Portable,
                "chunk" => Routines::ChunkRecurrent,
                "fused" => Routines::Fused,
                other => panic!("--routines takes auto, portable, chunk and/or fused, not {other}"),
            })
            .collect(),
        only: value("--only")
            .unwrap_or("prefill,decode,training,mixed".into())
            .split(',')
            .map(String::from)
            .collect(),
        dtypes: value("--dtypes")
            .unwrap_or("f32,bf16".into())
            .split(',')
            .map(|dtype| match dtype {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                other => panic!("--dtypes takes f32, f16 and/or bf16, not {other}"),
            })
            .collect(),
        cache_dtypes: value("--cache-dtypes")
            .unwrap_or("f32,bf16".into())
            .split(',')
            .map(|dtype| match dtype {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                other => panic!("--cache-dtypes takes f32 and/or bf16, not {other}"),
            })
            .collect(),
        precisions: value("--precisions")
            .unwrap_or("split".into())
            .split(',')
            .map(|p| match p {
                "split" => Precision::Split,
                "rounded" => Precision::Rounded,
                "exact" => Precision::Exact,
                other => panic!("--precisions takes split, rounded and/or exact, not {other}"),
            })
            .collect(),
        accuracy: args.iter().any(|a| a == "--accuracy"),
        layer: value("--layer")
            .map(|pair| {
                let (layer, layers) = pair.split_once('/').expect("--layer takes I/L");
                (layer.parse().expect("layer"), layers.parse().expect("layers"))
            })
            .unwrap_or((0, 2)),
        step_layers: numbers(value("--step-layers"), "--step-layers", "70,4"),
        step_heads: numbers(value("--step-heads"), "--step-heads", "8,64"),
        step_batches: numbers(value("--step-batches"), "--step-batches", "1,16,64,256"),
        shapes: value("--shapes").map(|list| {
            list.split(',')
                .map(|i| i.parse().expect("--shapes takes indices 0 to 5"))
                .collect()
        }),
        reps: value("--reps")
            .map(|r| r.parse().expect("--reps takes a number"))
            .unwrap_or(20),
        out: value("--out").unwrap_or("target/bench".into()).into(),
        tuning: Tuning {
            diag_value_tile: value("--diag-value-tile")
                .map(|t| t.parse().expect("--diag-value-tile takes a number")),
            decode_rows_in_flight: value("--decode-rows-in-flight")
                .map(|r| r.parse().expect("--decode-rows-in-flight takes a number")),
            fused_products: match value("--fused-products").as_deref() {
                None | Some("auto") => FusedProducts::Auto,
                Some("portable") => FusedProducts::Portable,
                Some("emulated") => FusedProducts::Emulated,
                Some(other) => panic!("--fused-products takes auto, portable or emulated, not {other}"),
            },
            fused_value_tile: value("--fused-value-tile")
                .map(|t| t.parse().expect("--fused-value-tile takes a number")),
            fused_stages: value("--fused-stages").map(|t| t.parse().expect("--fused-stages takes 1 or 2")),
            fused_split: value("--fused-split").map(|t| t.parse().expect("--fused-split takes 1, 2 or 4")),
            fused_choice: match value("--fused-choice").as_deref() {
                None | Some("tuned") => FusedChoice::Tuned,
                Some("rule") => FusedChoice::Rule,
                Some(other) => panic!("--fused-choice takes tuned or rule, not {other}"),
            },
            fused_separate_key_value: args.iter().any(|a| a == "--fused-separate-key-value"),
        },
    }
}

/// A comma-separated list of numbers given for `name`, or `default`.
fn numbers(given: Option<String>, name: &str, default: &str) -> Vec<usize> {
    given
        .as_deref()
        .unwrap_or(default)
        .split(',')
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("{name} takes numbers, not {n}"))
        })
        .collect()
}

/// What a row's op says of its routines ("" for the default, Auto).
fn routines_label(routines: Routines) -> &'static str {
    match routines {
        Routines::Portable => " portable",
        Routines::ChunkRecurrent => " chunk",
        Routines::Fused => " fused",
        Routines::Auto => "",
    }
}

/// What a row's op says of its precision (f32 inputs only; "" otherwise).
fn precision_label(dtype: DType, precision: Precision) -> &'static str {
    match (dtype, precision) {
        (DType::F32, Precision::Split) => " split",
        (DType::F32, Precision::Rounded) => " rounded",
        (DType::F32, Precision::Exact) => " exact",
        _ => "",
    }
}

/// The configs of one shape and dtype: each (BLOCK, CBLOCK), routine and,
/// for f32, precision the options name.
fn configs(opts: &Options, dtype: DType) -> Vec<PrefillConfig> {
    let precisions = if dtype == DType::F32 {
        opts.precisions.clone()
    } else {
        vec![Precision::default()]
    };
    let mut configs = Vec::new();
    for &(block, sub_block) in &opts.configs {
        for &routines in &opts.routines {
            for &precision in &precisions {
                configs.push(
                    PrefillConfig::new(block, sub_block)
                        .with_routines(routines)
                        .with_precision(precision)
                        .with_tuning(opts.tuning),
                );
            }
        }
    }
    configs
}

/// Copies `input` to `output`, four floats per unit: the bandwidth yardstick.
#[cube(launch_unchecked)]
fn copy_kernel<N: Size>(input: &[Vector<f32, N>], output: &mut [Vector<f32, N>]) {
    let pos = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * CUBE_DIM as usize
        + UNIT_POS as usize;
    if pos < input.len() {
        output[pos] = input[pos];
    }
}

/// Median device time of `reps` runs of `work`, after warm-up.
fn median_time(client: &Client, reps: usize, work: impl Fn() + Send + Sync) -> Duration {
    for _ in 0..3 {
        work();
    }
    block_on(client.sync()).expect("warm-up ran");
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let ((), profile) = client
                .profile(&work, "lightning-bench")
                .expect("profiling is supported");
            block_on(profile.resolve())
                .expect("the window was measured")
                .duration()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// One unit per 4-wide vector of `floats` f32, 256 units a cube, cubes over
/// x then y: the grid of [`copy_kernel`] and of the step's yardstick, which
/// index by `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X`.
fn vector_grid(floats: usize) -> (CubeCount, CubeDim) {
    let units = 256usize;
    let cubes = (floats / 4).div_ceil(units);
    (
        CubeCount::Static(cubes.min(32768) as u32, cubes.div_ceil(32768) as u32, 1),
        CubeDim::new_1d(units as u32),
    )
}

/// Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written).
fn copy_bandwidth(client: &Client, reps: usize, quick: bool) -> f64 {
    let floats: usize = if quick { 1 << 22 } else { 1 << 28 };
    let data = uniform_f32(floats, 99);
    let input = client.create_from_slice(f32::as_bytes(&data));
    let output = client.empty(floats * 4);
    let (count, dim) = vector_grid(floats);
    let time = median_time(client, reps, || unsafe {
        copy_kernel::launch_unchecked(
            client,
            count.clone(),
            dim,
            4,
            BufferArg::from_raw_parts(input.clone(), floats),
            BufferArg::from_raw_parts(output.clone(), floats),
        )
    });
    2.0 * (floats * 4) as f64 / time.as_secs_f64()
}

fn upload(client: &Client, shape: &[usize], dtype: DType, seed: u64) -> DeviceTensor {
    let len = shape.iter().product();
    DeviceTensor::from_f32(client, &uniform_f32(len, seed), shape, dtype).expect("upload")
}

/// The slopes of the options' layer.
fn slope_values(heads: usize, opts: &Options) -> Vec<f32> {
    lightning_attention::slopes::layer_slopes(heads, opts.layer.0, opts.layer.1).expect("slopes")
}

fn slopes(client: &Client, heads: usize, opts: &Options) -> DeviceTensor {
    DeviceTensor::from_f32(client, &slope_values(heads, opts), &[heads], DType::F32).expect("upload")
}

fn bench_prefill(
    client: &Client,
    target: &str,
    shape: [usize; 4],
    dtype: DType,
    config: PrefillConfig,
    opts: &Options,
    bw: f64,
) -> Row {
    let [b, h, n, d] = shape;
    let e = d;
    let mut row = Row::new(target, "prefill", shape, dtype);
    row.op = if config == PrefillConfig::default().with_tuning(config.tuning) {
        "prefill".into()
    } else {
        format!("prefill {}/{}", config.block, config.sub_block)
    };
    row.op += routines_label(config.routines);
    row.op += precision_label(dtype, config.precision);
    row.op += words_label(client, dtype);
    if !dtype.is_supported(client) {
        row.note = "dtype unsupported by this runtime".into();
        return row;
    }
    let q = upload(client, &[b, h, n, d], dtype, 1);
    let k = upload(client, &[b, h, n, d], dtype, 2);
    let v = upload(client, &[b, h, n, e], dtype, 3);
    let s = slopes(client, h, opts);
    let out = DeviceTensor::empty(client, &[b, h, n, e], dtype);
    let state = DeviceTensor::empty(client, &[b, h, d, e], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
    };
    if let Err(err) = prefill_into(client, &inputs, &config, &out, &state) {
        row.note = err.to_string();
        return row;
    }
    // The first call above tuned the fused walk where it is tuned: say
    // which variant runs.
    if let Some(variant) = tuned_fused_variant(client, &inputs, &config).expect("validated above") {
        row.op += &format!(" [{variant}]");
    }
    let time = median_time(client, opts.reps, || {
        prefill_into(client, &inputs, &config, &out, &state).expect("validated above");
    });
    // Which kernel dominates: each stage timed alone, median over a few runs.
    let mut stages: Vec<StageTimes> = (0..opts.reps.min(7))
        .map(|_| profile_prefill_into(client, &inputs, &config, &out, &state).expect("validated above"))
        .collect();
    stages.sort_by_key(|s| s.total());
    row.stages = Some(stages[stages.len() / 2]);
    let bytes = (2 * b * h * n * d + 2 * b * h * n * e) * dtype.size() + b * h * d * e * 4;
    row.measured(time, b * n, bytes as f64, bw);
    if opts.accuracy {
        let scale = config.scale.unwrap_or(1.0);
        let (error, slices) =
            accuracy::prefill_error(client, shape, &q, &k, &v, &slope_values(h, opts), scale, &out);
        row.note = format!("rel err {error:.2e} vs f64 ({slices} of {} (b, h) slices)", b * h);
    }
    row
}

/// " (bf16 words)" where the runtime has no bf16 and takes it as words.
fn words_label(client: &Client, dtype: DType) -> &'static str {
    if dtype.is_supported(client) && !dtype.is_native(client) {
        " (bf16 words)"
    } else {
        ""
    }
}

/// Forward plus backward (the three gradient passes) of one prefill shape.
fn bench_training(
    client: &Client,
    target: &str,
    shape: [usize; 4],
    dtype: DType,
    config: PrefillConfig,
    opts: &Options,
    bw: f64,
) -> Row {
    let [b, h, n, d] = shape;
    let e = d;
    let mut row = Row::new(target, "fwd+bwd", shape, dtype);
    row.op = format!("fwd+bwd {}/{}", config.block, config.sub_block);
    row.op += routines_label(config.routines);
    row.op += precision_label(dtype, config.precision);
    row.op += words_label(client, dtype);
    if !dtype.is_supported(client) {
        row.note = "dtype unsupported by this runtime".into();
        return row;
    }
    let q = upload(client, &[b, h, n, d], dtype, 11);
    let k = upload(client, &[b, h, n, d], dtype, 12);
    let v = upload(client, &[b, h, n, e], dtype, 13);
    let d_out = upload(client, &[b, h, n, e], dtype, 14);
    let s = slopes(client, h, opts);
    let out = DeviceTensor::empty(client, &[b, h, n, e], dtype);
    let state = DeviceTensor::empty(client, &[b, h, d, e], DType::F32);
    let inputs = PrefillInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
    };
    let grads = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        slopes: &s,
        initial_state: None,
        d_out: &d_out,
        d_final_state: None,
    };
    if let Err(err) = backward(client, &grads, &config) {
        row.note = err.to_string();
        return row;
    }
    // The first calls tune the fused walks where they are tuned: say which
    // variants run, the forward's then the backward's.
    prefill_into(client, &inputs, &config, &out, &state).expect("validated above");
    let forward = tuned_fused_variant(client, &inputs, &config).expect("validated above");
    let backward_variant = tuned_backward_variant(client, &grads, &config).expect("validated above");
    if let (Some(forward), Some(backward)) = (forward, backward_variant) {
        row.op += &format!(" [{forward} / {backward}]");
    }
    let time = median_time(client, opts.reps, || {
        prefill_into(client, &inputs, &config, &out, &state).expect("validated above");
        backward(client, &grads, &config).expect("validated above");
    });
    // IO floor: the forward's q, k, v, out; the backward's q, k, v, d_out read
    // and dq, dk, dv written.
    let bytes = (2 * b * h * n * d + 2 * b * h * n * e) * dtype.size() * 3;
    row.measured(time, b * n, bytes as f64, bw);
    row
}

/// The op of a decode or step row against a cache of `state_dtype`.
fn cache_op(op: &str, state_dtype: DType) -> String {
    match state_dtype {
        DType::F32 => op.to_string(),
        other => format!("{op}, {other} cache"),
    }
}

fn bench_decode(
    client: &Client,
    target: &str,
    batch: usize,
    state_dtype: DType,
    opts: &Options,
    bw: f64,
) -> Row {
    let (h, d, e) = (64, 128, 128);
    let mut row = Row::new(target, "decode", [batch, h, 1, d], DType::F32);
    row.op = cache_op("decode", state_dtype);
    let q = upload(client, &[batch, h, 1, d], DType::F32, 4);
    let k = upload(client, &[batch, h, 1, d], DType::F32, 5);
    let v = upload(client, &[batch, h, 1, e], DType::F32, 6);
    let s = slopes(client, h, opts);
    // Small values keep the state bounded over the many timed steps. A cache
    // past the runtime's largest buffer (wgpu: about 2 GiB) is split in parts.
    let max_buffer = client.properties().memory.max_page_size;
    let part_slots = (max_buffer / (h * d * e * state_dtype.size()) as u64) as usize;
    let split = if batch > part_slots {
        let parts = (0..batch.div_ceil(part_slots))
            .map(|p| {
                upload(
                    client,
                    &[part_slots.min(batch - p * part_slots), h, d, e],
                    state_dtype,
                    7 + p as u64,
                )
            })
            .collect();
        row.note = format!("cache in {} buffers (SplitCache)", batch.div_ceil(part_slots));
        Some(SplitCache::from_parts(parts).expect("parts of one shape"))
    } else {
        None
    };
    // A split step reads no single cache: the slopes stand in for it.
    let cache = match split {
        Some(_) => s.clone(),
        None => upload(client, &[batch, h, d, e], state_dtype, 7),
    };
    let out = DeviceTensor::empty(client, &[batch, h, 1, e], DType::F32);
    let slots: Vec<i32> = (0..batch as i32).rev().collect();
    let inputs = DecodeInputs {
        q: &q,
        k: &k,
        v: &v,
        cache: &cache,
        slopes: &s,
        slots: &slots,
        scale: None,
        rows_in_flight: opts.tuning.decode_rows_in_flight,
    };
    let step = || match &split {
        Some(split) => decode_split_into(client, &inputs, split, &out),
        None => decode_into(client, &inputs, &out),
    };
    if let Err(err) = step() {
        row.note = err.to_string();
        return row;
    }
    let time = median_time(client, opts.reps, || step().expect("validated above"));
    let state_bytes = 2 * batch * h * d * e * state_dtype.size();
    let io = state_bytes + batch * h * (2 * d + 2 * e) * 4;
    row.measured(time, batch, io as f64, bw);
    row.state_tb_s = Some(state_bytes as f64 / time.as_secs_f64() / 1e12);
    row
}

fn main() {
    let opts = options();
    let prefill_shapes: Vec<[usize; 4]> = if opts.quick {
        vec![[1, 4, 512, 64], [2, 2, 1000, 128]]
    } else {
        vec![
            [1, 64, 4096, 128],
            [1, 64, 16384, 128],
            [4, 64, 8192, 128],
            [1, 8, 65536, 128],
            [16, 8, 4096, 128],
            [1, 64, 16384, 64],
        ]
    };
    let prefill_shapes: Vec<[usize; 4]> = match &opts.shapes {
        Some(picked) => picked
            .iter()
            .filter_map(|&i| prefill_shapes.get(i).copied())
            .collect(),
        None => prefill_shapes,
    };
    let decode_batches: Vec<usize> = if opts.quick {
        vec![1, 16]
    } else {
        vec![1, 16, 128, 512]
    };
    let mut rows = Vec::new();
    for name in &opts.runtimes {
        let device = match runtime::named_device(name) {
            Ok(device) => device,
            Err(err) => {
                eprintln!("skipping {name}: {err}");
                continue;
            }
        };
        let client = device.client();
        let target = format!("{name} ({})", client.name());
        eprintln!("== {target}: {}", runtime::describe(&client));
        let bw = copy_bandwidth(&client, opts.reps, opts.quick);
        eprintln!("copy bandwidth {:.3} TB/s", bw / 1e12);
        rows.push(Row::copy(&target, bw));
        let runs = |group: &str| opts.only.iter().any(|g| g == group);
        for &shape in prefill_shapes.iter().filter(|_| runs("prefill")) {
            for &dtype in &opts.dtypes {
                for config in configs(&opts, dtype) {
                    let row = bench_prefill(&client, &target, shape, dtype, config, &opts, bw);
                    eprintln!("{}", row.line());
                    rows.push(row);
                }
            }
        }
        for &batch in decode_batches.iter().filter(|_| runs("decode")) {
            for &state_dtype in &opts.cache_dtypes {
                let row = bench_decode(&client, &target, batch, state_dtype, &opts, bw);
                eprintln!("{}", row.line());
                rows.push(row);
                let row =
                    backend_decode::bench_backend_decode(&client, &target, batch, state_dtype, &opts, bw);
                eprintln!("{}", row.line());
                rows.push(row);
            }
        }
        // Forward+backward at every prefill shape, config and routine.
        for &shape in prefill_shapes.iter().filter(|_| runs("training")) {
            for &dtype in &opts.dtypes {
                for config in configs(&opts, dtype) {
                    let row = bench_training(&client, &target, shape, dtype, config, &opts, bw);
                    eprintln!("{}", row.line());
                    rows.push(row);
                }
            }
        }
        // A model's decode step: 70 layers (MiniMax-Text-01's lightning
        // layers) and a small one, one tensor-parallel rank's heads and all 64.
        let (step_layers, step_heads, step_batches): (&[usize], &[usize], &[usize]) = if opts.quick {
            (&[2], &[8], &[1, 16])
        } else {
            (&opts.step_layers, &opts.step_heads, &opts.step_batches)
        };
        for &layers in step_layers.iter().filter(|_| runs("step")) {
            for &heads in step_heads {
                for &batch in step_batches {
                    for &state_dtype in &opts.cache_dtypes {
                        let shape = (layers, heads, batch);
                        for row in
                            decode_step::bench_decode_step(&client, &target, shape, state_dtype, &opts, bw)
                        {
                            eprintln!("{}", row.line());
                            rows.push(row);
                        }
                    }
                }
            }
        }
        // Speculative decoding: 4 drafts for 64 sequences (4 and 2 with --quick).
        let (verify_batch, drafts) = if opts.quick { (4, 2) } else { (64, 4) };
        if runs("verify") {
            for row in speculative::bench_verify(&client, &target, verify_batch, drafts, &opts, bw) {
                eprintln!("{}", row.line());
                rows.push(row);
            }
        }
        // The finite check's cost, beside the calls it would follow.
        for &shape in prefill_shapes.iter().filter(|_| runs("finite")) {
            for &dtype in &opts.dtypes {
                for row in finite::bench_prefill_check(&client, &target, shape, dtype, &opts, bw) {
                    eprintln!("{}", row.line());
                    rows.push(row);
                }
            }
        }
        for &batch in decode_batches.iter().filter(|_| runs("finite")) {
            for row in finite::bench_decode_check(&client, &target, batch, &opts, bw) {
                eprintln!("{}", row.line());
                rows.push(row);
            }
        }
        for &dtype in opts.dtypes.iter().filter(|_| runs("packed")) {
            for row in packed::bench_packed(&client, &target, dtype, &opts, bw) {
                eprintln!("{}", row.line());
                rows.push(row);
            }
        }
        for &dtype in opts.dtypes.iter().filter(|_| runs("mixed")) {
            for row in mixed::bench_mixed(&client, &target, dtype, &opts, bw) {
                eprintln!("{}", row.line());
                rows.push(row);
            }
        }
    }
    report::write(&rows, &opts.out).expect("write the results");
    chart::write_svg(&rows, &opts.out.join("bench.svg")).expect("write the chart");
    println!("{}", report::table(&rows));
    println!("results: {}/bench.{{csv,json,svg}}", opts.out.display());
}
