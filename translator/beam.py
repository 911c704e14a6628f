"""Beam search, batched over sentences, with beams reordered in the decoder cache and never recomputed.

Each step (per sentence, K = beam_size):
  1. every live beam is extended by every token; the 2K best candidates are kept, best first,
     ties going to the lower beam, then the lower token id (`beam_candidates`, the step strategy);
  2. an EOS candidate ranked within the first K finishes (at the sentence's last step, every one
     of the first K finishes, EOS or not); finite scores only;
  3. the K best non-EOS candidates become the next beams (short of K, the rest are dead: -inf);
  4. the sentence stops at its last step, when no beam is alive, or
       length_penalty == 0: when its n_best-th finished score is at least the best live score
         (exact: scores only fall as tokens are added);
       otherwise: when it holds K finished hypotheses (fairseq; CTranslate2 with patience 1).
  Stopped sentences leave the batch: their rows are dropped from the cache with the reordering.
Sentences may join the batch before any step (`admit`): each enters with as many rows as the
others, beam 0 alive at score 0 and the rest dead (-inf), which ranks its candidates exactly as a
first step on one row does, and goes on at its own step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from translator.cache import filling_order
from translator.decode_options import DecodeOptions
from translator.hooks import Admit, Cancelled, OnDone, OnStep
from translator.hypotheses import Hypotheses, Hypothesis, make_hypotheses, padded
from translator.search_setup import SearchSetup, Steps, on_source_device, start_search, whole
from translator.seq2seq import Seq2Seq

NEG_INF = float("-inf")


@dataclass
class Candidates:
    """The best extensions of each sentence's beams, best first; each (b, n)."""

    scores: Tensor  # summed log-probability of beam + token
    beams: Tensor  # the beam (0..k-1) extended
    tokens: Tensor  # the token added


