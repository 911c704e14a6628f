"""Where a checkpoint's weights came from: step, date, code, package versions, corpus, scores.

Stored as JSON inside every checkpoint (`translator.checkpoint`), covered by its digests, and
reported by the server's GetModelInfo. The training config itself is the checkpoint's `config`.
Every field may be absent: a checkpoint written before provenance existed has none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


@dataclass(frozen=True)
class TestScore:
    """A score `nmt-evaluate --record` stored: sacreBLEU BLEU and chrF on one test set."""

    test: str
    bleu: float
    chrf: float | None = None
    beam_size: int = 0
    bleu_signature: str = ""
    date: str = ""


@dataclass(frozen=True)
class Provenance:
    step: int | None = None  # optimizer steps behind these weights
    created: str = ""  # when the weights were saved, ISO 8601 UTC
    code_commit: str | None = None  # `git rev-parse HEAD` of the training code; None when unknown
    code_dirty: bool | None = None  # the working tree had uncommitted changes to tracked files
    versions: dict[str, str] = field(default_factory=dict)  # torch, sentencepiece, sacrebleu, ...
    corpus: str = ""  # the training corpus spec (data.train)
    corpus_sha256: str | None = None  # see training.provenance.pairs_sha256
    valid_bleu: float | None = None
    test_scores: tuple[TestScore, ...] = ()
    averaged_from: tuple[str, ...] = ()  # "FILE@step:weights-sha256" of each averaged checkpoint

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; absent (None or empty) fields are left out."""
        out = dataclasses.asdict(self)
        out["test_scores"] = [{k: v for k, v in s.items() if v not in (None, "")} for s in out["test_scores"]]
        return {k: v for k, v in out.items() if v not in (None, "", [], {}, ())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """From `to_dict`'s output; keys this version does not know are ignored (newer writers)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        scores = tuple(TestScore(**{k: v for k, v in s.items() if k in TestScore.__dataclass_fields__})
                       for s in kept.pop("test_scores", []))
        return cls(**{**kept, "test_scores": scores, "averaged_from": tuple(kept.get("averaged_from", ()))})

    def with_test_score(self, score: TestScore) -> Provenance:
        """This record with `score` added, replacing an earlier one of the same test and beam size."""
        others = tuple(s for s in self.test_scores if (s.test, s.beam_size) != (score.test, score.beam_size))
        return dataclasses.replace(self, test_scores=(*others, score))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
