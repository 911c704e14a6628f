"""A real in-process server on port 0, a real client, a tiny seeded checkpoint.

The checkpoint's EOS embedding is zeroed, so EOS never wins and every output runs exactly to its
budget: ordinary requests (max_len 6) are short, and a request for 1000 tokens is long enough for
deadlines and cancellation to cut it short. Expected translations come from offline decoding of
the same checkpoint, never from hard-coded strings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.internal import encoder
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import tiny_model_config, toy_pairs
from translator import provenance
from translator.batcher import BatcherConfig
from translator.checkpoint import load_checkpoint, save_checkpoint
from translator.cli import translate_main
from translator.client import TranslatorClient
from translator.config import to_dict
from translator.decoding import DecodeOptions
from translator.model import build_model
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.provenance import Provenance
from translator.requests import Limits
from translator.server import ServerConfig, create_server
from translator.tokenizer import Tokenizer
from translator.translate import Translator

MAX_POSITIONS = 1024
LONG = 1000  # output tokens of a request that deadlines and cancellation must cut short
# Beam 4 makes a long request take seconds even on an idle machine.
LONG_OPTIONS = pb.DecodingOptions(max_length=LONG, beam_size=4)
DEFAULTS = DecodeOptions(max_len_a=0.0, max_len_b=10_000, max_len=6)
LIMITS = Limits(max_sentences=8, max_sentence_chars=50_000, max_beam_size=8, max_length=LONG)
SENTENCES = [src for src, _ in toy_pairs(6, seed=5)]
BLEU_KEY = "test_bleu:multi30k:test_2016_flickr:beam1"
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


PROVENANCE = Provenance(
    step=400, created="2026-01-02T03:04:05+00:00", code_commit="c" * 40, code_dirty=False,
    versions={"torch": "2.13.0", "sentencepiece": "0.2.1"}, corpus="multi30k:train", corpus_sha256="d" * 64,
    valid_bleu=11.5, test_scores=(provenance.TestScore("multi30k:test_2016_flickr", 12.5, 40.1, 1, "nrefs:1"),),
)


def write_checkpoint(path: Path, tokenizer: Tokenizer, seed: int = 0, languages: tuple[str, str] = ("en", "de")) -> Path:
    """A tiny model of `seed`'s weights (another seed translates differently)."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(max_positions=MAX_POSITIONS)
    model = build_model(cfg)
    with torch.no_grad():
        model.embed.tokens.weight[cfg.eos_id].zero_()  # logit 0 for EOS: some other token always beats it
    config = {"model": to_dict(cfg), "data": {"src_lang": languages[0], "tgt_lang": languages[1]}}
    save_checkpoint(path, config=config, tokenizer=tokenizer, model=model, metrics={BLEU_KEY: 12.5},
                    provenance=PROVENANCE)
    return path


def server_config(checkpoint: Path | None, **changes) -> ServerConfig:
    """None: the models come in `changes`."""
    base = {"checkpoint": str(checkpoint) if checkpoint else "", "port": 0, "limits": LIMITS, "decoding": DEFAULTS,
            "batching": BatcherConfig(max_queue_sentences=64, max_queue_delay_ms=2.0)}
    return ServerConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("server") / "tiny.pt", toy_tokenizer)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """Offline decoding of the same checkpoint: offline(texts, **DecodeOptions changes) -> Translations."""
    ckpt = load_checkpoint(checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS)
    return lambda texts, **changes: translator.translate(texts, DEFAULTS.replace(**changes))


@pytest.fixture(scope="module")
def server_settings(checkpoint) -> ServerConfig:
    """The API tests' server (conftest's `server` runs it in both engine layouts)."""
    return server_config(checkpoint, reflection=True, metrics_port=0)


@pytest.fixture(scope="module")
def client(server):
    with TranslatorClient(f"127.0.0.1:{server[1]}", timeout=60) as c:
        yield c


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return OK


