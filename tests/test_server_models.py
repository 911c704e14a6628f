"""Several models in one server: routing by name and language pair, ListModels, and swapping,
loading and unloading models while requests run (the Admin service and SIGHUP).

Two tiny checkpoints of different seeds translate differently; every answer is checked against
offline decoding of the checkpoint the server says answered it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.test_server import DEFAULTS, LIMITS, SENTENCES, code_of, log_line, server_config, write_checkpoint
from tests.test_server_drain import ROOT, read_line
from translator.checkpoint import load_checkpoint
from translator.client import TranslatorClient
from translator.config import ConfigError
from translator.models import ModelSpec
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.serve_cli import Reloader, parse_config
from translator.server import ServerConfig, build_models, create_server
from translator.translate import Translator

ADMIN_TOKEN = "admin-secret"
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, toy_tokenizer) -> dict[str, Path]:
    """en->de of seed 0, de->en of seed 1, and en->de of seed 2 (the swap's other weights)."""
    d = tmp_path_factory.mktemp("models")
    return {"en-de": write_checkpoint(d / "en-de.pt", toy_tokenizer, 0, ("en", "de")),
            "de-en": write_checkpoint(d / "de-en.pt", toy_tokenizer, 1, ("de", "en")),
            "en-de-2": write_checkpoint(d / "en-de-2.pt", toy_tokenizer, 2, ("en", "de"))}


@pytest.fixture(scope="module")
def offline(checkpoints):
    """offline[file name](texts) -> best translation of each, decoded without the server."""
    out = {}
    for path in checkpoints.values():
        ckpt = load_checkpoint(path)
        translator = Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS)
        out[path.name] = lambda texts, t=translator: [r.text for r in t.translate(texts)]
    return out


def texts_of(response: pb.TranslateResponse) -> list[str]:
    return [t.hypotheses[0].text for t in response.translations]


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def two_models(checkpoints, request):
    models = (ModelSpec("en-de", str(checkpoints["en-de"])), ModelSpec("de-en", str(checkpoints["de-en"])))
    srv, port = create_server(server_config(None, models=models, metrics_port=0,
                                            engine_process=request.param))
    srv.start()
    with TranslatorClient(f"127.0.0.1:{port}", timeout=60) as client:
        yield srv, client
    srv.stop()


def test_offline_models_translate_differently(offline):
    assert offline["en-de.pt"](SENTENCES) != offline["en-de-2.pt"](SENTENCES)
    assert offline["en-de.pt"](SENTENCES) != offline["de-en.pt"](SENTENCES)


def test_requests_are_routed_by_name(two_models, offline):
    _, client = two_models
    for name in ("en-de", "de-en"):
        response = client.translate(SENTENCES, model=name)
        assert response.model.name == name
        assert texts_of(response) == offline[f"{name}.pt"](SENTENCES)


def test_requests_are_routed_by_language_pair_and_default_to_the_first(two_models, offline):
    _, client = two_models
    assert client.translate(SENTENCES[:2], source_language="de", target_language="en").model.name == "de-en"
    assert client.translate(SENTENCES[:2], target_language="en").model.name == "de-en"
    response = client.translate(SENTENCES[:2], source_language="en")
    assert response.model.name == "en-de" and texts_of(response) == offline["en-de.pt"](SENTENCES[:2])
    assert client.translate(SENTENCES[:2]).model.name == "en-de"
    stream = list(client.translate_stream(SENTENCES[:1], model="de-en"))
    assert stream[0].model.name == "de-en" and stream[-1].translation.hypotheses[0].text == offline["de-en.pt"](
        SENTENCES[:1])[0]


def test_an_unknown_model_or_pair_is_not_found_naming_the_served(two_models):
    _, client = two_models
    for kwargs, named in (({"model": "fr-en"}, "'fr-en'"), ({"source_language": "fr"}, "fr->*")):
        with pytest.raises(grpc.RpcError) as error:
            client.translate(SENTENCES[:1], **kwargs)
        assert error.value.code() == NOT_FOUND
        assert named in error.value.details() and "en-de (en->de), de-en (de->en)" in error.value.details()
    assert code_of(lambda: client.model_info("nope")) == NOT_FOUND


