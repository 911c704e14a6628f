"""A request's decoding options: the server's defaults with the client's fields put in, each
checked against the limits (`InvalidArgument` naming the field)."""

from __future__ import annotations

import math
from typing import Any

from translator.decode_options import DecodeOptions
from translator.requests import InvalidArgument, Limits, RequestOptions

# RequestOptions fields that replace the DecodeOptions field of the same name as they are.
PASSED_OPTIONS = ("max_len_a", "max_len_b", "length_penalty_form", "length_includes_eos", "no_repeat_ngram",
                  "sample", "top_k", "top_p", "temperature", "seed")


def decode_options(req: RequestOptions, defaults: DecodeOptions, limits: Limits, max_length: int) -> DecodeOptions:
    """The server's defaults overridden by the request's fields; max_length: the longest output
    served (the limit, or the model's positions if fewer)."""
    beam = check_int("options.beam_size", req.beam_size, 1, limits.max_beam_size)
    beam = beam or (1 if req.sample else defaults.beam_size)  # sampling draws on one beam
    n_best = check_int("options.n_best", req.n_best, 1, beam, "options.beam_size")
    max_len = check_int("options.max_length", req.max_length, 1, max_length)
    max_len = min(max_len or defaults.max_len, max_length)
    changes: dict[str, Any] = {"beam_size": beam, "max_len": max_len}
    if n_best is not None:
        changes["n_best"] = n_best
    if req.min_length is not None:
        changes["min_len"] = check_int("options.min_length", req.min_length, 0, max_len - 1, "options.max_length - 1")
    if req.length_penalty is not None:
        if not (math.isfinite(req.length_penalty) and 0.0 <= req.length_penalty <= 10.0):
            raise InvalidArgument(f"options.length_penalty must be in [0, 10], got {req.length_penalty}")
        changes["length_penalty"] = req.length_penalty
    if req.return_alignments:
        changes["alignment"] = True
    changes.update((name, getattr(req, name)) for name in PASSED_OPTIONS if getattr(req, name) is not None)
    try:
        return defaults.replace(**changes)
    except ValueError as e:  # a combination with the server's defaults, e.g. n_best > beam_size
        raise InvalidArgument(f"options.{e}") from None


def check_int(name: str, value: int | None, lo: int, hi: int, hi_name: str | None = None) -> int | None:
    if value is not None and not lo <= value <= hi:
        bound = f"{hi_name} ({hi})" if hi_name else str(hi)
        raise InvalidArgument(f"{name} must be between {lo} and {bound}, got {value}")
    return value
