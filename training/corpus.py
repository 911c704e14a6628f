"""Parallel corpora as Hugging Face `datasets` with columns `src` and `tgt`.

A corpus spec names a split:
    multi30k:SPLIT                 Multi30K (train, val, test_2016_flickr, test_2017_flickr) from
                                   $MULTI30K_DIR, else ../shared/data/multi30k, else the Hub
    hub:NAME[#CONFIG]:SPLIT        any Hub dataset (or a local dataset folder) with a `translation`
                                   column or one column per language, e.g. hub:wmt14#de-en:train
    file:PATH.tsv                  source<TAB>target per line
    file:PATH.jsonl                {"translation": {lang: text}} or {lang: text} per line
    file:SRC_PATH,TGT_PATH         two line-aligned text files (optionally .gz)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets

from translator.config import ConfigError

MULTI30K_ENV = "MULTI30K_DIR"
MULTI30K_HUB = "bentrevett/multi30k"  # en-de only; splits train / validation / test
MULTI30K_HUB_SPLITS = {"train": "train", "val": "validation", "test_2016_flickr": "test"}
MULTI30K_LANGS = ("en", "de", "fr", "cs")


class CorpusError(ConfigError):
    """A corpus spec, file or column is wrong; the message names it."""


def load_pairs(spec: str, src_lang: str, tgt_lang: str) -> datasets.Dataset:
    """Load one split as a Dataset with string columns `src` and `tgt`."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise CorpusError(f"corpus spec {spec!r} must look like multi30k:SPLIT, hub:NAME:SPLIT or file:PATH")
    if kind == "multi30k":
        return load_multi30k(rest, src_lang, tgt_lang)
    if kind == "hub":
        name, _, split = rest.rpartition(":")
        if not name:
            raise CorpusError(f"corpus spec {spec!r} must look like hub:NAME[#CONFIG]:SPLIT")
        return load_hub(name, split, src_lang, tgt_lang)
    if kind == "file":
        return load_files(rest, src_lang, tgt_lang)
    raise CorpusError(f"corpus spec {spec!r}: unknown kind {kind!r} (multi30k, hub, file)")


def multi30k_dir() -> Path | None:
    """The local Multi30K folder: $MULTI30K_DIR, else shared/data/multi30k beside the project."""
    env = os.environ.get(MULTI30K_ENV)
    if env:
        if not Path(env).is_dir():
            raise CorpusError(f"${MULTI30K_ENV} names {env}, which is not a directory")
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data" / "multi30k"
        if candidate.is_dir():
            return candidate
    return None


def load_multi30k(split: str, src_lang: str, tgt_lang: str) -> datasets.Dataset:
    for lang in (src_lang, tgt_lang):
        if lang not in MULTI30K_LANGS:
            raise CorpusError(f"Multi30K has no language {lang!r} (it has {', '.join(MULTI30K_LANGS)})")
    folder = multi30k_dir()
    if folder is None:
        if split not in MULTI30K_HUB_SPLITS or {src_lang, tgt_lang} != {"en", "de"}:
            raise CorpusError(
                f"no local Multi30K (set ${MULTI30K_ENV}); the Hub copy {MULTI30K_HUB} has only "
                f"en-de splits {', '.join(MULTI30K_HUB_SPLITS)}"
            )
        return load_hub(MULTI30K_HUB, MULTI30K_HUB_SPLITS[split], src_lang, tgt_lang)
    return read_aligned(folder / f"{split}.{src_lang}.gz", folder / f"{split}.{tgt_lang}.gz")


def load_hub(name: str, split: str, src_lang: str, tgt_lang: str) -> datasets.Dataset:
    """A Hub dataset `name` or `name#config` (e.g. `wmt14#de-en`); `name` may be a local folder."""
    path, _, config = name.partition("#")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for missing datasets and splits
        raise CorpusError(f"could not load Hub dataset {name!r} split {split!r}: {e}") from None
    return to_pairs(ds, src_lang, tgt_lang, f"hub:{name}:{split}")


def to_pairs(ds: datasets.Dataset, src_lang: str, tgt_lang: str, where: str) -> datasets.Dataset:
    """Map a `translation` column, or per-language columns, to `src`/`tgt`."""
    if "translation" in ds.column_names:
        def split_translation(batch):
            return {
                "src": [t[src_lang] for t in batch["translation"]],
                "tgt": [t[tgt_lang] for t in batch["translation"]],
            }

        first = ds[0]["translation"] if len(ds) else {src_lang: "", tgt_lang: ""}
        missing = [lang for lang in (src_lang, tgt_lang) if lang not in first]
        if missing:
            raise CorpusError(f"{where}: translation column has no language {missing[0]!r} ({sorted(first)})")
        return ds.map(split_translation, batched=True, remove_columns=ds.column_names)
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in ds.column_names]
    if missing:
        raise CorpusError(
            f"{where}: no 'translation' column and no column {missing[0]!r} (columns: {ds.column_names})"
        )
    ds = ds.select_columns([src_lang, tgt_lang])
    return ds.rename_columns({src_lang: "src", tgt_lang: "tgt"})


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except (UnicodeDecodeError, OSError) as e:
        raise CorpusError(f"corpus file {path} is not readable UTF-8 text: {e}") from None


def read_aligned(src_path: Path, tgt_path: Path) -> datasets.Dataset:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CorpusError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


def load_files(rest: str, src_lang: str, tgt_lang: str) -> datasets.Dataset:
    if "," in rest:
        src_path, tgt_path = rest.split(",", 1)
        return read_aligned(Path(src_path), Path(tgt_path))
    path = Path(rest)
    if path.suffix == ".tsv":
        src, tgt = [], []
        for n, line in enumerate(read_lines(path), 1):
            cols = line.split("\t")
            if len(cols) != 2:
                raise CorpusError(f"{path}:{n}: expected 2 tab-separated columns, found {len(cols)}")
            src.append(cols[0])
            tgt.append(cols[1])
        return datasets.Dataset.from_dict({"src": src, "tgt": tgt})
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid JSON: {e}") from None
            pair = obj.get("translation", obj) if isinstance(obj, dict) else None
            if not isinstance(pair, dict) or src_lang not in pair or tgt_lang not in pair:
                raise CorpusError(f"{path}:{n}: expected keys {src_lang!r} and {tgt_lang!r}")
            rows.append((pair[src_lang], pair[tgt_lang]))
        return datasets.Dataset.from_dict({"src": [r[0] for r in rows], "tgt": [r[1] for r in rows]})
    raise CorpusError(f"corpus file {path}: use .tsv, .jsonl, or SRC_PATH,TGT_PATH")
