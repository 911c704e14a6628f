"""What a client may ask of the service: the request's types and limits, and the checks of its
texts and fields that come before any tokenizing. A failed check is an `InvalidArgument` whose
message names the field."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from translator.config import ConfigError
from translator.document_requests import DocumentRequest, check_language
from translator.glossary import Term

# C0/C1 control characters other than tab, newline and carriage return, and lone surrogates.
FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_REQUEST_ID_CHARS = 128


class InvalidArgument(ValueError):
    """A request field is out of its limits or malformed; the message names the field."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the model's positions cap source and output lengths further."""

    max_sentences: int = 64
    max_sentence_chars: int = 2000
    max_beam_size: int = 16
    max_length: int = 256
    max_message_bytes: int = 1 << 20
    # The decoding work one request may ask for, summed over its sentences: source tokens x beam
    # size x output budget (steps). 16 sentences of 1,000 characters at beam 16 with a 255-token
    # minimum come to ~16 million and held a decoder for 33 s; 64 sentences of 100 tokens at beam 5
    # to 5 million.
    max_request_cost: int = 8_000_000
    # A document request's characters (before markup is read) and sentences (counting each piece
    # of a sentence cut for the model), summed over its texts; max_sentence_chars does not apply.
    max_document_chars: int = 10_000
    max_document_sentences: int = 64
    max_terms: int = 64  # glossary terms per request
    max_term_chars: int = 200  # per source or target phrase of a term

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"limits.{f.name} must be positive, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class RequestOptions:
    """Decoding options as a client gave them; None takes the server's default."""

    beam_size: int | None = None
    length_penalty: float | None = None
    max_length: int | None = None
    n_best: int | None = None
    min_length: int | None = None
    return_scores: bool = False
    return_alignments: bool = False
    max_len_a: float | None = None
    max_len_b: int | None = None
    length_penalty_form: str | None = None
    length_includes_eos: bool | None = None
    no_repeat_ngram: int | None = None
    sample: bool | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    target_prefix: str = ""  # text every translation starts with
    terms: tuple[Term, ...] = ()  # glossary (translator.glossary)



def check_texts(texts: Sequence[str], limits: Limits) -> None:
    """A sentence request's texts: how many, how long, not blank, only text characters."""
    if not texts:
        raise InvalidArgument("texts is empty: send at least one sentence")
    if len(texts) > limits.max_sentences:
        raise InvalidArgument(f"texts has {len(texts)} sentences; at most {limits.max_sentences} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.max_sentence_chars:
            raise InvalidArgument(
                f"texts[{i}] has {len(text)} characters; at most {limits.max_sentence_chars} per sentence")
        if not text.strip():
            raise InvalidArgument(f"texts[{i}] is empty or only whitespace")
        check_text(text, f"texts[{i}]")


def check_document_request(texts: Sequence[str], options: RequestOptions, document: DocumentRequest,
                           limits: Limits) -> None:
    """A document request's texts and the options a document takes (splitting it into sentences
    checks its sizes)."""
    if not texts:
        raise InvalidArgument("texts is empty: send at least one document")
    if len(texts) > limits.max_sentences:
        raise InvalidArgument(f"texts has {len(texts)} documents; at most {limits.max_sentences} per request")
    for name, given in (("n_best", (options.n_best or 1) > 1), ("return_scores", options.return_scores),
                        ("return_alignments", options.return_alignments),
                        ("target_prefix", bool(options.target_prefix))):
        if given:
            raise InvalidArgument(f"options.{name} applies to sentences; a document request returns one "
                                  f"translation per document")
    if options.terms:
        raise InvalidArgument("terms apply to sentence requests; a document request takes none")
    for i, text in enumerate(texts):
        check_text(text, f"texts[{i}]")
    try:
        check_language(document.language)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def check_request_id(request_id: str) -> None:
    """A client's request id is logged and echoed: short, and printable (no line breaks)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        bad = next(c for c in request_id if not c.isprintable())
        raise InvalidArgument(f"request_id holds U+{ord(bad):04X}: only printable characters are allowed")


def check_text(text: str, name: str) -> None:
    """Text holds no control characters (but tab and line breaks) and no unpaired surrogates."""
    if bad := FORBIDDEN_CHARS.search(text):
        raise InvalidArgument(f"{name} holds U+{ord(bad.group()):04X} at offset {bad.start()}: control characters "
                              f"and unpaired surrogates are not text")
