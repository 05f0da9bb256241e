#!/usr/bin/env bash
# Self-test of the offline CUDA chain (NVRTC -> ptxas -> cuobjdump) on the
# hand-written kernels in selftest/: proves the tools run on this machine and
# that the report sees what it must (tensor cores, async copies, spills, compile
# errors), and that the occupancy rule reproduces what Nsight Compute read on
# the H100/H200. Usage: bash scripts/cuda-offline/selftest.sh  (no GPU needed)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh" >/dev/null
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
fail() { echo "SELFTEST FAILED: $*" >&2; exit 1; }

# 1. Without --allow-spills the spilling kernel must fail the run (exit 3).
set +e; python3 "$here/compile.py" "$here/selftest" --out "$tmp/a" > "$tmp/a.txt" 2>&1; rc=$?; set -e
cat "$tmp/a.txt"
[[ $rc == 3 ]] || fail "expected exit 3 (spill), got $rc"

# 2. With --allow-spills: exit 0, and the instruction mix shows each feature.
python3 "$here/compile.py" "$here/selftest" --out "$tmp/b" --allow-spills >/dev/null 2>&1 || fail "--allow-spills run failed"
python3 - "$tmp/b/report.json" <<'PY' || fail "report content"
import json, sys
rows = {r["kernel"]: r for r in json.load(open(sys.argv[1]))["rows"]}
checks = [("wmma_bf16 has HMMA", rows["wmma_bf16"]["HMMA"] > 0),
          ("cp_async has LDGSTS", rows["cp_async"]["LDGSTS"] > 0),
          ("cp_async has SYNCS (mbarrier)", rows["cp_async"]["SYNCS"] > 0),
          ("cp_async static smem (barrier) seen", rows["cp_async"]["static_shared_bytes"] > 0),
          ("spill_regs spills", rows["spill_regs"]["spill_stores"] > 0 and rows["spill_regs"]["STL"] > 0),
          ("no spills elsewhere", all(rows[k]["spill_stores"] == 0 for k in ("wmma_bf16", "cp_async")))]
for name, ok in checks:
    print(("ok   " if ok else "FAIL ") + name)
sys.exit(0 if all(ok for _, ok in checks) else 1)
PY

# 3. A source NVRTC rejects must fail the run (exit 1) and show the log.
mkdir "$tmp/bad"
printf 'extern "C" __global__ void __launch_bounds__(32) bad(float* x) { x[0] = undefined_name; }\n' > "$tmp/bad/bad.cu"
set +e; python3 "$here/compile.py" "$tmp/bad" --out "$tmp/c" > "$tmp/c.txt" 2>&1; rc=$?; set -e
[[ $rc == 1 ]] && grep -q undefined_name "$tmp/c.txt" || { cat "$tmp/c.txt"; fail "expected exit 1 with the NVRTC log, got $rc"; }
echo "ok   compile error -> exit 1"

# 4. --ptx-dir on the PTX of step 2 (as CUBECL_CUDA_DUMP_PTX would give it: no
#    sidecars, threads from .maxntid) must give the same registers: --compare.
python3 "$here/compile.py" --ptx-dir "$tmp/b/artifacts" --out "$tmp/d" --allow-spills \
  --compare "$tmp/b/report.json" > "$tmp/d.txt" 2>&1 || { cat "$tmp/d.txt"; fail "--ptx-dir run"; }
sed -n '/### compared/,$p' "$tmp/d.txt"
python3 - "$tmp/b/report.json" "$tmp/d/report.json" <<'PY' || fail "--ptx-dir registers differ"
import json, sys
a, b = ({r["entry"]: (r["registers"], r["threads"]) for r in json.load(open(p))["rows"]} for p in sys.argv[1:])
sys.exit(0 if a == b else 1)
PY
echo "ok   --ptx-dir gives the same registers and threads"

# 5. Occupancy rule against Nsight Compute's readings (SPEED_NOTES.md: kernel,
#    threads, registers, shared bytes -> cubes per SM it reported).
PYTHONDONTWRITEBYTECODE=1 python3 - "$here" <<'PY' || fail "occupancy rule"
import sys; sys.path.insert(0, sys.argv[1]); from compile import occupancy
cases = [("diag_cmma 174 regs, 78.9 KB", 128, 174, 80794, 2), ("kv_parallel_cmma 142", 256, 142, 0, 1),
         ("kv_parallel_cmma 128", 256, 128, 0, 2), ("chunk_state 172", 256, 172, 0, 1),
         ("diag_cmma 173", 128, 173, 0, 2), ("too much smem", 128, 32, 228 * 1024, 0),
         ("64 regs x 1024 threads", 1024, 64, 0, 1)]
bad = [(n, occupancy(t, r, s, 1)) for n, t, r, s, want in cases if occupancy(t, r, s, 1)[0] != want]
print("ok   occupancy rule matches Nsight Compute" if not bad else f"FAIL occupancy {bad}")
sys.exit(1 if bad else 0)
PY
echo "SELFTEST PASSED"
