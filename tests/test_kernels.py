"""The native attention kernel: torch's attention to float rounding, built once, and torch wherever it cannot go."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
import sys
import threading
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config
from tests.test_decoding import run, source_rows, tiny_model
from translator import native
from translator.decoding import DecodeOptions
from translator.model import MultiHeadAttention, build_model
from translator.native import kernels, loader, modules
from translator.native.modules import NativeLayerNorm, PackedLinear, layer_weights
from translator.translate import batch_tensor

HAS_COMPILER = shutil.which(loader.compiler()) is not None
needs_kernels = pytest.mark.skipif(loader.library() is None, reason="the kernel is not built here")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """`loader.library()` decided again under this test's environment, and again after it."""
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    loader.library.cache_clear()
    yield
    loader.library.cache_clear()


@pytest.mark.skipif(
    not (HAS_COMPILER and sys.platform.startswith("linux")) or os.environ.get(loader.ENV) == "0",
    reason="no C compiler here",
)
def test_kernel_builds_and_agrees_with_torch_where_a_compiler_is():
    assert loader.library() is not None  # built, loaded, and its check matched torch


def cache_layout(S: int, B: int, H: int, Dh: int, g: torch.Generator) -> torch.Tensor:
    """(B, H, S, Dh) keys as a decoder's self-attention cache holds them: a view of (capacity, B, H, Dh)."""
    return torch.randn(S + 3, B, H, Dh, generator=g)[:S].permute(1, 2, 0, 3)


@needs_kernels
@pytest.mark.parametrize("queries", [1, 5, 8, 16, 40])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "per-query"])
@pytest.mark.parametrize(("Dh", "layout"), [(8, "cache"), (64, "cache"), (64, "contiguous"), (256, "contiguous")])
def test_kernel_equals_torch(queries, mask_kind, Dh, layout):
    g = torch.Generator().manual_seed(queries * Dh)
    B, H, S = 3, 2, 13
    q = torch.randn(B, queries, H, Dh, generator=g).transpose(1, 2)  # (B, H, T, Dh) as the model splits heads
    k, v = (cache_layout(S, B, H, Dh, g) for _ in range(2))
    if layout == "contiguous":  # cross-attention keys/values
        k, v = k.contiguous(), v.contiguous()
    mask = None
    if mask_kind == "keys":  # source padding, (B, 1, 1, S)
        mask = (torch.arange(S) < torch.tensor([13, 4, 1])[:, None])[:, None, None, :]
    elif mask_kind == "per-query":  # causal with rows' own starts, (B, 1, T, S)
        mask = torch.ones(B, 1, queries, S, dtype=torch.bool).tril(S - queries)
        mask[1, :, :, :3] = False
    out = kernels.attention(q, k, v, mask)
    assert out is not None and out.shape == q.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_torch_when_large_enough_to_split_over_threads(threads):
    g = torch.Generator().manual_seed(threads)
    B, H, T, S, Dh = 32, 4, 5, 25, 64  # B * H * T * S past the kernel's one-thread limit
    q = torch.randn(B, T, H, Dh, generator=g).transpose(1, 2)
    k, v = (cache_layout(S, B, H, Dh, g) for _ in range(2))
    mask = (torch.arange(S) < torch.randint(1, S + 1, (B,), generator=g)[:, None])[:, None, None, :]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the count the kernel is given
    try:
        out = kernels.attention(q, k, v, mask)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_kernel_output_is_laid_out_for_the_output_projection():
    q, k, v = torch.randn(4, 2, 1, 8), torch.randn(4, 2, 6, 8), torch.randn(4, 2, 6, 8)
    out = kernels.attention(q, k, v, None)  # (B, H, T, Dh)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, Dh): merging heads is a view


@needs_kernels
def test_kernel_is_exact_for_extreme_scores_and_gives_zeros_for_a_query_that_sees_nothing():
    q = torch.zeros(1, 1, 2, 8)
    q[..., 0, :] = 30.0  # scores of +-1,000s: the softmax is one-hot, and must not overflow
    k = torch.zeros(1, 1, 3, 8)
    k[..., 1, :] = 1.0
    k[..., 2, :] = -1.0
    v = torch.arange(24.0).view(1, 1, 3, 8)
    mask = torch.tensor([[True, True, True], [False, False, False]])[None, None]  # query 2 sees nothing
    out = kernels.attention(q, k, v, mask)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 1])
    assert torch.equal(out[0, 0, 1], torch.zeros(8))


