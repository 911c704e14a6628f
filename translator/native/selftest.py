"""A check of every native kernel against torch when the library loads.

Each kernel runs once on a small case (a few milliseconds in all) through the same wrapper that
decoding calls, and its result is compared with torch's. A kernel that disagrees or fails is
disabled with a warning, and its callers take torch's path: a signature that ctypes misreads
(a float passed as a double, say) gives wrong numbers, not wrong translations. The cases use
a generator of their own and leave the global random stream as they found it.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from translator.model import ModelConfig, build_model
from translator.native import kernels
from translator.native.loader import Kernels
from translator.native.modules import layer_weights


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def check_attention(lib: Kernels, g: torch.Generator) -> bool:
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (2, 5, 5))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    got = kernels.attention(q, k, v, mask, lib=lib)
    return got is not None and close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def check_layer_norm(lib: Kernels, g: torch.Generator) -> bool:
    x = 0.3 * torch.randn(3, 16, generator=g)  # rows' variance near eps, so that a misread eps shows
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    got = kernels.layer_norm(x, w, b, 0.25, lib=lib)
    return got is not None and close(got, F.layer_norm(x, (16,), w, b, 0.25))


def check_panels(lib: Kernels, g: torch.Generator) -> bool:
    w, b, x = torch.randn(20, 24, generator=g), torch.randn(20, generator=g), torch.randn(7, 24, generator=g)
    packed = kernels.panels(w, lib=lib)  # 20 columns: a whole panel and a partial one
    got = None if packed is None else kernels.panel_linear(x, packed, b, 20, relu=True, lib=lib)
    return got is not None and close(got, F.relu(F.linear(x, w, b)))


def check_argmax(lib: Kernels, g: torch.Generator) -> bool:
    logits = torch.randn(3, 50, generator=g)
    got = kernels.argmax_log_prob(logits, lib=lib)
    logp = logits.log_softmax(dim=-1)
    idx = logp.argmax(dim=-1)
    return got is not None and torch.equal(got[0], idx) and close(got[1], logp.gather(1, idx[:, None]).squeeze(1))


def check_move_rows(lib: Kernels, g: torch.Generator) -> bool:
    a, b = torch.randn(4, 3, 2, 8, generator=g), torch.randn(5, 4, 2, 8, generator=g)  # rows along 0 and 1
    holes, movers = torch.tensor([0, 1]), torch.tensor([3, 2])
    expected_a, expected_b = a.clone(), b.clone()
    expected_a[holes], expected_b[:, holes] = a[movers], b[:, movers]
    moved = kernels.move_rows([(a, 0), (b, 1)], holes, movers, lib=lib)
    return moved and torch.equal(a, expected_a) and torch.equal(b, expected_b)


def check_decoder_step(lib: Kernels, g: torch.Generator) -> bool:
    """Two steps of a one-layer decoder (a padded source among two) against translator.model's."""
    cfg = ModelConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=1, d_ff=24, dropout=0.0, max_positions=8)
    model = build_model(cfg).eval()
    src = torch.randint(3, 16, (2, 5), generator=g)
    src[1, 3:] = cfg.pad_id
    tokens = torch.randint(3, 16, (2, 2), generator=g)
    memory, mask = model.encode(src)
    reference, cache = model.init_cache(memory, mask, capacity=4), model.init_cache(memory, mask, capacity=4)
    layer = model.decoder.layers[0]
    weights = kernels.DecoderWeights.of([layer_weights(layer, lambda linear: kernels.panels(linear.weight, lib=lib))])
    if weights is None:
        return False
    H, eps = cfg.n_heads, layer.sublayers[0].norm.eps
    for t in range(2):
        x = model.embed(tokens[:, t : t + 1], offset=t)  # (2, 1, D)
        expected = model.decoder.step(x.clone(), reference, False).view(2, -1)  # post-norm: no final norm
        reference.length += 1
        got = x.clone().view(2, -1)  # (R, D)
        for lc in cache.layers:
            lc.reserve(x.new_empty(()).expand(2, H, 1, cfg.d_model // H), cache.length, cache.length + 1, 4)
        caches = [(lc.self_k, lc.self_v, lc.cross_k, lc.cross_v) for lc in cache.layers]
        if not kernels.decoder_steps(weights, caches, got, cache.length, cache.src_mask, None, None, H, False, eps,
                                     lib=lib) or not close(got, expected):
            return False
        cache.length += 1
    return True


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch (and so the kernels' calls) on one thread for the block: the cases are too small to
    split, and on busy cores a team of threads waits for its slowest member at every region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Each check with the kernels it covers; the decoder step reads weights pack_panels packed.
CHECKS: list[tuple[tuple[str, ...], Callable[[Kernels, torch.Generator], bool]]] = [
    (("few_query_attention",), check_attention),
    (("layer_norm",), check_layer_norm),
    (("pack_panels", "panel_linear"), check_panels),
    (("argmax_log_prob",), check_argmax),
    (("move_rows",), check_move_rows),
    (("decoder_step",), check_decoder_step),
]


def self_test(lib: Kernels) -> None:
    """Every kernel of lib checked against torch; one that disagrees or fails is disabled, with a warning."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), one_thread():
        g = torch.Generator().manual_seed(0)
        for names, check in CHECKS:
            if lib.pack_panels is None and "decoder_step" in names:
                lib.disable("decoder_step", "its weights are packed by pack_panels, which is disabled")
                continue
            try:
                ok = check(lib, g)
            except (RuntimeError, ValueError, TypeError, ctypes.ArgumentError) as e:
                ok, why = False, f"its self-test raised {e!r}"
            else:
                why = "it disagrees with torch on its self-test"
            if not ok:
                for name in names:
                    lib.disable(name, why)
