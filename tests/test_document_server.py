"""Documents and inline markup through the service: a real server on port 0, a real client, a tiny
checkpoint whose EOS never wins (outputs run to their budget) and whose positions are few, so that a
sentence of a document can be longer than the model takes. Expected documents come from offline
Translator.translate_document on the same checkpoint."""

from __future__ import annotations

import functools
import html
import io
import logging
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest
import torch

from tests.conftest import tiny_model_config
from tests.test_server import DEFAULTS, log_line, server_config
from translator.batcher import BatcherConfig
from translator.checkpoint import load_checkpoint, save_checkpoint
from translator.cli import translate_main
from translator.client import TranslatorClient
from translator.config import ConfigError, to_dict
from translator.documents import split_document
from translator.markup import parse_markup
from translator.model import build_model
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.requests import Limits
from translator.server import ServerConfig, create_server
from translator.translate import Translator

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_POSITIONS = 24  # the model takes 23 source tokens
LIMITS = Limits(max_sentences=8, max_sentence_chars=120, max_length=64, max_document_chars=2000,
                max_document_sentences=24)
LONG = " ".join(["the red dog runs and the small cat sleeps on the street"] * 3)  # > 23 tokens, 1 sentence
DOCUMENT = (
    "  the red dog runs. a small cat sleeps!\r\n\r\n"
    "\tthe man sees the woman.   the child eats?\n"
    "\u200b\u200b\n"
    f"{LONG}.\n\n"
    "   🙂🙂 \r\n"
    "a big green dog jumps on the street.\n\n\n"
)
MARKUP = ('<p>the <b>red dog</b> runs. a <i>small <a href="x.html">cat</a></i> sleeps &amp; eats.</p>\n'
          '<p>the man<br/> sees <b>the <i>woman</i>.</b> 🙂</p>')
DOC = pb.DocumentOptions(enabled=True)
MARKED = pb.DocumentOptions(enabled=True, markup=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    torch.manual_seed(1)
    cfg = tiny_model_config(max_positions=MAX_POSITIONS)
    model = build_model(cfg)
    with torch.no_grad():
        model.embed.tokens.weight[cfg.eos_id].zero_()  # EOS never wins: outputs run to their budget
    path = tmp_path_factory.mktemp("documents") / "tiny.pt"
    save_checkpoint(path, config={"model": to_dict(cfg), "data": {"src_lang": "en", "tgt_lang": "de"}},
                    tokenizer=toy_tokenizer, model=model)
    return path


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    ckpt = load_checkpoint(checkpoint)
    return Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS)


@pytest.fixture(scope="module")
def server_settings(checkpoint) -> ServerConfig:
    return server_config(checkpoint, limits=LIMITS)