@needs_kernels
def test_kernel_declines_what_it_cannot_read():
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    assert kernels.attention(q.double(), k.double(), v.double(), None) is None  # float32 only
    assert kernels.attention(q[..., :6], k[..., :6], v[..., :6], None) is None  # Dh not a multiple of 8
    assert kernels.attention(q, k.transpose(-2, -1).contiguous().transpose(-2, -1), v, None) is None  # Dh strided
    assert kernels.attention(q, k, v, torch.zeros(2, 1, 1, 5)) is None  # additive masks: torch's
    assert kernels.attention(q, k[:1], v[:1], None) is None  # keys broadcast over sentences
    # The model's attention still answers them, through torch.
    assert_native_attention_answers(torch.randn(2, 1, 12), k[..., :6], v[..., :6])


def assert_native_attention_answers(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The native form of attention over k/v (B, H, S, Dh) answers as torch's does."""
    reference = MultiHeadAttention(x.size(-1), k.size(1), dropout=0.0).eval()
    with torch.inference_mode():
        expected = reference.attend(x, k, v, None)
        torch.testing.assert_close(native.apply(reference).attend(x, k, v, None), expected)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 32), (7, 32), (2, 5, 256), (64, 20, 256)])  # the last: rows over threads
def test_layer_norm_equals_torch(shape):
    g = torch.Generator().manual_seed(shape[-2])
    norm = NativeLayerNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        norm.bias.copy_(torch.randn(shape[-1], generator=g))
    x = 3 + 5 * torch.randn(shape, generator=g)  # an offset mean, a large variance
    with torch.inference_mode():
        out = norm(x)
    expected = F.layer_norm(x, shape[-1:], norm.weight.detach(), norm.bias.detach(), eps=1e-6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_layer_norm_keeps_autograd_and_nn_layer_norms_state_dict():
    norm = NativeLayerNorm(8)
    assert norm.state_dict().keys() == torch.nn.LayerNorm(8).state_dict().keys()
    x = torch.randn(4, 8, requires_grad=True)
    norm(x).pow(2).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_layer_norm_takes_torch_for_what_the_kernel_cannot_read():
    norm = NativeLayerNorm(8)
    x = torch.randn(8, 5).t()  # (5, 8), not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.weight, norm.bias))


@needs_kernels
@pytest.mark.parametrize(("n", "V"), [(1, 8), (3, 13), (64, 8000), (5, 8003)])  # V not a multiple of 8
def test_argmax_log_prob_equals_torchs_log_softmax_argmax_and_gather(n, V):
    g = torch.Generator().manual_seed(V)
    x = 4 * torch.randn(n, V, generator=g)
    x[0, V // 2] = x[0, V - 1] = x[0].max() + 1  # a tie: the first wins
    idx, lp = kernels.argmax_log_prob(x)
    logp = x.log_softmax(dim=-1)
    assert torch.equal(idx, logp.argmax(dim=-1)) and idx[0] == V // 2
    torch.testing.assert_close(lp, logp.gather(1, idx[:, None]).squeeze(1), atol=1e-6, rtol=1e-6)


@needs_kernels
def test_argmax_log_prob_reads_rows_apart_and_marks_broken_rows_as_torch_does():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 20, generator=g)
    x = wide[:, 3:15]  # rows 20 floats apart
    x[1, 5] = float("nan")
    x[2] = float("-inf")
    x[3, :] = -1e30  # extreme but finite: a uniform distribution
    idx, lp = kernels.argmax_log_prob(x)
    logp = x.log_softmax(dim=-1)
    assert torch.equal(idx, logp.argmax(dim=-1))
    torch.testing.assert_close(lp, logp.gather(1, idx[:, None]).squeeze(1), equal_nan=True)
    assert kernels.argmax_log_prob(x.double()) is None and kernels.argmax_log_prob(x.t()) is None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler here")
def test_build_is_cached_and_keyed_by_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    first = loader.build()
    built_at = first.stat().st_mtime_ns
    assert loader.build() == first and first.stat().st_mtime_ns == built_at  # reused, not rebuilt
    edited = tmp_path / "src" / loader.SOURCE.name  # same name, other content
    edited.parent.mkdir()
    edited.write_text(loader.SOURCE.read_text() + "\n/* edited */\n")
    shutil.copy(loader.SOURCE.with_name("kernels.h"), edited.parent)
    assert loader.build(edited) != first
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler here")
def test_a_failed_build_names_the_compiler_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return missing_name; }\n")
    with pytest.raises(loader.BuildError, match="missing_name"):
        loader.build(broken)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{broken.stem}-{loader.build_key(broken)}.so.lock"]


