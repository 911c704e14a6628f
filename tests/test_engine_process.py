"""The decoding engine in a process of its own: what happens when it dies or cannot start. (The API
tests of tests/test_server.py and tests/test_wire_options.py run against this layout too.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.test_server import DEFAULTS, LONG, SENTENCES, server_config, write_checkpoint
from translator.batcher import BatcherConfig
from translator.checkpoint import load_checkpoint
from translator.client import TranslatorClient
from translator.engine_process import EngineSpec, EngineStartError, RemoteBatcher
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.requests import Limits
from translator.server import create_server
from translator.translate import Translator


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("engine") / "tiny.pt", toy_tokenizer)


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_a_killed_engine_fails_its_requests_as_unavailable_and_is_replaced(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    want = [t.text for t in Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS).translate(SENTENCES[:2])]
    srv, port = create_server(server_config(checkpoint, engine_process=True))
    srv.start()
    batcher = srv.service.batcher
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120, retries=0) as client:
            request = pb.TranslateRequest(texts=SENTENCES[:1], options=pb.DecodingOptions(max_length=LONG))
            stream = client.stub.TranslateStream(request, timeout=120)
            next(stream)  # decoding in the engine now
            first = batcher.pid
            os.kill(first, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as lost:
                list(stream)
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "restarted" in lost.value.details()
            assert batcher.pending == 0  # its queue place came back
            # A request sent while the new engine loads waits for it rather than failing.
            response = client.translate(SENTENCES[:2])
            assert [t.hypotheses[0].text for t in response.translations] == want
            assert batcher.restarts == 1 and batcher.pid != first
    finally:
        srv.stop()
    assert batcher._process.poll() is not None  # stopped with the server


def test_the_front_end_holds_no_weights_and_serves_the_offline_translations(checkpoint):
    """Weights are in memory once, in the engine process: the front end keeps the config and tokenizer."""
    ckpt = load_checkpoint(checkpoint)
    want = [t.text for t in Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS).translate(SENTENCES[:3])]
    srv, port = create_server(server_config(checkpoint, engine_process=True))
    srv.start()
    try:
        model = srv.service.translator.model
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert srv.service.info.origin.weights_sha256 == ckpt.weights_sha256
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120, retries=0) as client:
            response = client.translate(SENTENCES[:3])
        assert [t.hypotheses[0].text for t in response.translations] == want
    finally:
        srv.stop()


def test_an_engine_that_cannot_load_its_model_is_an_error_naming_it(tmp_path):
    spec = EngineSpec(str(tmp_path / "absent.pt"), BatcherConfig(), Limits())
    with pytest.raises(EngineStartError, match="absent.pt"):
        RemoteBatcher(spec)
