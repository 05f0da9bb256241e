#!/usr/bin/env python3
"""Compile CUDA kernels offline (no GPU) and report their resources (issue 27).

Input: a directory of <name>.cu (the CUDA source cubecl-cpp generates) with a
<name>.json sidecar {"kernel", "variant", "threads", "dynamic_shared_bytes"}.
Each source goes through NVRTC exactly as cubecl-cuda 0.11.3 compiles it
(compute/context.rs compile_to_ptx), then `ptxas -v` (registers, spills,
static shared, stack) and `cuobjdump -sass` (instruction mix). With --ptx-dir,
the input is PTX (what CUBECL_CUDA_DUMP_PTX wrote on a GPU) and NVRTC is skipped.

Writes report.csv, report.json and artifacts/<name>.{ptx,cubin,sass,log} under
--out; prints a markdown table. Exit 1 on a compile error, 3 on a spill (unless
--allow-spills; 2 is argparse's usage error). Stdlib only; tools come from setup.sh's venv.
"""
import argparse, concurrent.futures, ctypes, csv, glob, hashlib, json, os, re, subprocess, sys

ARCH = "sm_90a"  # cubecl-cuda uses sm_XXa for arch >= 90 (wgmma/setmaxnreg-capable PTX)
SASS_OPS = ["HMMA", "LDSM", "STSM", "LDGSTS", "UTMALDG", "UTMASTG", "BAR", "SYNCS",
            "LDL", "STL", "LDG", "STG", "LDS", "STS", "LD", "ST", "MOVM"]

# sm_90 (H100/H200) limits, as cuda_occupancy.h (shipped in the runtime wheel) uses them.
SM90 = dict(regs_per_sm=65536, reg_unit=256, sub_partitions=4, max_regs_per_thread=255,
            smem_per_sm=228 * 1024, smem_per_cube_max=227 * 1024, smem_reserved=1024,
            smem_unit=128, max_threads=2048, max_warps=64, max_cubes=32, barriers_per_sm=64)


def cuda_root(arg):
    """site-packages/nvidia/cu13 of setup.sh's venv (or --cuda-root / $CUDA_OFFLINE_ROOT)."""
    if arg or os.environ.get("CUDA_OFFLINE_ROOT"):
        return os.path.abspath(arg or os.environ["CUDA_OFFLINE_ROOT"])
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    venv = os.environ.get("CUDA_OFFLINE_VENV", os.path.join(repo, ".cuda-offline-venv"))
    hits = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "nvidia", "cu13")))
    if not hits:
        sys.exit(f"compile.py: no CUDA wheels under {venv}: run scripts/cuda-offline/setup.sh")
    return hits[-1]


def ensure_ld_path(lib):
    """libnvrtc dlopens libnvrtc-builtins.so.13.0 by bare name and the wheel sets no
    RPATH, so its dir must be on LD_LIBRARY_PATH *before* the process starts (the
    loader reads it once): re-exec ourselves with it set."""
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    if lib in paths:
        return
    if os.environ.get("CUDA_OFFLINE_REEXEC"):
        sys.exit("compile.py: LD_LIBRARY_PATH re-exec loop")
    env = dict(os.environ, LD_LIBRARY_PATH=":".join([lib] + [p for p in paths if p]),
               CUDA_OFFLINE_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


class Nvrtc:
    def __init__(self, lib):
        self.so = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
        self.so.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.so.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"{major.value}.{minor.value}"

    def compile(self, source, options):
        """Returns (ptx or None, log). Same calls cudarc makes for cubecl-cuda:
        create (no name, no headers), compile with options, log, PTX."""
        so, prog = self.so, ctypes.c_void_p()
        rc = so.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), None, 0, None, None)
        if rc:
            return None, "nvrtcCreateProgram: " + so.nvrtcGetErrorString(rc).decode()
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = so.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        so.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        so.nvrtcGetProgramLog(prog, buf)
        log, ptx = buf.value.decode(errors="replace"), None
        if rc:
            log = f"{so.nvrtcGetErrorString(rc).decode()}\n{log}"
        else:
            so.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            so.nvrtcGetPTX(prog, buf)
            ptx = buf.value.decode()
        so.nvrtcDestroyProgram(ctypes.byref(prog))
        return ptx, log


