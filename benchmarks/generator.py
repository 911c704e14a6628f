"""The output projection of a decoding step: logits for `rows` rows over the vocabulary, five ways.

`F.linear(x, W)` multiplies (rows, D) @ (D, V) with W stored (V, D); the transposed form
multiplies (V, D) @ (D, rows) and copies the result back to (rows, V); the third multiplies by a
(D, V) row-major copy of W, through MKL; the fourth by the same copy through oneDNN's sgemm
(`translator.native.onednn.matmul`); the fifth through torch's own oneDNN matmul primitive over W packed
in advance (`translator.native.onednn.packed_linear`). Log-softmax included. `translator.native.modules.NativeGenerator`
takes the fourth up to `onednn.PACKED_ROWS` rows and the fifth past them where oneDNN is installed;
through MKL, the third for one row and the second up to `FEW_ROWS`. Median microseconds per
call, on an idle machine:

    python benchmarks/generator.py --vocab 8000 --d-model 256 --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script

from translator.native import onednn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,16,32,64,128,256,288,320,384,448")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not onednn.enabled():
        raise SystemExit("oneDNN is not available here (translator.native.onednn): pip install onednn-cpu-gomp")
    weight = torch.randn(args.vocab, args.d_model)
    weight_dv = weight.t().contiguous()  # (D, V) row-major copy
    forms = {
        "linear": lambda x: F.linear(x, weight),
        "transposed": lambda x: (weight @ x.t()).t().contiguous(),
        "(D, V) MKL": lambda x: x @ weight_dv,
        "(D, V) oneDNN": lambda x: onednn.matmul(x, weight_dv),
    }
    packed = onednn.pack(weight)
    if packed is not None:
        forms["packed oneDNN"] = lambda x: onednn.packed_linear(x, packed)
    print(f"{'rows':>6} " + " ".join(f"{name + ' us':>16}" for name in forms) + f" {'linear / (D, V) oneDNN':>24}")
    for rows in map(int, args.rows.split(",")):
        x = torch.randn(rows, args.d_model)
        calls = max(10, 2000 // rows)
        with torch.inference_mode():
            for form in forms.values():
                torch.testing.assert_close(form(x), F.linear(x, weight), atol=1e-3, rtol=1e-4)
            us = [median_us(lambda x=x, form=form: form(x).log_softmax(-1), calls) for form in forms.values()]
        print(f"{rows:>6} " + " ".join(f"{u:>16.0f}" for u in us) + f" {us[0] / us[3]:>24.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
