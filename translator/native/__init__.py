"""The native inference backend: C kernels and oneDNN products behind translator.model's modules.

`for_backend(model, backend)` is the one entry point: translator.translate.Translator calls it
when it is built, `backend="native"` (the default, where the kernels load) or `"torch"`. Nothing
else in the package reaches the native code.

- loader: builds csrc/kernels.c for this CPU, loads it, and checks it (ABI, self-test);
- kernels: the ctypes calls, each falling back (None) where it does not apply;
- onednn: the output projection's products through oneDNN, where installed;
- modules: the modules' native forms and `apply` / `remove`.
"""

from __future__ import annotations

import copy
import itertools
from typing import TypeVar

from torch import nn

from translator.native.loader import available
from translator.native.modules import apply, remove

__all__ = ["BACKENDS", "apply", "available", "for_backend", "remove"]

BACKENDS = ("native", "torch")
M = TypeVar("M", bound=nn.Module)


def for_backend(model: M, backend: str) -> M:
    """The model's modules in `backend`'s forms, on the model's own parameters and buffers: a
    copy of its module tree, so the caller's model (a training model being validated, one
    shared by translators of both backends) keeps its classes. "native" falls back to "torch"
    where the kernels do not load (no compiler, NMT_KERNELS=0)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    tree = copy.deepcopy(model, shared)
    return apply(tree) if backend == "native" and available() else remove(tree)
