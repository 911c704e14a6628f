"""Glossaries wherever a user is: matching, checks, TSV files, Translator, nmt-translate, the gRPC server."""

from __future__ import annotations

import grpc
import pytest

from tests.test_server import SENTENCES, server_config, write_checkpoint
from tests.test_translate_cli import checkpoint, translator_of  # noqa: F401 - the fixture
from translator.cli import translate_main
from translator.client import TranslatorClient
from translator.decoding import DecodeOptions
from translator.glossary import GlossaryError, GlossaryLimits, Term, check_glossary, read_glossary, terms_in
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.server import create_server

LINES = ["the red dog runs", "a small cat sleeps on the street", "the man sees"]
BEAM = DecodeOptions(beam_size=4)


def contains(tokens: list[int], phrase: list[int]) -> bool:
    return any(tokens[i : i + len(phrase)] == phrase for i in range(len(tokens)))


def test_source_phrases_match_any_case_on_word_boundaries():
    terms = [Term("Red dog", "rot hund"), Term("cat", "katze"), Term("man", "frau")]
    assert terms_in("The RED   dog runs.", terms) == [terms[0]]
    assert terms_in("cats and a mankind", terms) == []  # no whole word
    assert terms_in("(cat) sees the man", terms) == [terms[1], terms[2]]


def test_contradictory_terms_are_an_error_naming_the_term():
    with pytest.raises(GlossaryError, match="term 'Dog' has two targets: 'hund' and 'katze'"):
        check_glossary([Term("dog", "hund"), Term("Dog", "katze")])
    assert check_glossary([Term("dog", "hund"), Term("dog", "hund")]) == [Term("dog", "hund")]


@pytest.mark.parametrize(("terms", "message"), [
    ([Term("a", "b")] * 3, "3 terms; at most 2"),
    ([Term("dog", "x" * 11)], "term 'dog': the target phrase has 11 characters; at most 10"),
    ([Term(" ", "hund")], "the source phrase is empty"),
])
def test_oversized_or_empty_terms_are_errors(terms, message):
    with pytest.raises(GlossaryError, match=message):
        check_glossary(terms, GlossaryLimits(max_terms=2, max_term_chars=10))


def test_tsv_glossary_is_read_and_a_malformed_line_is_named(tmp_path):
    good = tmp_path / "g.tsv"
    good.write_text("# source\ttarget\ndog\thund\n\nred cat\trote katze\n", encoding="utf-8")
    assert read_glossary(good) == [Term("dog", "hund"), Term("red cat", "rote katze")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("dog\thund\ncat katze\n", encoding="utf-8")
    with pytest.raises(GlossaryError, match=r"bad.tsv line 2: expected 'source<TAB>target'"):
        read_glossary(bad)


def test_translator_places_the_target_only_where_the_source_phrase_occurs(checkpoint):  # noqa: F811
    tr = translator_of(checkpoint)
    glossary = [Term("DOG", "katze frau"), Term("giraffe", "strasse")]
    plain = tr.translate(LINES, BEAM)
    glossed = tr.translate(LINES, BEAM, glossary=glossary)
    phrase = tr.tokenizer.encode(["katze frau"])[0]
    assert contains(glossed[0].tokens, phrase) and glossed[0].unmet_terms == []
    assert [t.text for t in glossed[1:]] == [t.text for t in plain[1:]]  # no term applies to them
    greedy = tr.translate(LINES[:1], DecodeOptions(), glossary=glossary)[0]  # a constrained beam of one
    assert contains(greedy.tokens, phrase)


def test_a_term_the_budget_cannot_hold_is_reported(checkpoint):  # noqa: F811
    tr = translator_of(checkpoint)
    long_target = "katze frau hund rot blau gruen klein gross"
    result = tr.translate(LINES[:1], BEAM.replace(max_len_a=0.0, max_len_b=3), glossary=[Term("dog", long_target)])
    assert result[0].unmet_terms == [Term("dog", long_target)]


def test_translate_command_takes_a_glossary_file(checkpoint, tmp_path, capsys):  # noqa: F811
    src, out, gloss = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "g.tsv"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    gloss.write_text("dog\tkatze frau\n", encoding="utf-8")
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                           "--beam-size", "4", "--glossary", str(gloss)]) == 0
    expected = translator_of(checkpoint).translate(LINES, BEAM, glossary=[Term("dog", "katze frau")])
    assert out.read_text(encoding="utf-8").splitlines() == [t.text for t in expected]
    capsys.readouterr()
    gloss.write_text("dog\n", encoding="utf-8")
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--glossary", str(gloss)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "g.tsv line 1" in err[0]


@pytest.fixture(scope="module")
def server_target(tmp_path_factory, toy_tokenizer):
    srv, port = create_server(server_config(write_checkpoint(tmp_path_factory.mktemp("g") / "tiny.pt", toy_tokenizer)))
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop()


def test_server_places_terms_and_says_which_it_could_not(server_target):
    with TranslatorClient(server_target) as client:
        response = client.translate(SENTENCES[:3], beam_size=4, terms=[(SENTENCES[0].split()[0], "katze frau")])
        assert "katze frau" in response.translations[0].hypotheses[0].text
        assert not response.translations[0].hypotheses[0].unmet_terms
        short = client.translate(SENTENCES[:1], beam_size=4, max_length=2,
                                 terms=[(SENTENCES[0].split()[0], "katze frau hund rot")])
        unmet = short.translations[0].hypotheses[0].unmet_terms
        assert [(t.source, t.target) for t in unmet] == [(SENTENCES[0].split()[0], "katze frau hund rot")]


def test_streamed_translation_with_terms_ends_as_the_whole_one(server_target):
    terms = [(SENTENCES[1].split()[0], "katze frau")]
    with TranslatorClient(server_target) as client:
        whole = client.translate(SENTENCES[:2], beam_size=3, terms=terms).translations
        streamed, final = ["", ""], ["", ""]
        for msg in client.translate_stream(SENTENCES[:2], beam_size=3, terms=terms):
            streamed[msg.index] += msg.text  # each message: the text newly final
            if msg.done:
                final[msg.index] = msg.translation.hypotheses[0].text
    assert final == [t.hypotheses[0].text for t in whole]
    assert [s.strip() for s in streamed] == [f.strip() for f in final]
    assert "katze frau" in final[1]


def test_server_refuses_contradictory_terms_naming_the_term(server_target):
    with TranslatorClient(server_target, retries=0) as client, pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1], terms=[("dog", "hund"), ("Dog", "katze")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "term 'Dog' has two targets" in e.value.details()


def test_server_refuses_terms_on_a_document_request(server_target):
    with TranslatorClient(server_target, retries=0) as client, pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1], document=pb.DocumentOptions(enabled=True), terms=[("dog", "hund")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "terms apply to sentence requests" in e.value.details()


def test_glossary_limits_reach_model_info(server_target):
    with TranslatorClient(server_target) as client:
        assert client.model_info().limits.max_terms > 0

