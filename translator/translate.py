"""Text in, text out: tokenizer + model + search, with length-sorted batching."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from translator import native
from translator.decode_options import check_budgets
from translator.decoding import DecodeOptions, Hypotheses, Hypothesis, search_steps
from translator.documents import (
    DEFAULT_LIMITS,
    DocumentLimitError,
    DocumentLimits,
    DocumentResult,
    check_chars,
    reassemble,
    split_document,
)
from translator.glossary import (
    DEFAULT_GLOSSARY_LIMITS,
    GlossaryError,
    GlossaryLimits,
    Term,
    check_glossary,
    terms_in,
)
from translator.hooks import RunningSearch
from translator.markup import parse_markup
from translator.model import EncoderDecoder
from translator.placement import AlignedTranslation, restore_markup
from translator.search_setup import Steps, run_to_end
from translator.tokenizer import UNK, Tokenizer


@dataclass
class Translation:
    """One translation: detokenized text, token ids, and the search's score (see Hypothesis)."""

    text: str
    tokens: list[int]
    score: float
    log_probs: list[float] = field(default_factory=list)  # per token
    alignment: torch.Tensor | None = None  # (len(tokens), source tokens + EOS) when requested
    nbest: list[Translation] = field(default_factory=list)  # all n_best translations, best first
    unmet_terms: list[Term] = field(default_factory=list)  # glossary terms whose target it lacks


def translations(tokenizer: Tokenizer, hyps: list[Hypothesis], terms: Sequence[Term] = ()) -> list[Translation]:
    """Hypotheses of one sentence as translations, best first; terms: the glossary terms that
    applied to it, in the order of its search's phrases."""
    texts = tokenizer.decode([h.tokens for h in hyps])
    return [Translation(t, h.tokens, h.score, h.log_probs, h.alignment, unmet_terms=[terms[j] for j in h.unmet])
            for t, h in zip(texts, hyps)]


def unchanged(text: str) -> Translation:
    """A text passed through as its own translation (nothing in it to translate)."""
    only = Translation(text, [], 0.0)
    return replace(only, nbest=[only])


def aligned_translation(
    tokenizer: Tokenizer, source: str, tokens: list[int], alignment: torch.Tensor | None
) -> AlignedTranslation:
    """What restore_markup needs of one translated piece of a document: alignment (T, S + 1)."""
    pieces = [piece if token > UNK else "" for token, piece in zip(tokens, tokenizer.pieces(tokens))]
    return AlignedTranslation(tokenizer.spans(source), pieces, alignment.tolist() if alignment is not None else [],
                              tokenizer.log_probs(tokens))


def passed_through(tokenizer: Tokenizer, source: str) -> AlignedTranslation:
    """A content-free piece as its own translation, each token aligned to itself, so that its
    characters keep their markup."""
    spans = tokenizer.spans(source)
    pieces = [source[a:b].replace(" ", "\u2581") for a, b in spans]
    return AlignedTranslation(spans, pieces, [[float(i == j) for j in range(len(spans))] for i in range(len(spans))])


