"""The C layer checked like a library: its ABI and every kernel's self-test at load, the build's cache and lock."""

from __future__ import annotations

import ctypes
import logging
import platform
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F

from translator.native import kernels, loader
from translator.native.abi import ABI_VERSION, F32, SIGNATURES, DecoderStep, LayerStep
from translator.native.selftest import CHECKS

HAS_COMPILER = shutil.which(loader.compiler()) is not None
needs_kernels = pytest.mark.skipif(loader.library() is None, reason="the kernels are not built here")


def test_the_self_test_covers_every_kernel():
    assert {name for names, _ in CHECKS for name in names} == set(SIGNATURES)


@needs_kernels
def test_every_kernel_passes_its_self_test_here():
    lib = loader.library()
    assert all(getattr(lib, name) is not None for name in SIGNATURES)


@needs_kernels
def test_a_library_of_another_abi_version_is_refused_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="translator.native"):
        assert loader.load(abi_version=ABI_VERSION + 1) is None
    (record,) = [r for r in caplog.records if "ABI version" in r.getMessage()]
    assert f"expects version {ABI_VERSION + 1}" in record.getMessage()


class WiderLayerStep(ctypes.Structure):
    """layer_t with a field the library does not have: its size differs."""

    _fields_ = [*LayerStep._fields_, ("extra", ctypes.c_int64)]


class ShiftedDecoderStep(ctypes.Structure):
    """step_t with its int norm_first moved before the int64 shapes: same size, other offsets."""

    _fields_ = [("norm_first", ctypes.c_int), *(f for f in DecoderStep._fields_ if f[0] != "norm_first")]


@needs_kernels
@pytest.mark.parametrize("structs", [(WiderLayerStep, DecoderStep), (LayerStep, ShiftedDecoderStep)],
                         ids=["size", "offsets"])
def test_a_struct_layout_other_than_the_librarys_is_refused_loudly(structs, caplog):
    with caplog.at_level(logging.WARNING, logger="translator.native"):
        assert loader.load(structs=structs) is None
    assert "struct layout" in caplog.text


def misdeclared(name: str) -> dict:
    """SIGNATURES with `name`'s float argument declared a double: ctypes passes other bits than the kernel reads."""
    argtypes, restype = SIGNATURES[name]
    return {**SIGNATURES, name: ([ctypes.c_double if t is F32 else t for t in argtypes], restype)}


@needs_kernels
@pytest.mark.parametrize("name", ["layer_norm", "few_query_attention"])
def test_a_wrong_signature_fails_its_kernels_self_test_loudly_and_falls_back(name, caplog):
    with caplog.at_level(logging.WARNING, logger="translator.native"):
        lib = loader.load(signatures=misdeclared(name))
    assert lib is not None and getattr(lib, name) is None  # that kernel alone is off
    assert all(getattr(lib, other) is not None for other in SIGNATURES if other != name)
    assert f"native kernel {name} disabled" in caplog.text
    x = torch.randn(2, 2, 1, 8)
    if name == "layer_norm":
        assert kernels.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5, lib=lib) is None  # the caller's torch path
    else:
        assert kernels.attention(x, x, x, None, lib=lib) is None
    torch.testing.assert_close(kernels.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5, lib=loader.library()),
                               F.layer_norm(x, (8,), eps=1e-5), atol=1e-5, rtol=1e-5)


def test_the_cache_key_names_the_cpu():
    identity = loader.cpu_identity()
    assert f"machine:{platform.machine()}".encode() in identity
    assert identity == loader.cpu_identity()  # nothing that varies between reads (clock speeds)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_builders_at_once_share_one_build_and_a_cached_build_needs_no_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv(loader.ENV, raising=False)  # the loader under test, whatever this process decodes with
    built: list = []
    threads = [threading.Thread(target=lambda: built.append(loader.build())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 3 and len(set(built)) == 1
    assert [p.name for p in tmp_path.glob("*.so")] == [built[0].name] and not list(tmp_path.glob(".*partial"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # as on a machine without a compiler
    with caplog.at_level(logging.WARNING, logger="translator.native"):
        lib = loader.load()
    assert lib is not None and lib.path == str(built[0])
    assert not caplog.text