@pytest.fixture(scope="module")
def client(server):
    with TranslatorClient(f"127.0.0.1:{server[1]}", timeout=60, retries=0) as c:
        yield c


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_a_document_keeps_its_layout_and_equals_offline(client, translator, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    assert len(DOCUMENT) > LIMITS.max_sentence_chars  # documents have a limit of their own
    got = client.translate([DOCUMENT], document=DOC, request_id="layout").translations[0]
    want = translator.translate_document(DOCUMENT)
    assert got.document.text == want.text == got.hypotheses[0].text
    assert want.text.startswith("  ") and want.text.endswith("\n\n\n") and want.text != DOCUMENT
    assert want.text.count("\r\n\r\n\t") == 1 and "\n\u200b\u200b\n" in want.text and "\n   🙂🙂 \r\n" in want.text
    assert [((s.source_start, s.source_end), (s.target_start, s.target_end), s.text)
            for s in got.document.sentences] == [(s.source, s.target, s.text) for s in want.sentences]
    pieces = split_document(DOCUMENT, translator.count_tokens, translator.max_source_tokens).sources()
    content = [p for p in pieces if translator.tokenizer.has_content(translator.tokenizer.encode([p])[0])]
    assert len(content) == len(pieces) - 1  # the emoji line is passed through (zero-width spaces are layout)
    assert log_line(caplog, "layout")["sentences"] == len(content)  # one job: all of them, batched together


def test_spans_map_each_sentence_to_its_translation(client, translator):
    doc = client.translate([DOCUMENT], document=DOC).translations[0].document
    split = split_document(DOCUMENT, translator.count_tokens, translator.max_source_tokens)
    assert [(s.source_start, s.source_end) for s in doc.sentences] == [s.span for s in split.sentences]
    sources = [DOCUMENT[s.source_start:s.source_end] for s in doc.sentences]
    assert sources[:4] == ["the red dog runs.", "a small cat sleeps!", "the man sees the woman.", "the child eats?"]
    assert f"{LONG}." in sources and "🙂🙂" in sources
    for s in doc.sentences:
        assert doc.text[s.target_start:s.target_end] == s.text
    content_free = [s for s in doc.sentences if DOCUMENT[s.source_start:s.source_end] == "🙂🙂"]
    assert [s.text for s in content_free] == ["🙂🙂"]  # passed through unchanged
    assert not any("\u200b" in source for source in sources)  # zero-width spaces are layout, kept around them


def test_a_sentence_longer_than_the_model_takes_is_translated_in_pieces(client, translator):
    assert translator.count_tokens(LONG) > translator.max_source_tokens
    assert refusal(lambda: client.translate([LONG])).code() == INVALID  # as a sentence: too long
    doc = client.translate([LONG], document=DOC).translations[0].document
    assert len(doc.sentences) == 1 and doc.text == translator.translate_document(LONG).text
    pieces = split_document(LONG, translator.count_tokens, translator.max_source_tokens).sources()
    assert len(pieces) == 3 and doc.text == " ".join(t.text for t in translator.translate(pieces))


def test_markup_comes_back_well_formed_and_equals_offline(client, translator):
    got = client.translate([MARKUP], document=MARKED).translations[0].document
    want = translator.translate_document(MARKUP, markup=True)
    assert got.text == want.text
    ET.fromstring(f"<root>{got.text}</root>")  # well-formed (an untrained model: tags may go with empty output)
    assert got.text.count("<br/>") == 1 and got.text.count("<p>") == 2 and "🙂" in got.text
    assert [(s.source_start, s.source_end, s.target_start, s.target_end, s.text) for s in got.sentences] == [
        (*s.source, *s.target, s.text) for s in want.sentences]


def test_attribute_text_is_translated_unary_and_streamed_as_offline(client, translator):
    page = ('<p title="the red dog. the small cat.">the dog <img alt="a small cat sleeps"> runs.</p>\n'
            '<p><input type=submit value="the man"> <a href="x.html" title="the woman">eats</a></p>')
    want = translator.translate_document(page, markup=True)
    got = client.translate([page], document=MARKED).translations[0].document
    *sentences, final = client.translate_stream([page], document=MARKED)
    assert got.text == final.translation.document.text == want.text
    assert len(sentences) == len(got.sentences) == 2  # an attribute's text is not a sentence of the document
    for text in ("the red dog. the small cat.", "a small cat sleeps", "the man", "the woman"):
        assert f'"{html.escape(translator.translate_document(text).text)}"' in got.text


def test_attribute_sentences_count_toward_the_sentence_limit(client):
    page = "<p>" + "the dog runs. " * 20 + '<b title="' + "a cat. " * 5 + '">x</b></p>'
    error = refusal(lambda: client.translate([page], document=MARKED))
    assert error.code() == INVALID and "max_document_sentences allows 24 per request" in error.details()


def test_code_and_scripts_come_back_as_they_stand_and_equal_offline(client, translator):
    page = ('<p>the dog runs <code>ls &amp;&amp; x</code> on the street.</p>\n'
            '<script>if (a < b) { c = "<b>the dog</b>"; }</script>\n<p translate="no">the cat</p>')
    got = client.translate([page], document=MARKED).translations[0].document
    assert got.text == translator.translate_document(page, markup=True).text
    for kept in ("<code>ls &amp;&amp; x</code>", '<script>if (a < b) { c = "<b>the dog</b>"; }</script>',
                 '<p translate="no">the cat</p>'):
        assert got.text.count(kept) == 1


def test_html_wrapped_over_lines_is_translated_sentence_by_sentence_and_equals_offline(client, translator):
    page = "<p>the red dog\n   runs on the street. the small\r\ncat sleeps.</p>\n<pre>the man\nthe woman</pre>"
    got = client.translate([page], document=MARKED).translations[0].document
    want = translator.translate_document(page, markup=True)
    assert got.text == want.text
    assert [page[s.source_start : s.source_end] for s in got.sentences] == [
        "the red dog\n   runs on the street.", "the small\r\ncat sleeps.", "the man", "the woman"]
    assert "</p>\n<pre>" in got.text and got.text.count("\n") == 2  # between the blocks, and the line in <pre>


def test_markup_source_spans_cover_each_sentence_in_the_marked_up_text(client, translator):
    doc = client.translate([MARKUP], document=MARKED).translations[0].document
    plain = parse_markup(MARKUP).text
    split = split_document(plain, translator.count_tokens, translator.max_source_tokens,
                           breaks=parse_markup(MARKUP).breaks)
    sources = [MARKUP[s.source_start:s.source_end] for s in doc.sentences]
    assert sources[:2] == ["the <b>red dog</b> runs.", 'a <i>small <a href="x.html">cat</a></i> sleeps &amp; eats.']
    assert [parse_markup(s).text for s in sources] == split.sources()


def test_several_documents_in_one_request(client, translator):
    texts = ["the dog runs.\n\nthe cat sleeps.", "   ", "a man eats. a woman sees."]
    response = client.translate(texts, document=DOC)
    assert [t.document.text for t in response.translations] == [translator.translate_document(t).text for t in texts]
    assert response.translations[1].document.text == "   " and not response.translations[1].document.sentences


@pytest.mark.parametrize("texts, limit", [
    (["the dog runs. " * 150], "max_document_chars allows 2,000 per request"),
    (["the dog runs. " * 13, "a cat sleeps. " * 12], "max_document_sentences allows 24 per request"),
    ([f"{LONG}. " * 9], "are 27 pieces once those longer than the model takes are cut; max_document_sentences"),
])
def test_limits_are_refused_before_any_decoding(client, caplog, texts, limit):
    caplog.set_level(logging.INFO, logger="translator.server")
    for i, call in enumerate((lambda r: client.translate(texts, document=DOC, request_id=r),
                              lambda r: list(client.translate_stream(texts, document=DOC, request_id=r)))):
        request_id = f"limit-{len(texts[0])}-{i}"
        error = refusal(functools.partial(call, request_id))
        assert error.code() == INVALID and limit in error.details()
        line = log_line(caplog, request_id)
        assert (line["status"], line["sentences"], line["steps"]) == ("INVALID_ARGUMENT", 0, 0)


@pytest.mark.parametrize("options, field", [
    ({"n_best": 2, "beam_size": 2}, "n_best"), ({"return_scores": True}, "return_scores"),
    ({"return_alignments": True}, "return_alignments"), ({"target_prefix": "der"}, "target_prefix"),
])
def test_sentence_options_are_refused_for_documents(client, options, field):
    error = refusal(lambda: client.translate(["the dog runs."], document=DOC, **options))
    assert error.code() == INVALID and error.details().startswith(f"options.{field} applies to sentences")


@pytest.mark.parametrize("document, words", [
    (pb.DocumentOptions(markup=True), "document.markup and document.language need document.enabled"),
    (pb.DocumentOptions(enabled=True, language="en\nx"), "document.language must be a language code"),
])
def test_bad_document_fields_are_refused(client, document, words):
    error = refusal(lambda: client.translate(["the dog runs."], document=document))
    assert error.code() == INVALID and error.details().startswith(words)


def test_a_document_streams_sentence_by_sentence(client, translator):
    messages = list(client.translate_stream([DOCUMENT, "the cat sleeps."], document=DOC))
    for index, text in enumerate([DOCUMENT, "the cat sleeps."]):
        mine = [m for m in messages if m.index == index]
        final = mine[-1]
        assert final.done and all(not m.done for m in mine[:-1])
        assert final.translation.document.text == translator.translate_document(text).text
        assert "".join(m.text for m in mine) == final.translation.document.text
        sent = [m.sentence for m in mine[:-1]]
        assert list(sent) == list(final.translation.document.sentences)
    assert messages[0].HasField("model") and not any(m.HasField("model") for m in messages[1:])


def test_a_markup_document_streams_sentences_then_the_marked_up_document(client, translator):
    messages = list(client.translate_stream([MARKUP], document=MARKED))
    *sentences, final = messages
    assert final.done and final.translation.document.text == translator.translate_document(MARKUP, markup=True).text
    assert len(sentences) == len(final.translation.document.sentences) > 1
    for m, s in zip(sentences, final.translation.document.sentences):
        assert (m.sentence.source_start, m.sentence.source_end) == (s.source_start, s.source_end)
        assert not m.sentence.HasField("target_start") and m.text == m.sentence.text


def test_a_sentence_request_is_unchanged(client, translator):
    texts = ["the red dog runs. a small cat sleeps!", "a man eats"]
    response = client.translate(texts, beam_size=2, n_best=2, return_scores=True)
    want = translator.translate(texts, DEFAULTS.replace(beam_size=2, n_best=2))
    assert [[h.text for h in t.hypotheses] for t in response.translations] == [[n.text for n in t.nbest] for t in want]
    assert not any(t.HasField("document") for t in response.translations)
    error = refusal(lambda: client.translate(["the dog runs. " * 10]))
    assert error.details() == f"texts[0] has 140 characters; at most {LIMITS.max_sentence_chars} per sentence"


def test_model_info_reports_the_document_limits(client):
    limits = client.model_info().limits
    assert (limits.max_document_chars, limits.max_document_sentences) == (2000, 24)


def test_full_documents_must_fit_the_queue(checkpoint):
    with pytest.raises(ConfigError, match=r"max_queue_sentences \(16\) must be >= limits.max_document_sentences"):
        create_server(server_config(checkpoint, limits=LIMITS, batching=BatcherConfig(max_queue_sentences=16)))


@pytest.mark.parametrize("flags", [["--document"], ["--markup"]], ids=["document", "markup"])
def test_nmt_translate_through_the_server_equals_offline(server, checkpoint, tmp_path, capsys, monkeypatch, flags):
    text = MARKUP if "--markup" in flags else DOCUMENT
    source = tmp_path / "doc.txt"
    source.write_bytes(text.encode("utf-8"))
    outputs = []
    for backend in (["--checkpoint", str(checkpoint)], ["--server", f"127.0.0.1:{server[1]}"]):
        out = tmp_path / f"out-{len(outputs)}.txt"
        argv = [*backend, *flags, "--input", str(source), "--output", str(out), "--beam-size", "2",
                "--max-len", "6", "--max-len-a", "0", "--max-len-b", "10000"]
        assert translate_main(argv) == 0, capsys.readouterr().err
        outputs.append(out.read_bytes().decode("utf-8"))
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == text.count("\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("the dog runs. " * 200))
    assert translate_main(["--server", f"127.0.0.1:{server[1]}", "--document"]) == 2
    assert "INVALID_ARGUMENT: the documents have 2,800 characters" in capsys.readouterr().err
