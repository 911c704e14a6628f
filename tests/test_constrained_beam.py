"""Constrained beam search checked exactly against hand-written per-step probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from tests.scripted_model import EOS, A, B, C, ScriptedModel, sources
from tests.test_beam_scripted import TABLE
from tests.test_decoding import run, source_rows, tiny_model
from translator.constrained_beam import constrained_beam_search
from translator.decoding import DecodeOptionError, DecodeOptions, beam_search, search
from translator.phrases import PhraseTable, Progress

log = math.log

# Sentence 7 (from test_beam_scripted): beam search prefers B (.36); C only comes after A (A C .30)
# or B (B C .04).
# Sentence 10: C EOS (.81) unless A and B are both required: A B and B A (.025 each) beat C A B and
# C B A (.0225 each).
# Sentence 11: C EOS (.54) unless A B C is required: A B C (.1) beats C A B C (.012).
CONSTRAINED = TABLE | {
    (7, A, C): {EOS: 1.0},
    (7, B, C): {EOS: 1.0},
    (10,): {C: 0.9, A: 0.05, B: 0.05},
    (10, C): {EOS: 0.9, A: 0.05, B: 0.05},
    (10, C, A): {B: 0.5, EOS: 0.5},
    (10, C, B): {A: 0.5, EOS: 0.5},
    (10, A): {B: 0.5, C: 0.5},
    (10, B): {A: 0.5, C: 0.5},
    (11,): {C: 0.6, A: 0.4},
    (11, C): {EOS: 0.9, A: 0.1},
    (11, A): {B: 0.5, EOS: 0.5},
    (11, A, B): {C: 0.5, A: 0.5},
    (11, C, A): {B: 1.0},
    (11, C, A, B): {C: 0.2, EOS: 0.8},
}
RAW = DecodeOptions(length_penalty=0.0)  # rank by summed log-probability
# The constraints of each sentence in the tests below.
PHRASES = {7: [[C]], 10: [[A], [B]], 11: [[A, B, C]], 9: []}


def constrained(keys, beam_size, **opts):
    return search(ScriptedModel(CONSTRAINED), sources(*keys), RAW.replace(beam_size=beam_size, **opts),
                  constraints=[PHRASES[k] for k in keys])


@pytest.mark.parametrize("beam_size", [1, 5])
def test_a_phrase_beam_search_would_not_produce_appears(beam_size):
    assert beam_search(ScriptedModel(CONSTRAINED), sources(7), RAW.replace(beam_size=5)).tokens == [[B]]
    hyps = constrained([7], beam_size)
    best = hyps.nbest[0][0]
    assert best.tokens == [A, C] and best.unmet == ()


@pytest.mark.parametrize("beam_size", [1, 5])
def test_the_constrained_hypothesis_is_scored_by_the_model(beam_size):
    best = constrained([7], beam_size).nbest[0][0]
    assert best.log_probs == pytest.approx([log(0.6), log(0.5)])
    assert best.eos_log_prob == pytest.approx(0.0)
    assert best.score == pytest.approx(log(0.6 * 0.5 * 1.0))  # nothing added for the phrase


def test_nbest_lists_only_hypotheses_with_the_phrase_best_first():
    first, second = constrained([7], 5, n_best=2).nbest[0]
    assert (first.tokens, second.tokens) == ([A, C], [B, C])
    assert second.score == pytest.approx(log(0.4 * 0.1))


@pytest.mark.parametrize("beam_size", [1, 5])
def test_two_phrases_both_appear(beam_size):
    assert beam_search(ScriptedModel(CONSTRAINED), sources(10), RAW.replace(beam_size=5)).tokens == [[C]]
    best = constrained([10], beam_size).nbest[0][0]
    assert best.tokens == [A, B]  # ties B A at .025; A, the lower id, ranks first
    assert best.score == pytest.approx(log(0.05 * 0.5))


@pytest.mark.parametrize("beam_size", [1, 5])
def test_a_phrase_of_three_tokens_appears_whole(beam_size):
    best = constrained([11], beam_size).nbest[0][0]
    assert best.tokens == [A, B, C] and best.unmet == ()
    assert best.score == pytest.approx(log(0.4 * 0.5 * 0.5))


def test_a_phrase_the_budget_cannot_hold_gives_the_best_hypothesis_and_names_the_phrase():
    # Two steps: A B C cannot fit, so the search is plain beam search, and says what is missing.
    best = constrained([11], 5, max_len_a=0.0, max_len_b=2).nbest[0][0]
    assert best.tokens == [C]
    assert best.score == pytest.approx(log(0.6 * 0.9))
    assert best.unmet == (0,)


def test_length_penalty_divides_the_models_score():
    best = constrained([11], 5, length_penalty=1.0).nbest[0][0]
    assert best.tokens == [A, B, C]
    assert best.score == pytest.approx(log(0.1) / 4)  # three tokens and EOS


def test_forced_prefix_comes_first_and_the_phrase_after_it():
    hyps = search(ScriptedModel(CONSTRAINED), sources(7), RAW.replace(beam_size=5), prefix=[[B]],
                  constraints=[[[C]]])
    assert hyps.tokens == [[B, C]]
    assert hyps.scores[0] == pytest.approx(log(0.4 * 0.1))


@pytest.mark.parametrize("beam_size", [1, 5])
def test_batched_equals_one_by_one(beam_size):
    keys = [7, 10, 11, 9]
    batched = constrained(keys, beam_size, n_best=1)
    alone = [constrained([k], beam_size, n_best=1) for k in keys]
    assert batched.tokens == [h.tokens[0] for h in alone]
    assert batched.scores == pytest.approx([h.scores[0] for h in alone])
    # Sentence 9, without phrases, as beam search of the same size finds it.
    assert batched.tokens[3] == beam_search(ScriptedModel(CONSTRAINED), sources(9), RAW.replace(beam_size=beam_size)).tokens[0]


def test_streamed_prefixes_end_as_the_output_and_every_sentence_is_handed_over():
    reports, done = [], {}
    hyps = search(ScriptedModel(CONSTRAINED), sources(7, 11), RAW.replace(beam_size=3),
                  constraints=[[[C]], [[A, B, C]]], on_step=reports.append,
                  on_done=lambda i, nbest: done.setdefault(i, nbest))
    assert reports[-1] == hyps.tokens == [[A, C], [A, B, C]]
    assert {i: [h.tokens for h in n] for i, n in done.items()} == {0: [[A, C]], 1: [[A, B, C]]}


def test_sampling_with_phrases_is_refused():
    with pytest.raises(DecodeOptionError, match="sample"):
        search(ScriptedModel(CONSTRAINED), sources(7), DecodeOptions(sample=True, seed=1), constraints=[[[C]]])


@pytest.mark.parametrize("phrase", [[], [EOS], [99]])
def test_bad_phrases_are_errors_naming_the_sentence(phrase):
    with pytest.raises(DecodeOptionError, match="constraint 0 of sentence 0"):
        search(ScriptedModel(CONSTRAINED), sources(7), RAW.replace(beam_size=2), constraints=[[phrase]])


def test_a_broken_partial_match_starts_over():
    table = PhraseTable.of([[[A, B, C]]], 1, 6, EOS)
    sentence = torch.tensor([0])
    progress = Progress.start(table, sentence)
    seen = []
    for token in (A, B, A, B, C):
        progress = progress.after(torch.tensor([token]), table, sentence)
        seen.append((int(progress.inside[0]), int(progress.matched[0]), bool(progress.met[0, 0])))
    assert seen == [(0, 1, False), (0, 2, False), (0, 1, False), (0, 2, False), (-1, 0, True)]


@pytest.mark.parametrize("opts", [DecodeOptions(beam_size=3, n_best=3),
                                  DecodeOptions(beam_size=4, n_best=2, length_penalty=0.6, length_penalty_form="gnmt")],
                         ids=["beam3", "beam4-gnmt"])
def test_without_phrases_it_equals_beam_search(opts):
    model = tiny_model()
    rows = source_rows(model)
    plain = run(model, rows, opts)
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                                          padding_value=model.cfg.pad_id)
    unconstrained = constrained_beam_search(model, src, opts, [[] for _ in rows])
    assert unconstrained.tokens == plain.tokens
    assert unconstrained.scores == pytest.approx(plain.scores, abs=1e-5)


def test_phrases_appear_in_a_real_models_output():
    model = tiny_model()
    rows = source_rows(model)
    phrases = [[[7, 8]], [[9], [10, 11, 12]], [], [[13]]]
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                                          padding_value=model.cfg.pad_id)
    hyps = search(model, src, DecodeOptions(beam_size=4, max_len_b=20), constraints=phrases)
    for tokens, wanted, nbest in zip(hyps.tokens, phrases, hyps.nbest):
        assert nbest[0].unmet == ()
        for phrase in wanted:
            assert any(tokens[i : i + len(phrase)] == phrase for i in range(len(tokens)))


def test_no_word_continuation_follows_a_phrase():
    # Sentence 10 with A required: A B and A C tie (.025); B, the lower id, wins unless B continues a word.
    model = ScriptedModel(CONSTRAINED)
    assert search(model, sources(10), RAW.replace(beam_size=5), constraints=[[[A]]]).tokens == [[A, B]]
    glued = torch.tensor([False, False, False, False, True, False])  # B continues the word before it
    hyps = search(model, sources(10), RAW.replace(beam_size=5), constraints=[[[A]]], continuations=glued)
    assert hyps.tokens == [[A, C]]
    assert hyps.scores[0] == pytest.approx(log(0.05 * 0.5))


def test_cancelled_sentence_leaves_at_once():
    polls = []

    def cancelled():
        polls.append(1)
        return [False, len(polls) > 1]  # sentence 11 is cancelled before the second step

    model = ScriptedModel(CONSTRAINED)
    hyps = search(model, sources(7, 11), RAW.replace(beam_size=2), constraints=[[[C]], [[A, B, C]]],
                  cancelled=cancelled)
    assert hyps.cancelled == [False, True]
    assert hyps.tokens == [[A, C], []]
    assert model.batch_sizes[:2] == [2, 2]
