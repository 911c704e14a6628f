"""Lexically constrained beam search: required target phrases (translator.phrases) appear in the
output, placed by the search itself. Dynamic beam allocation (Post & Vilar 2018), run over the
whole batch at once (Hu et al. 2019).

Each step (per sentence, K = beam_size):
  1. candidates: the 2K best extensions of all beams (as in plain beam search), each beam's best
     token, and each beam's tokens that advance a phrase (`Progress.wanted`); a (beam, token)
     pair listed twice counts once;
  2. banks: a candidate's bank is the number of constraint tokens it has in place, or 0 when its
     budget no longer leaves room for the rest and EOS (it competes on score alone);
  3. the candidates are ordered round robin over the banks, the fullest first, best first within
     each (an empty bank's places go to the others); with no phrases this is plain score order;
  4. an EOS candidate within the first K finishes (at the last step, each of the first K does);
     the first K others become the next beams. EOS is allowed only to a beam that has met every
     phrase, or that no longer has room to; after a phrase's last token, no token that would
     continue its last word (`continuations`) may follow, so that the phrase stays as given;
  5. the stopping rules of translator.beam, counting only hypotheses that met every phrase.
Scores are the model's own log-probabilities: nothing is added for a phrase. Finished hypotheses
rank by whether they met every phrase, then by score; one that did not lists the phrases it lacks
(Hypothesis.unmet). Sentences do not join a constrained search while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from translator.beam import NEG_INF, Beams, Finished, beam_candidates, settled_prefixes
from translator.decode_options import DecodeOptions
from translator.hooks import Cancelled, OnDone, OnStep
from translator.hypotheses import Hypotheses, make_hypotheses
from translator.phrases import PhraseTable, Progress
from translator.search_setup import SearchSetup, Steps, on_source_device, start_search, whole
from translator.seq2seq import Seq2Seq


@on_source_device
@torch.inference_mode()
def constrained_beam_steps(
    model: Seq2Seq,
    src: Tensor,
    opts: DecodeOptions,
    constraints: list[list[list[int]]],
    *,
    prefix: list[list[int]] | None = None,
    cancelled: Cancelled | None = None,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
    continuations: Tensor | None = None,
) -> Steps:
    """Beam search over src (B, S) with K = opts.beam_size (1 included) whose outputs contain, per
    sentence, each of its phrases constraints[i] (token-id lists); a step per next(). Returns
    opts.n_best hypotheses each. See the module docstring; the hooks and `prefix` as in beam_steps.
    continuations (V,): True for the tokens that continue the word before them (SentencePiece
    pieces without the word-start mark); None lets any token follow a phrase."""
    B, S = src.shape
    if B == 0:
        return Hypotheses([])
    table = PhraseTable.of(constraints, B, model.cfg.vocab_size, model.cfg.eos_id, continuations)
    run = start_search(model, src, opts, prefix, cancelled, on_step, on_done)
    beams = Beams.start(torch.arange(B), 1, S if opts.alignment else None, model.cfg.bos_id)
    progress = Progress.start(table, beams.sentence)
    finished = Finished(B, opts)
    while True:
        yield
        stay = run.hooks.poll(beams.sentence)
        if stay is not None:
            k = beams.scores.size(1)
            rows = (stay.nonzero() * k + torch.arange(k)).flatten()  # (b'*k,)
            run.cache.select(rows)
            beams, progress = beams.keep(stay, rows), progress.select(rows)
        if not beams.count:
            break
        logits = model.decode_step(beams.last, run.cache, record_alignment=opts.alignment)[:, -1]  # (b*k, V)
        beams, progress = advance(beams, progress, logits, table, run, finished, opts, model.cfg.eos_id)
        if run.hooks.streaming:
            run.hooks.report(settled_prefixes(beams, finished, run.hooks.flags))
    nbest = [[] if gone else hyps[: opts.n_best] for hyps, gone in zip(finished.hyps, run.hooks.flags)]
    return Hypotheses(nbest, list(run.hooks.flags))


@dataclass
class Ranked:
    """Each sentence's M candidates in the order they take beam places; each (b, M)."""

    scores: Tensor  # summed log-probability of beam + token, -inf for none
    tokens: Tensor  # the token added
    log_probs: Tensor  # its log-probability
    parent: Tensor  # the beam row it extends
    progress: Progress  # (b*M rows) where each stands with its sentence's phrases


