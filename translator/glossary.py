"""Glossaries: terms (source phrase -> required target phrase), checked, read from TSV, and matched
against source sentences.

A term applies to a sentence when its source phrase occurs in it, case-insensitively and on word
boundaries ("Cart" matches "the cart." but not "carts"); the sentence's translation must then hold
the target phrase exactly as given (translator.constrained_beam places it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class GlossaryError(ValueError):
    """A bad glossary or term; the message names it."""


@dataclass(frozen=True)
class Term:
    source: str  # phrase of the source language
    target: str  # what its translation must contain, as given


@dataclass(frozen=True)
class GlossaryLimits:
    max_terms: int = 256  # per request or call
    max_term_chars: int = 200  # per source or target phrase
    max_term_tokens: int = 32  # per target phrase, in subword tokens

    def __post_init__(self) -> None:
        for name in ("max_terms", "max_term_chars", "max_term_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GlossaryError(f"{name} must be an integer >= 1, got {value!r}")


DEFAULT_GLOSSARY_LIMITS = GlossaryLimits()


def check_glossary(terms: Sequence[Term], limits: GlossaryLimits = DEFAULT_GLOSSARY_LIMITS) -> list[Term]:
    """The terms without repeats, checked: within the limits, no empty phrase, no source phrase with
    two different targets. A GlossaryError names the first bad term."""
    if len(terms) > limits.max_terms:
        raise GlossaryError(f"the glossary has {len(terms)} terms; at most {limits.max_terms}")
    targets: dict[str, Term] = {}
    for term in terms:
        for side in ("source", "target"):
            text = getattr(term, side)
            if not text.strip():
                raise GlossaryError(f"term {term.source!r} -> {term.target!r}: the {side} phrase is empty")
            if len(text) > limits.max_term_chars:
                raise GlossaryError(f"term {term.source!r}: the {side} phrase has {len(text)} characters; "
                                    f"at most {limits.max_term_chars}")
        key = normalized(term.source)
        seen = targets.setdefault(key, term)
        if seen.target != term.target:
            raise GlossaryError(f"term {term.source!r} has two targets: {seen.target!r} and {term.target!r}")
    return list(dict.fromkeys(targets.values()))


def normalized(phrase: str) -> str:
    return " ".join(phrase.casefold().split())


def source_pattern(phrase: str) -> re.Pattern[str]:
    """A phrase's occurrences: any case, any run of whitespace between its words, whole words."""
    words = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def terms_in(text: str, terms: Sequence[Term]) -> list[Term]:
    """The terms whose source phrase occurs in text, in glossary order."""
    return [t for t in terms if source_pattern(t.source).search(text)]


def read_glossary(path: str | Path) -> list[Term]:
    """Terms from a UTF-8 TSV file, one `source<TAB>target` a line; blank lines and lines starting
    with '#' are skipped. A malformed line is a GlossaryError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GlossaryError(f"cannot read glossary {path}: {e}") from None
    terms = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise GlossaryError(f"{path} line {n}: expected 'source<TAB>target', got {line!r}")
        terms.append(Term(fields[0].strip(), fields[1].strip()))
    return terms
