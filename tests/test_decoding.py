"""Search properties on a tiny seeded Transformer: beam 1 == greedy, cached == recomputed, batch invariance."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from tests.conftest import tiny_model_config
from translator import native
from translator.decoding import (
    DecodeOptionError,
    DecodeOptions,
    Hypotheses,
    beam_search,
    greedy_search,
    search,
)
from translator.length import output_budget, output_budgets
from translator.model import EncoderDecoder, build_model
from translator.translate import batch_tensor


def tiny_model(seed: int = 0) -> EncoderDecoder:
    """A seeded tiny model in the native backend's forms where the kernels load (as a Translator
    decodes it), in translator.model's own with NMT_KERNELS=0."""
    torch.manual_seed(seed)
    return native.for_backend(build_model(tiny_model_config()).eval(), "native")


def source_rows(model: EncoderDecoder, lengths=(5, 9, 3, 7), seed: int = 1) -> list[list[int]]:
    """Random EOS-terminated sources of the given lengths (EOS included)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return [torch.randint(4, cfg.vocab_size, (n - 1,), generator=g).tolist() + [cfg.eos_id] for n in lengths]


def run(model: EncoderDecoder, rows: list[list[int]], opts: DecodeOptions, **hooks) -> Hypotheses:
    return search(model, batch_tensor(rows, model.cfg.pad_id), opts, **hooks)


SEARCHES = [
    pytest.param(DecodeOptions(), id="greedy"),
    pytest.param(DecodeOptions(beam_size=3, n_best=3), id="beam3"),
    pytest.param(DecodeOptions(beam_size=4, n_best=2, length_penalty=0.6, length_penalty_form="gnmt"), id="beam4-gnmt"),
]


@pytest.mark.parametrize(
    "changes",
    [{}, {"min_len": 4}, {"no_repeat_ngram": 2}, {"length_penalty": 0.0}, {"max_len_a": 0.5, "max_len_b": 2}],
    ids=["default", "min_len", "no_repeat", "no_penalty", "short_budget"],
)
def test_beam1_equals_greedy(changes):
    model = tiny_model()
    src = batch_tensor(source_rows(model), model.cfg.pad_id)
    opts = DecodeOptions(**changes)
    greedy = greedy_search(model, src, opts)
    beam = beam_search(model, src, opts)
    assert beam.tokens == greedy.tokens
    assert beam.scores == pytest.approx(greedy.scores, abs=1e-5)
    for g, b in zip(greedy.nbest, beam.nbest):
        assert b[0].log_probs == pytest.approx(g[0].log_probs, abs=1e-5)


@pytest.mark.parametrize("opts", SEARCHES)
def test_token_scores_equal_full_recomputation(opts):
    """Cached, reordered decoding scores every token as a full teacher-forced pass over its prefix does."""
    model = tiny_model()
    rows = source_rows(model)
    hyps = run(model, rows, opts)
    for row, nbest in zip(rows, hyps.nbest):
        assert len(nbest) == opts.n_best
        for h in nbest:
            tgt_in = torch.tensor([[model.cfg.bos_id, *h.tokens]])  # (1, T + 1)
            with torch.inference_mode():
                logp = model(torch.tensor([row]), tgt_in).log_softmax(dim=-1)[0]  # (T + 1, V)
            expected = logp[torch.arange(len(h.tokens)), h.tokens].tolist()
            assert h.log_probs == pytest.approx(expected, abs=1e-4)
            if h.eos_log_prob is not None:
                assert h.eos_log_prob == pytest.approx(float(logp[-1, model.cfg.eos_id]), abs=1e-4)


@pytest.mark.parametrize("opts", SEARCHES)
def test_batched_equals_one_by_one(opts):
    model = tiny_model()
    rows = source_rows(model)
    alone = [run(model, [row], opts) for row in rows]
    # Another order, with extra padding columns.
    order = [2, 0, 3, 1]
    padded = torch.cat([batch_tensor([rows[i] for i in order], model.cfg.pad_id),
                        torch.full((4, 3), model.cfg.pad_id)], dim=1)
    for hyps, index in ((run(model, rows, opts), range(4)), (search(model, padded, opts), order)):
        for nbest, i in zip(hyps.nbest, index):
            expected = alone[i].nbest[0]
            assert [h.tokens for h in nbest] == [h.tokens for h in expected]
            assert [h.score for h in nbest] == pytest.approx([h.score for h in expected], abs=1e-4)


def test_alignment_follows_the_chosen_beam():
    """The beam's alignment rows equal those of decoding its best output again, forced, alone."""
    model = tiny_model()
    rows = source_rows(model)
    hyps = run(model, rows, DecodeOptions(beam_size=3, alignment=True))
    for row, nbest in zip(rows, hyps.nbest):
        best = nbest[0]
        assert best.alignment.shape == (len(best.tokens), len(row))
        torch.testing.assert_close(best.alignment.sum(dim=1), torch.ones(len(best.tokens)))
        forced = greedy_search(model, torch.tensor([row]), DecodeOptions(alignment=True), prefix=[best.tokens])
        again = forced.nbest[0][0].alignment[: len(best.tokens)]
        torch.testing.assert_close(best.alignment, again, atol=1e-5, rtol=1e-4)


