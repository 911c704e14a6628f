"""nmt-translate: translate lines with a checkpoint, stdin to stdout or a file to a file.

Also the flags shared with nmt-evaluate: decoding (`add_decoding_flags`, `decoding_options`) and
the client of a running server (`add_client_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TextIO

from translator.config import ConfigError
from translator.decode_options import PRESETS, DecodeOptions
from translator.glossary import Term, read_glossary
from translator.length import PENALTY_FORMS
from translator.translate import Translation

DEFAULT_BEAM_SIZE = 5

# Flags whose values, when given, replace the option of the same name.
OPTION_FLAGS = (
    "beam_size", "n_best", "max_len_a", "max_len_b", "max_len", "min_len", "length_penalty",
    "length_penalty_form", "length_includes_eos", "no_repeat_ngram", "sample", "top_k", "top_p",
    "temperature", "seed",
)


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding", f"defaults: beam {DEFAULT_BEAM_SIZE}, else DecodeOptions' own")
    g.add_argument("--preset", choices=sorted(PRESETS), help="another toolkit's length conventions")
    g.add_argument("--beam-size", type=int, help=f"1 for greedy search (default {DEFAULT_BEAM_SIZE})")
    g.add_argument("--n-best", type=int, help="hypotheses per sentence (<= beam size)")
    g.add_argument("--max-len-a", type=float, help="output budget: a * source length + b ...")
    g.add_argument("--max-len-b", type=int, help="... in tokens, EOS included")
    g.add_argument("--max-len", type=int, help="hard cap on the output budget")
    g.add_argument("--min-len", type=int, help="no EOS before this many tokens")
    g.add_argument("--length-penalty", type=float, help="alpha; 0 ranks by summed log-probability")
    g.add_argument("--length-penalty-form", choices=PENALTY_FORMS, help="power: len**a, gnmt: ((5+len)/6)**a")
    g.add_argument("--length-includes-eos", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--no-repeat-ngram", type=int, help="forbid repeated n-grams of this size")
    g.add_argument("--sample", action="store_true", default=None, help="sample instead of searching")
    g.add_argument("--top-k", type=int, help="sampling: among the k likeliest tokens")
    g.add_argument("--top-p", type=float, help="sampling: among the tokens holding this mass")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--seed", type=int, help="sampling seed")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `--server HOST:PORT`'s connection (read by translator.client.backend_from_args)."""
    g = p.add_argument_group("server client", "with --server HOST:PORT")
    g.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server's certificate; turns TLS on")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a server that wants mutual TLS")
    g.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    g.add_argument("--tls-server-name", help="name in the server certificate, when it is not the host's")
    g.add_argument("--token-file", help="bearer token for the server (default: $NMT_AUTH_TOKEN)")
    g.add_argument("--deadline", type=float, default=60.0,
                   help="seconds each request may take, retries included (default 60)")
    g.add_argument("--retries", type=int, default=4,
                   help="tries again after UNAVAILABLE or RESOURCE_EXHAUSTED, with backoff (default 4)")


def decoding_options(args: argparse.Namespace) -> DecodeOptions:
    """DecodeOptions from the flags of `add_decoding_flags`; bad values raise DecodeOptionError."""
    base = DecodeOptions.preset(args.preset) if args.preset else DecodeOptions(beam_size=DEFAULT_BEAM_SIZE)
    given = {name: getattr(args, name) for name in OPTION_FLAGS if getattr(args, name) is not None}
    if given.get("sample") and "beam_size" not in given:
        given["beam_size"] = 1
    return dataclasses.replace(base, **given)


class TranslateBackend(Protocol):
    """What translates lines: a local Translator, or a client of a running server."""

    def translate(
        self, texts: list[str], options: DecodeOptions | None = None, progress: Callable[[int], None] | None = None,
        target_prefix: str = "", glossary: Sequence[Term] = (),
    ) -> list[Translation]: ...


