"""Beam and greedy search checked exactly against hand-written per-step probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from tests.scripted_model import EOS, A, B, C, ScriptedModel, sources
from translator.beam import beam_candidates, each_beams_best
from translator.decoding import DecodeOptions, beam_search, greedy_search
from translator.length import length_penalty

log = math.log

# Sentence 7: greedy takes A (.6), then EOS and C tie at .5 (EOS, the lower id, wins): A = .30.
# Beam 2 also keeps B (.4), whose EOS (.9) gives B = .36, the better sentence.
# Sentence 8: EOS right away (.3) against A-EOS (.25): the length penalty decides.
# Sentence 9: C C EOS (.56) needs three steps; A EOS (.3) finishes first.
# Sentence 5: A then A again is likely: a repeat to forbid; A-EOS (.095) still beats EOS (.05).
TABLE = {
    (7,): {A: 0.6, B: 0.4},
    (7, A): {EOS: 0.5, C: 0.5},
    (7, B): {EOS: 0.9, C: 0.1},
    (8,): {A: 0.5, EOS: 0.3, B: 0.2},
    (8, A): {EOS: 0.5, C: 0.5},
    (8, B): {EOS: 1.0},
    (9,): {C: 0.7, A: 0.3},
    (9, C): {C: 0.8, EOS: 0.2},
    (9, A): {EOS: 1.0},
    (5,): {A: 0.95, EOS: 0.05},
    (5, A): {A: 0.9, EOS: 0.1},
}

RAW = DecodeOptions(length_penalty=0.0)  # rank by summed log-probability


def beam(keys, **opts):
    model = ScriptedModel(TABLE)
    return beam_search(model, sources(*keys), RAW.replace(beam_size=2, **opts)), model


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_candidates_break_ties_by_beam_then_token(n):
    # Two beams over four tokens; scores 0 and -1 with log-probabilities making four ties at -1.
    scores = torch.tensor([[0.0, -1.0]])
    logp = torch.tensor([[[-2.0, -1.0, -1.0, -3.0], [-5.0, 0.0, -4.0, 0.0]]])
    cand = beam_candidates(scores, logp, n)
    ties = [(0, 1), (0, 2), (1, 1), (1, 3)]  # (beam, token) of the four at -1, in stable order
    assert list(zip(cand.beams[0].tolist(), cand.tokens[0].tolist())) == ties[:n]
    assert cand.scores[0].tolist() == [-1.0] * n


def test_beam_finds_the_likelier_sentence_greedy_misses():
    greedy = greedy_search(ScriptedModel(TABLE), sources(7), RAW)
    assert greedy.tokens == [[A]]
    assert greedy.scores[0] == pytest.approx(log(0.6 * 0.5))
    hyps, _ = beam([7])
    assert hyps.tokens == [[B]]
    assert hyps.scores[0] == pytest.approx(log(0.4 * 0.9))


def test_nbest_lists_finished_hypotheses_best_first_with_token_scores():
    hyps, _ = beam([7], n_best=2)
    first, second = hyps.nbest[0]
    assert (first.tokens, second.tokens) == ([B], [A])  # A-EOS outranks its tie A-C: EOS has the lower id
    assert first.log_probs == pytest.approx([log(0.4)])
    assert first.eos_log_prob == pytest.approx(log(0.9))
    assert second.score == pytest.approx(log(0.6 * 0.5))


def expected_scores(alpha: float, form: str, with_eos: bool) -> dict[tuple[int, ...], float]:
    """Sentence 8's two finished hypotheses, scored with the penalty's own formula."""
    out = {}
    for tokens, p in (((), 0.3), ((A,), 0.5 * 0.5)):
        n = len(tokens) + with_eos
        out[tokens] = log(p) / float(length_penalty(torch.tensor([n]), alpha, form)[0])
    return out


@pytest.mark.parametrize(
    ("alpha", "form", "with_eos"),
    [(0.0, "power", True), (1.0, "power", True), (1.0, "gnmt", True), (1.0, "power", False)],
)
def test_length_penalty_decides_between_short_and_long(alpha, form, with_eos):
    hyps, _ = beam([8], n_best=2, length_penalty=alpha, length_penalty_form=form, length_includes_eos=with_eos)
    expected = expected_scores(alpha, form, with_eos)
    ranked = sorted(expected, key=lambda t: -expected[t])
    assert [tuple(h.tokens) for h in hyps.nbest[0]] == ranked
    assert [h.score for h in hyps.nbest[0]] == pytest.approx([expected[t] for t in ranked])


def test_finished_sentence_leaves_the_batch_and_others_are_unchanged():
    hyps, model = beam([7, 9])
    alone = [beam([k])[0] for k in (7, 9)]
    assert hyps.tokens == [alone[0].tokens[0], alone[1].tokens[0]] == [[B], [C, C]]
    assert hyps.scores == pytest.approx([log(0.4 * 0.9), log(0.7 * 0.8)])
    # Step 1 runs two sentences on one beam each, step 2 two beams each, step 3 sentence 9 only.
    assert model.batch_sizes == [2, 4, 2]


def test_budget_ends_hypotheses_without_eos():
    hyps, _ = beam([9], max_len_a=0.0, max_len_b=2)
    best = hyps.nbest[0][0]
    assert best.tokens == [C, C] and best.eos_log_prob is None
    assert best.score == pytest.approx(log(0.7 * 0.8))


def test_min_len_forbids_early_eos():
    hyps, _ = beam([8], min_len=1)
    assert hyps.tokens == [[A]]
    assert hyps.scores[0] == pytest.approx(log(0.5 * 0.5))


@pytest.mark.parametrize("search", [greedy_search, beam_search], ids=["greedy", "beam"])
def test_forced_prefix_is_kept_and_scored(search):
    opts = RAW.replace(beam_size=1 if search is greedy_search else 2)
    hyps = search(ScriptedModel(TABLE), sources(7, 7), opts, prefix=[[B], [A, C]])
    assert hyps.tokens == [[B], [A, C]]
    assert hyps.scores == pytest.approx([log(0.4 * 0.9), log(0.6 * 0.5 * 1.0)])
    assert hyps.nbest[1][0].log_probs == pytest.approx([log(0.6), log(0.5)])


@pytest.mark.parametrize("beam_size", [1, 2])
def test_no_repeat_ngram_forbids_repeats(beam_size):
    search = greedy_search if beam_size == 1 else beam_search
    opts = RAW.replace(beam_size=beam_size)
    assert search(ScriptedModel(TABLE), sources(5), opts).tokens == [[A, A]]
    hyps = search(ScriptedModel(TABLE), sources(5), opts.replace(no_repeat_ngram=1))
    assert hyps.tokens == [[A]]
    assert hyps.scores[0] == pytest.approx(log(0.95 * 0.1))


def test_cancelled_sentence_leaves_at_once():
    polls = []

    def cancelled():
        polls.append(1)
        return [False, len(polls) > 1]  # sentence 9 is cancelled before the second step

    model = ScriptedModel(TABLE)
    hyps = beam_search(model, sources(7, 9), RAW.replace(beam_size=2), cancelled=cancelled)
    assert hyps.cancelled == [False, True]
    assert hyps.tokens == [[B], []] and hyps.nbest[1] == []
    assert model.batch_sizes == [2, 2]


@pytest.mark.parametrize(
    ("search", "expected"),
    [(greedy_search, [[C], [C, C], [C, C]]), (beam_search, [[], [], [C, C]])],
    ids=["greedy", "beam"],
)
def test_on_step_streams_only_settled_tokens(search, expected):
    # Beam: after step 2 the live C C and the finished A disagree from the first token on.
    reports = []
    opts = RAW.replace(beam_size=1 if search is greedy_search else 2)
    search(ScriptedModel(TABLE), sources(9), opts, on_step=lambda p: reports.append(p[0]))
    assert reports == expected


def test_joining_sentences_are_scored_exactly_and_stream_only_their_own_tokens():
    # Sentences 6 and 7 join sentence 9 before its second step, with two rows each (beam 1 dead).
    # Sentence 6's tokens are certain: its one live beam and its dead one agree on every column,
    # the columns past its own step included; only its own tokens are final.
    model = ScriptedModel(TABLE | {(6,): {C: 1.0}, (6, C): {A: 1.0}})
    calls = []

    def admit(alive):
        calls.append(alive)
        return sources(6, 7) if len(calls) == 2 else None

    reports = []
    hyps = beam_search(model, sources(9), RAW.replace(beam_size=2), on_step=reports.append, admit=admit)
    assert hyps.tokens == [[C, C], [C, A], [B]]  # each as alone: 7 ranks A-EOS over its tie A-C
    assert hyps.scores == pytest.approx([log(0.7 * 0.8), 0.0, log(0.4 * 0.9)])
    assert model.batch_sizes == [1, 6, 6, 2]
    assert reports == [[[]], [[], [C], []], [[C, C], [C, A], [B]], [[C, C], [C, A], [B]]]


def ranked_by_stable_sort(scores, logp, n):
    """Reference: all k * V candidates of each sentence, best first, ties in flat order."""
    b, k, V = logp.shape
    total = (scores[:, :, None] + logp).view(b, k * V)
    ranked = [sorted(range(k * V), key=lambda i: (-float(total[s, i]), i))[:n] for s in range(b)]
    return [[divmod(i, V) for i in r] for r in ranked], [[float(total[s, i]) for i in r] for s, r in enumerate(ranked)]


@pytest.mark.parametrize("seed", range(4))
def test_candidates_from_each_beams_best_equal_ranking_all_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    b, k, V, n = 7, 3, 40, 6
    # Distinct values within a beam, with its two best tied (a tie inside, not across, the cut);
    # half-unit steps make equal sums across beams common.
    logp = torch.stack([-torch.randperm(V, generator=g).float() * 0.5 for _ in range(b * k)]).view(b, k, V)
    best2 = logp.topk(2, dim=2).indices
    logp.scatter_(2, best2[:, :, 1:], logp.gather(2, best2[:, :, :1]))
    scores = (torch.randint(0, 4, (b, k), generator=g) * -0.5).float()
    assert each_beams_best(scores, logp, n) is not None  # the short path is the one under test
    got = beam_candidates(scores, logp, n)
    pairs, totals = ranked_by_stable_sort(scores, logp, n)
    assert [list(zip(got.beams[s].tolist(), got.tokens[s].tolist())) for s in range(b)] == pairs
    assert got.scores.tolist() == totals


def test_candidates_with_a_tie_at_a_beams_cut_rank_all_tokens():
    logp = torch.full((1, 2, 10), -9.0)
    logp[0, 0, :4] = torch.tensor([-1.0, -2.0, -2.0, -2.0])  # n = 2: the cut falls inside a tie
    logp[0, 1, 5] = -0.5
    scores = torch.tensor([[0.0, -3.0]])
    assert each_beams_best(scores, logp, 2) is None
    got = beam_candidates(scores, logp, 2)
    pairs, totals = ranked_by_stable_sort(scores, logp, 2)
    assert list(zip(got.beams[0].tolist(), got.tokens[0].tolist())) == pairs[0]
    assert got.scores[0].tolist() == totals[0]