def test_one_sentence_budget_in_plain_python_equals_the_batched_one():
    lengths = list(range(0, 300, 7))
    for a, b, cap, positions in [(1.2, 10, 256, 256), (0.0, 200, 1024, 64), (3.5, -20, 50, 1024), (1e300, 5, 99, 128),
                                 (0.5, 1, 4, 64)]:
        batched = output_budgets(torch.tensor(lengths), a, b, cap, positions).tolist()
        assert [output_budget(n, a, b, cap, positions) for n in lengths] == batched


@pytest.mark.parametrize("opts", SEARCHES)
def test_outputs_stay_within_their_budget(opts):
    model = tiny_model()
    rows = source_rows(model)
    opts = opts.replace(max_len_a=0.5, max_len_b=1, max_len=4)
    for row, nbest in zip(rows, run(model, rows, opts).nbest):
        budget = min(math.floor(0.5 * len(row) + 1), 4)
        for h in nbest:
            assert len(h.tokens) + (h.eos_log_prob is not None) <= budget


@pytest.mark.parametrize("opts", SEARCHES)
def test_streamed_prefixes_only_grow_and_end_as_the_output(opts):
    model = tiny_model()
    rows = source_rows(model)
    reports: list[list[list[int]]] = []
    hyps = run(model, rows, opts, on_step=reports.append)
    assert reports
    for i, final in enumerate(hyps.tokens):
        seen = [r[i] for r in reports]
        for before, after in pairwise(seen):
            assert after[: len(before)] == before
        assert seen[-1] == final


@pytest.mark.parametrize("opts", SEARCHES)
def test_each_sentence_is_handed_over_once_as_soon_as_it_is_final(opts):
    model = tiny_model()
    rows = source_rows(model)
    steps = 0
    done: dict[int, tuple[int, list]] = {}

    def on_step(_):
        nonlocal steps
        steps += 1

    def on_done(i, nbest):
        assert i not in done
        done[i] = (steps, nbest)

    hyps = run(model, rows, opts, on_step=on_step, on_done=on_done)
    assert sorted(done) == list(range(len(rows)))
    for i, nbest in enumerate(hyps.nbest):
        at_step, early = done[i]
        assert [(h.tokens, h.score) for h in early] == [(h.tokens, h.score) for h in nbest]
        if opts.beam_size == 1:  # handed over in the step that ended it
            assert at_step == len(nbest[0].tokens) + (nbest[0].eos_log_prob is not None)
    assert len({at for at, _ in done.values()}) > 1  # not all at the end of the search


def join_schedule(model: EncoderDecoder, rows: list[list[int]], at: list[int]):
    """An admit hook handing over rows[i] before step at[i] (rows[0] starts the search), and the
    order in which it did."""
    calls, order = 0, [0]

    def admit(alive: int):
        nonlocal calls
        new = [i for i in range(1, len(rows)) if at[i] == calls]
        calls += 1
        order.extend(new)
        return batch_tensor([rows[i] for i in new], model.cfg.pad_id) if new else None

    return admit, order


def assert_decoded_as_if_alone(model: EncoderDecoder, rows: list[list[int]], order: list[int], hyps: Hypotheses,
                               opts: DecodeOptions) -> None:
    """hyps.nbest[j] is what decoding rows[order[j]] alone gives: every entry of its n-best list."""
    assert len(hyps.nbest) == len(order)
    for i, nbest in zip(order, hyps.nbest):
        alone = run(model, [rows[i]], opts).nbest[0]
        assert [h.tokens for h in nbest] == [h.tokens for h in alone]
        for h, a in zip(nbest, alone):
            assert h.score == pytest.approx(a.score, abs=1e-4)
            assert h.log_probs == pytest.approx(a.log_probs, abs=1e-4)
            if opts.alignment:
                torch.testing.assert_close(h.alignment, a.alignment, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "changes",
    [{}, {"min_len": 4}, {"no_repeat_ngram": 2}, {"alignment": True}, {"max_len_a": 0.5, "max_len_b": 2}],
    ids=["default", "min_len", "no_repeat", "alignment", "short_budget"],
)
def test_sentences_joining_a_running_greedy_search_decode_as_if_alone(changes):
    model = tiny_model()
    rows = source_rows(model, lengths=(5, 9, 3, 12, 4))  # the fourth is the longest source yet
    opts = DecodeOptions(**changes)
    admit, order = join_schedule(model, rows, at=[0, 0, 2, 3, 3])
    hyps = run(model, rows[:1], opts, admit=admit)
    assert order == [0, 1, 2, 3, 4]
    assert_decoded_as_if_alone(model, rows, order, hyps, opts)