def test_list_models_and_model_info_describe_each_model(two_models, checkpoints):
    _, client = two_models
    listed = client.list_models()
    assert [(m.model.name, m.model.source_language, m.model.target_language) for m in listed] == [
        ("en-de", "en", "de"), ("de-en", "de", "en")]
    for info in listed:
        ckpt = load_checkpoint(checkpoints[info.model.name])
        assert info.provenance.weights_sha256 == ckpt.weights_sha256
        assert client.model_info(info.model.name) == info
    assert client.model_info().model.name == "en-de"


def test_metrics_and_request_log_carry_the_model(two_models, caplog):
    srv, client = two_models
    caplog.set_level(logging.INFO, logger="translator.server")
    client.translate(SENTENCES[:1], model="de-en", request_id="routed-1")
    assert log_line(caplog, "routed-1")["model"] == "de-en"
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert 'nmt_model_requests_total{model="de-en",method="Translate",code="OK"}' in text
    assert 'nmt_model_request_seconds_count{model="de-en"}' in text


# -- the Admin service ------------------------------------------------------------------------


@pytest.fixture
def admin_server(checkpoints, tmp_path, request):
    """One model "m" (en-de.pt), the Admin service on; request.param: the engine-process layout."""
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    cfg = server_config(None, models=(ModelSpec("m", str(checkpoints["en-de"])),),
                        admin_token_file=str(token), engine_process=getattr(request, "param", False))
    srv, port = create_server(cfg)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with TranslatorClient(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
        yield srv, client, pb_grpc.AdminStub(channel)
    channel.close()
    srv.stop()


def admin(stub: pb_grpc.AdminStub, method: str, token: str = ADMIN_TOKEN, **fields):
    request = getattr(pb, f"{method}Request")(**fields)
    return getattr(stub, method)(request, timeout=120, metadata=(("authorization", f"Bearer {token}"),))


@pytest.mark.parametrize("admin_server", [False, True], ids=["engine-thread", "engine-process"], indirect=True)
def test_swap_under_load_loses_no_request_and_mixes_no_models(admin_server, checkpoints, offline):
    srv, client, stub = admin_server
    texts = SENTENCES[:3]
    expected = {load_checkpoint(p).weights_sha256: offline[p.name](texts) for p in checkpoints.values()}
    answers: list[tuple[str, list[str]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def stream_requests() -> None:
        while not stop.is_set():
            try:
                response = client.translate(texts, model="m")
            except grpc.RpcError as e:
                failures.append(e)
                return
            answers.append((_weights_of(response, checkpoints), texts_of(response)))

    threads = [threading.Thread(target=stream_requests) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for path in (checkpoints["en-de-2"], checkpoints["en-de"], checkpoints["en-de-2"]):
            before = len(answers)
            while len(answers) < before + 3 and not failures:  # requests run on the old model meanwhile
                time.sleep(0.01)
            info = admin(stub, "ReloadModel", name="m", checkpoint=str(path))
            assert info.model.name == "m" and info.provenance.verified
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    assert {weights for weights, _ in answers} == {load_checkpoint(checkpoints[k]).weights_sha256
                                                   for k in ("en-de", "en-de-2")}
    for weights, got in answers:
        assert got == expected[weights]  # wholly the old model's or wholly the new one's
    assert srv.models.wait_retired(60)
    assert texts_of(client.translate(texts)) == offline["en-de-2.pt"](texts)


@pytest.mark.parametrize("admin_server", [True], ids=["engine-process"], indirect=True)
def test_a_reloaded_engine_process_runs_at_the_servers_priority(admin_server, checkpoints):
    """The loading thread yields the cores only to an engine in this process: an engine process it
    started would inherit a lowered priority for life and starve wherever other work fills the cores."""
    srv, client, stub = admin_server
    admin(stub, "ReloadModel", name="m", checkpoint=str(checkpoints["en-de-2"]))
    pid = srv.models.route("m").batcher.pid
    assert pid is not None
    assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
    assert texts_of(client.translate(SENTENCES[:1])) != []


def _weights_of(response: pb.TranslateResponse, checkpoints: dict[str, Path]) -> str:
    """The weights digest of the checkpoint that answered (the response names its file's sha256)."""
    for path in checkpoints.values():
        if _file_sha256(path) == response.model.checkpoint_sha256:
            return _weights_sha256(path)
    raise AssertionError(f"answered by an unknown checkpoint {response.model.checkpoint_sha256}")


_SHA: dict[Path, str] = {}
_WEIGHTS_SHA: dict[Path, str] = {}


def _weights_sha256(path: Path) -> str:
    """Once per file: loading a checkpoint verifies it and builds its model, work that, repeated for
    every answer, would take the cores from the engine being reloaded."""
    if path not in _WEIGHTS_SHA:
        _WEIGHTS_SHA[path] = load_checkpoint(path).weights_sha256
    return _WEIGHTS_SHA[path]


def _file_sha256(path: Path) -> str:
    if path not in _SHA:
        _SHA[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA[path]


def test_a_corrupt_checkpoint_is_refused_with_its_reason_and_the_old_model_serves(admin_server, checkpoints,
                                                                                  offline, tmp_path):
    _, client, stub = admin_server
    corrupt = tmp_path / "corrupt.pt"
    data = checkpoints["en-de-2"].read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(grpc.RpcError) as error:
        admin(stub, "ReloadModel", name="m", checkpoint=str(corrupt))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "corrupt.pt" in error.value.details() and "\n" not in error.value.details()
    response = client.translate(SENTENCES[:2])
    assert response.model.checkpoint_sha256 == _file_sha256(checkpoints["en-de"])
    assert texts_of(response) == offline["en-de.pt"](SENTENCES[:2])


def test_models_are_loaded_and_unloaded(admin_server, checkpoints, offline):
    _, client, stub = admin_server
    info = admin(stub, "LoadModel", name="back", checkpoint=str(checkpoints["de-en"]))
    assert (info.model.name, info.model.source_language) == ("back", "de")
    assert texts_of(client.translate(SENTENCES[:2], source_language="de")) == offline["de-en.pt"](SENTENCES[:2])
    with pytest.raises(grpc.RpcError) as taken:
        admin(stub, "LoadModel", name="back", checkpoint=str(checkpoints["de-en"]))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as bad_name:
        admin(stub, "LoadModel", name="a b", checkpoint=str(checkpoints["de-en"]))
    assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    admin(stub, "UnloadModel", name="back")
    assert [m.model.name for m in client.list_models()] == ["m"]
    assert code_of(lambda: client.translate(SENTENCES[:1], model="back")) == NOT_FOUND
    assert code_of(lambda: admin(stub, "UnloadModel", name="back")) == NOT_FOUND


def test_admin_calls_need_the_admin_token(admin_server, checkpoints):
    _, client, stub = admin_server
    for token in ("", "wrong"):
        assert code_of(lambda t=token: admin(stub, "UnloadModel", token=t, name="m")) == grpc.StatusCode.UNAUTHENTICATED
    assert [m.model.name for m in client.list_models()] == ["m"]


def test_admin_service_is_off_unless_configured(checkpoints):
    srv, port = create_server(server_config(checkpoints["en-de"]))
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = lambda: admin(pb_grpc.AdminStub(channel), "UnloadModel", name="en-de.pt")
            assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


# -- configuration ----------------------------------------------------------------------------


def test_models_come_from_the_config_file_or_repeated_flags(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  - {name: en-de, checkpoint: a.pt}\n"
                      "  - {name: de-en, checkpoint: b.pt, source_language: de, target_language: en}\n")
    cfg = parse_config(["--config", str(config)])
    assert cfg.models == (ModelSpec("en-de", "a.pt"), ModelSpec("de-en", "b.pt", "de", "en"))
    cfg = parse_config(["--model", "x=c.pt", "--model", "y=d.pt"])
    assert [(m.name, m.checkpoint) for m in cfg.model_specs()] == [("x", "c.pt"), ("y", "d.pt")]
    assert parse_config(["--checkpoint", "runs/best.pt"]).model_specs() == (ModelSpec("best.pt", "runs/best.pt"),)
    shipped = parse_config(["--config", str(ROOT / "deploy" / "serve.yaml"), "--model", "x=c.pt"])
    assert (shipped.checkpoint, shipped.model_specs()) == ("", (ModelSpec("x", "c.pt"),))  # --model replaces it


@pytest.mark.parametrize("argv, error", [
    (["--model", "x"], "NAME=PATH"),
    (["--model", "x=a.pt", "--model", "x=b.pt"], "distinct"),
    (["--model", "x=a.pt", "--checkpoint", "b.pt"], "not both"),
    (["--model", "a b=a.pt"], "letters, digits"),
    ([], "required"),
])
def test_bad_model_configs_are_errors_naming_the_problem(argv, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(argv)


def test_server_config_refuses_no_model():
    with pytest.raises(ConfigError, match="required"):
        ServerConfig(limits=LIMITS)


# -- SIGHUP -----------------------------------------------------------------------------------


class LogReader:
    """Lines of a process's stderr as they come, read straight from the pipe (a buffered reader
    may hold several lines that select() no longer sees)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd = proc.stderr.fileno()
        self.pending = ""

    def until(self, pattern: str, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while True:
                *lines, self.pending = self.pending.split("\n")
                for k, line in enumerate(lines):
                    if re.search(pattern, line):
                        self.pending = "\n".join([*lines[k + 1:], self.pending])
                        return line
                left = end - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"no log line matching {pattern!r} in {timeout} s")
                self.pending += os.read(self.fd, 1 << 16).decode()


def test_sighup_reloads_every_model_and_keeps_one_that_fails(tmp_path, checkpoints, offline):
    served = tmp_path / "served.pt"
    served.write_bytes(checkpoints["en-de"].read_bytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "translator.serve_cli", "--model", f"m={served}", "--port", "0",
         "decoding.max_len_a=0", "decoding.max_len_b=10000", f"decoding.max_len={DEFAULTS.max_len}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", read_line(proc, 300)).group(1))
        log = LogReader(proc)
        with TranslatorClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert texts_of(client.translate(SENTENCES[:2])) == offline["en-de.pt"](SENTENCES[:2])
            replacement = tmp_path / "next.pt"
            replacement.write_bytes(checkpoints["en-de-2"].read_bytes())
            replacement.replace(served)  # as a deployment swaps a file: whole, in one step
            proc.send_signal(signal.SIGHUP)
            log.until(r"model m reloaded")
            response = client.translate(SENTENCES[:2])
            assert response.model.name == "m"
            assert texts_of(response) == offline["en-de-2.pt"](SENTENCES[:2])
            served.write_bytes(b"not a checkpoint")
            proc.send_signal(signal.SIGHUP)
            line = log.until(r"model m kept")
            assert "served.pt" in line
            assert texts_of(client.translate(SENTENCES[:2])) == offline["en-de-2.pt"](SENTENCES[:2])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def serve_one_model(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "translator.serve_cli", "--model", f"m={path}", "--port", "0",
         "decoding.max_len_a=0", "decoding.max_len_b=10000", f"decoding.max_len={DEFAULTS.max_len}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def sighups(proc: subprocess.Popen, count: int = 10, apart_s: float = 0.02) -> None:
    """Signals far enough apart that the server sees each, close enough that reloads overlap them."""
    for _ in range(count):
        proc.send_signal(signal.SIGHUP)
        time.sleep(apart_s)


def test_reloads_asked_for_during_a_reload_make_one_more_reload_not_one_each(tmp_path, checkpoints, caplog):
    served = tmp_path / "served.pt"
    served.write_bytes(checkpoints["en-de"].read_bytes())
    models = build_models(server_config(None, models=(ModelSpec("m", str(served)),)))
    reloader = Reloader(models)
    try:
        with caplog.at_level(logging.INFO, logger="translator.server"):
            def logged(text: str, count: int) -> None:
                deadline = time.monotonic() + 120
                while sum(text in r.message for r in caplog.records) < count:
                    assert time.monotonic() < deadline, f"{count} x {text!r} not logged"
                    time.sleep(0.01)

            reloader.ask()
            logged("SIGHUP: reloading", 1)
            for _ in range(9):  # within a millisecond, while the first reload runs
                reloader.ask()
            logged("model m reloaded", 2)
            time.sleep(1.0)  # time enough for a third, which must not come
        starts = [r.message for r in caplog.records if "SIGHUP: reloading" in r.message]
        assert len(starts) == 2
        assert sum("model m reloaded" in r.message for r in caplog.records) == 2
    finally:
        reloader.stop()
        models.stop()


def test_no_reload_starts_once_the_server_drains(tmp_path, checkpoints):
    served = tmp_path / "served.pt"
    served.write_bytes(checkpoints["en-de"].read_bytes())
    proc = serve_one_model(served)
    try:
        read_line(proc, 300)
        sighups(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        lines = proc.stderr.read().splitlines()
        drained = next(i for i, line in enumerate(lines) if "draining" in line)
        assert not [line for line in lines[drained:] if "SIGHUP: reloading" in line]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
