"""On a CUDA device: the searches give the CPU's translations, and mixed-precision training steps run."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_config
from tests.test_decoding import SEARCHES, source_rows, tiny_model
from training.data import collate
from training.precision import MixedPrecision
from training.step import label_smoothed_loss
from translator.decoding import DecodeOptions, search
from translator.model import build_model
from translator.translate import Translator, batch_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("opts", SEARCHES)
def test_searches_on_cuda_give_the_cpus_translations(opts):
    model = tiny_model()
    rows = source_rows(model, lengths=(5, 9, 3, 7, 12))
    src = batch_tensor(rows, model.cfg.pad_id)
    on_cpu = search(model, src, opts)
    on_cuda = search(model.to(CUDA), src.to(CUDA), opts)
    assert on_cuda.tokens == on_cpu.tokens
    for a, b in zip(on_cuda.nbest, on_cpu.nbest):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize("opts", SEARCHES)
def test_batched_equals_one_by_one_on_cuda(opts):
    model = tiny_model().to(CUDA)
    rows = source_rows(model)
    batched = search(model, batch_tensor(rows, model.cfg.pad_id).to(CUDA), opts)
    for row, nbest in zip(rows, batched.nbest):
        alone = search(model, batch_tensor([row], model.cfg.pad_id).to(CUDA), opts).nbest[0]
        assert [h.tokens for h in nbest] == [h.tokens for h in alone]
        assert [h.score for h in nbest] == pytest.approx([h.score for h in alone], abs=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_steps_run_on_cuda(precision):
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).to(CUDA)
    amp = MixedPrecision(precision, CUDA)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], bos=1, eos=2, pad=0).to(CUDA)
    losses = []
    for _ in range(20):
        with amp.autocast():
            loss, _ = label_smoothed_loss(model, batch, 0.1)
        optimizer.zero_grad()
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_seeded_sampling_on_cuda_draws_as_on_the_cpu():
    model = tiny_model()
    src = batch_tensor(source_rows(model), model.cfg.pad_id)
    opts = DecodeOptions(sample=True, seed=7, top_k=5)
    on_cpu = search(model, src, opts)
    on_cuda = search(model.to(CUDA), src.to(CUDA), opts)
    assert on_cuda.tokens == on_cpu.tokens


def test_translator_on_cuda_translates_as_on_the_cpu(toy_tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).eval()
    texts = ["red dog runs", "a small cat sleeps on the street", "the man"]
    opts = DecodeOptions(beam_size=3)
    on_cpu = Translator(model, toy_tokenizer, opts).translate(texts)
    on_cuda = Translator(model.to(CUDA), toy_tokenizer, opts).translate(texts)
    assert [t.text for t in on_cuda] == [t.text for t in on_cpu]
