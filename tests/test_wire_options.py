"""Every decoding option over gRPC decodes as offline and is refused with offline's message; an old
client's request still works; content-free texts come back unchanged; min_length past a sentence's
budget and long or unprintable request ids are refused. A real server on port 0, a real client, the
tiny checkpoint of test_server (EOS never wins: outputs run to their budget)."""

from __future__ import annotations

import itertools
import json
import logging

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tests.test_server import DEFAULTS, SENTENCES, server_config, write_checkpoint
from translator.checkpoint import load_checkpoint
from translator.cli import translate_main
from translator.client import TranslatorClient
from translator.decode_options import DecodeOptionError, DecodeOptions
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.server import ServerConfig
from translator.translate import Translator

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# DecodingOptions fields named differently from DecodeOptions'.
RENAMED = {"max_length": "max_len", "min_length": "min_len"}
CONTENT_FREE = ["\u200b", "\ufeff", "🐕🐕", "\u0301\u0308", "...!?", "\u200d 🙂 —"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("options") / "tiny.pt", toy_tokenizer)


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    ckpt = load_checkpoint(checkpoint)
    return Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS)


@pytest.fixture(scope="module")
def server_settings(checkpoint) -> ServerConfig:
    return server_config(checkpoint)


@pytest.fixture(scope="module")
def client(server):
    with TranslatorClient(f"127.0.0.1:{server[1]}", timeout=60, retries=0) as c:
        yield c


def offline_options(wire: dict) -> DecodeOptions:
    """What the server makes of wire options: its defaults with them replaced (sampling on one beam)."""
    changes = {RENAMED.get(k, k): v for k, v in wire.items() if k != "target_prefix"}
    if changes.get("sample") and "beam_size" not in changes:
        changes["beam_size"] = 1
    return DEFAULTS.replace(**changes)


WIRE_OPTIONS = [
    ("gnmt penalty", {"length_penalty_form": "gnmt", "length_penalty": 0.6, "beam_size": 3, "n_best": 2}),
    ("budget a and b", {"max_len_a": 1.0, "max_len_b": 2, "max_length": 50, "beam_size": 2}),
    ("no repeated bigrams", {"no_repeat_ngram": 2, "max_length": 20, "beam_size": 2}),
    ("eos outside the penalty", {"length_includes_eos": False, "beam_size": 2, "max_length": 8}),
    ("sampling", {"sample": True, "top_k": 5, "top_p": 0.9, "temperature": 0.7, "seed": 3, "max_length": 10}),
    ("forced prefix", {"target_prefix": "der rote hund", "beam_size": 2, "max_length": 9}),
    ("forced prefix, greedy", {"target_prefix": "ein", "max_length": 7}),
]


@pytest.mark.parametrize("wire", [w for _, w in WIRE_OPTIONS], ids=[name for name, _ in WIRE_OPTIONS])
def test_every_decoding_option_over_the_wire_decodes_as_offline(client, translator, wire):
    # One text a request: sampled draws depend on the batch they are drawn in.
    for text in SENTENCES[:2]:
        got = client.translate([text], return_scores=True, **wire).translations[0]
        want = translator.translate([text], offline_options(wire), target_prefix=wire.get("target_prefix", ""))[0]
        assert [h.text for h in got.hypotheses] == [t.text for t in want.nbest]
        assert [h.score for h in got.hypotheses] == pytest.approx([t.score for t in want.nbest], abs=1e-4)
        if "target_prefix" in wire:
            assert got.hypotheses[0].text.startswith(wire["target_prefix"])


def test_no_repeat_ngram_over_the_wire_leaves_no_bigram_twice(client, translator):
    text = client.translate_text(SENTENCES[:1], no_repeat_ngram=2, max_length=30)[0]
    ids = translator.tokenizer.encode([text])[0]
    bigrams = list(itertools.pairwise(ids))
    assert len(bigrams) > 10 and len(set(bigrams)) == len(bigrams)


