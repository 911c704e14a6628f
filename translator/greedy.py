"""Greedy search (and sampling), batched: finished sentences leave the batch at once, and new
ones may join it between steps (iteration-level batching)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from translator.decode_options import DecodeOptions
from translator.hooks import Admit, Cancelled, OnDone, OnStep
from translator.hypotheses import Hypotheses, Hypothesis, make_hypotheses, padded
from translator.sampling import make_picker
from translator.search_setup import SearchSetup, Steps, on_source_device, start_search, whole
from translator.seq2seq import Seq2Seq


@dataclass
class Rows:
    """The sentences being decoded, one row each, in the decoder cache's row order.

    Outputs are left-aligned: row i has emitted tokens[i, :steps[i]]. Rows that joined later are
    at fewer steps than the others.
    """

    sentence: Tensor  # (b,) batch index of each row's sentence
    tokens: Tensor  # (b, W) W: the longest budget among them
    log_probs: Tensor  # (b, W)
    steps: Tensor  # (b,) tokens emitted so far, EOS included
    summed: Tensor  # (b,) log-probabilities summed step by step, in the order beam search does
    last: Tensor  # (b, 1) input of the next step
    alignment: Tensor | None  # (b, W, S) cross-attention per emitted token, when recorded

    @classmethod
    def new(cls, sentence: Tensor, width: int, bos_id: int, pad_id: int, src_len: int | None) -> Rows:
        b = sentence.numel()
        return cls(
            sentence=sentence,
            tokens=torch.full((b, width), pad_id, dtype=torch.long),
            log_probs=torch.zeros(b, width),
            steps=torch.zeros(b, dtype=torch.long),
            summed=torch.zeros(b),
            last=torch.full((b, 1), bos_id, dtype=torch.long),
            alignment=None if src_len is None else torch.zeros(b, width, src_len),
        )

    @property
    def count(self) -> int:
        return self.sentence.numel()

    def step(self) -> int | Tensor:
        """The step every row is at, or each row's (b,) when they differ."""
        first = int(self.steps[0])
        return first if bool((self.steps == first).all()) else self.steps

    def keep(self, index: Tensor) -> None:
        """Keep rows index (k,), in that order."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value[index])

    def join(self, new: Rows) -> None:
        """Append the rows of `new`, widening both to the longer budget and the longer source."""
        width = max(self.tokens.size(1), new.tokens.size(1))
        self.tokens = torch.cat([padded(self.tokens, 1, width), padded(new.tokens, 1, width)])
        self.log_probs = torch.cat([padded(self.log_probs, 1, width), padded(new.log_probs, 1, width)])
        if self.alignment is not None and new.alignment is not None:
            S = max(self.alignment.size(2), new.alignment.size(2))
            self.alignment = torch.cat([padded(padded(a, 1, width), 2, S) for a in (self.alignment, new.alignment)])
        for name in ("sentence", "steps", "summed", "last"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))

    def push(self, idx: Tensor, lp: Tensor, alignment: Tensor | None) -> None:
        """Record each row's next token idx (b,), its log-probability lp (b,) and cross-attention (b, S)."""
        rows = torch.arange(self.count)
        self.tokens[rows, self.steps] = idx
        self.log_probs[rows, self.steps] = lp
        if self.alignment is not None and alignment is not None:
            self.alignment[rows, self.steps, : alignment.size(1)] = alignment
        self.steps += 1
        self.summed += lp
        self.last = idx[:, None]

    def hypotheses(self, done: Tensor, ended: Tensor, opts: DecodeOptions, src_lengths: Tensor) -> list[Hypothesis]:
        """Hypotheses of the rows flagged done (b,); ended (b,): whose last token was EOS."""
        return make_hypotheses(
            self.tokens[done], self.log_probs[done], self.steps[done], ended[done], self.summed[done], opts,
            self.alignment[done] if self.alignment is not None else None, src_lengths[self.sentence[done]],
        )


@on_source_device
@torch.inference_mode()
def greedy_steps(
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
    """Decode src (B, S) one best token at a time (or one sampled token when opts.sample), a step
    per next() (translator.search_setup.Steps); `greedy_search` runs it to its end.

    A sentence leaves the batch (and the cache) at the step it emits EOS, reaches its budget or
    is cancelled; sentences `admit` hands over join it before a step, at their own position 0.
    See translator.hooks for the hooks, translator.constraints for `prefix`.
    """
    cfg = model.cfg
    B, S = src.shape
    if B == 0:
        return Hypotheses([])
    run = start_search(model, src, opts, prefix, cancelled, on_step, on_done)
    rows = Rows.new(torch.arange(B), int(run.budget.max()), cfg.bos_id, cfg.pad_id, S if opts.alignment else None)
    nbest: list[list[Hypothesis]] = [[] for _ in range(B)]
    streamed: list[list[int]] = [[] for _ in range(B)]
    pick = make_picker(opts)
    while True:
        yield
        new = admit(rows.count) if admit is not None else None
        if new is not None and new.size(0):
            join(model, new, opts, run, rows)
            nbest, streamed = nbest + [[] for _ in new], streamed + [[] for _ in new]
        stay = run.hooks.poll(rows.sentence)
        if stay is not None:
            for i in rows.sentence[~stay].tolist():
                streamed[i] = []
            rows.keep(run.cache.drop(stay))
        if not rows.count:
            break
        logits = model.decode_step(rows.last, run.cache, record_alignment=opts.alignment)[:, -1]  # (b, V)
        if run.rules.active or opts.sample:
            logp = logits.float().log_softmax(dim=-1)
            if run.rules.active:
                run.rules.apply(logp, rows.step(), rows.sentence, rows.tokens if run.rules.needs_history else None)
            idx = pick(logp)  # (b,)
            lp = logp.gather(1, idx[:, None]).squeeze(1)  # (b,)
        else:
            idx, lp = model.best_tokens(logits)  # (b,) each
        rows.push(idx, lp, run.cache.alignments.pop() if opts.alignment else None)
        is_eos = idx == cfg.eos_id
        if run.hooks.streaming:
            report(run, rows.sentence, idx, is_eos, streamed)
        done = is_eos | (run.budget[rows.sentence] <= rows.steps)  # (b,)
        if done.any():
            for i, h in zip(rows.sentence[done].tolist(), rows.hypotheses(done, is_eos, opts, run.src_lengths)):
                nbest[i] = [h]
                run.hooks.done(i, [h])
            rows.keep(run.cache.drop(~done))
    return Hypotheses(nbest, list(run.hooks.flags))


def join(model: Seq2Seq, new: Tensor, opts: DecodeOptions, run: SearchSetup, rows: Rows) -> None:
    """Sources new (n, S') join the running batch, one row each at its position 0."""
    first, n, cfg = run.hooks.batch_size, new.size(0), model.cfg
    run.admit(model, new, opts)
    src_len = run.cache.src_mask.size(-1) if opts.alignment else None
    rows.join(Rows.new(torch.arange(first, first + n), int(run.budget[first:].max()), cfg.bos_id, cfg.pad_id,
                       src_len))


def report(run: SearchSetup, sentence: Tensor, idx: Tensor, is_eos: Tensor, streamed: list[list[int]]) -> None:
    """Each row's new token idx (b,) added to its sentence's streamed tokens (EOS left out), all reported."""
    for i, tok, eos in zip(sentence.tolist(), idx.tolist(), is_eos.tolist()):
        if not eos:
            streamed[i] = streamed[i] + [tok]  # a new list: one already reported never changes
    run.hooks.report(list(streamed))


greedy_search = whole(greedy_steps, "greedy_search")
