"""The output projection of a decoding step: logits for `rows` rows over the vocabulary, three ways.

`F.linear(x, W)` multiplies (rows, D) @ (D, V) with W stored (V, D); the transposed form
multiplies (V, D) @ (D, rows) and copies the result back to (rows, V); the third multiplies by a
(D, V) row-major copy of W. Log-softmax included. MKL runs the second faster for a few rows and
the third for one row, which is how `translator.model.Generator` picks (up to `FEW_ROWS`).
Median microseconds per call, on an idle machine:

    python benchmarks/generator.py --vocab 8000 --d-model 256 --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,16,32,64,128,320")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocab, args.d_model)
    weight_dv = weight.t().contiguous()  # (D, V) row-major copy
    print(f"{'rows':>6} {'linear us':>10} {'transposed us':>14} {'(D, V) us':>11} {'x transposed':>12} "
          f"{'x (D, V)':>12}")
    for rows in map(int, args.rows.split(",")):
        x = torch.randn(rows, args.d_model)
        calls = max(10, 2000 // rows)
        with torch.inference_mode():
            linear = median_us(lambda x=x: F.linear(x, weight).log_softmax(-1), calls)
            transposed = median_us(lambda x=x: (weight @ x.t()).t().contiguous().log_softmax(-1), calls)
            columns = median_us(lambda x=x: (x @ weight_dv).log_softmax(-1), calls)
        print(f"{rows:>6} {linear:>10.0f} {transposed:>14.0f} {columns:>11.0f} {linear / transposed:>12.2f} "
              f"{linear / columns:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
