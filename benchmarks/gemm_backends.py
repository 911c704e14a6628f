"""The matrix products of a decoding step through two libraries: Intel MKL (what torch's
`F.linear` runs on CPU) and oneDNN's `dnnl_sgemm` (what CTranslate2 runs on non-Intel CPUs).
Same shapes as the CPU preset's layers (d_model 256, d_ff 512) and its 8,000-piece output
projection, at the row counts decoding sees. Median microseconds per product, on an idle
machine. oneDNN comes from the `onednn-cpu-gomp` wheel (not a project dependency):

    pip install onednn-cpu-gomp==2023.2.0
    python benchmarks/gemm_backends.py --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script


def load_sgemm(path: Path) -> Callable:
    if not path.exists():
        raise SystemExit(f"no oneDNN library at {path}: pip install onednn-cpu-gomp, or pass --libdnnl")
    sgemm = ctypes.CDLL(str(path)).dnnl_sgemm
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    sgemm.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    return sgemm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,64,320")
    p.add_argument("--libdnnl", type=Path, default=Path(sys.prefix) / "lib" / "libdnnl.so.3")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sgemm = load_sgemm(args.libdnnl)
    print(f"{'rows':>5} {'in':>4} {'out':>5} {'MKL us':>8} {'oneDNN us':>10} {'MKL / oneDNN':>13}")
    for rows in map(int, args.rows.split(",")):
        for k, n in ((256, 256), (256, 512), (512, 256), (256, 8000)):
            x, w, out = torch.randn(rows, k), torch.randn(n, k), torch.empty(rows, n)

            def onednn(x=x, w=w, out=out, rows=rows, k=k, n=n) -> None:  # out = x @ w.T, row-major
                sgemm(b"N", b"T", rows, n, k, 1.0, x.data_ptr(), k, w.data_ptr(), k, 0.0, out.data_ptr(), n)

            onednn()
            torch.testing.assert_close(out, x @ w.t(), atol=1e-3, rtol=1e-4)
            calls = 50 if n > 1000 else 200
            mkl = median_us(lambda x=x, w=w: F.linear(x, w), calls)
            dnnl = median_us(onednn, calls)
            print(f"{rows:>5} {k:>4} {n:>5} {mkl:>8.1f} {dnnl:>10.1f} {mkl / dnnl:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