class Translator:
    """Translates lists of sentences with one model, tokenizer and default decoding options.

    workers: batches decoded side by side, each in its own thread. With torch's intra-op
    threads divided among them (the caller sets `torch.set_num_threads`), the cores stay busy
    while each thread runs the Python and the small single-threaded ops of its decoding steps,
    about half of a step's time at batch 64 on the CPU preset (docs/RESULTS.md).
    backend: "native" (translator.native's kernels, where they load; torch's otherwise) or
    "torch" (translator.model as written); either decodes on the model's own parameters.
    """

    def __init__(
        self,
        model: EncoderDecoder,
        tokenizer: Tokenizer,
        options: DecodeOptions | None = None,
        max_batch_tokens: int = 4096,
        workers: int = 1,
        src_lang: str = "en",
        backend: str = "native",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.model = native.for_backend(model.eval(), backend)
        self.tokenizer = tokenizer
        self.options = options or DecodeOptions()
        self.max_batch_tokens = max_batch_tokens
        self.workers = workers
        self.src_lang = src_lang  # documents are split into sentences by this language's rules

    @property
    def max_source_tokens(self) -> int:
        # Room for EOS at the end of every source.
        return self.model.cfg.max_positions - 1

    def encode_sources(self, texts: list[str]) -> list[list[int]]:
        """Source ids with EOS; a sentence longer than the model's positions is a ValueError."""
        return [self._source(ids, f"sentence {i}") for i, ids in enumerate(self.tokenizer.encode(texts))]

    def _source(self, ids: list[int], name: str) -> list[int]:
        """ids with EOS, or a ValueError naming the text if the model's positions cannot hold them."""
        if len(ids) > self.max_source_tokens:
            raise ValueError(f"{name} has {len(ids)} tokens; the model takes at most {self.max_source_tokens}")
        return ids + [self.model.cfg.eos_id]

    def translate(
        self,
        texts: list[str],
        options: DecodeOptions | None = None,
        progress: Callable[[int], None] | None = None,
        target_prefix: str = "",
        glossary: Sequence[Term] = (),
    ) -> list[Translation]:
        """Translate texts in length-sorted batches; results come back in input order.

        Content-free texts (Tokenizer.has_content) come back unchanged, score 0, without decoding.
        target_prefix: text every translation starts with (forced, scored, part of the text).
        A min_len or prefix the output budgets leave no room for is a DecodeOptionError.
        glossary: terms whose target phrase a translation must contain when the source phrase occurs
        in its sentence (translator.glossary), placed by constrained beam search (with one beam for
        greedy options); Translation.unmet_terms lists those it could not place. A bad or oversized
        glossary is a GlossaryError naming the term, raised before any decoding.
        """
        opts = options or self.options
        terms, phrases = self.glossary_phrases(texts, glossary)
        prefix = self.tokenizer.encode([target_prefix])[0] if target_prefix else []
        sources, todo = self.checked_sources(texts, opts, len(prefix))
        ids = dict(zip(todo, sources))
        out: list[Translation] = [unchanged(text) for text in texts]

        def decode(batch: list[int]) -> list[Translation]:
            hyps = self.decode([ids[i] for i in batch], opts, prefix, [phrases[i] for i in batch] if glossary else None)
            ranked = [translations(self.tokenizer, nbest, terms[i]) for i, nbest in zip(batch, hyps.nbest)]
            return [replace(r[0], nbest=r) for r in ranked]

        if progress and len(todo) < len(texts):
            progress(len(texts) - len(todo))
        batches = [[todo[k] for k in batch] for batch in self.batches(sources, opts.beam_size)]
        for batch, results in zip(batches, self.in_order(decode, batches)):
            for i, translation in zip(batch, results):
                out[i] = translation
            if progress:
                progress(len(batch))
        return out

    def glossary_phrases(self, texts: list[str], glossary: Sequence[Term],
                         limits: GlossaryLimits = DEFAULT_GLOSSARY_LIMITS) -> tuple[list[list[Term]], list[list[list[int]]]]:
        """Per text, the glossary terms that apply to it and their target phrases' token ids."""
        if not glossary:
            return [[] for _ in texts], [[] for _ in texts]
        checked = check_glossary(glossary, limits)
        targets = dict(zip(checked, self.tokenizer.encode([t.target for t in checked])))
        for term, ids in targets.items():
            if not ids or len(ids) > limits.max_term_tokens:
                raise GlossaryError(f"term {term.source!r}: the target {term.target!r} has {len(ids)} tokens; "
                                    f"1 to {limits.max_term_tokens} fit")
        terms = [terms_in(text, checked) for text in texts]
        return terms, [[targets[t] for t in ts] for ts in terms]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode([text])[0])

    def translate_document(
        self,
        text: str,
        options: DecodeOptions | None = None,
        lang: str | None = None,
        limits: DocumentLimits = DEFAULT_LIMITS,
        markup: bool = False,
    ) -> DocumentResult:
        """A document translated sentence by sentence in one `translate` call and put back together
        with its layout (translator.documents); with `markup`, its inline HTML/XML placed through
        the alignments and the text of its attributes translated (translator.markup,
        translator.placement). `lang` picks the sentence splitter's rules (default: src_lang).
        Over a limit: DocumentLimitError, before any sentence is translated."""
        check_chars(text, limits)
        parsed = parse_markup(text) if markup else None
        plain, breaks = (parsed.flowing, parsed.breaks) if parsed else (text, ())
        doc = split_document(plain, self.count_tokens, self.max_source_tokens, lang or self.src_lang, limits, breaks)
        opts = options or self.options
        if parsed is None:
            return reassemble(doc, [t.text for t in self.translate(doc.sources(), opts)])
        attributes = [split_document(a.text, self.count_tokens, self.max_source_tokens, lang or self.src_lang, limits)
                      for a in parsed.attributes]
        sentences = len(doc.sentences) + sum(len(a.sentences) for a in attributes)
        if sentences > limits.max_sentences:
            raise DocumentLimitError(f"the text has {sentences} sentences, its attributes' among them; the limit is "
                                     f"max_sentences={limits.max_sentences}")
        sources = doc.sources() + [s for a in attributes for s in a.sources()]
        results = self.translate(sources, opts.replace(alignment=True, n_best=1))
        aligned = [
            aligned_translation(self.tokenizer, source, t.tokens, t.alignment)
            if self.tokenizer.has_content(self.tokenizer.encode([source])[0])
            else passed_through(self.tokenizer, source)
            for source, t in zip(doc.sources(), results)
        ]
        texts, k = [], len(doc.pieces)
        for a in attributes:
            texts.append(reassemble(a, [t.text for t in results[k : k + len(a.pieces)]]).text)
            k += len(a.pieces)
        return restore_markup(parsed.with_attributes(texts), doc, aligned)

    def in_order(self, decode: Callable[[list[int]], list[Translation]], batches: list[list[int]]) -> Iterator:
        """decode(batch) for each batch, in order; on `workers` threads when there are several."""
        if self.workers == 1 or len(batches) < 2:
            yield from map(decode, batches)
            return
        with ThreadPoolExecutor(min(self.workers, len(batches))) as pool:
            yield from pool.map(decode, batches)

    def checked_sources(self, texts: Sequence[str], opts: DecodeOptions, prefix_len: int = 0,
                        sentence: str = "sentence {}", min_len_name: str = "min_len",
                        prefix_name: str = "target_prefix") -> tuple[list[list[int]], list[int]]:
        """The EOS-terminated source ids of the texts with content, and each one's index in texts
        (content-free texts, Tokenizer.has_content, are not decoded: they come back unchanged).
        A text longer than the model's positions is a ValueError, an output budget with no room for
        opts.min_len or a prefix of prefix_len tokens a DecodeOptionError; each names the text as
        `sentence.format(index)` and the options as min_len_name and prefix_name."""
        sources, index = [], []
        for i, ids in enumerate(self.tokenizer.encode(list(texts))):
            if self.tokenizer.has_content(ids):
                sources.append(self._source(ids, sentence.format(i)))
                index.append(i)
        check_budgets(opts, dict(zip(index, map(len, sources))), self.model.cfg.max_positions, prefix_len,
                      min_len_name, sentence, prefix_name)
        return sources, index

    def decode(self, sources: list[list[int]], opts: DecodeOptions, prefix: Sequence[int] = (),
               phrases: list[list[list[int]]] | None = None) -> Hypotheses:
        """`decode_steps` run to its end."""
        return run_to_end(self.decode_steps(sources, opts, prefix, phrases))

    def decode_steps(self, sources: list[list[int]], opts: DecodeOptions, prefix: Sequence[int] = (),
                     phrases: list[list[list[int]]] | None = None, batch: RunningSearch | None = None) -> Steps:
        """Search over sources from `checked_sources` (of this translator's tokenizer and options), a
        step per next(), returning the Hypotheses: offline `translate` and the server's engine both
        decode through here. prefix: target ids every output starts with; phrases: per source, the
        target phrases (ids) its output must contain. batch: a server's running batch
        (translator.hooks.RunningSearch), whose hooks the search calls; its queued sources join
        between steps unless sampling, a prefix or phrases apply (joining sources would not get them)."""
        src = self.source_batch(sources)  # (B, S)
        prefixes = [list(prefix)] * len(sources) if prefix else None
        continuations = self.continuations if phrases else None
        if batch is None:
            return search_steps(self.model, src, opts, prefix=prefixes, constraints=phrases,
                                continuations=continuations)
        joins = not (opts.sample or prefix or phrases)
        return search_steps(self.model, src, opts, prefix=prefixes, constraints=phrases, continuations=continuations,
                            cancelled=batch.cancelled, on_step=batch.on_step if batch.streaming else None,
                            on_done=batch.on_result, admit=functools.partial(self._joining, batch.admit) if joins else None)

    def _joining(self, admit: Callable[[int], list[list[int]]], alive: int) -> torch.Tensor | None:
        """Sources joining a running search now, (b, S'), or None."""
        new = admit(alive)
        return self.source_batch(new) if new else None

    @functools.cached_property
    def continuations(self) -> torch.Tensor:
        """(V,) True for the tokens that continue the word before them (none may follow a glossary term)."""
        mask = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
        mask[sorted(self.tokenizer.continuation_ids)] = True
        return mask

    def source_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        """EOS-terminated source ids as one right-padded (B, S) tensor on the model's device."""
        return batch_tensor(seqs, self.model.cfg.pad_id).to(self.model.embed.tokens.weight.device)

    def batches(self, ids: list[list[int]], beam_size: int) -> Iterator[list[int]]:
        """Indices grouped by similar length so that padding stays small."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batch: list[int] = []
        for i in order:
            longest = len(ids[i])  # ascending order: the newest is the longest
            if batch and (len(batch) + 1) * longest * beam_size > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


def batch_tensor(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded (B, L) tensor of token ids."""
    L = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
