"""Packed-weight linear layers and oneDNN's sgemm: torch's products, and torch wherever they cannot go."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from translator.native import loader, onednn
from translator.native.modules import PackedLinear

ONEDNN_PLATFORM = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_onednn = pytest.mark.skipif(not onednn.enabled(), reason="oneDNN is not installed here")
needs_kernels = pytest.mark.skipif(loader.library() is None, reason="the native kernels are not built here")


@pytest.mark.skipif(not ONEDNN_PLATFORM or os.environ.get(onednn.ENV) == "0", reason="the onednn extra installs it only on x86-64 Linux")
def test_onednn_is_installed_and_agrees_with_torch_where_it_is_a_dependency():
    assert onednn.library_path() is not None
    assert onednn.enabled()  # loaded, and its check product matched torch's


def test_linear_with_relu_keeps_autograd_when_training():
    layer = PackedLinear(8, 4)
    x = torch.randn(6, 8, requires_grad=True)
    out = layer(x, relu=True)
    out.sum().backward()
    active = (out > 0).float()  # (6, 4): the gradient flows only where the ReLU passed
    torch.testing.assert_close(layer.bias.grad, active.sum(0))


@needs_kernels
def test_layer_reads_batched_and_strided_inputs():
    layer = PackedLinear(16, 8)
    x = torch.randn(3, 16, 5).transpose(1, 2)  # (3, 5, 16), not contiguous
    padded = torch.randn(6, 40)[:, 8:24]  # rows 40 floats apart
    w, b = layer.weight.detach(), layer.bias.detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(padded), F.linear(padded, w, b), atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 32), (2, 3, 32), (70, 32)])
def test_matmul_equals_torch(shape):
    x, columns = torch.randn(shape), torch.randn(32, 50)
    with torch.inference_mode():
        out = onednn.matmul(x, columns)
    torch.testing.assert_close(out, x @ columns, atol=1e-4, rtol=1e-5)


needs_packing = pytest.mark.skipif(not onednn.packing(), reason="torch's oneDNN is not built in here")


@needs_packing
@pytest.mark.parametrize("shape", [(1, 32), (2, 3, 32), (onednn.PACKED_ROWS + 44, 32)])
def test_packed_linear_equals_torch(shape):
    x, w = torch.randn(shape), torch.randn(50, 32)
    with torch.inference_mode():
        out = onednn.packed_linear(x, onednn.pack(w))
    assert out.shape == (*shape[:-1], 50)
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_only_plain_float32_weights_are_packed():
    assert onednn.pack(torch.randn(5, 4, dtype=torch.float64)) is None
    assert onednn.pack(torch.randn(4, 5).t()) is None  # not contiguous


def test_linear_keeps_autograd_when_training():
    layer = PackedLinear(8, 4)
    x = torch.randn(6, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(4, 1) * x.detach().sum(0))


def test_linear_takes_torch_for_other_dtypes():
    layer = PackedLinear(8, 4).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_linear_state_dict_is_nn_linears():
    assert PackedLinear(8, 4).state_dict().keys() == torch.nn.Linear(8, 4).state_dict().keys()


def test_environment_turns_onednn_off():
    code = "from translator.native import onednn; print(onednn.enabled())"
    env = {**os.environ, onednn.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"


# In a fresh thread OpenMP still has its default thread count (every core) until torch sets it.
THREAD_COUNT = """
import ctypes, threading, torch
from translator.native import onednn
torch.set_num_threads(1)
x, w, seen = torch.randn(8, 16), torch.randn(4, 16), []
def decode():
    with torch.inference_mode():
        onednn.matmul(x, w.t().contiguous())
    seen.append(ctypes.CDLL("libgomp.so.1").omp_get_max_threads())
thread = threading.Thread(target=decode)
thread.start()
thread.join()
print(seen[0])
"""


@needs_onednn
def test_onednn_in_a_new_thread_uses_torchs_thread_count():
    out = subprocess.run([sys.executable, "-c", THREAD_COUNT], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1"


def test_loading_onednn_and_the_kernels_leaves_the_random_stream_alone():
    code = ("import torch; from translator.native import loader, onednn; torch.manual_seed(0); onednn.enabled(); "
            "loader.library(); print(torch.rand(1).item())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    torch.manual_seed(0)
    assert float(out.stdout) == torch.rand(1).item()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 64])  # every count of rows a panel's last block can hold
@pytest.mark.parametrize("n", [16, 37, 512])  # whole panels, a partial last one
@pytest.mark.parametrize(("with_bias", "relu"), [(True, False), (False, False), (True, True)])
def test_layer_over_packed_weights_equals_torch(rows, n, with_bias, relu):
    g = torch.Generator().manual_seed(rows * n)
    layer = PackedLinear(24, n, bias=with_bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, 24, generator=g))
    x = torch.randn(rows, 24, generator=g)[:, None].expand(rows, 2, 24)  # batched and strided
    with torch.inference_mode():
        out = layer(x, relu=relu)
    expected = F.linear(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    torch.testing.assert_close(out, F.relu(expected) if relu else expected, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("k", [256, 512])  # row blocks of 256 and 128 rows
def test_layer_over_packed_weights_takes_rows_block_by_block(k):
    g = torch.Generator().manual_seed(k)
    layer = PackedLinear(k, 40)
    x = torch.randn(2 * 256 + 65, k, generator=g)
    with torch.inference_mode():
        out = layer(x, relu=True)
    torch.testing.assert_close(out, F.relu(F.linear(x, layer.weight.detach(), layer.bias.detach())),
                               atol=1e-4, rtol=1e-5)


@needs_kernels
def test_packed_weights_follow_weight_changes_and_stay_out_of_the_state_dict():
    layer = PackedLinear(8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        before = layer(x)
    first = layer.panels()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # as an optimizer step would
    with torch.inference_mode():
        after = layer(x)
    torch.testing.assert_close(after - layer.bias.detach(), 2.0 * (before - layer.bias.detach()))
    assert layer.panels() is not first and layer.panels() is layer.panels()
    assert set(layer.state_dict()) == {"weight", "bias"}
