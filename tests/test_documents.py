"""Documents split into sentences and put back together: layout kept, long sentences cut, limits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_config
from translator.decode_options import DecodeOptions
from translator.documents import (
    DocumentLimitError,
    DocumentLimits,
    reassemble,
    split_document,
)
from translator.model import build_model
from translator.translate import Translator


def words(text: str) -> int:
    return len(text.split())


def split(text: str, max_tokens: int = 50, **kw):
    return split_document(text, words, max_tokens, **kw)


DOC = "  First one. Second one!\n\n\tThird on its line.  \r\nA fourth? Yes.\n   \n"


def test_sentences_are_found_with_their_spans():
    doc = split(DOC)
    assert doc.sources() == ["First one.", "Second one!", "Third on its line.", "A fourth?", "Yes."]
    for s in doc.sentences:
        assert doc.text[s.span[0]:s.span[1]] == doc.sources()[doc.sentences.index(s)]


def test_identity_translations_give_back_the_document_exactly():
    doc = split(DOC)
    assert reassemble(doc, doc.sources()).text == DOC


def test_translations_go_where_their_sources_were_and_keep_the_layout():
    doc = split(DOC)
    result = reassemble(doc, [s.upper() for s in doc.sources()])
    assert result.text == "  FIRST ONE. SECOND ONE!\n\n\tTHIRD ON ITS LINE.  \r\nA FOURTH? YES.\n   \n"
    for t in result.sentences:
        assert result.text[t.target[0]:t.target[1]] == t.text
        assert t.text == DOC[t.source[0]:t.source[1]].upper()


@pytest.mark.parametrize("text", ["", " ", "\n\n", " \t\r\n  \u2028\u3000"])
def test_whitespace_only_content_is_kept_as_is(text):
    doc = split(text)
    assert doc.sentences == ()
    assert reassemble(doc, []).text == text


def test_invisible_format_characters_around_sentences_stay_in_the_layout():
    # A byte-order mark, a line of zero-width spaces, a word joiner: the model would drop them.
    text = "\ufeffFirst one.\n\u200b\u200b\nSecond one.\u200b Third.\u2060\n"
    doc = split(text)
    assert doc.sources() == ["First one.", "Second one.", "Third."]
    assert reassemble(doc, [s.upper() for s in doc.sources()]).text == (
        "\ufeffFIRST ONE.\n\u200b\u200b\nSECOND ONE.\u200b THIRD.\u2060\n")
    assert split("a\u200db c.").sources() == ["a\u200db c."]  # inside a sentence they stay in it


def test_a_long_sentence_is_cut_at_clause_punctuation_first():
    text = "one two three, four five six; seven eight nine: ten."
    doc = split(text, max_tokens=3)
    assert doc.sources() == ["one two three,", "four five six;", "seven eight nine:", "ten."]
    assert len(doc.sentences) == 1
    result = reassemble(doc, [s.upper() for s in doc.sources()])
    assert result.text == text.upper()
    assert result.sentences[0].source == (0, len(text))


def test_clauses_that_fit_together_stay_together():
    doc = split("a b, c d, e f g h", max_tokens=4)
    assert doc.sources() == ["a b, c d,", "e f g h"]


def test_a_clause_over_the_limit_is_cut_into_word_windows():
    doc = split("a b c d e f g, h", max_tokens=3)
    assert doc.sources() == ["a b c", "d e f", "g,", "h"]
    for a, b in doc.pieces:
        assert words(doc.text[a:b]) <= 3


def test_a_word_over_the_limit_is_cut_into_characters():
    def chars(text: str) -> int:
        return len(text)

    doc = split_document("abcdefgh ij", chars, 3)
    assert doc.sources() == ["abc", "def", "gh", "ij"]
    assert reassemble(doc, doc.sources()).text == "abcdefgh ij"


def test_the_pieces_of_a_cut_sentence_map_to_the_whole_sentence():
    text = "Short. " + " ".join(f"w{i}" for i in range(10)) + ".\nEnd."
    doc = split(text, max_tokens=4)
    assert [len(s.pieces) for s in doc.sentences] == [1, 3, 1]
    result = reassemble(doc, doc.sources())
    assert result.text == text
    assert [t.source for t in result.sentences] == [s.span for s in doc.sentences]


def test_character_limit_is_checked_before_splitting():
    with pytest.raises(DocumentLimitError, match="max_chars=10"):
        split("x" * 11, limits=DocumentLimits(max_chars=10))


def test_sentence_limit_names_the_limit_and_the_count():
    def never(text: str) -> int:
        raise AssertionError("no sentence is measured over the limit")

    with pytest.raises(DocumentLimitError, match="3 sentences; the limit is max_sentences=2"):
        split_document("Go home. Run fast. Stop now.", never, 10, limits=DocumentLimits(max_sentences=2))


@pytest.mark.parametrize("field", ["max_chars", "max_sentences"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        DocumentLimits(**{field: 0})


def test_translation_count_must_match():
    with pytest.raises(ValueError, match="1 translations for 2 pieces"):
        reassemble(split("Go home. Run fast."), ["x"])


class RecordingTranslator(Translator):
    """A Translator that notes the size of every batch it searches."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []

    def decode_steps(self, sources, opts, prefix=(), phrases=None, batch=None):
        self.batch_sizes.append(len(sources))
        return super().decode_steps(sources, opts, prefix, phrases, batch)