def parse_ptxas(text):
    """`ptxas -v` info per entry: registers, barriers, spills, stack, static smem."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:  # also printed for non-inlined device functions: only keep entries
            cur = out.get(m.group(1))
            continue
        if cur is None:
            continue
        for key, pat in (("stack_bytes", r"(\d+) bytes stack frame"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"), ("registers", r"Used (\d+) registers"),
                         ("barriers", r"used (\d+) barriers"), ("static_shared_bytes", r"(\d+) bytes smem")):
            m = re.search(pat, line)
            if m:
                cur[key] = int(m.group(1))
    for v in out.values():
        for k in ("stack_bytes", "spill_stores", "spill_loads", "registers", "barriers", "static_shared_bytes"):
            v.setdefault(k, 0)  # ptxas omits "used N barriers" / "smem" when zero
    return out


def parse_sass(text):
    """Instruction mix per function from `cuobjdump -sass`: opcode = first token after
    an optional predicate (@P0 / @!PT / @UP1), bucketed by its base (HMMA.16816.F32 -> HMMA)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), dict.fromkeys(SASS_OPS + ["total"], 0))
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur is not None:
            base = m.group(1).split(".")[0]
            cur["total"] += 1
            if base in cur:
                cur[base] += 1
    return out


def occupancy(threads, regs, smem_bytes, barriers, L=SM90):
    """Resident cubes per SM on sm_90, as cuda_occupancy.h computes it (default carveout):
    registers go to warps in units of 256 (regs rounded up to 8), per sub-partition
    (4 x 16384); shared memory = static + dynamic + 1 KB reserved, rounded to 128 B,
    at most 227 KB + 1 KB per cube, 228 KB per SM. Returns (cubes, limiter)."""
    warps = -(-threads // 32)
    reg_warp = -(-regs * 32 // L["reg_unit"]) * L["reg_unit"]
    limits = {"cubes": L["max_cubes"], "warps": L["max_warps"] // warps}
    if regs > L["max_regs_per_thread"] or reg_warp * -(-warps // 4) * 4 > L["regs_per_sm"]:
        limits["regs"] = 0
    elif reg_warp:
        per_part = (L["regs_per_sm"] // L["sub_partitions"]) // reg_warp
        limits["regs"] = per_part * L["sub_partitions"] // warps
    if smem_bytes is not None:
        cube = -(-(smem_bytes + L["smem_reserved"]) // L["smem_unit"]) * L["smem_unit"]
        fits = cube <= L["smem_per_cube_max"] + L["smem_reserved"]
        limits["smem"] = L["smem_per_sm"] // cube if fits else 0
    if barriers:
        limits["barriers"] = L["barriers_per_sm"] // barriers
    cubes = min(limits.values())
    limiter = "/".join(k for k, v in limits.items() if v == cubes)
    if smem_bytes is None:
        limiter += " (smem unknown)"
    return cubes, limiter


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def analyze(name, ptx, meta, tools, art):
    """ptxas + cuobjdump on one PTX text; one row per entry function in it."""
    base = os.path.join(art, name)
    with open(base + ".ptx", "w") as f:
        f.write(ptx)
    rc, info = run([tools["ptxas"], f"-arch={ARCH}", "-v", base + ".ptx", "-o", base + ".cubin"])
    with open(base + ".ptxas.log", "w") as f:
        f.write(info)
    if rc:
        return None, f"ptxas failed:\n{info}"
    rc, sass = run([tools["cuobjdump"], "-sass", base + ".cubin"])
    with open(base + ".sass", "w") as f:
        f.write(sass)
    if rc:
        return None, f"cuobjdump failed:\n{sass}"
    res, mix = parse_ptxas(info), parse_sass(sass)
    # __launch_bounds__(n) becomes `.maxntid n, 1, 1` between the entry's params and its body.
    maxntid = {}
    for m in re.finditer(r"\.entry\s+([\w$]+)\s*\(([^)]*)\)([^{]*)\{", ptx):
        ntid = re.search(r"\.maxntid\s+([\d, ]+)", m.group(3))
        if ntid:
            maxntid[m.group(1)] = ntid.group(1)
    rows = []
    for entry, r in res.items():
        ntid = maxntid.get(entry)
        ptx_threads = eval_product(ntid) if ntid else None
        threads = meta.get("threads") or ptx_threads  # None: no sidecar, no __launch_bounds__
        dyn = meta.get("dynamic_shared_bytes")
        smem = None if dyn is None else r["static_shared_bytes"] + dyn
        cubes, limiter = (occupancy(threads, r["registers"], smem, r["barriers"]) if threads
                          else (None, "threads unknown"))
        row = {"kernel": meta.get("kernel", entry), "variant": meta.get("variant", name), "entry": entry,
               "threads": threads, "registers": r["registers"], "spill_stores": r["spill_stores"],
               "spill_loads": r["spill_loads"], "stack_bytes": r["stack_bytes"],
               "static_shared_bytes": r["static_shared_bytes"], "dynamic_shared_bytes": dyn,
               "barriers": r["barriers"], "cubes_per_sm": cubes, "limiter": limiter,
               "warps_per_sm": cubes * -(-threads // 32) if threads else None}
        row.update(mix.get(entry, {}))
        row["source"] = name
        row["ptx_sha256"] = hashlib.sha256(ptx.encode()).hexdigest()[:16]
        if ptx_threads and meta.get("threads") and ptx_threads != meta["threads"]:
            row["note"] = f"sidecar threads {meta['threads']} != PTX .maxntid {ptx_threads}"
        rows.append(row)
    return rows, None


def eval_product(ntid):
    n = 1
    for x in ntid.split(","):
        n *= int(x.strip() or 1)
    return n


COLS = [("kernel", "kernel"), ("variant", "variant"), ("threads", "thr"), ("registers", "regs"),
        ("spill_stores", "spill st"), ("spill_loads", "spill ld"), ("stack_bytes", "stack"),
        ("static_shared_bytes", "smem st"), ("dynamic_shared_bytes", "smem dyn"),
        ("cubes_per_sm", "cubes/SM"), ("limiter", "limit")] + [(o, o) for o in SASS_OPS]


def table(rows):
    cell = lambda v: "?" if v is None else str(v)
    lines = ["| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in COLS) + " |" for r in rows]
    return "\n".join(lines)


def compare(rows, other_path):
    """Match rows against another report.json (e.g. offline vs --ptx-dir of the GPU's
    PTX) by PTX hash, else by (entry, threads) when that is unique; print deltas."""
    other = json.load(open(other_path))["rows"]
    by_hash = {o["ptx_sha256"]: o for o in other}
    by_key = {}
    for o in other:
        by_key.setdefault((o["entry"], o["threads"]), []).append(o)
    print(f"\n### compared with {other_path}\n\n| kernel | variant | regs | other regs | spills | other spills | match |\n|---|---|---|---|---|---|---|")
    for r in rows:
        o, how = by_hash.get(r["ptx_sha256"]), "same PTX"
        if o is None:
            cands = by_key.get((r["entry"], r["threads"]), [])
            o, how = (cands[0], "entry+threads") if len(cands) == 1 else (None, f"{len(cands)} candidates")
        fmt = lambda x: "-" if x is None else x
        print(f"| {r['kernel']} | {r['variant']} | {r['registers']} | {fmt(o and o['registers'])} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {fmt(o and '%d/%d' % (o['spill_stores'], o['spill_loads']))} | {how} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("cu_dir", nargs="?", help="directory of <name>.cu + <name>.json")
    src.add_argument("--ptx-dir", help="directory of .ptx (CUBECL_CUDA_DUMP_PTX); skips NVRTC")
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    ap.add_argument("--out", default=os.path.join(repo, "target", "cuda-offline-report"),
                    help="output dir (default: <repo>/target/cuda-offline-report, git-ignored)")
    ap.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    ap.add_argument("--allowed-spills", metavar="JSON",
                    help="reviewed spills that do not fail: a list of {kernel, call, max_bytes, why}; "
                         "a listed variant fails once it spills more than max_bytes")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="files compiled at once (default: CPUs)")
    ap.add_argument("--cuda-root", help="dir with bin/ lib/ include/ (default: setup.sh's venv)")
    ap.add_argument("--compare", metavar="REPORT_JSON", help="print register deltas against another report.json")
    a = ap.parse_args()

    root = cuda_root(a.cuda_root)
    lib, inc = os.path.join(root, "lib"), os.path.join(root, "include")
    tools = {t: os.path.join(root, "bin", t) for t in ("ptxas", "cuobjdump", "nvdisasm")}
    for t, path in tools.items():  # cuobjdump -sass execs nvdisasm from its own dir
        if not os.access(path, os.X_OK):
            sys.exit(f"compile.py: {path} missing: run scripts/cuda-offline/setup.sh")
    nvrtc = None
    if not a.ptx_dir:
        ensure_ld_path(lib)
        nvrtc = Nvrtc(lib)
    # cubecl-cuda: arch, include, -lineinfo, then cccl include only if that dir exists.
    options = [f"--gpu-architecture={ARCH}", f"--include-path={inc}", "-lineinfo"]
    if os.path.isdir(os.path.join(inc, "cccl")):
        options.append(f"--include-path={os.path.join(inc, 'cccl')}")

    art = os.path.join(a.out, "artifacts")
    os.makedirs(art, exist_ok=True)
    inputs = sorted(glob.glob(os.path.join(a.ptx_dir or a.cu_dir, "*.ptx" if a.ptx_dir else "*.cu")))
    if not inputs:
        sys.exit(f"compile.py: no input files in {a.ptx_dir or a.cu_dir}")
    def one(path):
        """NVRTC (unless PTX input), ptxas and cuobjdump on one file: (rows, error, note)."""
        name = os.path.splitext(os.path.basename(path))[0]
        for old in glob.glob(os.path.join(art, name + ".*")):
            os.remove(old)  # stale artifacts of a previous run would mislead
        side = os.path.splitext(path)[0] + ".json"
        meta = json.load(open(side)) if os.path.exists(side) else {}
        text, note = open(path).read(), None
        if nvrtc:
            ptx, log = nvrtc.compile(text, options)
            with open(os.path.join(art, name + ".nvrtc.log"), "w") as f:
                f.write(log)
            if ptx is None:
                return [], f"{name}: NVRTC failed:\n{log}", None
            if log.strip():  # warnings on success: the runtime drops them, keep them visible
                note = f"note: {name}: NVRTC warnings in {art}/{name}.nvrtc.log"
            text = ptx
        got, err = analyze(name, text, meta, tools, art)
        for row in got or []:
            row["calls"] = meta.get("calls", [])
        return got or [], err and f"{name}: {err}", note

    # NVRTC runs in-process (ctypes releases the GIL), ptxas and cuobjdump as
    # subprocesses: one file per thread.
    rows, errors = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for got, err, note in pool.map(one, inputs):
            rows.extend(got)
            if err:
                errors.append(err)
            if note:
                print(note, file=sys.stderr)

    print(table(rows))
    for r in rows:
        if "note" in r:
            print(f"note: {r['kernel']} {r['variant']}: {r['note']}")
    _, pv = run([tools["ptxas"], "--version"])
    tool_info = {"mode": "ptx" if a.ptx_dir else "nvrtc", "arch": ARCH,
                 "nvrtc": nvrtc and nvrtc.version, "nvrtc_options": None if a.ptx_dir else options,
                 "ptxas": next((l for l in pv.splitlines() if "release" in l), pv.strip())}
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"tools": tool_info, "limits_sm90": SM90, "rows": rows, "errors": errors}, f, indent=1)
    keys = [k for k, _ in COLS] + ["entry", "barriers", "warps_per_sm", "total", "source", "ptx_sha256", "note"]
    with open(os.path.join(a.out, "report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if a.compare:
        compare(rows, a.compare)
    print(f"\n{len(rows)} kernel(s); report in {a.out}/report.{{csv,json}}; tools: {tool_info['ptxas']}, NVRTC {tool_info['nvrtc'] or '- (PTX input)'}")

    allowed = json.load(open(a.allowed_spills)) if a.allowed_spills else []

    def reviewed(r):
        """The allowed-spills entry covering row r, if its spill is within the entry's bytes."""
        bytes_ = max(r["spill_stores"], r["spill_loads"])
        return next((e for e in allowed if e["kernel"] == r["kernel"] and e["call"] in r.get("calls", [])
                     and bytes_ <= e["max_bytes"]), None)

    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    failing = []
    for r in spilling:
        entry = reviewed(r)
        if not (entry or a.allow_spills):
            failing.append(r)
        level = "ERROR" if r in failing else "warning"
        why = f" (reviewed: {entry['why']})" if entry else ""
        print(f"{level}: {r['kernel']} ({r['variant']}) spills "
              f"{r['spill_stores']} B stores / {r['spill_loads']} B loads{why}", file=sys.stderr)
    if errors:
        sys.exit(1)
    if failing:
        sys.exit(3)


if __name__ == "__main__":
    main()
