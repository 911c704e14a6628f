"""Mixed precision: fp32 is plain training, bf16 autocasts the matmuls, fp16 needs a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_config
from training.data import collate
from training.precision import MixedPrecision
from training.step import label_smoothed_loss
from translator.config import ConfigError
from translator.model import build_model

CPU = torch.device("cpu")


def batch():
    return collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], bos=1, eos=2, pad=0)


def test_fp32_adds_no_autocast_and_no_loss_scaling():
    amp = MixedPrecision("fp32", CPU)
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    with amp.autocast():
        loss, _ = label_smoothed_loss(model, batch(), 0.1)
    plain, _ = label_smoothed_loss(model, batch(), 0.1)
    assert torch.equal(loss, plain)
    assert amp.scaler.scale(loss) is loss and not amp.scaler.is_enabled()


def test_bf16_autocast_computes_logits_in_bfloat16_and_keeps_fp32_weights_and_loss():
    amp = MixedPrecision("bf16", CPU)
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    b = batch()
    with amp.autocast():
        logits = model(b.src, b.tgt_in)
        loss, _ = label_smoothed_loss(model, b, 0.1)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    fp32, _ = label_smoothed_loss(model, b, 0.1)
    assert loss.item() == pytest.approx(fp32.item(), rel=0.05)


def test_fp16_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        MixedPrecision("fp16", CPU)