def step_log_probs(beams: Beams, progress: Progress, logits: Tensor, table: PhraseTable, run: SearchSetup,
                   eos: int) -> Tensor:
    """Next-token log-probabilities (b*k, V) of the beams, with the step rules and the phrase rules
    (no word continuation right after a phrase; no EOS while every phrase can still fit) applied."""
    step, k = beams.tokens.size(1), beams.scores.size(1)
    row_sentence = beams.sentence.repeat_interleave(k)  # (b*k,)
    logp = logits.float().log_softmax(dim=-1)  # (b*k, V)
    run.rules.apply(logp, step, row_sentence, beams.tokens)
    if table.continuations is not None:
        logp.masked_fill_(progress.just_met[:, None] & table.continuations, NEG_INF)
    steps_left = run.budget[row_sentence] - step  # (b*k,) this step included
    owed = table.total[row_sentence] - progress.tokens_met(table, row_sentence)  # (b*k,)
    logp[(owed > 0) & (owed < steps_left), eos] = NEG_INF
    return logp


def rank(beams: Beams, progress: Progress, logp: Tensor, table: PhraseTable, budget: Tensor, K: int) -> Ranked:
    """The candidates of each sentence, scored, banked and put in bank order (module docstring)."""
    b, k = beams.scores.shape
    V = logp.size(-1)
    step = beams.tokens.size(1)
    row_sentence = beams.sentence.repeat_interleave(k)  # (b*k,)
    cand_beam, tokens = candidates(beams.scores, logp.view(b, k, V), progress.wanted(table, row_sentence), K)
    M = cand_beam.size(1)
    parent = torch.arange(b)[:, None] * k + cand_beam  # (b, M) row each candidate extends
    log_probs = logp[parent, tokens]  # (b, M)
    scores = beams.scores.gather(1, cand_beam) + log_probs  # (b, M)
    scores = scores.masked_fill(duplicates(cand_beam * V + tokens), NEG_INF)
    cand_sentence = beams.sentence.repeat_interleave(M)  # (b*M,)
    after = progress.select(parent.flatten()).after(tokens.flatten(), table, cand_sentence)
    met = after.tokens_met(table, cand_sentence).view(b, M)
    total = table.total[beams.sentence][:, None]  # (b, 1)
    room = budget[beams.sentence][:, None] - step - 1 - (total - met)  # (b, M) steps to spare after the phrases
    banks = torch.where((room >= 1) | (met == total), met, 0)
    order = bank_order(scores, cand_beam * V + tokens, banks, int(table.total.max()) + 1)  # (b, M)
    pick = (torch.arange(b)[:, None] * M + order).flatten()  # (b*M,) rows of `after`, in order
    return Ranked(*(x.gather(1, order) for x in (scores, tokens, log_probs, parent)), after.select(pick))


