"""The tokenizer: one SentencePiece call per text for a few texts, one list call for many, the same ids and text either way."""

from __future__ import annotations

import pytest

from tests.conftest import toy_pairs
from translator.tokenizer import BATCH_CALL_MIN, BOS, EOS, PAD, UNK, train_tokenizer

SENTENCES = ["a small dog runs", "two men are talking", "the woman sings on a stage", ""]


@pytest.mark.parametrize("count", [0, 1, BATCH_CALL_MIN - 1, BATCH_CALL_MIN, 3 * BATCH_CALL_MIN + 1])
def test_encode_and_decode_give_the_list_calls_results_at_every_count(toy_tokenizer, count):
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(count)]
    ids = toy_tokenizer.encode(texts)
    assert ids == [toy_tokenizer.sp.encode(t) for t in texts]
    with_specials = [[BOS, *seq, UNK, EOS, PAD] for seq in ids]
    assert toy_tokenizer.decode(with_specials) == [toy_tokenizer.sp.decode(seq) for seq in ids]


@pytest.mark.parametrize("text, content", [
    ("red dog", True), ("the dog 🐕", True), ("", False), (" \t ", False), ("\u200b\u200d\u2060", False),
    ("\ufeff", False), ("🐕🙂", False), ("\u0301\u0308", False), ("...!? — ·", False),
    ("\u65e5\u672c", False),  # letters, but none the vocabulary knows: the unknown piece
])
def test_text_has_content_when_a_known_piece_holds_a_letter_or_digit(toy_tokenizer, text, content):
    ids = toy_tokenizer.encode([text])[0]
    assert toy_tokenizer.has_content(ids) is content
    assert all(any(c.isalnum() for c in toy_tokenizer.sp.id_to_piece(i)) for i in toy_tokenizer.word_ids)
    assert UNK not in toy_tokenizer.word_ids


@pytest.mark.parametrize("text", ["the red dog runs", "  the  cat\tsleeps ", "a ﬁne café 😀 — x", ""])
def test_spans_cover_each_token_of_the_encoding(toy_tokenizer, text):
    ids = toy_tokenizer.encode([text])[0]
    spans = toy_tokenizer.spans(text)
    assert len(spans) == len(ids)
    assert all(0 <= a <= b <= len(text) for a, b in spans)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    if text.isascii():  # normalized characters (the ligature ﬁ) may give a piece an empty span
        for (a, b), piece in zip(spans, toy_tokenizer.pieces(ids)):
            assert text[a:b].strip() == piece.replace("\u2581", "").strip()


def test_piece_log_probabilities_come_from_a_unigram_model_only(toy_tokenizer):
    ids = toy_tokenizer.encode(["the dog runs"])[0]
    log_probs = toy_tokenizer.log_probs(ids)
    assert log_probs == [toy_tokenizer.sp.get_score(i) for i in ids]
    assert len(log_probs) == len(ids) and all(lp < 0 for lp in log_probs)
    bpe = train_tokenizer([t for pair in toy_pairs(200) for t in pair], 60, "bpe")
    assert bpe.log_probs(bpe.encode(["the dog runs"])[0]) == []  # its scores are merge ranks
