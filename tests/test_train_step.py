"""The training step: its loss, optimizer and clipping follow the config; fused Adam keeps the
inference caches fresh; the bf16 probe decides the precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config, tiny_overrides
from training.config import TrainConfig, load_config
from training.data import collate
from training.precision import MixedPrecision, choose_precision, probe, training_shapes
from training.step import TrainStep, make_adam, smoothed_nll
from training.trainer import Trainer
from translator.model import build_model

CPU = torch.device("cpu")


def test_smoothed_nll_equals_torch_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    gold = torch.randint(1, 11, (3, 5))
    gold[0, 3:] = 0  # padding
    gold[2, 1:] = 0
    loss, nll = smoothed_nll(logits, gold, pad=0, smoothing=0.2)
    flat, g = logits.view(-1, 11), gold.view(-1)
    torch.testing.assert_close(loss, F.cross_entropy(flat, g, ignore_index=0, label_smoothing=0.2, reduction="sum"))
    torch.testing.assert_close(nll, F.cross_entropy(flat, g, ignore_index=0, reduction="sum"))
    assert not nll.requires_grad


@pytest.mark.parametrize("smoothing, dtype", [(0.2, torch.float32), (0.0, torch.float32), (0.1, torch.bfloat16)])
def test_smoothed_nll_gradient_equals_autograd_through_torch_cross_entropy(smoothing, dtype):
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 13).to(dtype)
    gold = torch.randint(1, 13, (4, 6))
    gold[1, 2:] = 0
    gold[3, :] = 0  # a row of padding only
    ours = logits.clone().requires_grad_()
    loss, _ = smoothed_nll(ours, gold, pad=0, smoothing=smoothing)
    (loss * 0.7).backward()
    ref = logits.clone().requires_grad_()
    expected = F.cross_entropy(ref.float().view(-1, 13), gold.view(-1), ignore_index=0, label_smoothing=smoothing,
                               reduction="sum")
    (expected * 0.7).backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad, ref.grad, **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}))
    assert ours.grad[3].abs().max() == 0


def test_smoothed_nll_refuses_a_second_backward():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss, _ = smoothed_nll(logits, torch.randint(1, 7, (2, 3)), pad=0, smoothing=0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def trainer(tmp_path, corpus, **extra) -> Trainer:
    cfg = load_config("cpu", tiny_overrides(corpus, **{"model.dropout": 0.0, "train.max_steps": 5, **extra}))
    return Trainer(cfg, tmp_path / "run", log=lambda *_: None)


def first_batch(tr: Trainer):
    return tr.train_data.collate(tr.train_data.epoch(0)[0])


def test_label_smoothing_and_betas_reach_the_loss_and_optimizer(tmp_path, toy_corpus):
    tr = trainer(tmp_path, toy_corpus, **{"train.label_smoothing": 0.3, "train.betas": "[0.8,0.95]", "train.clip_norm": 0})
    b = first_batch(tr)
    with torch.no_grad():
        logits = tr.model(b.src, b.tgt_in).view(-1, tr.cfg.model.vocab_size)
        gold = b.tgt_out.view(-1)
        smoothed = F.cross_entropy(logits, gold, ignore_index=0, label_smoothing=0.3, reduction="sum")
        nll = F.cross_entropy(logits, gold, ignore_index=0, reduction="sum")
    loss_sum, nll_sum = tr.step([b], 1e-3, b.n_tokens)
    assert loss_sum == pytest.approx(smoothed.item(), rel=1e-5)
    assert nll_sum == pytest.approx(nll.item(), rel=1e-5)
    # After one Adam step m = (1 - b1) g and v = (1 - b2) g^2: m^2 / v = (1 - b1)^2 / (1 - b2).
    state = tr.optimizer.state[tr.model.embed.tokens.weight]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    seen = v > 1e-20
    torch.testing.assert_close(m[seen] ** 2 / v[seen], torch.full_like(v[seen], 0.2**2 / 0.05), rtol=1e-3, atol=0)


def weight_change(tr: Trainer) -> float:
    before = [p.detach().clone() for p in tr.model.parameters()]
    b = first_batch(tr)
    tr.step([b], 1e-3, b.n_tokens)
    return sum((p.detach() - q).abs().sum().item() for p, q in zip(tr.model.parameters(), before))


def test_clipping_reaches_the_optimizer(tmp_path, toy_corpus):
    """A gradient clipped to a norm far below Adam's eps moves the weights far less."""
    free = weight_change(trainer(tmp_path / "a", toy_corpus, **{"train.clip_norm": 0}))
    tr = trainer(tmp_path / "b", toy_corpus, **{"train.clip_norm": 1e-13})
    clipped = weight_change(tr)
    assert tr.step.grad_norm > 1e-3  # the norm before clipping
    assert clipped < 0.01 * free


def test_fused_adam_steps_refresh_the_models_inference_caches():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    b = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], bos=1, eos=2, pad=0)
    model.eval()
    with torch.inference_mode():
        model(b.src, b.tgt_in)  # packs the weights for inference
    t = TrainConfig(fused_adam=True, precision="fp32")
    opt = make_adam(model.parameters(), t)
    TrainStep(model, model, opt, MixedPrecision("fp32", CPU), t)([b], 1e-2, b.n_tokens)
    fresh = build_model(tiny_model_config())
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(b.src, b.tgt_in), fresh(b.src, b.tgt_in))


def test_probe_times_both_precisions_and_auto_follows_it():
    shapes = training_shapes(rows=64, d_model=32, d_ff=64, vocab=100)
    result = probe(shapes, CPU, repeats=1)
    assert result.fp32_ms > 0 and (result.bf16_ms is None or result.bf16_ms > 0)
    chosen, record = choose_precision("auto", CPU, shapes)
    assert chosen in ("fp32", "bf16") and record["precision"] == chosen and record["probe_fp32_ms"] > 0
    assert choose_precision("fp32", CPU, shapes) == ("fp32", {"precision": "fp32"})


def test_activation_dropout_drops_feed_forward_units_in_training_only():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(activation_dropout=0.5))
    plain = build_model(tiny_model_config())
    plain.load_state_dict(model.state_dict())
    b = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], bos=1, eos=2, pad=0)
    model.train()
    assert not torch.equal(model(b.src, b.tgt_in), model(b.src, b.tgt_in))
    model.eval()
    plain.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(b.src, b.tgt_in), plain(b.src, b.tgt_in))


def test_dropout_keys_reach_the_model(tmp_path, toy_corpus):
    tr = trainer(tmp_path, toy_corpus, **{"model.attention_dropout": 0.2, "model.activation_dropout": 0.3})
    layer = tr.model.decoder.layers[0]
    assert layer.self_attn.dropout == layer.cross_attn.dropout == 0.2 and layer.feed_forward.dropout == 0.3
