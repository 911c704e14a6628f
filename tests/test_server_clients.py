"""The command-line clients of a running server: nmt-evaluate --server scores as offline, and
nmt-translate / nmt-evaluate connect with TLS, a token file, a deadline and retries. Real servers on
port 0; a tiny model trained in the test, so that BLEU is more than zero."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import tiny_overrides
from tests.test_server import LONG, SENTENCES, server_config, write_checkpoint
from tests.test_server_security import issue, pem
from training.cli import evaluate_main
from training.config import load_config
from training.trainer import Trainer
from translator.batcher import BatcherConfig
from translator.checkpoint import load_checkpoint
from translator.cli import translate_main
from translator.client import TranslatorClient
from translator.decode_options import DecodeOptions
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.requests import Limits
from translator.server import TlsConfig, create_server
from translator.translate import Translator


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_corpus_module) -> Path:
    """best.pt of a seconds-long run on the toy corpus."""
    out = tmp_path_factory.mktemp("trained")
    cfg = load_config("cpu", tiny_overrides(toy_corpus_module, **{
        "train.max_steps": 120, "train.lr": 3e-3, "train.valid_every": 60, "model.dropout": 0.0}))
    Trainer(cfg, out, log=lambda *_: None).run()
    return out / "best.pt"


@pytest.fixture(scope="module")
def toy_corpus_module(tmp_path_factory) -> dict[str, str]:
    from tests.conftest import toy_pairs, write_tsv

    folder = tmp_path_factory.mktemp("corpus")
    return {name: "file:" + str(write_tsv(folder / f"{name}.tsv", toy_pairs(n, seed=seed)))
            for name, n, seed in (("train", 400, 1), ("valid", 20, 2), ("test", 40, 3))}


@pytest.fixture(scope="module")
def started():
    """started(checkpoint, **ServerConfig changes) -> target; every server stops at the end."""
    servers = []

    def start(checkpoint: Path, **changes) -> str:
        srv, port = create_server(server_config(checkpoint, **changes))
        srv.start()
        servers.append(srv)
        return f"127.0.0.1:{port}"

    yield start
    for srv in servers:
        srv.stop()


def test_evaluate_through_the_server_scores_as_offline(trained, toy_corpus_module, started, tmp_path, capsys):
    target = started(trained, decoding=DecodeOptions(), limits=Limits(max_sentences=8))
    test = toy_corpus_module["test"]
    flags = ["--test", test, "--beam-size", "3", "--length-penalty-form", "gnmt", "--length-penalty", "0.6"]
    assert evaluate_main([str(trained), *flags, "--output", str(tmp_path / "offline.txt")]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert evaluate_main(["--server", target, *flags, "--output", str(tmp_path / "served.txt")]) == 0
    served = json.loads(capsys.readouterr().out)
    assert offline["bleu"] > 1.0  # a real score, not two zeros
    assert (served["bleu"], served["chrf"], served["sentences"]) == (offline["bleu"], offline["chrf"], 40)
    assert (tmp_path / "served.txt").read_text() == (tmp_path / "offline.txt").read_text()
    assert served["server_model"] == "best.pt"


def test_evaluate_through_the_server_needs_a_test_set_and_cannot_record(trained, started, capsys):
    target = started(trained)
    assert evaluate_main(["--server", target]) == 2
    assert "--server needs --test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([str(trained), "--server", target])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca = issue("test CA", ca=True)
    files = {}
    for name, (cert, key) in {"ca": ca, "server": issue("localhost", ca), "client": issue("client", ca)}.items():
        files[name], files[f"{name}_key"] = str(folder / f"{name}.crt"), str(folder / f"{name}.key")
        Path(files[name]).write_bytes(pem(cert))
        Path(files[f"{name}_key"]).write_bytes(pem(key))
    return files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("clients") / "tiny.pt", toy_tokenizer)


def test_translate_and_evaluate_connect_with_mutual_tls_and_a_token_file(checkpoint, started, pki, tmp_path,
                                                                        capsys):
    token = tmp_path / "token"
    token.write_text("s3cret\n", encoding="utf-8")
    tls = TlsConfig(cert_file=pki["server"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    target = started(checkpoint, tls=tls, auth_token_file=str(token))
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES[:3]) + "\n", encoding="utf-8")
    credentials = ["--tls-ca", pki["ca"], "--tls-cert", pki["client"], "--tls-key", pki["client_key"],
                   "--token-file", str(token)]
    argv = ["--server", target, "--input", str(source), "--output", str(out), "--max-len", "6", "--beam-size", "2"]
    assert translate_main([*argv, *credentials]) == 0
    ckpt = load_checkpoint(checkpoint)
    want = Translator(ckpt.build_model(), ckpt.tokenizer).translate(
        SENTENCES[:3], DecodeOptions(beam_size=2, max_len_a=0.0, max_len_b=10_000, max_len=6))
    assert out.read_text(encoding="utf-8").splitlines() == [t.text for t in want]
    assert translate_main([*argv, *credentials[:-2]]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert translate_main([*argv, *credentials[:2], *credentials[-2:]]) == 2  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert evaluate_main(["--server", target, "--test", f"file:{source},{out}", "--max-len", "6",
                          "--beam-size", "2", *credentials]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] == 100.0


@pytest.mark.parametrize("flags, words", [
    (["--tls-cert", "c.pem"], "need --tls-ca"),
    (["--tls-ca", "ca.pem", "--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
    (["--deadline", "0"], "--deadline must be > 0"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--token-file", "/nonexistent/token"], "/nonexistent/token"),
])
def test_bad_client_flags_are_one_line_errors(flags, words, capsys):
    assert translate_main(["--server", "127.0.0.1:1", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_deadline_flag_bounds_a_request(checkpoint, started, tmp_path, capsys):
    target = started(checkpoint, limits=Limits(max_sentences=8, max_length=LONG, max_sentence_chars=5000))
    source = tmp_path / "in.txt"
    source.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    start = time.monotonic()
    argv = ["--server", target, "--input", str(source), "--max-len", str(LONG), "--beam-size", "4",
            "--max-len-a", "0", "--max-len-b", str(LONG), "--deadline", "0.5"]
    assert translate_main(argv) == 2
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
    assert time.monotonic() - start < 30


def test_a_full_queue_is_retried_until_it_has_room(checkpoint, started):
    target = started(checkpoint, limits=Limits(max_sentences=1, max_length=LONG, max_document_sentences=1),
                     batching=BatcherConfig(max_queue_sentences=1, max_queue_delay_ms=0.0))
    with grpc.insecure_channel(target) as channel:
        blocker = channel.unary_unary("/translator.v1.Translator/Translate",
                                      request_serializer=pb.TranslateRequest.SerializeToString,
                                      response_deserializer=pb.TranslateResponse.FromString).future(
            pb.TranslateRequest(texts=SENTENCES[:1], options=pb.DecodingOptions(max_length=LONG, beam_size=4)),
            timeout=120)
        time.sleep(0.3)  # the blocker holds the queue's one place
        with TranslatorClient(target, timeout=30, retries=0) as impatient, pytest.raises(grpc.RpcError) as e:
            impatient.translate(SENTENCES[1:2])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        threading.Timer(0.5, blocker.cancel).start()
        start = time.monotonic()
        with TranslatorClient(target, timeout=30, retries=30, backoff=0.05) as patient:
            assert len(patient.translate(SENTENCES[1:2]).translations) == 1
        assert time.monotonic() - start >= 0.4


@pytest.mark.parametrize("flags, changes, lines", [
    (["--beam-size", "2", "--length-penalty-form", "gnmt", "--no-repeat-ngram", "2", "--max-len-a", "1",
      "--max-len-b", "3", "--no-length-includes-eos"],
     {"beam_size": 2, "length_penalty_form": "gnmt", "no_repeat_ngram": 2, "max_len_a": 1.0, "max_len_b": 3,
      "length_includes_eos": False}, 3),
    (["--sample", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7", "--seed", "11"],
     {"beam_size": 1, "sample": True, "top_k": 5, "top_p": 0.9, "temperature": 0.7, "seed": 11}, 1),
])
def test_command_line_client_carries_every_decoding_flag(checkpoint, started, tmp_path, flags, changes, lines):
    target = started(checkpoint)
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES[:lines]) + "\n", encoding="utf-8")
    prefix = ["--target-prefix", "der hund"]
    assert translate_main(["--server", target, "--input", str(source), "--output", str(out), "--max-len", "12",
                           *flags, *prefix]) == 0
    ckpt = load_checkpoint(checkpoint)
    opts = DecodeOptions(max_len=12, **changes)
    want = Translator(ckpt.build_model(), ckpt.tokenizer).translate(SENTENCES[:lines], opts, target_prefix="der hund")
    assert out.read_text(encoding="utf-8").splitlines() == [t.text for t in want]