def beam_candidates(scores: Tensor, logp: Tensor, n: int) -> Candidates:
    """The beam step: beams with summed scores (b, k) and next-token logp (b, k, V) -> n best per sentence."""
    b, k, V = logp.shape
    if n < V:
        short = each_beams_best(scores, logp, n)
        if short is not None:
            return short
    total = (scores[:, :, None] + logp).view(b, k * V)  # (b, k*V), flat index = beam * V + token
    values, flat = top_n_stable(total, n)
    return Candidates(values, flat // V, flat % V)


def each_beams_best(scores: Tensor, logp: Tensor, n: int) -> Candidates | None:
    """`beam_candidates` from each beam's n best tokens: a sentence's n best candidates are among
    them, and ranking k * n per sentence instead of k * V saves the sums over (b, k, V)
    (docs/HISTORY.md, round 4). None when a
    beam's n-th and (n+1)-th tokens tie (or it has fewer than n finite ones): which of the tied
    tokens rank first is then decided over all of them, by `top_n_stable`."""
    b, k, V = logp.shape
    values, tokens = logp.topk(n + 1, dim=2)  # (b, k, n + 1), ties in no set order
    if bool((values[:, :, n] == values[:, :, n - 1]).any()):
        return None
    total = (scores[:, :, None] + values[:, :, :n]).view(b, k * n)  # the same sums as over all of V
    flat = (torch.arange(k)[:, None] * V + tokens[:, :, :n]).view(b, k * n)  # beam * V + token
    # Best first; equal sums in flat order (lower beam, then lower token), as top_n_stable ranks.
    flat, by_flat = flat.sort(dim=1)
    total, order = total.gather(1, by_flat).sort(dim=1, descending=True, stable=True)
    flat = flat.gather(1, order[:, :n])
    return Candidates(total[:, :n], flat // V, flat % V)


def top_n_stable(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest of each row of x (b, m), ordered as a stable descending sort would order them."""
    m = x.size(1)
    values, idx = x.topk(min(n + 1, m), dim=1)  # (b, n + 1), ties in no set order
    if m > n:
        # Rare: the (n+1)-th equals the n-th, a finite tie straddles the cut; sort those rows stably.
        straddle = torch.isfinite(values[:, n]) & (values[:, n] == values[:, n - 1])
        for r in straddle.nonzero().flatten().tolist():
            v, i = x[r].sort(descending=True, stable=True)
            values[r], idx[r] = v[: n + 1], i[: n + 1]
        values, idx = values[:, :n], idx[:, :n]
    idx, by_index = idx.sort(dim=1)
    values, order = values.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return values, idx.gather(1, order)


@dataclass
class Beams:
    """Live hypotheses of the b active sentences, k each; row r is sentence r // k, beam r % k.

    Histories are left-aligned: a sentence that has taken n steps holds them in its rows' first n
    columns. Sentences that joined later are at fewer steps (`steps`); later columns are unread.
    """

    sentence: Tensor  # (b,) batch index of each active sentence
    scores: Tensor  # (b, k) summed log-probabilities, -inf for a dead beam
    tokens: Tensor  # (b*k, t)
    log_probs: Tensor  # (b*k, t)
    alignment: Tensor | None  # (b*k, t, S)
    last: Tensor  # (b*k, 1) input of the next step
    steps: Tensor | None = None  # (b,) steps each sentence has taken; None: every one has taken t

    @classmethod
    def start(cls, sentence: Tensor, k: int, S: int | None, bos_id: int) -> Beams:
        """Sentences (n,) before their first step, k rows each: beam 0 at score 0, the others dead."""
        n = sentence.numel()
        scores = torch.full((n, k), NEG_INF)
        scores[:, 0] = 0
        return cls(sentence, scores, torch.zeros(n * k, 0, dtype=torch.long), torch.zeros(n * k, 0),
                   None if S is None else torch.zeros(n * k, 0, S), torch.full((n * k, 1), bos_id, dtype=torch.long))

    @property
    def count(self) -> int:
        return self.sentence.numel()

    def step(self) -> int | Tensor:
        """The step every sentence is at, or each sentence's (b,) when they differ."""
        return self.tokens.size(1) if self.steps is None else self.steps

    def rows(self, parent: Tensor, tokens: Tensor, log_probs: Tensor, step_align: Tensor | None):
        """History of rows `parent` (r,) extended by tokens / log_probs (r,) and step_align (b*k, S)."""
        toks = torch.cat([self.tokens[parent], tokens[:, None]], dim=1)  # (r, t + 1)
        lps = torch.cat([self.log_probs[parent], log_probs[:, None]], dim=1)
        align = new_align = None
        if self.alignment is not None and step_align is not None:
            # (r, S): the cache may have cut source positions no row reads any more (narrow_sources)
            new_align = padded(step_align[parent], 1, self.alignment.size(2))
            align = torch.cat([self.alignment[parent], new_align[:, None]], dim=1)  # (r, t + 1, S)
        if self.steps is not None:  # each at its sentence's own step (and, unread, in the last column)
            r, at = torch.arange(parent.numel()), self.steps[parent // self.scores.size(1)]  # (r,) each
            toks[r, at], lps[r, at] = tokens, log_probs
            if align is not None:
                align[r, at] = new_align
        return toks, lps, align

    def keep(self, stay: Tensor, rows: Tensor) -> Beams:
        """The sentences flagged in stay (b,), whose rows are `rows` (b'*k,)."""
        kept = Beams(self.sentence[stay], self.scores[stay], self.tokens[rows], self.log_probs[rows],
                     None if self.alignment is None else self.alignment[rows], self.last[rows],
                     None if self.steps is None else self.steps[stay])
        kept.compact()
        return kept

    def join(self, new: Beams) -> Beams:
        """These sentences followed by `new` ones at step 0, with as many rows each."""
        t = self.tokens.size(1)
        steps = self.steps if self.steps is not None else torch.full((self.count,), t, dtype=torch.long)
        align = None
        if self.alignment is not None and new.alignment is not None:
            S = max(self.alignment.size(2), new.alignment.size(2))
            align = torch.cat([padded(padded(a, 1, t), 2, S) for a in (self.alignment, new.alignment)])
        joined = Beams(torch.cat([self.sentence, new.sentence]), torch.cat([self.scores, new.scores]),
                       torch.cat([self.tokens, padded(new.tokens, 1, t)]),
                       torch.cat([self.log_probs, padded(new.log_probs, 1, t)]), align,
                       torch.cat([self.last, new.last]), torch.cat([steps, steps.new_zeros(new.count)]))
        joined.compact()
        return joined

    def compact(self) -> None:
        """Cut the history columns no sentence has reached; steps None once all are at one step."""
        if self.steps is None:
            return
        t = int(self.steps.max()) if self.count else 0
        if t < self.tokens.size(1):
            self.tokens, self.log_probs = self.tokens[:, :t], self.log_probs[:, :t]
            if self.alignment is not None:
                self.alignment = self.alignment[:, :t]
        if bool((self.steps == t).all()):
            self.steps = None


class Finished:
    """Finished hypotheses per sentence, best first, and what the stopping rule needs of them."""

    def __init__(self, B: int, opts: DecodeOptions) -> None:
        self.opts = opts
        self.hyps: list[list[Hypothesis]] = [[] for _ in range(B)]
        self.count = torch.zeros(B, dtype=torch.long)
        self.nth_best = torch.full((B,), NEG_INF)  # score of the n_best-th best, -inf if fewer

    def extend(self, n: int) -> None:
        """n more sentences joined the search."""
        self.hyps += [[] for _ in range(n)]
        self.count = torch.cat([self.count, self.count.new_zeros(n)])
        self.nth_best = torch.cat([self.nth_best, self.nth_best.new_full((n,), NEG_INF)])

    def add(self, sentences: list[int], hyps: list[Hypothesis]) -> None:
        for s, h in zip(sentences, hyps):
            self.hyps[s].append(h)
        n = self.opts.n_best
        for s in set(sentences):
            # Those lacking a required phrase (constrained search) rank last, and the stopping rule
            # counts only the others; stable: earlier wins ties.
            ranked = self.hyps[s] = sorted(self.hyps[s], key=lambda h: (bool(h.unmet), -h.score))
            complete = sum(not h.unmet for h in ranked)
            self.count[s] = complete
            if complete >= n:
                self.nth_best[s] = ranked[n - 1].score

    def satisfied(self, sentence: Tensor, best_live: Tensor) -> Tensor:
        """Which sentences (b,) may stop before their budget, given their best live score (b,)."""
        if self.opts.length_penalty == 0:
            return self.nth_best[sentence] >= best_live
        return self.count[sentence] >= self.opts.beam_size


@on_source_device
@torch.inference_mode()
def beam_steps(
    model: Seq2Seq,
    src: Tensor,
    opts: DecodeOptions,
    *,
    prefix: list[list[int]] | None = None,
    cancelled: Cancelled | None = None,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
    admit: Admit | None = None,
) -> Steps:
    """Beam search over src (B, S) with K = opts.beam_size, a step per next(); returns opts.n_best
    hypotheses each (translator.search_setup.Steps); `beam_search` runs it to its end.

    The first step runs on B rows (one beam each), later ones on b*K; sentences `admit` hands over
    join before a step with as many rows as the others, at their own step 0. See the module
    docstring for the rules, translator.hooks for the hooks, translator.constraints for `prefix`.
    """
    B, S = src.shape
    if B == 0:
        return Hypotheses([])
    run = start_search(model, src, opts, prefix, cancelled, on_step, on_done)
    beams = Beams.start(torch.arange(B), 1, S if opts.alignment else None, model.cfg.bos_id)
    finished = Finished(B, opts)
    while True:
        yield
        new = admit(beams.count) if admit is not None else None
        if new is not None and new.size(0):
            beams = join(model, new, beams, run, finished, opts)
        stay = run.hooks.poll(beams.sentence)
        if stay is not None:
            beams = drop_sentences(beams, stay, run)
        if not beams.count:
            break
        logits = model.decode_step(beams.last, run.cache, record_alignment=opts.alignment)[:, -1]  # (b*k, V)
        beams = advance(beams, logits, run, finished, opts, model.cfg.eos_id)
        if run.hooks.streaming:
            run.hooks.report(settled_prefixes(beams, finished, run.hooks.flags))
    nbest = [[] if gone else hyps[: opts.n_best] for hyps, gone in zip(finished.hyps, run.hooks.flags)]
    return Hypotheses(nbest, list(run.hooks.flags))


def join(model: Seq2Seq, src: Tensor, beams: Beams, run: SearchSetup, finished: Finished,
         opts: DecodeOptions) -> Beams:
    """Sentences src (n, S') join the search as sentences B, B + 1, ..., with as many rows as the others."""
    first, n = run.hooks.batch_size, src.size(0)
    run.admit(model, src, opts)  # the cache gives each its group of rows
    finished.extend(n)
    S = run.cache.src_mask.size(-1) if opts.alignment else None
    return beams.join(Beams.start(torch.arange(first, first + n), beams.scores.size(1), S, model.cfg.bos_id))


def advance(beams: Beams, logits: Tensor, run: SearchSetup, finished: Finished, opts: DecodeOptions, eos: int) -> Beams:
    """One beam step: register finished candidates, pick the next beams, drop stopped sentences."""
    b, k = beams.scores.shape
    K = opts.beam_size
    step = beams.step()  # shared, or (b,) per sentence
    logp = logits.float().log_softmax(dim=-1)  # (b*k, V)
    V = logp.size(-1)
    run.rules.apply(logp, step if isinstance(step, int) else step.repeat_interleave(k),
                    beams.sentence.repeat_interleave(k), beams.tokens)
    step_align = run.cache.alignments.pop() if opts.alignment else None  # (b*k, S)
    n = min(2 * K, k * V)
    cand = beam_candidates(beams.scores, logp.view(b, k, V), n)
    cand_logp = logp.view(b, k * V).gather(1, cand.beams * V + cand.tokens)  # (b, n)
    parent = torch.arange(b)[:, None] * k + cand.beams  # (b, n) row each candidate extends
    is_eos = cand.tokens == eos
    last_step = run.budget[beams.sentence] <= step + 1  # (b,)
    top = torch.arange(n) < K
    finish = torch.isfinite(cand.scores) & top & (is_eos | last_step[:, None])  # (b, n)
    if finish.any():
        r, j = finish.nonzero(as_tuple=True)
        toks, lps, align = beams.rows(parent[r, j], cand.tokens[r, j], cand_logp[r, j], step_align)
        sentence = beams.sentence[r]
        taken = torch.full_like(r, step + 1) if isinstance(step, int) else step[r] + 1  # (f,) steps
        hyps = make_hypotheses(toks, lps, taken, is_eos[r, j], cand.scores[r, j], opts, align,
                               run.src_lengths[sentence])
        finished.add(sentence.tolist(), hyps)
    # Next beams: the non-EOS candidates in rank order (EOS ones sort last and, if taken, are dead).
    live = (is_eos.long() * n + torch.arange(n)).argsort(dim=1)[:, :K]  # (b, K)
    live_scores = cand.scores.gather(1, live).masked_fill(is_eos.gather(1, live), NEG_INF)  # (b, K)
    stop = last_step | ~torch.isfinite(live_scores[:, 0]) | finished.satisfied(beams.sentence, live_scores[:, 0])
    if run.hooks.wants_done:
        for s in beams.sentence[stop].tolist():
            run.hooks.done(s, finished.hyps[s][: opts.n_best])
    # (b',): the sentences that go leave their places to the last ones, so that the cache moves
    # only those (DecoderCache.select); every per-sentence tensor follows this order.
    keep = filling_order(~stop)[0]
    rows = parent.gather(1, live)[keep].flatten()  # (b'*K,)
    chosen = live[keep]
    toks, lps, align = beams.rows(rows, cand.tokens[keep].gather(1, chosen).flatten(),
                                  cand_logp[keep].gather(1, chosen).flatten(), step_align)
    run.cache.select(rows, group=K)
    after = Beams(beams.sentence[keep], live_scores[keep], toks, lps, align, toks[:, -1:],
                  None if beams.steps is None else beams.steps[keep] + 1)
    after.compact()
    return after


def drop_sentences(beams: Beams, stay: Tensor, run: SearchSetup) -> Beams:
    """Keep the sentences where stay (b,) is True, with their k beams each, in beams and the cache."""
    k = beams.scores.size(1)
    rows = (stay.nonzero() * k + torch.arange(k)).flatten()  # (b'*k,)
    run.cache.select(rows)
    return beams.keep(stay, rows)


def settled_prefixes(beams: Beams, finished: Finished, cancelled: list[bool]) -> list[list[int]]:
    """Per sentence, the tokens shared by every hypothesis that can still become its best."""
    out = [[] if gone else (hyps[0].tokens if hyps else []) for hyps, gone in zip(finished.hyps, cancelled)]
    b, K = beams.scores.shape
    if not b:
        return out
    toks = beams.tokens.view(b, K, -1)  # (b, K, t)
    dead = ~torch.isfinite(beams.scores)  # (b, K)
    agree = ((toks == toks[:, :1]) | dead[:, :, None]).all(dim=1)  # (b, t)
    shared = agree.long().cumprod(dim=1).sum(dim=1)  # (b,)
    if beams.steps is not None:  # columns past a sentence's own steps are not its tokens
        shared = torch.minimum(shared, beams.steps)
    for s, lead, n in zip(beams.sentence.tolist(), toks[:, 0].tolist(), shared.tolist()):
        prefix = lead[:n]
        if finished.hyps[s]:
            best = finished.hyps[s][0].tokens
            n = next((i for i, (x, y) in enumerate(zip(prefix, best)) if x != y), min(len(prefix), len(best)))
            prefix = prefix[:n]
        out[s] = prefix
    return out


beam_search = whole(beam_steps, "beam_search")