def advance(beams: Beams, progress: Progress, logits: Tensor, table: PhraseTable, run: SearchSetup,
            finished: Finished, opts: DecodeOptions, eos: int) -> tuple[Beams, Progress]:
    """One constrained step: register finished candidates, pick the next beams, drop stopped sentences."""
    K = opts.beam_size
    step = beams.tokens.size(1)  # sentences never join: all are at one step
    logp = step_log_probs(beams, progress, logits, table, run, eos)  # (b*k, V)
    step_align = run.cache.alignments.pop() if opts.alignment else None  # (b*k, S)
    ranked = rank(beams, progress, logp, table, run.budget, K)
    scores, cand_token, cand_logp, parent, after = (ranked.scores, ranked.tokens, ranked.log_probs,
                                                    ranked.parent, ranked.progress)
    M = scores.size(1)

    is_eos = cand_token == eos
    last_step = run.budget[beams.sentence] <= step + 1  # (b,)
    top = torch.arange(M) < K
    finish = torch.isfinite(scores) & top & (is_eos | last_step[:, None])  # (b, M)
    if finish.any():
        r, j = finish.nonzero(as_tuple=True)
        toks, lps, align = beams.rows(parent[r, j], cand_token[r, j], cand_logp[r, j], step_align)
        sentence = beams.sentence[r]
        hyps = make_hypotheses(toks, lps, torch.full_like(r, step + 1), is_eos[r, j], scores[r, j], opts, align,
                               run.src_lengths[sentence])
        for h, unmet in zip(hyps, after.select(r * M + j).unmet(table, sentence)):
            h.unmet = unmet
        finished.add(sentence.tolist(), hyps)
    live = (is_eos.long() * M + torch.arange(M)).argsort(dim=1)[:, :K]  # (b, K) non-EOS first, in order
    live_scores = scores.gather(1, live).masked_fill(is_eos.gather(1, live), NEG_INF)  # (b, K)
    best_live = live_scores.max(dim=1).values  # (b,) bank order is not score order
    stop = last_step | ~torch.isfinite(best_live) | finished.satisfied(beams.sentence, best_live)
    if run.hooks.wants_done:
        for s in beams.sentence[stop].tolist():
            run.hooks.done(s, finished.hyps[s][: opts.n_best])
    keep = (~stop).nonzero().squeeze(1)  # (b',)
    chosen = live[keep]  # (b', K)
    rows = parent.gather(1, live)[keep].flatten()  # (b'*K,)
    toks, lps, align = beams.rows(rows, cand_token[keep].gather(1, chosen).flatten(),
                                  cand_logp[keep].gather(1, chosen).flatten(), step_align)
    run.cache.select(rows, group=K)
    nxt = Beams(beams.sentence[keep], live_scores[keep], toks, lps, align, toks[:, -1:])
    return nxt, after.select((keep[:, None] * M + chosen).flatten())


def candidates(scores: Tensor, logp: Tensor, wanted: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Beams (b, k) with next-token logp (b, k, V) and the tokens each beam wants (b*k, C), -1 for
    none -> the (beam, token) pairs to rank, each (b, M): the 2K best, each beam's best token, and
    the wanted tokens (a beam's unwanted slots repeat its best token)."""
    b, k, V = logp.shape
    best = beam_candidates(scores, logp, min(2 * K, k * V))
    own_best = logp.argmax(dim=2)  # (b, k)
    C = wanted.size(1)
    wanted = wanted.view(b, k, C)
    wanted = torch.where(wanted >= 0, wanted, own_best[:, :, None]).view(b, k * C)
    beam = torch.arange(k)
    cand_beam = torch.cat([best.beams, beam.expand(b, k), beam.repeat_interleave(C).expand(b, k * C)], dim=1)
    return cand_beam, torch.cat([best.tokens, own_best, wanted], dim=1)


def duplicates(flat: Tensor) -> Tensor:
    """(b, M) True at each repeat of a value already seen earlier in its row."""
    ordered, at = flat.sort(dim=1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(repeat).scatter(1, at, repeat)


def bank_order(scores: Tensor, flat: Tensor, banks: Tensor, n_banks: int) -> Tensor:
    """(b, M) candidate indices: round robin over the banks (b, M), the fullest first, each bank
    best first (ties: lower beam * V + token); candidates with -inf scores last."""
    by_flat = flat.argsort(dim=1)
    by_score = scores.gather(1, by_flat).argsort(dim=1, descending=True, stable=True)
    ranked = by_flat.gather(1, by_score)  # (b, M) best first
    bank = banks.gather(1, ranked)
    seen = torch.nn.functional.one_hot(bank, n_banks).cumsum(dim=1)  # (b, M, n_banks)
    place = seen.gather(2, bank[:, :, None]).squeeze(2) - 1  # (b, M) rank within its bank
    key = place * n_banks + (n_banks - 1 - bank)
    key = key.masked_fill(~torch.isfinite(scores.gather(1, ranked)), torch.iinfo(torch.long).max)
    return ranked.gather(1, key.argsort(dim=1, stable=True))


constrained_beam_search = whole(constrained_beam_steps, "constrained_beam_search")
