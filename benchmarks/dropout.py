"""Dropout on a training step's activations: torch's F.dropout against translator.model.dropout
(the same distribution, its mask drawn 16 bits an element from 64-bit draws), forward alone and
forward with backward, at the shapes of the CPU preset's batches (about 2,500 target tokens of
d_model 256, and d_ff 512 hidden units). Prints the median milliseconds of each per call and their
ratio. Run it on an otherwise idle machine.

    python benchmarks/dropout.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_us  # benchmarks/timing.py, beside this script

from translator.model import dropout

SHAPES = {"residual (2500, 256)": (2500, 256), "hidden (2500, 512)": (2500, 512)}


def ms_per_call(fn, x: torch.Tensor, backward: bool, calls: int, repeats: int) -> float:
    """Median over repeats of the mean milliseconds of fn(x) (and its backward) per call."""
    def once():
        y = fn(x)
        if backward:
            y.backward(torch.ones_like(y))
    return median_us(once, calls, repeats, warmup=3) / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--p", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        for backward in (False, True):
            x = torch.randn(*shape, requires_grad=backward)
            ref = ms_per_call(lambda t: F.dropout(t, args.p, True), x, backward, args.calls, args.repeats)
            ours = ms_per_call(lambda t: dropout(t, args.p, True), x, backward, args.calls, args.repeats)
            rows.append({"shape": name, "backward": backward, "torch_ms": ref, "ours_ms": ours, "ours_over_torch": ours / ref})
            print(f"{name:22s} {'forward+backward' if backward else 'forward':17s} F.dropout {ref:7.3f} ms  "
                  f"ours {ours:7.3f} ms  ours / F.dropout {ours / ref:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "p": args.p, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
