"""What every search starts with: source lengths, output budgets, step rules, hooks, encoder cache;
and what sentences joining a running search bring to it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from translator.constraints import StepRules
from translator.decode_options import DecodeOptionError, DecodeOptions
from translator.hooks import Cancelled, OnDone, OnStep, SearchHooks
from translator.hypotheses import Hypotheses
from translator.length import output_budgets
from translator.seq2seq import Cache, Seq2Seq

Search = TypeVar("Search", bound=Callable)
# A search run step by step: each next() runs up to the next decoding step (the first one encodes
# the sources too) and the generator returns its Hypotheses.
Steps = Generator[None, None, Hypotheses]


def on_source_device(search: Search) -> Search:
    """Run a step generator search(model, src, ...) with src's device as the default for the
    tensors it makes (row indices, scores, masks), so that a model on a GPU decodes there; the
    device applies while a step runs, not to the caller between steps. On the CPU, the default
    already, it runs as it is: the device context intercepts every torch call from Python."""

    @functools.wraps(search)
    def on_device(model: Seq2Seq, src: Tensor, *args, **kwargs) -> Steps:
        steps = search(model, src, *args, **kwargs)
        if src.device.type == "cpu":
            return steps
        return steps_within(lambda: torch.device(src.device), steps)

    return on_device  # type: ignore[return-value]


def steps_within(context: Callable[[], contextlib.AbstractContextManager], steps: Steps) -> Steps:
    """steps, each of them run inside a fresh context()."""
    while True:
        with context():
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value
        yield


def whole(make_steps: Callable[..., Steps], name: str) -> Callable[..., Hypotheses]:
    """The search that runs the step generator make_steps(...) gives to its end: same arguments,
    returns the Hypotheses."""

    def search(*args, **kwargs) -> Hypotheses:
        return run_to_end(make_steps(*args, **kwargs))

    search.__name__ = search.__qualname__ = name
    search.__doc__ = f"`{make_steps.__name__}` run to its end, returning its Hypotheses.\n\n{make_steps.__doc__}"
    return search


def run_to_end(steps: Steps) -> Hypotheses:
    """Run a step generator to its end: the search's Hypotheses."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@dataclass
class SearchSetup:
    src_lengths: Tensor  # (B,) real source tokens, EOS included
    budget: Tensor  # (B,) decoding steps allowed, EOS included
    rules: StepRules
    hooks: SearchHooks
    cache: Cache  # encoder output projected for every decoder layer, B sources

    def admit(self, model: Seq2Seq, src: Tensor, opts: DecodeOptions) -> None:
        """Sentences src (b, S') join the search: encoded, budgeted, and appended to the cache, with
        as many rows each as its other sources (their beams), that start at its next slot. They
        take batch indices B, B + 1, ..."""
        src_lengths = (src != model.cfg.pad_id).sum(dim=1)  # (b,)
        budget = output_budgets(src_lengths, opts.max_len_a, opts.max_len_b, opts.max_len, model.cfg.max_positions)
        memory, src_mask = model.encode(src)  # (b, S', D), (b, 1, 1, S')
        self.cache.extend(model.init_cache(memory, src_mask))
        self.src_lengths = torch.cat([self.src_lengths, src_lengths])
        self.budget = torch.cat([self.budget, budget])
        self.rules.extend(src.size(0))
        self.hooks.extend(src.size(0))


def start_search(
    model: Seq2Seq,
    src: Tensor,
    opts: DecodeOptions,
    prefix: list[list[int]] | None,
    cancelled: Cancelled | None,
    on_step: OnStep | None,
    on_done: OnDone | None = None,
) -> SearchSetup:
    """Check the per-sentence inputs, then encode src (B, S) once."""
    cfg = model.cfg
    B = src.size(0)
    src_lengths = (src != cfg.pad_id).sum(dim=1)  # (B,)
    rules = StepRules(opts, cfg.eos_id, cfg.vocab_size, prefix, B)
    # A forced prefix gets room for itself and EOS, within the hard cap.
    budget = output_budgets(src_lengths, opts.max_len_a, opts.max_len_b, opts.max_len, cfg.max_positions,
                            floor=rules.prefix_len + 1)
    too_long = (rules.prefix_len >= budget).nonzero()
    if too_long.numel():
        i = int(too_long[0])
        raise DecodeOptionError(
            f"prefix of sentence {i} has {int(rules.prefix_len[i])} tokens; at most {int(budget[i]) - 1} fit"
        )
    memory, src_mask = model.encode(src)  # (B, S, D), (B, 1, 1, S)
    # Room for the longest budget up front, within reason: a larger one grows by doubling.
    cache = model.init_cache(memory, src_mask, capacity=min(int(budget.max()), 128))
    return SearchSetup(src_lengths, budget, rules, SearchHooks(cancelled, on_step, B, on_done), cache)