@pytest.mark.parametrize(
    "opts",
    [
        DecodeOptions(beam_size=5, n_best=3),
        DecodeOptions(beam_size=4, n_best=2, length_penalty=0.6, length_penalty_form="gnmt"),
        DecodeOptions(beam_size=3, n_best=2, length_penalty=0.0),
        DecodeOptions(beam_size=3, min_len=4),
        DecodeOptions(beam_size=3, n_best=3, no_repeat_ngram=2),
        DecodeOptions(beam_size=3, alignment=True),
        DecodeOptions(beam_size=3, n_best=2, max_len_a=0.5, max_len_b=2),
    ],
    ids=["beam5", "beam4-gnmt", "no_penalty", "min_len", "no_repeat", "alignment", "short_budget"],
)
def test_sentences_joining_a_running_beam_search_decode_as_if_alone(opts):
    """Joiners before the first step (one row each, as the first sentence) and after several
    steps (all beams, the dead ones at -inf), the last one's source the longest of all."""
    model = tiny_model()
    rows = source_rows(model, lengths=(5, 9, 3, 12, 4, 15))
    admit, order = join_schedule(model, rows, at=[0, 0, 2, 5, 5, 9])
    hyps = run(model, rows[:1], opts, admit=admit)
    assert order == [0, 1, 2, 3, 4, 5]
    assert_decoded_as_if_alone(model, rows, order, hyps, opts)


def test_a_long_running_beam_search_keeps_buffers_for_its_live_rows_not_every_row_it_has_had():
    """Sentences keep joining while others finish: the self-attention buffers hold at most twice
    the rows a step runs (rows of finished sentences are let go), and every sentence decodes as
    if alone."""
    model = tiny_model()
    rows = source_rows(model, lengths=[3 + (5 * i) % 10 for i in range(16)])
    opts = DecodeOptions(beam_size=3, n_best=2, max_len_a=0.5, max_len_b=2)
    admit, order = join_schedule(model, rows, at=[2 * i for i in range(16)])
    held: list[tuple[int, int]] = []  # (rows the step runs, rows its buffers hold)
    step = model.decode_step

    def decode_step(tgt, cache, **kw):
        held.append((tgt.size(0), cache.layers[0].self_k.size(1) if cache.layers[0].self_k is not None else 0))
        return step(tgt, cache, **kw)

    model.decode_step = decode_step
    hyps = run(model, rows[:1], opts, admit=admit)
    del model.decode_step
    assert order == list(range(16))
    assert max(buffer for _, buffer in held) < 16 * 3  # not every row the search has had
    assert all(buffer <= 2 * running for running, buffer in held)
    assert_decoded_as_if_alone(model, rows, order, hyps, opts)


@pytest.mark.parametrize("opts", SEARCHES + [pytest.param(DecodeOptions(beam_size=3, alignment=True), id="alignment")])
def test_the_longest_source_leaving_narrows_the_cache_and_the_rest_decode_as_if_alone(opts):
    model = tiny_model()
    rows = source_rows(model, lengths=(15, 4, 5, 3))
    admit, order = join_schedule(model, rows, at=[0, 0, 1, 4])
    widths: list[int] = []  # the cache's source positions at each step
    step = model.decode_step

    def decode_step(tgt, cache, **kw):
        widths.append(cache.src_mask.size(-1))
        return step(tgt, cache, **kw)

    model.decode_step = decode_step
    hyps = run(model, rows[:1], opts, admit=admit, cancelled=lambda: [len(widths) >= 2 and i == 0 for i in range(len(order))])
    assert hyps.cancelled == [True, False, False, False]
    assert widths[:2] == [15, 15] and max(widths[2:]) == 5  # no row reads past 5 once the first has gone
    del model.decode_step
    assert_decoded_as_if_alone(model, rows, order[1:], Hypotheses(hyps.nbest[1:]), opts)


