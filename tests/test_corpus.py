"""Corpus loading through Hugging Face datasets: Multi30K folder, Hub-style datasets, local files."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from training.corpus import CorpusError, load_pairs


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.fixture
def multi30k_dir(tmp_path, monkeypatch):
    write_gz(tmp_path / "train.en.gz", ["A dog runs.", "Two men."])
    write_gz(tmp_path / "train.de.gz", ["Ein Hund rennt.", "Zwei Männer."])
    write_gz(tmp_path / "val.fr.gz", ["Un chien."])
    monkeypatch.setenv("MULTI30K_DIR", str(tmp_path))
    return tmp_path


def test_multi30k_reads_the_folder_named_by_the_environment(multi30k_dir):
    ds = load_pairs("multi30k:train", "de", "en")
    assert ds.column_names == ["src", "tgt"]
    assert ds[1] == {"src": "Zwei Männer.", "tgt": "Two men."}


def test_multi30k_missing_language_file_is_named(multi30k_dir):
    with pytest.raises(CorpusError, match="val.en.gz"):
        load_pairs("multi30k:val", "en", "fr")


def test_multi30k_unknown_language_is_refused(multi30k_dir):
    with pytest.raises(CorpusError, match="no language 'ja'"):
        load_pairs("multi30k:train", "en", "ja")


def test_hub_dataset_with_translation_column(tmp_path):
    """The Hub path, through datasets.load_dataset, on a dataset folder saved locally."""
    rows = [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}, {"translation": {"de": "Ja", "en": "Yes"}}]
    folder = tmp_path / "wmt-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_pairs(f"hub:{folder}:train", "en", "de")
    assert list(ds["src"]) == ["Hello world", "Yes"] and list(ds["tgt"]) == ["Hallo Welt", "Ja"]


def test_hub_dataset_with_language_columns(tmp_path):
    folder = tmp_path / "multi30k-like"
    folder.mkdir()
    datasets.Dataset.from_dict({"en": ["A cat."], "de": ["Eine Katze."]}).to_parquet(folder / "test.parquet")
    ds = load_pairs(f"hub:{folder}:test", "de", "en")
    assert ds[0] == {"src": "Eine Katze.", "tgt": "A cat."}


def test_hub_dataset_without_the_language_is_named(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    datasets.Dataset.from_dict({"en": ["x"], "fr": ["y"]}).to_parquet(folder / "train.parquet")
    with pytest.raises(CorpusError, match="no column 'de'"):
        load_pairs(f"hub:{folder}:train", "en", "de")


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="could not load Hub dataset"):
        load_pairs("hub:no-such-owner/no-such-dataset#xx-yy:train", "en", "de")


def test_tsv_jsonl_and_two_file_corpora(tmp_path):
    (tmp_path / "c.tsv").write_text("a b\tx y\nc\tz\n")
    (tmp_path / "c.jsonl").write_text('{"en": "a b", "de": "x y"}\n{"translation": {"en": "c", "de": "z"}}\n')
    (tmp_path / "c.en").write_text("a b\nc\n")
    (tmp_path / "c.de").write_text("x y\nz\n")
    specs = ["file:" + str(tmp_path / "c.tsv"), "file:" + str(tmp_path / "c.jsonl"),
             f"file:{tmp_path / 'c.en'},{tmp_path / 'c.de'}"]
    for spec in specs:
        ds = load_pairs(spec, "en", "de")
        assert list(ds["src"]) == ["a b", "c"] and list(ds["tgt"]) == ["x y", "z"], spec


@pytest.mark.parametrize(
    "content, name, message",
    [
        ("a\tb\tc\n", "bad.tsv", r"bad.tsv:1: expected 2 tab-separated columns"),
        ('{"en": "a"}\n', "bad.jsonl", r"bad.jsonl:1: expected keys 'en' and 'de'"),
        ("{not json\n", "bad.jsonl", r"bad.jsonl:1: not valid JSON"),
        ("x\n", "bad.txt", "use .tsv, .jsonl"),
    ],
)
def test_malformed_local_files_are_named_with_the_line(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CorpusError, match=message):
        load_pairs(f"file:{tmp_path / name}", "en", "de")


def test_misaligned_files_are_refused(tmp_path):
    (tmp_path / "a.en").write_text("1\n2\n")
    (tmp_path / "a.de").write_text("1\n")
    with pytest.raises(CorpusError, match="has 2 lines but"):
        load_pairs(f"file:{tmp_path / 'a.en'},{tmp_path / 'a.de'}", "en", "de")


def test_bad_spec_is_named():
    with pytest.raises(CorpusError, match="unknown kind 'ftp'"):
        load_pairs("ftp:x", "en", "de")
    with pytest.raises(CorpusError, match="must look like"):
        load_pairs("multi30k", "en", "de")
