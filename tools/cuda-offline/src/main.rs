//! The offline CUDA build (issue 27): every CUDA kernel variant
//! lightning-attention's plans launch, built for an NVIDIA H200 (sm_90) as
//! cubecl-cuda would build it, without a GPU, LLVM or a CUDA install.
//!
//! Each call of [`calls::calls`] runs the library's own validation, planning
//! and launch code against an `OfflineBuild` standing in for the H200 (see
//! [`sm90`]), which records each launch's kernel with its exact
//! compile-time arguments, cube dim, dtypes and execution mode. Distinct
//! kernels go through cubecl's C++ compiler (`CppCompiler<Cuda>`, the
//! compiler cubecl-cuda's `cuda-cpp` backend runs before NVRTC), and each
//! source is written as `<name>.cu` with a `<name>.json` sidecar for
//! `scripts/cuda-offline/compile.py`, which compiles it with NVRTC and
//! ptxas and reports registers, spills, shared memory, cubes per SM and the
//! instruction mix.
//!
//! ```text
//! cargo run --release -p lightning-attention-cuda-offline -- [--out DIR]
//! ```
//! (default `target/cuda-offline-src`); `--only KERNEL` writes one kernel's
//! variants (`--only diag_cmma`). Exit status 1 where a kernel fails
//! to expand or compile.

mod calls;
mod sm90;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::process::ExitCode;

use cubecl::Compiler;
use cubecl::prelude::{CubeCount, KernelId};
use cubecl_cpp::shared::CppCompiler;
use cubecl_cpp::target::Cuda;
use lightning_attention::offline::{OfflineBuild, OfflineKernel};

/// One distinct kernel and the calls that launch it.
struct Distinct {
    kernel: OfflineKernel,
    id: KernelId,
    calls: Vec<String>,
}

fn main() -> ExitCode {
    let mut out = PathBuf::from("target/cuda-offline-src");
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out takes a directory")),
            "--only" => only = Some(args.next().expect("--only takes a kernel name")),
            other => {
                eprintln!("unknown argument {other}; usage: cuda-offline [--out DIR] [--only KERNEL]");
                return ExitCode::from(2);
            }
        }
    }
    let build = OfflineBuild::new("cuda", sm90::properties(), sm90::target_properties());
    let calls = calls::calls();
    let mut distinct: Vec<Distinct> = Vec::new();
    let mut index: HashMap<KernelId, usize> = HashMap::new();
    let mut refused = 0;
    for call in &calls {
        if let Err(err) = call.build(&build) {
            println!("refused by the plans: {}: {err}", call.label);
            refused += 1;
        }
        for kernel in build.take_kernels() {
            let id = kernel.id();
            match index.get(&id) {
                Some(&i) => distinct[i].calls.push(kernel.label.clone()),
                None => {
                    index.insert(id.clone(), distinct.len());
                    distinct.push(Distinct {
                        calls: vec![kernel.label.clone()],
                        kernel,
                        id,
                    });
                }
            }
        }
    }
    if let Err(err) = prepare(&out) {
        eprintln!("cannot prepare {}: {err}", out.display());
        return ExitCode::FAILURE;
    }
    let options = sm90::compilation_options();
    let mut failed = 0;
    distinct.retain(|kernel| {
        only.as_ref()
            .is_none_or(|only| kernel_name(&kernel.kernel) == *only)
    });
    for kernel in &distinct {
        if let Err(err) = write_kernel(&out, kernel, &options) {
            eprintln!(
                "FAILED {} ({}): {err}",
                kernel_name(&kernel.kernel),
                kernel.calls[0]
            );
            failed += 1;
        }
    }
    println!(
        "{} calls ({refused} refused by the plans), {} distinct kernels written to {}, {failed} failed",
        calls.len(),
        distinct.len(),
        out.display()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Creates `out`, removing the sources and sidecars of an earlier run.
fn prepare(out: &PathBuf) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "cu" || ext == "json") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// The kernel function's name: `diag_cmma` of
/// `lightning_attention_kernels::diag_cmma::diag_cmma::DiagCmma<..>`.
fn kernel_name(kernel: &OfflineKernel) -> String {
    let path = kernel.kernel.name();
    let path = path.split('<').next().unwrap_or(path);
    let segments: Vec<&str> = path.split("::").collect();
    segments
        .len()
        .checked_sub(2)
        .map_or(path, |i| segments[i])
        .to_string()
}

/// Compiles `kernel` to CUDA and writes `<kernel>-<hash>.cu` and its sidecar.
fn write_kernel(
    out: &std::path::Path,
    distinct: &Distinct,
    options: &cubecl_cpp::shared::CompilationOptions,
) -> Result<(), String> {
    let kernel = &distinct.kernel;
    let definition = kernel.definition().map_err(|err| format!("{err:?}"))?;
    let cube_dim = definition.settings.cube_dim;
    let threads = cube_dim.x * cube_dim.y * cube_dim.z;
    let compiled = CppCompiler::<Cuda>::default()
        .compile(definition, options)
        .map_err(|err| format!("{err:?}"))?;
    let name = kernel_name(kernel);
    let mut hasher = DefaultHasher::new();
    compiled.source.hash(&mut hasher);
    let stem = format!("{name}-{:08x}", hasher.finish() as u32);
    let variant = match distinct.calls.len() {
        1 => distinct.calls[0].clone(),
        n => format!("{} (+{} more)", distinct.calls[0], n - 1),
    };
    let cube_count = match &kernel.cube_count {
        CubeCount::Static(x, y, z) => format!("[{x}, {y}, {z}]"),
        _ => "null".into(),
    };
    let mut calls = String::new();
    for (i, call) in distinct.calls.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(calls, "{sep}{}", json_string(call));
    }
    let sidecar = format!(
        "{{\n  \"kernel\": {},\n  \"variant\": {},\n  \"stage\": {},\n  \"threads\": {threads},\n  \
         \"dynamic_shared_bytes\": {},\n  \"cube_count\": {cube_count},\n  \"mode\": {},\n  \
         \"id\": {},\n  \"calls\": [{calls}]\n}}\n",
        json_string(&name),
        json_string(&variant),
        json_string(kernel.stage),
        compiled.shared_memory_size,
        json_string(&format!("{:?}", kernel.mode)),
        json_string(&distinct.id.to_string()),
    );
    std::fs::write(out.join(format!("{stem}.cu")), &compiled.source).map_err(|e| e.to_string())?;
    std::fs::write(out.join(format!("{stem}.json")), sidecar).map_err(|e| e.to_string())?;
    Ok(())
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