@pytest.mark.parametrize("opts", SEARCHES)
def test_a_sentence_joining_the_step_after_the_batch_emptied_decodes_as_if_alone(opts):
    model = tiny_model()
    rows = source_rows(model)[:2]
    alive_seen: list[int] = []

    def admit(alive: int):  # the second sentence once the first has finished
        alive_seen.append(alive)
        return batch_tensor(rows[1:], model.cfg.pad_id) if alive_seen.count(0) == 1 and alive == 0 else None

    hyps = run(model, rows[:1], opts, admit=admit)
    assert alive_seen[0] == 1 and alive_seen.count(0) == 2  # emptied twice: before it joined, at the end
    assert_decoded_as_if_alone(model, rows, [0, 1], hyps, opts)


@pytest.mark.parametrize("opts", SEARCHES)
def test_joining_sentences_are_handed_over_cancelled_and_streamed_like_the_first(opts):
    model = tiny_model()
    rows = source_rows(model)
    admit, order = join_schedule(model, rows, at=[0, 1, 1, 2])
    steps, done, reports = 0, {}, []

    def cancelled():  # sentence 2 (joined before step 1) is cancelled before step 3
        return [steps >= 3 and i == 2 for i in range(len(order))]

    def on_step(prefixes):
        nonlocal steps
        steps += 1
        reports.append(prefixes)

    hyps = run(model, rows[:1], opts, admit=admit, cancelled=cancelled, on_step=on_step,
               on_done=lambda i, nbest: done.setdefault(i, nbest))
    assert hyps.cancelled == [False, False, True, False] and hyps.nbest[2] == []
    assert sorted(done) == [0, 1, 3]
    for i in (0, 1, 3):
        assert done[i] == hyps.nbest[i] and reports[-1][i] == hyps.tokens[i]
        seen = [r[i] for r in reports if len(r) > i]
        for before, after in pairwise(seen):
            assert after[: len(before)] == before
    assert [len(r) for r in reports[:3]] == [1, 3, 4]  # each report covers the sentences so far


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    rows = source_rows(model)
    opts = DecodeOptions(sample=True, top_k=10, top_p=0.9, temperature=1.5, seed=3)
    first, second = run(model, rows, opts), run(model, rows, opts)
    assert first.tokens == second.tokens
    assert run(model, rows, opts.replace(seed=4)).tokens != first.tokens


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k", "top_p"])
def test_sampling_from_the_likeliest_token_only_is_greedy(cut):
    model = tiny_model()
    rows = source_rows(model)
    sampled = run(model, rows, DecodeOptions(sample=True, seed=0, **cut))
    greedy = run(model, rows, DecodeOptions())
    assert sampled.tokens == greedy.tokens


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2.5}, "beam_size"),
        ({"beam_size": 2, "n_best": 3}, "n_best"),
        ({"max_len": -1}, "max_len"),
        ({"max_len_b": -5}, "max_len_b"),
        ({"max_len_a": float("nan")}, "max_len_a"),
        ({"max_len_a": float("inf")}, "max_len_a"),
        ({"min_len": 500}, "min_len"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"length_penalty_form": "linear"}, "length_penalty_form"),
        ({"no_repeat_ngram": -1}, "no_repeat_ngram"),
        ({"sample": True, "top_p": 0.0}, "top_p"),
        ({"sample": True, "temperature": 0.0}, "temperature"),
        ({"top_k": 5}, "top_k"),
        ({"sample": True, "beam_size": 2}, "sample"),
    ],
)
def test_invalid_options_raise_errors_naming_the_option(changes, name):
    with pytest.raises(DecodeOptionError) as e:
        DecodeOptions(**changes)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(name + " ")


def test_prefix_longer_than_the_hard_cap_is_an_error():
    model = tiny_model()
    with pytest.raises(DecodeOptionError, match="^prefix"):
        run(model, source_rows(model)[:1], DecodeOptions(max_len=3), prefix=[[5, 6, 7]])


@pytest.mark.parametrize("opts", SEARCHES)
def test_empty_batch_gives_empty_output(opts):
    hyps = search(tiny_model(), torch.zeros(0, 0, dtype=torch.long), opts)
    assert hyps.nbest == [] and hyps.tokens == [] and hyps.cancelled == []


def test_presets_set_length_conventions_and_take_overrides():
    ct2 = DecodeOptions.preset("ctranslate2")
    assert (ct2.beam_size, ct2.length_includes_eos, ct2.max_len) == (2, False, 256)
    assert DecodeOptions.preset("fairseq", beam_size=2).beam_size == 2
    assert DecodeOptions.preset("gnmt").length_penalty_form == "gnmt"
    with pytest.raises(DecodeOptionError, match="^preset"):
        DecodeOptions.preset("moses")
