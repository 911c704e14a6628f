"""Training corpora too large for memory, read as a `datasets` stream (`data.streaming: true`).

Each epoch the stream passes through the `datasets` shuffle buffer, is tokenized and
length-filtered on the fly, and is cut into chunks of `data.stream_buffer` pairs; each chunk is
grouped by length into the same token-budget batches as an in-memory split (`bucket_batches`),
in an order drawn from (seed, epoch, chunk). Every pair of the split lands in exactly one batch
per epoch, and at most about two buffers of pairs are held at once.

The data position is the same as in memory, (epoch, batches consumed): a resumed run replays
the epoch's stream from its start and skips what was consumed, so it sees the same batches.
Under torchrun every process reads the whole stream and collates only its own share.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import IO

import datasets

from training.corpus import CorpusError, load_pairs
from training.data import Batch, bucket_batches, collate, keep_pair
from translator.tokenizer import Tokenizer

ROWS_PER_READ = 1000  # pairs read and tokenized at a time

PairBatch = tuple[list[list[int]], list[list[int]]]  # source ids, target ids of one batch


def stream_pairs(spec: str, src_lang: str, tgt_lang: str) -> datasets.IterableDataset:
    """A corpus spec (see training.corpus) as an IterableDataset with a column per language or a
    `translation` column. Hub datasets and files are read lazily; Multi30K is small and is
    streamed from memory."""
    kind, _, rest = spec.partition(":")
    if kind == "hub" and ":" in rest:
        name, _, split = rest.rpartition(":")
        path, _, config = name.partition("#")
        try:
            return datasets.load_dataset(path, config or None, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for missing datasets
            raise CorpusError(f"could not stream Hub dataset {name!r} split {split!r}: {e}") from None
    if kind == "file" and rest.endswith(".jsonl"):
        return datasets.load_dataset("json", data_files=rest, split="train", streaming=True)
    if kind == "file":
        return datasets.IterableDataset.from_generator(
            read_text_pairs, gen_kwargs={"rest": rest, "src_lang": src_lang, "tgt_lang": tgt_lang}
        )
    ds = load_pairs(spec, src_lang, tgt_lang)
    return ds.rename_columns({"src": src_lang, "tgt": tgt_lang}).to_iterable_dataset()


def open_text(path: Path) -> IO[str]:
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8")


def read_text_pairs(rest: str, src_lang: str, tgt_lang: str) -> Iterator[dict[str, str]]:
    """Pairs of `file:SRC,TGT` (line-aligned) or `file:PATH.tsv`, one line at a time."""
    if "," in rest:
        src_path, tgt_path = (Path(p) for p in rest.split(",", 1))
        with open_text(src_path) as fs, open_text(tgt_path) as ft:
            for n, (s, t) in enumerate(zip_longest(fs, ft), 1):
                if s is None or t is None:
                    raise CorpusError(f"{src_path} and {tgt_path} differ in length from line {n} on")
                yield {src_lang: s.rstrip("\r\n"), tgt_lang: t.rstrip("\r\n")}
        return
    path = Path(rest)
    if path.suffix != ".tsv":
        raise CorpusError(f"corpus file {path}: use .tsv, .jsonl, or SRC_PATH,TGT_PATH")
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) != 2:
                raise CorpusError(f"{path}:{n}: expected 2 tab-separated columns, found {len(cols)}")
            yield {src_lang: cols[0], tgt_lang: cols[1]}


def pair_columns(rows: dict[str, list], src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Source and target texts of a block of rows with a `translation` or per-language columns."""
    if "translation" in rows:
        try:
            return [t[src_lang] for t in rows["translation"]], [t[tgt_lang] for t in rows["translation"]]
        except KeyError as e:
            raise CorpusError(f"the stream's translation column has no language {e.args[0]!r}") from None
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in rows]
    if missing:
        raise CorpusError(f"the stream has no 'translation' column and no column {missing[0]!r} ({sorted(rows)})")
    return rows[src_lang], rows[tgt_lang]


def stream_sentences(stream: datasets.IterableDataset, src_lang: str, tgt_lang: str) -> Iterator[str]:
    """Every non-empty source and target sentence, for training the tokenizer in one pass."""
    for rows in stream.iter(batch_size=ROWS_PER_READ):
        src, tgt = pair_columns(rows, src_lang, tgt_lang)
        yield from (s for s in src + tgt if s)


class StreamingBatchSource:
    """The training split as a stream, served as token-budget batches epoch by epoch."""

    def __init__(
        self, stream: datasets.IterableDataset, tokenizer: Tokenizer, *, src_lang: str, tgt_lang: str,
        buffer: int, max_len: int, max_len_ratio: float, max_tokens: int, seed: int, bos: int, eos: int,
        pad: int,
    ) -> None:
        self.stream, self.tokenizer = stream, tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.buffer, self.max_len, self.max_len_ratio = buffer, max_len, max_len_ratio
        self.max_tokens, self.seed = max_tokens, seed
        self.bos, self.eos, self.pad = bos, eos, pad

    def epoch(self, epoch: int) -> Iterator[PairBatch]:
        """The epoch's batches, in an order that depends only on (seed, epoch)."""
        shuffled = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer)
        shuffled.set_epoch(epoch)  # the shuffle seed becomes seed + epoch
        src_ids: list[list[int]] = []
        tgt_ids: list[list[int]] = []
        chunk = 0
        for rows in shuffled.iter(batch_size=ROWS_PER_READ):
            src, tgt = pair_columns(rows, self.src_lang, self.tgt_lang)
            for s, t in zip(self.tokenizer.encode(src), self.tokenizer.encode(tgt)):
                if keep_pair(len(s), len(t), self.max_len, self.max_len_ratio):
                    src_ids.append(s)
                    tgt_ids.append(t)
            while len(src_ids) >= self.buffer:
                yield from self.chunk_batches(src_ids[: self.buffer], tgt_ids[: self.buffer], epoch, chunk)
                del src_ids[: self.buffer], tgt_ids[: self.buffer]
                chunk += 1
        if src_ids:
            yield from self.chunk_batches(src_ids, tgt_ids, epoch, chunk)

    def chunk_batches(
        self, src_ids: list[list[int]], tgt_ids: list[list[int]], epoch: int, chunk: int
    ) -> Iterator[PairBatch]:
        rng = random.Random((self.seed * 100_003 + epoch) * 1_000_003 + chunk)
        lens = [len(s) for s in src_ids], [len(t) for t in tgt_ids]
        for batch in bucket_batches(*lens, self.max_tokens, rng):
            yield [src_ids[i] for i in batch], [tgt_ids[i] for i in batch]

    def collate(self, item: PairBatch) -> Batch:
        return collate(item[0], item[1], self.bos, self.eos, self.pad)