def test_options_stream_as_they_translate(client, translator):
    wire = {"target_prefix": "der hund", "length_penalty_form": "gnmt", "beam_size": 2, "max_length": 8}
    messages = list(client.translate_stream(SENTENCES[:2], **wire))
    want = translator.translate(SENTENCES[:2], offline_options(wire), target_prefix="der hund")
    for i, t in enumerate(want):
        assert "".join(m.text for m in messages if m.index == i) == t.text


BAD_OPTIONS = [
    {"sample": True, "top_p": 1.5},
    {"top_k": 5},  # sampling options without sampling
    {"length_penalty_form": "linear"},
    {"sample": True, "beam_size": 4},
    {"no_repeat_ngram": -1},
    {"sample": True, "temperature": 0.0},
    {"max_len_a": -1.0},
    {"max_len_b": -3},
]


@pytest.mark.parametrize("wire", BAD_OPTIONS, ids=[str(w) for w in BAD_OPTIONS])
def test_bad_options_are_refused_with_offline_message(client, wire):
    with pytest.raises(DecodeOptionError) as offline:
        offline_options(wire)
    with pytest.raises(grpc.RpcError) as served:
        client.translate(SENTENCES[:1], **wire)
    assert served.value.code() == INVALID
    assert served.value.details() == f"options.{offline.value}"


def test_a_prefix_longer_than_the_output_is_refused_before_decoding(client, translator):
    prefix = "der rote hund rennt auf der strasse"
    with pytest.raises(DecodeOptionError, match=r"^target_prefix has \d+ tokens; at most 3 fit"):
        translator.translate(SENTENCES[:1], DEFAULTS.replace(max_len=4), target_prefix=prefix)
    with pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1], target_prefix=prefix, max_length=4)
    assert e.value.code() == INVALID and e.value.details().startswith("options.target_prefix has")


def test_min_length_past_a_sentence_budget_is_refused_naming_both(client, translator, checkpoint, tmp_path, capsys):
    wire = {"max_len_a": 1.0, "max_len_b": 0, "max_length": 100, "min_length": 20}
    texts = ["red dog", SENTENCES[0]]
    with pytest.raises(DecodeOptionError) as offline:
        translator.translate(texts, offline_options(wire))
    n = len(translator.tokenizer.encode(texts[:1])[0]) + 1  # the budget: 1.0 x source tokens with EOS
    assert str(offline.value).startswith(f"min_len 20 is beyond the length budget of sentence 0: {n} tokens")
    with pytest.raises(grpc.RpcError) as served:
        client.translate(texts, **wire)
    assert served.value.code() == INVALID
    assert served.value.details() == str(offline.value).replace("min_len", "options.min_length").replace(
        "sentence 0", "texts[0]")
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    flags = ["--max-len-a", "1", "--max-len-b", "0", "--max-len", "100", "--min-len", "20", "--input", str(source)]
    assert translate_main(["--checkpoint", str(checkpoint), *flags]) == 2
    assert "error: min_len 20 is beyond the length budget of sentence 0" in capsys.readouterr().err
    # Within every budget it is taken: outputs run to their budget anyway (EOS never wins).
    assert client.translate(texts, **{**wire, "min_length": n - 1}).translations


def old_request_class() -> type:
    """TranslateRequest as a client built from the proto before the options of fields 8 on knew it."""
    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    options = next(m for m in file.message_type if m.name == "DecodingOptions")
    kept = [f for f in options.field if f.number <= 7]
    del options.field[:]
    options.field.extend(kept)
    used = {f.oneof_index for f in kept if f.HasField("oneof_index")}
    assert used == set(range(len(used)))  # the old fields' synthetic oneofs come first
    del options.oneof_decl[len(used):]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("translator.v1.TranslateRequest"))


