"""Mixed precision for training: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.

Weights and optimizer state stay fp32 in every mode; autocast runs matmuls in the low precision
and keeps losses and softmaxes in fp32. fp16's narrow exponent needs a GradScaler so that small
gradients do not underflow; bf16 has fp32's range and needs none.

`auto` decides by measurement, not by CPU flags: whether a bf16 matmul pays differs between CPUs
that report the same instructions (faster than fp32 on an AMD Zen 4, slower on an Intel Xeon
with AVX512-BF16 but no AMX, emulated where there is no bf16 at all). `probe` times the forward
and backward of linear layers of the run's shapes in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from translator.config import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 is chosen when its probe takes at most this fraction of fp32's time: the rest of a step
# (softmaxes, norms, the casts autocast adds) gains nothing, so a small matmul gain does not pay.
BF16_MARGIN = 0.9


class MixedPrecision:
    """The autocast context and gradient scaler of one precision on one device.

    With fp32 the context does nothing and the scaler is disabled (it passes losses and
    optimizer steps through unchanged), so fp32 training is exactly plain training.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision == "auto":
            raise ConfigError("train.precision=auto must be resolved (choose_precision) before training")
        if precision not in DTYPES:
            raise ConfigError(f"train.precision must be one of {tuple(DTYPES)}, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
        self.precision, self.device = precision, device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass(frozen=True)
class Probe:
    """Milliseconds of one forward and backward over the probe's shapes, the best of its repeats;
    bf16_ms is None where bf16 autocast failed (`error` says why)."""

    fp32_ms: float
    bf16_ms: float | None
    error: str = ""

    @property
    def bf16_pays(self) -> bool:
        return self.bf16_ms is not None and self.bf16_ms <= BF16_MARGIN * self.fp32_ms


def training_shapes(rows: int, d_model: int, d_ff: int, vocab: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of a step's main products: attention projections, feed-forward, output."""
    return [(rows, d_model, 3 * d_model), (rows, d_model, d_ff), (rows, d_ff, d_model), (rows, d_model, vocab)]


def probe(shapes: list[tuple[int, int, int]], device: torch.device, repeats: int = 3) -> Probe:
    """Time F.linear forward + backward over `shapes` in fp32 and under bf16 autocast."""
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG alone
    tensors = [
        (torch.randn(r, k, generator=gen, device=device, requires_grad=True),
         torch.randn(n, k, generator=gen, device=device, requires_grad=True))
        for r, k, n in shapes
    ]

    def once(dtype: torch.dtype | None) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first warms caches and kernels
            sync(device)
            t0 = time.perf_counter()
            for x, w in tensors:
                with nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
                    y = F.linear(x, w)
                y.float().sum().backward()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best * 1000

    fp32 = once(None)
    try:
        bf16 = once(torch.bfloat16)
    except RuntimeError as e:  # no bf16 kernels for this device
        return Probe(fp32, None, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return Probe(fp32, bf16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_precision(setting: str, device: torch.device, shapes: list[tuple[int, int, int]]) -> tuple[str, dict]:
    """The precision to train in, and what to record about the choice: `setting` itself unless
    it is `auto`, then bf16 where the probe finds it pays, else fp32."""
    if setting != "auto":
        return setting, {"precision": setting}
    result = probe(shapes, device)
    chosen = "bf16" if result.bf16_pays else "fp32"
    return chosen, {"precision": chosen, "precision_setting": "auto", **{f"probe_{k}": v for k, v in asdict(result).items()}}