def translate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-translate", description="Translate lines with a trained checkpoint.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint file (.pt)")
    source.add_argument("--server", metavar="HOST:PORT", help="translate with a running nmt-serve instead")
    p.add_argument("--input", type=Path, help="file of sentences, one per line, UTF-8, gzip-compressed if it ends in .gz (default: stdin)")
    p.add_argument("--output", type=Path, help="write translations here (default: stdout)")
    p.add_argument("--scores", action="store_true", help="prefix each translation with its score and a tab")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="sentences x longest source x beam")
    p.add_argument("--attention-png", type=Path, help="save the first sentence's cross-attention here")
    p.add_argument("--workers", type=int, default=1,
                   help="batches decoded side by side, sharing the torch threads (local checkpoint only)")
    doc = p.add_argument_group("documents", "the input as one document instead of one sentence per line")
    doc.add_argument("--document", action="store_true",
                     help="split the input into sentences; paragraphs, line breaks and spacing are kept")
    doc.add_argument("--markup", action="store_true",
                     help="a document with inline HTML/XML: its tags are kept around the translated words")
    doc.add_argument("--lang", help="the input's language for the sentence splitter (default: the checkpoint's)")
    add_decoding_flags(p)
    p.add_argument("--target-prefix", default="", metavar="TEXT",
                   help="text every translation starts with (forced, then continued by the model)")
    p.add_argument("--glossary", type=Path, metavar="TSV",
                   help="terms, one 'source<TAB>target' a line: a line holding a source phrase (any case, whole "
                        "words) gets a translation holding its target phrase as written")
    add_client_flags(p)
    args = p.parse_args(argv)
    from translator.checkpoint import CheckpointError

    try:
        opts = decoding_options(args)
        check_extras(args)
        if args.document or args.markup:
            check_document_flags(args, opts)
        backend = open_backend(args)
        if args.document or args.markup:
            translate_document_file(backend, args, opts)
            return 0
        glossary = read_glossary(args.glossary) if args.glossary else []
        lines = read_lines(args.input)
        results = translate_lines(backend, lines, opts, show_progress=args.input is not None,
                                  target_prefix=args.target_prefix, glossary=glossary)
        write_results(results, args.output, opts.n_best > 1, args.scores)
        report_unmet_terms(results)
        if args.attention_png and lines:
            save_attention(backend, lines[0], opts, args.attention_png)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_extras(args: argparse.Namespace) -> None:
    """Name the missing extra before any work: the base install translates a local checkpoint only."""
    for wanted, module, flag, extra in ((args.server, "grpc", "--server", "serve"),
                                        (args.attention_png, "matplotlib", "--attention-png", "plot")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(f"{flag} needs the {extra!r} extra: pip install 'nmt-translator[{extra}]'")


def check_document_flags(args: argparse.Namespace, opts: DecodeOptions) -> None:
    if args.target_prefix:
        raise ValueError("--document and --markup translate whole documents: --target-prefix applies to lines")
    if args.glossary:
        raise ValueError("--document and --markup translate whole documents: --glossary applies to lines")
    if opts.n_best > 1 or args.scores or args.attention_png:
        raise ValueError("--document and --markup write one document: --n-best, --scores and "
                         "--attention-png apply to lines")


def translate_document_file(backend: TranslateBackend, args: argparse.Namespace, opts: DecodeOptions) -> None:
    """The whole input translated as one document, written with its layout (newlines untranslated)."""
    from translator.documents import DocumentLimits

    text = read_input(args.input)
    # A file is not a request: its only limit is itself.
    limits = DocumentLimits(max_chars=max(len(text), 1), max_sentences=max(len(text), 1))
    result = backend.translate_document(text, opts, args.lang, limits, markup=args.markup)  # type: ignore[attr-defined]
    if args.output is None:
        sys.stdout.write(result.text)
        return
    with args.output.open("w", encoding="utf-8", newline="") as f:
        f.write(result.text)


def open_backend(args: argparse.Namespace) -> TranslateBackend:
    if args.server:
        from translator.client import backend_from_args

        if args.workers != 1:
            raise ValueError("--workers applies to a local --checkpoint; the server has its own batching.workers")
        return backend_from_args(args)
    import torch

    from translator.checkpoint import load_checkpoint
    from translator.runtime import keep_freed_memory
    from translator.translate import Translator

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    keep_freed_memory()
    ckpt = load_checkpoint(args.checkpoint)
    # The cores are shared among the workers: each decodes on its part of torch's threads.
    torch.set_num_threads(max(1, torch.get_num_threads() // args.workers))
    return Translator(ckpt.build_model(), ckpt.tokenizer, max_batch_tokens=args.max_batch_tokens,
                      workers=args.workers, src_lang=ckpt.config.get("data", {}).get("src_lang", "en"))


def read_lines(path: Path | None) -> list[str]:
    return read_input(path).splitlines()


def read_input(path: Path | None) -> str:
    """The text of path (through gzip when it ends in .gz) or of stdin, as it is (line ends kept).
    Not UTF-8, or a gzip file cut short: a ValueError naming the input, and the line and column of
    the first byte that is not UTF-8."""
    if path is None:
        name = "stdin"
        stdin = sys.stdin
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    else:
        name = str(path)
        data = path.read_bytes()
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (EOFError, OSError, zlib.error) as e:
                raise ValueError(f"{path} is not a complete gzip file: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{name} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {column}") from None


def translate_lines(
    backend: TranslateBackend, lines: list[str], opts: DecodeOptions, show_progress: bool, target_prefix: str = "",
    glossary: Sequence[Term] = (),
) -> list[Translation]:
    from tqdm import tqdm

    with tqdm(total=len(lines), unit="sent", disable=not show_progress, file=sys.stderr) as bar:
        return backend.translate(lines, opts, progress=bar.update, target_prefix=target_prefix, glossary=glossary)


def report_unmet_terms(results: list[Translation]) -> None:
    """A line on stderr for each glossary term a best translation lacks (its length budget left no room)."""
    for i, result in enumerate(results, start=1):
        for term in result.unmet_terms:
            print(f"line {i}: glossary term {term.source!r} -> {term.target!r} does not fit its translation",
                  file=sys.stderr)


def write_results(results: list[Translation], path: Path | None, nbest: bool, scores: bool) -> None:
    if path is None:
        emit(results, sys.stdout, nbest, scores)
        return
    with path.open("w", encoding="utf-8") as f:
        emit(results, f, nbest, scores)


def emit(results: list[Translation], out: TextIO, nbest: bool, scores: bool) -> None:
    """One line per sentence, or with n-best the Moses format `index ||| text ||| score` per hypothesis."""
    for i, result in enumerate(results):
        if nbest:
            out.writelines(f"{i} ||| {t.text} ||| {t.score:.4f}\n" for t in result.nbest)
        elif scores:
            out.write(f"{result.score:.4f}\t{result.text}\n")
        else:
            out.write(result.text + "\n")


def save_attention(backend: TranslateBackend, line: str, opts: DecodeOptions, path: Path) -> None:
    """Translate `line` again, alone, with alignments; search results do not depend on the batch
    (a sampled translation is drawn afresh)."""
    from translator.attention_plot import plot_attention

    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("--attention-png needs a local checkpoint")
    best = backend.translate([line], opts.replace(alignment=True, n_best=1))[0]
    if not best.tokens:
        print("no attention picture: the first translation is empty", file=sys.stderr)
        return
    src_pieces = tokenizer.pieces(tokenizer.encode([line])[0]) + ["</s>"]
    plot_attention(best.alignment, src_pieces, tokenizer.pieces(best.tokens), path)
    print(f"attention picture: {path}", file=sys.stderr)