def test_a_request_from_an_old_client_still_translates(server, translator):
    OldRequest = old_request_class()
    request = OldRequest(texts=SENTENCES[:3], request_id="old-client")
    request.options.beam_size, request.options.n_best, request.options.return_scores = 3, 2, True
    assert not hasattr(request.options, "target_prefix")
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        send = channel.unary_unary("/translator.v1.Translator/Translate",
                                   request_serializer=OldRequest.SerializeToString,
                                   response_deserializer=pb.TranslateResponse.FromString)
        response = send(request, timeout=60)
    want = translator.translate(SENTENCES[:3], DEFAULTS.replace(beam_size=3, n_best=2))
    for got, t in zip(response.translations, want, strict=True):
        assert [h.text for h in got.hypotheses] == [n.text for n in t.nbest]


def test_model_info_reports_every_default(client):
    d = client.model_info().defaults
    assert (d.max_len_a, d.max_len_b, d.length_penalty_form) == (DEFAULTS.max_len_a, DEFAULTS.max_len_b, "power")
    assert (d.sample, d.top_k, d.no_repeat_ngram, d.HasField("seed")) == (False, 0, 0, False)


# -- content-free texts -------------------------------------------------------------------------


def test_content_free_texts_come_back_unchanged_beside_translated_ones(client, translator):
    texts = [SENTENCES[0], *CONTENT_FREE, SENTENCES[1]]
    offline = translator.translate(texts, DEFAULTS.replace(beam_size=3, n_best=2))
    assert [t.text for t in offline[1:-1]] == CONTENT_FREE
    response = client.translate(texts, beam_size=3, n_best=2, return_scores=True)
    assert [t.hypotheses[0].text for t in response.translations] == [t.text for t in offline]
    for t in response.translations[1:-1]:
        assert len(t.hypotheses) == 1 and t.hypotheses[0].score == 0.0
    assert len(response.translations[0].hypotheses) == 2


def test_content_free_texts_stream_unchanged(client, translator):
    texts = [CONTENT_FREE[2], SENTENCES[0], CONTENT_FREE[0]]
    messages = list(client.translate_stream(texts))
    want = [t.text for t in translator.translate(texts)]
    for i, text in enumerate(want):
        mine = [m for m in messages if m.index == i]
        assert "".join(m.text for m in mine) == text and mine[-1].done
    only = list(client.translate_stream(CONTENT_FREE[:2]))
    assert [(m.index, m.text, m.done) for m in only] == [(0, CONTENT_FREE[0], True), (1, CONTENT_FREE[1], True)]


# -- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id, words", [
    ("x" * 129, "request_id has 129 characters; at most 128"),
    ("x" * 500_000, "request_id has 500000 characters; at most 128"),
    ("forged\n{\"event\": \"rpc\"}", "request_id holds U+000A"),
    ("tab\there", "request_id holds U+0009"),
])
def test_long_or_unprintable_request_ids_are_refused_and_not_logged(client, caplog, request_id, words):
    caplog.set_level(logging.INFO, logger="translator.server")
    with pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1], request_id=request_id)
    assert e.value.code() == INVALID and e.value.details() == words + (
        "" if "characters" in words else ": only printable characters are allowed")
    with pytest.raises(grpc.RpcError):
        list(client.translate_stream(SENTENCES[:1], request_id=request_id))
    lines = [r.getMessage() for r in caplog.records if r.name == "translator.server"]
    assert lines and all("\n" not in line and len(line) < 1000 for line in lines)
    assert [json.loads(line)["status"] for line in lines] == ["INVALID_ARGUMENT"] * len(lines)


def test_request_ids_up_to_the_limit_are_logged_quoted(client, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    request_id = 'q"uo\\te ' + "é" * 120
    client.translate(SENTENCES[:1], request_id=request_id)
    escaped = json.dumps(request_id)[1:-1]
    line = next(json.loads(r.getMessage()) for r in caplog.records if escaped in r.getMessage())
    assert line["id"] == request_id and line["status"] == "OK"
