"""Greedy search (and sampling), batched: finished sentences leave the batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from translator.decode_options import DecodeOptions
from translator.hooks import Cancelled, OnDone, OnStep
from translator.hypotheses import Hypotheses, make_hypotheses
from translator.model import EncoderDecoder
from translator.sampling import make_picker
from translator.search_setup import start_search


@torch.inference_mode()
def greedy_search(
    model: EncoderDecoder,
    src: Tensor,
    opts: DecodeOptions,
    *,
    prefix: list[list[int]] | None = None,
    cancelled: Cancelled | None = None,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
) -> Hypotheses:
    """Decode src (B, S) one best token at a time (or one sampled token when opts.sample).

    Output buffers are preallocated at the longest budget and filled by row index; a sentence
    leaves the batch (and the cache) at the step it emits EOS, reaches its budget or is cancelled.
    See translator.hooks for `cancelled`, `on_step` and `on_done`, translator.constraints for `prefix`.
    """
    cfg = model.cfg
    B, S = src.shape
    if B == 0:
        return Hypotheses([])
    run = start_search(model, src, opts, prefix, cancelled, on_step, on_done)
    T = int(run.budget.max())
    tokens = torch.full((B, T), cfg.pad_id, dtype=torch.long)
    log_probs = torch.zeros(B, T)
    summed = torch.zeros(B)  # accumulated step by step, in the order beam search does
    alignment = torch.zeros(B, T, S) if opts.alignment else None
    steps = torch.zeros(B, dtype=torch.long)
    ended = torch.zeros(B, dtype=torch.bool)
    alive = torch.arange(B)  # (b,) batch index of each active row
    last = torch.full((B, 1), cfg.bos_id, dtype=torch.long)  # (b, 1)
    pick = make_picker(opts)
    streamed: list[list[int]] = [[] for _ in range(B)]
    for step in range(T):
        stay = run.hooks.poll(alive)
        if stay is not None:
            for i in alive[~stay].tolist():
                streamed[i] = []
            alive, last = alive[stay], last[stay]
            run.cache.select(stay.nonzero().squeeze(1))
        if not alive.numel():
            break
        logits = model.decode_step(last, run.cache, record_alignment=opts.alignment)[:, -1]  # (b, V)
        logp = logits.float().log_softmax(dim=-1)
        run.rules.apply(logp, step, alive, tokens[alive, :step] if run.rules.needs_history else None)
        idx = pick(logp)  # (b,)
        tokens[alive, step] = idx
        lp = logp.gather(1, idx[:, None]).squeeze(1)  # (b,)
        log_probs[alive, step] = lp
        summed[alive] += lp
        if alignment is not None:
            alignment[alive, step] = run.cache.alignments.pop()  # (b, S)
        is_eos = idx == cfg.eos_id
        steps[alive] = step + 1
        ended[alive] = is_eos
        if run.hooks.streaming:
            for i, tok, eos in zip(alive.tolist(), idx.tolist(), is_eos.tolist()):
                if not eos:
                    streamed[i].append(tok)
            run.hooks.report([list(p) for p in streamed])
        done = is_eos | (run.budget[alive] <= step + 1)  # (b,)
        if done.any():
            if run.hooks.wants_done:
                rows = alive[done]
                finished = make_hypotheses(tokens[rows], log_probs[rows], steps[rows], ended[rows], summed[rows],
                                           opts, alignment[rows] if alignment is not None else None,
                                           run.src_lengths[rows])
                for i, h in zip(rows.tolist(), finished):
                    run.hooks.done(i, [h])
            keep = (~done).nonzero().squeeze(1)
            run.cache.select(keep)
            alive, idx = alive[keep], idx[keep]
        last = idx[:, None]
    hyps = make_hypotheses(tokens, log_probs, steps, ended, summed, opts, alignment, run.src_lengths)
    nbest = [[] if gone else [h] for h, gone in zip(hyps, run.hooks.flags)]
    return Hypotheses(nbest, list(run.hooks.flags))
