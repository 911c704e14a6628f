"""The linear layers of a decoding step through Intel MKL (what torch's `F.linear` runs on CPU),
oneDNN's `dnnl_sgemm` (what CTranslate2 multiplies with on non-Intel CPUs) and our kernel over
weights packed once (`translator.native.kernels.panel_linear`): the last two called directly through ctypes, the
product alone (no bias), as the native decoding step calls them; and our layer from Python
(`translator.native.modules.PackedLinear` at inference: packed weights, bias, the module call). Same shapes as the CPU preset's layers
(d_model 256, d_ff 512, fused 512-wide key/value projection) at the row counts decoding sees
(1: batch-1 greedy; 320: beam 5 over 64 sentences). Median microseconds per product, on an idle
machine:

    python benchmarks/gemm_backends.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script

from translator.native import loader, onednn
from translator.native.modules import PackedLinear


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,64,320")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sgemm = onednn.sgemm()
    if sgemm is None:
        raise SystemExit("oneDNN is not available here (translator.native.onednn): pip install onednn-cpu-gomp")
    if loader.library() is None:
        raise SystemExit("the native kernels are not built here (translator.native.loader): is a C compiler installed?")
    lib = loader.library()
    print(f"{'rows':>5} {'in':>4} {'out':>5} {'MKL us':>8} {'oneDNN us':>10} {'packed us':>10} "
          f"{'oneDNN / packed':>16} {'layer us':>9}")
    for rows in map(int, args.rows.split(",")):
        for k, n in ((256, 256), (256, 512), (512, 256)):
            layer = PackedLinear(k, n)
            x, w, b = torch.randn(rows, k), layer.weight.detach(), layer.bias.detach()
            out = torch.empty(rows, n)

            def dnnl_call(x=x, w=w, out=out, rows=rows, k=k, n=n) -> None:
                sgemm(b"N", b"T", rows, n, k, 1.0, x.data_ptr(), k, w.data_ptr(), k, 0.0, out.data_ptr(), n)

            panels = layer.panels()

            def packed(x=x, panels=panels, out=out, rows=rows, k=k, n=n) -> None:
                lib.panel_linear(x.data_ptr(), panels.data_ptr(), None, out.data_ptr(), rows, n, k, 0, args.threads)

            with torch.inference_mode():
                torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-3, rtol=1e-4)
                mkl = median_us(lambda x=x, w=w, b=b: F.linear(x, w, b), 200)
                dnnl = median_us(dnnl_call, 200)
                pk = median_us(packed, 200)
                module = median_us(lambda x=x, layer=layer: layer(x), 200)
            print(f"{rows:>5} {k:>4} {n:>5} {mkl:>8.1f} {dnnl:>10.1f} {pk:>10.1f} {dnnl / pk:>16.2f} {module:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
