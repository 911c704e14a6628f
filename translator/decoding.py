"""Autoregressive search over the model's incremental decoder: pure functions, tensors in and out.

    search(model, src, opts, *, prefix=None, cancelled=None, on_step=None, on_done=None,
           admit=None, constraints=None) -> Hypotheses
    search_steps(...) -> Steps: the same search, one decoding step per next()

dispatches on the options: greedy search for beam_size 1 (sampling when opts.sample), beam search
otherwise; with required target phrases (`constraints`), constrained beam search of beam_size
(1 included). Modules: decode_options (DecodeOptions), length (budgets, length penalty), constraints
(prefix, min length, no-repeat n-grams), greedy, beam, constrained_beam and phrases (required
phrases), sampling, hooks (cancellation, streaming), hypotheses (results).
"""

from __future__ import annotations

from torch import Tensor

from translator.beam import beam_search, beam_steps
from translator.constrained_beam import constrained_beam_steps
from translator.decode_options import PRESETS, DecodeOptionError, DecodeOptions
from translator.greedy import greedy_search, greedy_steps
from translator.hooks import Admit, Cancelled, OnDone, OnStep
from translator.hypotheses import Hypotheses, Hypothesis
from translator.search_setup import Steps, whole
from translator.seq2seq import Seq2Seq

__all__ = [
    "PRESETS", "DecodeOptionError", "DecodeOptions", "Hypotheses", "Hypothesis",
    "beam_search", "greedy_search", "search", "search_steps",
]


def search_steps(
    model: Seq2Seq,
    src: Tensor,
    opts: DecodeOptions,
    *,
    prefix: list[list[int]] | None = None,
    cancelled: Cancelled | None = None,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
    admit: Admit | None = None,
    constraints: list[list[list[int]]] | None = None,
    continuations: Tensor | None = None,
) -> Steps:
    """Translate src (B, S) of source ids (EOS-terminated, right-padded) into opts.n_best hypotheses
    each, a decoding step per next() (the first encodes src too): a server interleaves the steps of
    searches with different options on one thread this way. `search` runs it to its end.

    prefix: per sentence, target tokens the output must start with (scored, and returned as
    part of the tokens).
    cancelled(): one bool per sentence, read before every step; a True sentence leaves the batch
    at once and comes back with no hypotheses and Hypotheses.cancelled[i] set.
    on_step(prefixes): after every step, per sentence, the tokens that are final: greedy, all so
    far; beam, the longest prefix shared by the live beams and the best finished hypothesis.
    on_done(i, nbest): sentence i's final n-best list, as soon as it is known.
    admit(alive): more sources joining the running batch before a step, decoded as if alone.
    (Details in translator.hooks.)
    constraints: per sentence, phrases (token-id lists) its output must contain, found by the
    constrained beam search (translator.constrained_beam), which takes no joining sentences
    (`admit` is not called); a greedy search with phrases is that search with one beam, and
    sampling with phrases is a DecodeOptionError. Hypothesis.unmet lists the phrases an output lacks.
    continuations (V,): True for tokens that continue the word before them; none follows a phrase.
    A sentence's result does not depend on the other sentences of the batch or on padding (up to
    float rounding), except when sampling.
    """
    if constraints is not None and any(constraints):
        if opts.sample:
            raise DecodeOptionError("sample cannot place required phrases (constraints); use beam search")
        return constrained_beam_steps(model, src, opts, constraints, prefix=prefix, cancelled=cancelled,
                                      on_step=on_step, on_done=on_done, continuations=continuations)
    steps = greedy_steps if opts.beam_size == 1 else beam_steps
    return steps(model, src, opts, prefix=prefix, cancelled=cancelled, on_step=on_step, on_done=on_done,
                 admit=admit)


search = whole(search_steps, "search")
