"""Building and loading the native kernels (csrc/kernels.c) as a shared library.

The library is compiled for this CPU (`-march=native`) into a cache directory the first time a
process asks for it, and reused from there. Without a C compiler with OpenMP (`$CC`, else
`cc`), or with `NMT_KERNELS=0`, `library()` is None and every caller falls back to torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger("translator.native")

ENV = "NMT_KERNELS"  # "0": never build or load them
CACHE_ENV = "NMT_KERNEL_CACHE"  # where built libraries go (default ~/.cache/nmt-translator/kernels)
SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
BUILD_SECONDS = 120


class BuildError(RuntimeError):
    """The C compiler is missing or failed."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt-translator" / "kernels"


def compiler() -> str:
    return os.environ.get("CC") or "cc"


def cpu_identity() -> bytes:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return b""
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags"))).encode()


def run_compiler(args: list[str]) -> str:
    """The compiler's standard output; BuildError with its messages when it is missing or fails."""
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=BUILD_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{args[0]}: {e}") from e
    if done.returncode:
        raise BuildError(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def build(source: Path = SOURCE) -> Path:
    """The shared library for `source`, compiled unless the cache already holds it.

    Keyed by the source, the compiler's version, the flags and the CPU, so an edited source, a
    new compiler or a home directory shared with another CPU get their own build. Written under
    a temporary name and renamed into place: processes building at once, or one killed
    mid-build, never leave a partial library under the final name.
    """
    cc = compiler()
    version = run_compiler([cc, "--version"])
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), version.encode(), " ".join(FLAGS).encode(), cpu_identity()])
    ).hexdigest()[:20]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        run_compiler([cc, *FLAGS, "-o", str(partial), str(source)])
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
STRIDES = ctypes.c_int64 * 4
SIGNATURES = {  # name: (argument types, result type), as in csrc/kernels.c
    "few_query_attention": ([PTR] * 9 + [I64] * 5 + [F32, PTR, INT, PTR], INT),
    "layer_norm": ([PTR] * 4 + [I64] * 2 + [F32, INT], None),
    "decoder_layer_step": ([PTR] * 4, INT),
    "pack_panels": ([PTR, PTR, I64, I64], None),
    "panel_linear": ([PTR] * 4 + [I64] * 3 + [INT, INT], None),
    "move_rows": ([I64] + [PTR] * 7 + [I64], None),
    "argmax_log_prob": ([PTR, I64, I64, I64, PTR, PTR, INT], None),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, checked against torch on a small case; None (logged once) when unavailable."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        for name, (argtypes, restype) in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
    except (BuildError, OSError, AttributeError) as e:
        log.warning("native kernels unavailable, decoding uses torch alone: %s", e)
        return None
    g = torch.Generator().manual_seed(0)  # not the global RNG
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (2, 5, 5))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    from translator.native.kernels import call_attention

    got = call_attention(lib, q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if got is None or not torch.allclose(got, expected, atol=1e-5):
        log.warning("native attention kernel disagrees with torch on its check, not used")
        return None
    return lib


def available() -> bool:
    """Whether the native kernels are built, loaded and checked in this process."""
    return library() is not None