def test_a_document_keeps_its_paragraphs_and_its_sentences_go_in_one_batch(toy_tokenizer):
    torch.manual_seed(0)
    translator = RecordingTranslator(build_model(tiny_model_config()), toy_tokenizer)
    text = "\n  the dog runs. a cat sleeps!\n\nthe red man eats.\tthe woman sees a child.\r\n\n\nbig dog  \n"
    result = translator.translate_document(text, DecodeOptions(max_len=8))
    assert translator.batch_sizes == [5]
    expected = translator.translate([text[a:b] for a, b in (s.source for s in result.sentences)],
                                    DecodeOptions(max_len=8))
    assert [s.text for s in result.sentences] == [t.text.strip() for t in expected]
    # Every translation replaced by its source gives the document back: the layout is untouched.
    rebuilt, cursor = "", 0
    for s in result.sentences:
        rebuilt += result.text[cursor : s.target[0]] + text[s.source[0] : s.source[1]]
        cursor = s.target[1]
    assert rebuilt + result.text[cursor:] == text


def test_a_line_of_zero_width_spaces_in_a_marked_up_document_is_kept(toy_tokenizer):
    # With markup a line break is only whitespace, so the line would otherwise join the next sentence.
    torch.manual_seed(0)
    translator = Translator(build_model(tiny_model_config()), toy_tokenizer)
    text = "\ufeffthe <b>dog</b> runs.\n\u200b\u200b\na cat sleeps.\n"
    result = translator.translate_document(text, DecodeOptions(max_len=6), markup=True)
    assert result.text.startswith("\ufeff") and result.text.split("\n")[1] == "\u200b\u200b"
    assert [text[a:b] for a, b in (s.source for s in result.sentences)] == ["the <b>dog</b> runs.", "a cat sleeps."]


def test_a_sentence_longer_than_the_model_positions_is_translated_in_pieces(toy_tokenizer):
    torch.manual_seed(0)
    translator = RecordingTranslator(build_model(tiny_model_config(max_positions=8)), toy_tokenizer)
    text = "the dog runs, the cat sleeps, the man eats and the woman sees a child on the street."
    result = translator.translate_document(text, DecodeOptions(max_len=4))
    assert translator.batch_sizes and sum(translator.batch_sizes) > 1
    assert len(result.sentences) == 1 and result.sentences[0].source == (0, len(text))
    assert result.text == result.sentences[0].text


def test_document_limits_are_checked_before_translation(toy_tokenizer):
    translator = RecordingTranslator(build_model(tiny_model_config()), toy_tokenizer)
    with pytest.raises(DocumentLimitError, match="max_sentences=1"):
        translator.translate_document("the dog runs. the cat sleeps.", limits=DocumentLimits(max_sentences=1))
    with pytest.raises(DocumentLimitError, match="max_chars=5"):
        translator.translate_document("<b>the dog</b>", markup=True, limits=DocumentLimits(max_chars=5))
    assert translator.batch_sizes == []
