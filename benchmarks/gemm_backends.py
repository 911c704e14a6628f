"""The linear layers of a decoding step through two libraries: Intel MKL (what torch's `F.linear`
runs on CPU) and oneDNN's `dnnl_sgemm` as `translator.gemm.linear` calls it (bias copy and
ctypes call included; what CTranslate2 multiplies with on non-Intel CPUs). Same shapes as the
CPU preset's layers (d_model 256, d_ff 512, fused 768-wide self-attention projection) at the
row counts decoding sees (1: batch-1 greedy; 320: beam 5 over 64 sentences). Median
microseconds per product, on an idle machine:

    python benchmarks/gemm_backends.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script

from translator import gemm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,64,320")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not gemm.enabled():
        raise SystemExit("oneDNN is not available here (translator.gemm): pip install onednn-cpu-gomp")
    gemm.MIN_ROWS = 1  # every row count through oneDNN, to compare
    print(f"{'rows':>5} {'in':>4} {'out':>5} {'MKL us':>8} {'oneDNN us':>10} {'MKL / oneDNN':>13}")
    for rows in map(int, args.rows.split(",")):
        for k, n in ((256, 256), (256, 512), (256, 768), (512, 256)):
            x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            with torch.inference_mode():
                torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), atol=1e-3, rtol=1e-4)
                mkl = median_us(lambda x=x, w=w, b=b: F.linear(x, w, b), 200)
                dnnl = median_us(lambda x=x, w=w, b=b: gemm.linear(x, w, b), 200)
            print(f"{rows:>5} {k:>4} {n:>5} {mkl:>8.1f} {dnnl:>10.1f} {mkl / dnnl:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
