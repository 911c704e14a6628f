"""Mixed precision for training: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.

Weights and optimizer state stay fp32 in every mode; autocast runs matmuls in the low precision
and keeps losses and softmaxes in fp32. fp16's narrow exponent needs a GradScaler so that small
gradients do not underflow; bf16 has fp32's range and needs none.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from translator.config import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The autocast context and gradient scaler of one precision on one device.

    With fp32 the context does nothing and the scaler is disabled (it passes losses and
    optimizer steps through unchanged), so fp32 training is exactly plain training.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
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
