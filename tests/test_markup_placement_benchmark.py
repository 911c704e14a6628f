"""benchmarks/markup_placement.py measured against a person's placement: `--sheet` writes the cases
with the translation's tags taken out, a person adds the words they would wrap, and `--reference`
counts the cases where the service's element wraps those words. Run on a tiny checkpoint."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from translator.checkpoint import save_checkpoint
from translator.config import to_dict
from translator.model import build_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("markup_placement_benchmark", BENCHMARKS / "markup_placement.py")
markup_placement = sys.modules["markup_placement_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(markup_placement)

SOURCES = ["the red dog runs on the green street", "a small cat sleeps", "two men walk"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    torch.manual_seed(3)
    cfg = tiny_model_config()
    path = tmp_path_factory.mktemp("placement") / "tiny.pt"
    save_checkpoint(path, config={"model": to_dict(cfg), "data": {"src_lang": "en", "tgt_lang": "de"}},
                    tokenizer=toy_tokenizer, model=build_model(cfg))
    return path


def run(checkpoint: Path, tmp_path: Path, *flags: str | Path) -> dict:
    src = tmp_path / "src.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(SOURCES) + "\n")
    out = tmp_path / "figures.json"
    argv = [str(checkpoint), "--src", str(src), "--sentences", "3", "--beam-size", "1", "--max-len-b", "6",
            "--json", str(out), *map(str, flags)]
    assert markup_placement.main(argv) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_a_filled_in_sheet_scores_the_cases_judged_and_leaves_out_stale_ones(checkpoint, tmp_path, capsys):
    sheet = tmp_path / "sheet.txt"
    run(checkpoint, tmp_path, "--sheet", sheet)
    printed = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if " | " in line]
    rows = [line.split(" | ") for line in sheet.read_text(encoding="utf-8").splitlines()]
    assert [r[:2] for r in rows] == [p[:2] for p in printed]
    assert all("<" not in r[2] for r in rows)  # the person sees no tags
    wrapped = markup_placement.wrapped_text(printed[0][2])
    assert wrapped
    rows[0][3] = f"nonsense || {wrapped.upper()}."  # the service's words, among alternatives, case and stop aside
    rows[1][3] = "-"  # nothing renders the word: no element is right
    rows[2][2] += " anders"  # judged on another translation: stale
    rows[2][3] = "anders"
    person = tmp_path / "person.txt"
    person.write_text("\n".join(" | ".join(r) for r in rows) + "\n", encoding="utf-8")
    dropped = tmp_path / "person-without-sources.txt"  # the source column left out
    dropped.write_text("\n".join(" | ".join([r[0], *r[2:]]) for r in rows) + "\n", encoding="utf-8")

    figures = run(checkpoint, tmp_path, "--reference", person, dropped)
    for name in ("person.txt", "person-without-sources.txt"):
        assert figures[f"{name}: judged"] == 2 and figures[f"{name}: stale"] == 1
        assert figures[f"{name}: placed_rate"] == 0.5
    assert figures["markup_tags_placed_rate"] == 0.5


def test_the_service_element_must_wrap_exactly_the_words_chosen():
    judged = ("Zwei Hunde spielen miteinander.", ["miteinander", "spielen miteinander"])
    assert markup_placement.matches_reference("Zwei Hunde <b>spielen miteinander</b>.", judged)
    assert markup_placement.matches_reference("Zwei Hunde spielen <b>miteinander.</b>", judged)
    assert not markup_placement.matches_reference("Zwei <b>Hunde</b> spielen miteinander.", judged)
    assert not markup_placement.matches_reference("Zwei Hunde <b>spielen</b> <b>miteinander</b>.", judged)
    assert markup_placement.matches_reference("Zwei Hunde <b>spielen</b>", judged) is None
    entity = ("Tom &amp; Jerry laufen.", ["laufen"])
    assert markup_placement.matches_reference("Tom &amp; Jerry <i>laufen</i>.", ("Tom & Jerry laufen.", ["laufen"]))
    assert markup_placement.matches_reference("Tom &amp; Jerry <i>laufen</i>.", entity) is None


def test_a_malformed_reference_line_names_its_file_and_line(tmp_path):
    path = tmp_path / "person.txt"
    path.write_text("0 | Ein Hund. | Hund\nzwei | Ein Hund | Hund\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"person\.txt:2: expected"):
        markup_placement.read_reference(path)
    path.write_text("0 | Ein Hund. | \n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"person\.txt:1: expected"):
        markup_placement.read_reference(path)
