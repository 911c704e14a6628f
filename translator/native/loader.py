"""Building, loading and checking the native kernels (csrc/kernels.c) as a shared library.

The library is compiled for this CPU (`-march=native`) into a cache directory the first time a
process asks for it, and reused from there, without a compiler, by any process on a machine with
the same CPU. At load it must report the ABI that abi.py mirrors (version, struct sizes, field
offsets), and each kernel must agree with torch on a small case (selftest.py): a library that
fails the first is not used at all, a kernel that fails the second is not used, each with a
warning. Without a C compiler with OpenMP (`$CC`, else `cc`) and no cached build, or with
`NMT_KERNELS=0`, `library()` is None and every caller falls back to torch.

ctypes, not torch's extension machinery: a torch extension needs a C++ toolchain and torch's
headers on every serving machine and a build of tens of seconds, where this C file builds in
about a second with any C compiler, and the checks here give the safety a schema would.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from translator.native.abi import ABI_VERSION, SIGNATURES, STRUCTS, layout, library_abi

log = logging.getLogger("translator.native")

ENV = "NMT_KERNELS"  # "0": never build or load them
CACHE_ENV = "NMT_KERNEL_CACHE"  # where built libraries go (default ~/.cache/nmt-translator/kernels)
SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
BUILD_SECONDS = 120
# /proc/cpuinfo fields that say what `-march=native` targets: x86's model and flags; aarch64's
# implementer, part, variant and features (per core: big and little cores differ); POWER's and
# RISC-V's cpu, isa and uarch. Clock speeds and core numbers are left out: they vary by the read.
CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU architecture",
              "CPU variant", "CPU part", "CPU revision", "Features", "cpu", "isa", "uarch")


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
    """What `-march=native` compiles for, on any architecture: the machine type and every CPU's
    model and feature fields from /proc/cpuinfo (the kernels load on Linux alone)."""
    seen = {f"machine:{platform.machine()}"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in CPU_FIELDS:
            seen.add(f"{name.strip()}:{value.strip()}")
    return "\n".join(sorted(seen)).encode()


def run_compiler(args: list[str]) -> str:
    """The compiler's standard output; BuildError with its messages when it is missing or fails."""
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=BUILD_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{args[0]}: {e}") from e
    if done.returncode:
        raise BuildError(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def build_key(source: Path) -> str:
    """The source, its headers, the compiler's name, the flags and the CPU. Not the compiler's
    version: asking for it needs the compiler, and a cached library must load without one; a
    library from an older compiler is still checked (ABI and self-test) at every load."""
    parts = [source.read_bytes(), *(h.read_bytes() for h in sorted(source.parent.glob("*.h"))),
             compiler().encode(), " ".join(FLAGS).encode(), cpu_identity()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created) for the block: threads and processes building at once wait their turn."""
    import fcntl  # POSIX only, as the kernels are (library() loads them on Linux alone)

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(source: Path = SOURCE) -> Path:
    """The shared library for `source`: the cached one where it exists (no compiler needed), else
    compiled, under a lock, into a unique temporary file renamed into place, so that builders
    running at once or one killed mid-build never leave a partial library under the final name."""
    target = cache_dir() / f"{source.stem}-{build_key(source)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(f".{target.name}.lock")):
        if target.exists():  # built while this builder waited for the lock
            return target
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        os.close(fd)
        try:
            run_compiler([compiler(), *FLAGS, "-o", partial, str(source)])
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


class Kernels:
    """The library's kernels by name (abi.SIGNATURES), each a ctypes function with its signature
    set, or None once it has failed its self-test (callers then take torch's path)."""

    few_query_attention: Callable | None
    layer_norm: Callable | None
    decoder_step: Callable | None
    pack_panels: Callable | None
    panel_linear: Callable | None
    move_rows: Callable | None
    argmax_log_prob: Callable | None

    def __init__(self, cdll: ctypes.CDLL, signatures: dict) -> None:
        self.path = cdll._name
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(cdll, name)
            fn.argtypes, fn.restype = argtypes, restype
            setattr(self, name, fn)

    def disable(self, name: str, why: str) -> None:
        log.warning("native kernel %s disabled, torch runs in its place: %s", name, why)
        setattr(self, name, None)


def open_library(path: Path, abi_version: int = ABI_VERSION, structs: tuple = STRUCTS,
                 signatures: dict = SIGNATURES) -> Kernels | None:
    """The library at path with its kernels' signatures set, where it reports `abi_version` and
    the sizes and field offsets of `structs`; None, with one warning, where it does not."""
    try:
        cdll = ctypes.CDLL(str(path))
        version, found = library_abi(cdll)
    except (OSError, AttributeError) as e:
        log.warning("native kernels unavailable, decoding uses torch alone: %s", e)
        return None
    expected = layout(structs)
    if version != abi_version or found != expected:
        log.warning("native kernels disabled, decoding uses torch alone: %s has ABI version %d and struct "
                    "layout %s, this package expects version %d and %s", path, version, found, abi_version, expected)
        return None
    try:
        return Kernels(cdll, signatures)
    except AttributeError as e:
        log.warning("native kernels unavailable, decoding uses torch alone: %s", e)
        return None


def load(abi_version: int = ABI_VERSION, structs: tuple = STRUCTS, signatures: dict = SIGNATURES) -> Kernels | None:
    """The kernels built (or found built), opened, ABI-checked and self-tested; None (with a
    warning) where unavailable. Each call loads them afresh; `library()` keeps the first."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        path = build()
    except BuildError as e:
        log.warning("native kernels unavailable, decoding uses torch alone: %s", e)
        return None
    lib = open_library(path, abi_version, structs, signatures)
    if lib is None:
        return None
    # Imported here: the self-test calls the kernels' wrappers, whose module imports this one.
    from translator.native.selftest import self_test

    self_test(lib)
    log.info("native decoding kernels loaded from %s", path)
    return lib


@functools.cache
def library() -> Kernels | None:
    """The process's kernels, loaded and checked once."""
    return load()


def available() -> bool:
    """Whether the native kernels are built, loaded and checked in this process."""
    return library() is not None