def test_without_a_compiler_decoding_falls_back_to_torch(fresh_library, monkeypatch, caplog):
    monkeypatch.delenv(loader.ENV, raising=False)  # asked for, and not buildable
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="translator.native"):
        assert loader.library() is None
    assert "/nonexistent/cc" in caplog.text
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    assert kernels.attention(q, k, v, None) is None
    assert_native_attention_answers(torch.randn(2, 1, 16), k, v)


def test_switched_off_it_is_neither_built_nor_loaded(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv(loader.ENV, "0")
    assert loader.library() is None
    assert not (tmp_path / "cache").exists()


@needs_kernels
@pytest.mark.parametrize("beam", [1, 4])
def test_searches_decode_the_same_with_and_without_the_kernel(beam, monkeypatch):
    model = tiny_model()
    rows = source_rows(model, lengths=(5, 9, 3, 7, 12))
    opts = DecodeOptions(beam_size=beam, n_best=beam)
    with_kernel = run(native.for_backend(model, "native"), rows, opts)
    without = run(native.for_backend(model, "torch"), rows, opts)
    assert with_kernel.tokens == without.tokens
    for a, b in zip(with_kernel.nbest, without.nbest):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def decode_steps(model, src: torch.Tensor, joining: torch.Tensor | None, steps: int = 10) -> tuple[torch.Tensor, bool]:
    """Logits of `steps` single-token decoding steps: greedy rows, joined rows, beams copied and
    reordered, a source dropped, with joined rows the first sources too (the slots before the
    joined rows' start go), the cache grown before and after; and whether the beams were
    reordered in the slot table."""
    g = torch.Generator().manual_seed(5)
    V = model.cfg.vocab_size
    memory, mask = model.encode(src)
    cache = model.init_cache(memory, mask, capacity=2)  # grows at slots 2, 4 and 8
    out, tabled = [], False
    for step in range(steps):
        if step == 2 and joining is not None:  # sentences join the running batch at this slot
            cache.extend(model.init_cache(*model.encode(joining)))
        n = cache.src_mask.size(0)
        if step == 4:  # two beams per source from here on
            cache.select(torch.arange(n).repeat_interleave(2), group=2)
        if step in (5, 6):  # beams swapped within their sentence, as beam search reorders them
            cache.select(torch.arange(n * 2).view(-1, 2).flip(1).flatten())
        if step == 7:  # the first source's first beam copied twice; the second source leaves
            cache.select(torch.tensor([r for s in range(n) if s != 1 for r in ((0, 0) if s == 0 else (2 * s + 1, 2 * s))]))
        if step == 8 and joining is not None:  # only the last joined source stays, beams swapped
            last = 2 * (cache.src_mask.size(0) - 1)
            cache.select(torch.tensor([last + 1, last]))
        tabled |= cache.slot_rows is not None
        rows = cache.src_mask.size(0) * cache.group
        out.append(model.decode_step(torch.randint(4, V, (rows, 1), generator=g), cache).flatten())
    return torch.cat(out), tabled


@needs_kernels
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("join", [False, True], ids=["beams", "joined-rows"])
def test_native_decoder_step_equals_torchs_layers(norm_first, join):
    torch.manual_seed(0)
    plain = build_model(tiny_model_config(norm_first=norm_first)).eval()
    model = native.for_backend(plain, "native")
    src = torch.randint(4, model.cfg.vocab_size, (3, 7))
    src[0, 4:] = model.cfg.pad_id  # a padded source
    joining = torch.randint(4, model.cfg.vocab_size, (2, 9)) if join else None
    with torch.inference_mode():
        x = model.embed(src[:, :1])
        cache = model.init_cache(*model.encode(src))
        assert model.decoder.native_step(x, cache)  # the path under test is taken
        fast, tabled = decode_steps(model, src, joining)
    assert tabled
    with torch.inference_mode():
        reference, _ = decode_steps(plain, src, joining)  # translator.model's layers
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("norm_first", [True, False])
def test_a_padded_batch_is_encoded_over_its_real_tokens_with_the_padded_arithmetic(norm_first, monkeypatch):
    torch.manual_seed(0)
    plain = build_model(tiny_model_config(norm_first=norm_first)).eval()
    model = native.for_backend(plain, "native")
    src = torch.randint(4, model.cfg.vocab_size, (4, 11))
    for row, n in enumerate((11, 3, 6, 2)):  # half the batch is padding: packed
        src[row, n:] = model.cfg.pad_id
    real = src != model.cfg.pad_id
    with torch.inference_mode():
        memory, mask = model.encode(src)
        caches = model.init_cache(memory, mask).layers
        monkeypatch.setattr(modules, "PACK_BELOW", 0.0)  # every batch padded, as before packing
        padded_memory, _ = model.encode(src)
        padded_caches = model.init_cache(padded_memory, mask).layers
        reference, _ = plain.encode(src)
    assert torch.equal(memory[real], padded_memory[real]) and not memory[~real].any()
    torch.testing.assert_close(memory[real], reference[real], atol=1e-5, rtol=1e-5)
    for packed, padded in zip(caches, padded_caches):
        for a, b in ((packed.cross_k, padded.cross_k), (packed.cross_v, padded.cross_v)):
            assert torch.equal(a.transpose(1, 2)[real], b.transpose(1, 2)[real])  # (B, S, H, Dh) at real tokens


@needs_kernels
def test_native_decoder_step_stays_out_of_training():
    model = native.apply(build_model(tiny_model_config()))
    src = torch.randint(4, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        cache = model.init_cache(*model.encode(src))
        assert not model.decoder.native_step(model.embed(src[:, :1]), cache)  # train mode: dropout
    model.eval()
    cache = model.init_cache(*model.encode(src))
    assert not model.decoder.native_step(model.embed(src[:, :1]), cache)  # autograd on


@needs_kernels
def test_a_new_search_sees_weight_changes_and_the_model_still_copies(monkeypatch):
    model = native.apply(tiny_model())
    src = torch.randint(4, model.cfg.vocab_size, (3, 7))
    joining = None
    with torch.inference_mode():
        decode_steps(model, src, joining)  # the native weights are made
    with torch.no_grad():
        model.decoder.layers[1].feed_forward.w_1.weight.mul_(2.0)  # as an optimizer step or a load would
    copied = copy.deepcopy(model)
    pickle.dumps(model)  # torch.save(model) pickles it
    with torch.inference_mode():
        (fast, _), (from_copy, _) = decode_steps(model, src, joining), decode_steps(copied, src, joining)
    monkeypatch.setenv(loader.ENV, "0")
    loader.library.cache_clear()
    try:
        with torch.inference_mode():
            reference, _ = decode_steps(model, src, joining)
    finally:
        loader.library.cache_clear()
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(from_copy, fast)


@needs_kernels
def test_a_search_keeps_the_packed_weights_it_reads_alive():
    model = tiny_model()
    layers = [layer_weights(layer) for layer in native.apply(model).decoder.layers]
    weights = kernels.DecoderWeights.of(layers)
    packed = weakref.ref(layers[0]["self_q_w"])
    del layers
    for m in model.modules():  # as another thread's search would: the weights packed again
        if isinstance(m, PackedLinear):
            with torch.no_grad():
                m.weight.add_(0.0)  # a new version
            m.panels()
    assert packed() is not None and weights.layers  # the step's pointers still point into live memory


@needs_kernels
@pytest.mark.parametrize("packed_first", [True, False], ids=["packed", "packing-at-once"])
def test_threads_decoding_with_one_model_at_once_get_their_own_results(packed_first):
    model = native.apply(tiny_model())
    batches = [source_rows(model, lengths=lengths, seed=seed) for seed, lengths in enumerate([(5, 9, 3), (12, 4), (7,)])]
    opts = DecodeOptions(beam_size=2)
    alone = [run(model, rows, opts).tokens for rows in batches]
    if not packed_first:  # every thread packs the weights again at once, each search keeping its own
        for m in model.modules():
            if isinstance(m, PackedLinear):
                with torch.no_grad():
                    m.weight.add_(0.0)  # a new version: the packed copies are out of date
    results: dict[int, list] = {}

    def decode(i: int) -> None:
        for _ in range(5):
            results.setdefault(i, []).append(run(model, batches[i], opts).tokens)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got == [alone[i]] * 5 for i, got in results.items()) and len(results) == len(batches)


def test_a_quantized_copy_decodes_through_its_own_layers():
    model = native.for_backend(tiny_model(), "torch")  # torch's int8 conversion takes exactly nn.Linear
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still the eager API
        warnings.simplefilter("ignore")
        quantized = native.apply(torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8))
    src = batch_tensor(source_rows(model), model.cfg.pad_id)
    with torch.inference_mode():
        cache = quantized.init_cache(*quantized.encode(src))
        assert not quantized.decoder.native_step(quantized.embed(src[:, :1]), cache)  # int8 layers, not the fp32 step
    hyps = run(quantized, source_rows(model), DecodeOptions(beam_size=2))
    assert all(len(nbest) == 1 and nbest[0].tokens for nbest in hyps.nbest)
