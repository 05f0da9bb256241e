"""FLA's packed training call beside ours (issue 29's figure, run by
scripts/gpu-issue32.sh `fla-packed`): chunk_simple_gla with cu_seqlens,
forward and forward+backward, bf16, on the bench's packed batch (8 documents
of 100 to 8000 tokens back to back, h = 64, d = 128, the bench's slopes).
Prints one JSON line; --out writes it too. Needs torch, triton and fla-core."""

import argparse
import json
import math

import torch
import triton
from fla.ops.simple_gla import chunk_simple_gla

DOCUMENTS = [100, 250, 600, 1200, 2000, 3500, 5500, 8000]


def slopes(h):
    """MiniMax's (ALiBi's) per-head slopes, layer scale 1."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(h).is_integer():
        return pow2(h)
    c = 2 ** math.floor(math.log2(h))
    return pow2(c) + slopes(2 * c)[0::2][: h - c]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    h, d = 64, 128
    t = sum(DOCUMENTS)
    cu = torch.tensor([0] + list(torch.tensor(DOCUMENTS).cumsum(0)), device="cuda", dtype=torch.int64)
    s = torch.tensor(slopes(h), device="cuda", dtype=torch.float32)
    q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in range(3))
    do = torch.randn_like(v)

    def forward():
        chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0, cu_seqlens=cu)

    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def forward_backward():
        o, _ = chunk_simple_gla(qg, kg, vg, g_gamma=-s, scale=1.0, cu_seqlens=cu)
        o.backward(do)

    bench = lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
    res = {"documents": DOCUMENTS, "tokens": t, "h": h, "d": d,
           "fla_bf16_packed_fwd_ms": bench(forward), "fla_bf16_packed_fwd_bwd_ms": bench(forward_backward)}
    print("packed", json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