def log_line(caplog, request_id: str, timeout: float = 30.0) -> dict:
    """The server's structured log line for request_id (written when its handler finishes)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for record in list(caplog.records):
            if record.name == "translator.server" and f'"id": "{request_id}"' in record.getMessage():
                return json.loads(record.getMessage())
        time.sleep(0.02)
    raise AssertionError(f"no log line for request {request_id}")


def assert_serves_normally(client, offline) -> None:
    response = client.translate(SENTENCES[:2])
    assert [t.hypotheses[0].text for t in response.translations] == [t.text for t in offline(SENTENCES[:2])]


# -- the API ----------------------------------------------------------------------------------


def test_translate_matches_offline_decoding(client, offline, checkpoint):
    response = client.translate(SENTENCES, beam_size=3, n_best=2, return_scores=True)
    expected = offline(SENTENCES, beam_size=3, n_best=2)
    for got, want in zip(response.translations, expected, strict=True):
        assert [h.text for h in got.hypotheses] == [t.text for t in want.nbest]
        assert [h.score for h in got.hypotheses] == pytest.approx([t.score for t in want.nbest], abs=1e-4)
    assert response.model.name == checkpoint.name
    assert (response.model.source_language, response.model.target_language) == ("en", "de")
    assert len(response.model.checkpoint_sha256) == 64


def test_scores_are_absent_unless_asked_for(client):
    response = client.translate(SENTENCES[:1])
    assert not response.translations[0].hypotheses[0].HasField("score")


@pytest.mark.parametrize("beam_size", [1, 3])
def test_streamed_pieces_add_up_to_the_translation(client, offline, beam_size):
    messages = list(client.translate_stream(SENTENCES[:3], beam_size=beam_size))
    assert messages[0].model.source_language == "en"
    expected = [t.text for t in offline(SENTENCES[:3], beam_size=beam_size)]
    for i, want in enumerate(expected):
        mine = [m for m in messages if m.index == i]
        assert "".join(m.text for m in mine) == want
        assert [m.done for m in mine].count(True) == 1 and mine[-1].done
        assert mine[-1].translation.hypotheses[0].text == want
    if beam_size == 1:  # greedy: every token as it is chosen
        assert len([m for m in messages if m.index == 0]) > 2


def test_alignments_cover_every_target_and_source_token(client):
    hyp = client.translate(SENTENCES[:1], return_alignments=True).translations[0].hypotheses[0]
    a = hyp.alignment
    assert a.source_tokens[-1] == "</s>" and len(a.target_tokens) == DEFAULTS.max_len
    assert len(a.weights) == len(a.target_tokens) * len(a.source_tokens)
    rows = [a.weights[i : i + len(a.source_tokens)] for i in range(0, len(a.weights), len(a.source_tokens))]
    assert all(math.isclose(sum(row), 1.0, abs_tol=1e-4) for row in rows)


def test_model_info_reports_the_checkpoint_and_limits(client, checkpoint, toy_tokenizer):
    info = client.model_info()
    assert info.vocabulary_size == toy_tokenizer.vocab_size
    assert info.tokenizer_sha256 == toy_tokenizer.sha256
    assert info.metrics[BLEU_KEY] == 12.5
    assert info.architecture.max_positions == MAX_POSITIONS
    assert info.limits.max_source_tokens == MAX_POSITIONS - 1
    assert info.limits.max_sentences == LIMITS.max_sentences
    assert info.limits.max_beam_size == LIMITS.max_beam_size
    assert info.defaults.max_length == DEFAULTS.max_len


def test_model_info_reports_the_verified_provenance(client, checkpoint):
    prov = client.model_info().provenance
    ckpt = load_checkpoint(checkpoint)
    assert prov.verified and prov.weights_sha256 == ckpt.weights_sha256
    assert (prov.step, prov.created, prov.code_commit, prov.code_dirty) == (400, PROVENANCE.created, "c" * 40, False)
    assert dict(prov.versions) == PROVENANCE.versions
    assert (prov.corpus, prov.corpus_sha256, prov.valid_bleu) == ("multi30k:train", "d" * 64, 11.5)
    (score,) = prov.test_scores
    assert (score.test, score.bleu, score.chrf, score.beam_size) == ("multi30k:test_2016_flickr", 12.5, 40.1, 1)
    assert json.loads(prov.training_config_json) == ckpt.config
    assert not prov.averaged_from


def test_health_serves_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        request = health_pb2.HealthCheckRequest(service="translator.v1.Translator")
        status = health_pb2_grpc.HealthStub(channel).Check(request).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"translator.v1.Translator", "grpc.health.v1.Health"} <= names


# -- bad input --------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (id, texts, options, expected code, words the message must contain)
    ("no texts", [], {}, INVALID, "texts is empty"),
    ("empty text", ["red dog", ""], {}, INVALID, "texts[1] is empty"),
    ("whitespace only", [" \t\u3000 "], {}, INVALID, "texts[0] is empty or only whitespace"),
    ("1 MB text", ["a" * 1_000_000], {}, INVALID, "texts[0] has 1000000 characters"),
    ("10,000-token sentence", ["red dog " * 5000], {}, INVALID,
     f"the model takes at most {MAX_POSITIONS - 1}"),
    ("control character", ["red\x07dog"], {}, INVALID, "texts[0] holds U+0007"),
    ("too many sentences", ["red dog"] * 9, {}, INVALID, "texts has 9 sentences"),
    ("beam 0", ["red dog"], {"beam_size": 0}, INVALID, "options.beam_size"),
    ("beam 10,000", ["red dog"], {"beam_size": 10_000}, INVALID, "options.beam_size"),
    ("n-best above beam", ["red dog"], {"beam_size": 2, "n_best": 3}, INVALID, "options.n_best"),
    ("negative max length", ["red dog"], {"max_length": -5}, INVALID, "options.max_length"),
    ("huge max length", ["red dog"], {"max_length": 2**31 - 1}, INVALID, "options.max_length"),
    ("min length past max length", ["red dog"], {"max_length": 4, "min_length": 4}, INVALID,
     "options.min_length"),
    ("NaN length penalty", ["red dog"], {"length_penalty": math.nan}, INVALID, "options.length_penalty"),
    ("work over the cost limit", ["red dog " * 150] * 8, {"beam_size": 8, "max_length": LONG}, INVALID,
     "units of decoding"),
    ("message over the size limit", ["red dog " * 150_000], {}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


def raw_request(*fields: bytes) -> bytes:
    return pb.TranslateRequest(texts=["red dog"]).SerializeToString() + b"".join(fields)


def length_delimited(field: int, payload: bytes) -> bytes:
    return encoder.TagBytes(field, 2) + encoder._VarintBytes(len(payload)) + payload


RAW_BAD_REQUESTS = [
    # A lone surrogate cannot be built with protobuf's Python API; on the wire it is bad UTF-8.
    ("unpaired surrogate", length_delimited(1, "\ud800".encode("utf-8", "surrogatepass")), "bad UTF-8"),
    ("unknown field", encoder.TagBytes(99, 0) + b"\x01", "unknown field TranslateRequest.#99"),
    ("unknown option field", length_delimited(2, encoder.TagBytes(42, 0) + b"\x01"),
     "unknown field TranslateRequest.options.#42"),
]


@pytest.mark.parametrize("texts, options, code, words", [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_the_server_carries_on(client, offline, texts, options, code, words):
    with pytest.raises(grpc.RpcError) as e:
        client.translate(texts, **options)
    assert e.value.code() == code
    assert words in e.value.details()
    assert "Traceback" not in e.value.details()
    assert_serves_normally(client, offline)


@pytest.mark.parametrize("payload, words", [r[1:] for r in RAW_BAD_REQUESTS],
                         ids=[r[0] for r in RAW_BAD_REQUESTS])
def test_malformed_request_gets_invalid_argument(server, client, offline, payload, words):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        send = channel.unary_unary("/translator.v1.Translator/Translate", request_serializer=None,
                                   response_deserializer=pb.TranslateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            send(raw_request(payload), timeout=30)
    assert e.value.code() == INVALID and words in e.value.details()
    assert_serves_normally(client, offline)


def test_unusual_but_valid_text_is_translated(client, offline):
    texts = ["red dog 🐕 runs", "a cat\tsleeps", "ein Hund läuft"]
    response = client.translate(texts)
    assert [t.hypotheses[0].text for t in response.translations] == [t.text for t in offline(texts)]


# -- deadlines, cancellation, overload ----------------------------------------------------------


def test_deadline_stops_decoding(client, offline, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    with pytest.raises(grpc.RpcError) as e:
        client.translate(SENTENCES[:1], max_length=LONG, beam_size=4, timeout=0.3, request_id="deadline-1")
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = log_line(caplog, "deadline-1")
    assert line["status"] == "DEADLINE_EXCEEDED" and line["steps"] < LONG
    assert_serves_normally(client, offline)


def test_cancelled_stream_stops_decoding(client, offline, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    request = pb.TranslateRequest(texts=SENTENCES[:1], options=pb.DecodingOptions(max_length=LONG),
                                  request_id="cancel-1")  # greedy, so that tokens stream at once
    call = client.stub.TranslateStream(request, timeout=60)
    next(call)
    call.cancel()
    line = log_line(caplog, "cancel-1")
    assert line["status"] == "CANCELLED" and line["steps"] < LONG
    assert_serves_normally(client, offline)


@pytest.mark.parametrize("beam_size", [1, 5])
def test_requests_join_the_running_batch_and_match_offline(checkpoint, offline, beam_size):
    """With the decoder busy on a long sentence (output budget: twice its source), short
    requests with its options are answered before it ends: they joined its batch between
    steps, and decode exactly as offline."""
    decoding = DecodeOptions(beam_size=beam_size, max_len_a=2.0, max_len_b=0, max_len=LONG)
    srv, port = create_server(server_config(checkpoint, decoding=decoding))
    srv.start()
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120) as client:
            long_text = " ".join(SENTENCES * 3)  # ~140 source tokens: ~280 steps, the others <= 30
            blocker = client.stub.Translate.future(pb.TranslateRequest(texts=[long_text]), timeout=120)
            while srv.service.batcher.pending == 0:
                time.sleep(0.01)
            with ThreadPoolExecutor(len(SENTENCES)) as pool:
                replies = list(pool.map(lambda text: client.translate([text]), SENTENCES))
            assert not blocker.done()
            want = offline(SENTENCES + [long_text], **dataclasses.asdict(decoding))
            assert [r.translations[0].hypotheses[0].text for r in replies] == [t.text for t in want[:-1]]
            assert blocker.result().translations[0].hypotheses[0].text == want[-1].text
    finally:
        srv.stop()


def test_overload_is_refused_at_once_and_no_request_is_lost(checkpoint, offline, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    cfg = server_config(checkpoint, limits=Limits(max_sentences=2, max_length=LONG, max_document_sentences=2),
                        batching=BatcherConfig(max_queue_sentences=2, max_queue_delay_ms=0.0))
    srv, port = create_server(cfg)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TranslatorStub(channel)
            long_request = pb.TranslateRequest(texts=SENTENCES[:1], options=LONG_OPTIONS)
            blocker = stub.Translate.future(long_request, timeout=120)
            while srv.service.batcher.pending == 0:
                time.sleep(0.01)
            # The blocker holds one of the queue's two places: one more sentence fits, eleven do not.
            # 100 steps each, so that the one that fits cannot finish (and give its place back)
            # before the last of the burst has arrived.
            options = pb.DecodingOptions(max_length=100)
            requests = [pb.TranslateRequest(texts=[SENTENCES[i % 6]], options=options, request_id=f"burst-{i}")
                        for i in range(12)]
            burst = [stub.Translate.future(r, timeout=120) for r in requests]
            while sum(f.done() for f in burst) < 11:
                time.sleep(0.01)
            assert not blocker.done()  # the refusals did not wait for the decoder
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # The one that fit may be answered already: its options start a batch beside the blocker's.
            refused = [i for i, f in enumerate(burst) if f.done() and f.code() != grpc.StatusCode.OK]
            assert len(refused) == 11
            assert all(burst[i].code() == grpc.StatusCode.RESOURCE_EXHAUSTED for i in refused)
            assert all("queue is full" in burst[i].details() for i in refused)
            blocker.cancel()
            (served,) = set(range(12)) - set(refused)
            want = offline([SENTENCES[served % 6]], max_len=options.max_length)[0].text
            assert burst[served].result(timeout=60).translations[0].hypotheses[0].text == want
        ids = [json.loads(r.getMessage())["id"] for r in caplog.records if r.name == "translator.server"]
        assert sorted(i for i in ids if i.startswith("burst-")) == sorted(f"burst-{i}" for i in range(12))
    finally:
        srv.stop()


# -- operations -------------------------------------------------------------------------------


def test_second_server_on_a_used_port_fails_loudly(server, checkpoint):
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server[1]}"):
        create_server(server_config(checkpoint, port=server[1]))


def test_one_log_line_per_request_with_sizes_and_timings(client, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    client.translate(SENTENCES[:3], request_id="logged-1")
    lines = [r for r in caplog.records if '"id": "logged-1"' in r.getMessage()]
    assert len(lines) == 1
    line = json.loads(lines[0].getMessage())
    assert line["status"] == "OK" and line["sentences"] == 3 and line["steps"] == DEFAULTS.max_len
    assert line["src_tokens"] > 3 and line["queue_ms"] >= 0 and line["decode_ms"] > 0


def test_metrics_endpoint_serves_prometheus_text(server, client):
    client.translate(SENTENCES[:1])
    with pytest.raises(grpc.RpcError):
        client.translate([""])
    with urllib.request.urlopen(f"http://127.0.0.1:{server[0].metrics_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert 'nmt_requests_total{method="Translate",code="OK"}' in text
    assert 'nmt_requests_total{method="Translate",code="INVALID_ARGUMENT"}' in text
    assert 'nmt_request_seconds_bucket{method="Translate",le="+Inf"}' in text
    assert "nmt_decode_seconds_count" in text


def test_command_line_client_translates_a_file_through_the_server(server, offline, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text(f"{SENTENCES[0]}\n\n{SENTENCES[1]}\n", encoding="utf-8")
    target = tmp_path / "out.txt"
    argv = ["--server", f"127.0.0.1:{server[1]}", "--input", str(source), "--output", str(target),
            "--beam-size", "2", "--max-len", str(DEFAULTS.max_len)]
    assert translate_main(argv) == 0
    want = [t.text for t in offline(SENTENCES[:2], beam_size=2)]
    assert target.read_text(encoding="utf-8").splitlines() == [want[0], "", want[1]]


def test_command_line_client_reports_an_unreachable_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert translate_main(["--server", f"127.0.0.1:{port}", "--max-len", "6"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
