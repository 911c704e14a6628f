"""The decoding engine in a process of its own: what happens when it dies or cannot start. (The API
tests of tests/test_server.py and tests/test_wire_options.py run against this layout too.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.test_server import DEFAULTS, LONG, LONG_OPTIONS, SENTENCES, server_config, write_checkpoint
from translator.batcher import BatcherConfig
from translator.checkpoint import load_checkpoint
from translator.client import TranslatorClient
from translator.config import ConfigError
from translator.engine_process import EnginePool, EngineSpec, EngineStartError, RemoteBatcher
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


def test_a_pool_gives_each_request_to_the_engine_holding_fewest_and_answers_as_offline(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    want = [t.text for t in Translator(ckpt.build_model(), ckpt.tokenizer, DEFAULTS).translate(SENTENCES[:3])]
    srv, port = create_server(server_config(checkpoint, engine_process=True, engine_processes=2))
    srv.start()
    pool = srv.service.batcher
    try:
        assert isinstance(pool, EnginePool) and len({engine.pid for engine in pool.engines}) == 2
        assert all(engine.spec.threads >= 1 for engine in pool.engines)  # the cores divided, never 0
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120, retries=0) as client:
            long = [client.stub.TranslateStream(pb.TranslateRequest(texts=SENTENCES[:1], options=LONG_OPTIONS),
                                                timeout=120) for _ in range(2)]
            for stream in long:
                next(stream)  # decoding now
            assert [engine.holding for engine in pool.engines] == [1, 1]  # one each, not both on one
            response = client.translate(SENTENCES[:3])
            assert [t.hypotheses[0].text for t in response.translations] == want
            for stream in long:
                stream.cancel()
        wait_for(lambda: pool.pending == 0)  # the cancelled ones gave their places back
    finally:
        srv.stop()
    assert all(engine._process.poll() is not None for engine in pool.engines)  # stopped with the server


def test_an_engine_of_a_pool_that_dies_fails_only_its_own_requests(checkpoint):
    srv, port = create_server(server_config(checkpoint, engine_process=True, engine_processes=2))
    srv.start()
    pool = srv.service.batcher
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120, retries=0) as client:
            streams = [client.stub.TranslateStream(pb.TranslateRequest(texts=SENTENCES[:1], options=LONG_OPTIONS),
                                                   timeout=120) for _ in range(2)]
            for stream in streams:
                next(stream)
            victim, survivor = pool.engines
            first = victim.pid
            os.kill(first, signal.SIGKILL)
            outcomes = []
            for stream in streams:
                try:
                    outcomes.append(len(list(stream)) > 0)
                except grpc.RpcError as e:
                    outcomes.append(e.code())
            assert sorted(map(str, outcomes)) == sorted(["True", str(grpc.StatusCode.UNAVAILABLE)])
            wait_for(lambda: victim.restarts == 1)
            assert victim.pid != first and survivor.restarts == 0 and not pool.failed
            response = client.translate(SENTENCES[:2])
            assert len(response.translations) == 2
    finally:
        srv.stop()


def test_engine_processes_need_the_engine_in_processes_and_at_least_one():
    with pytest.raises(ConfigError, match="engine_processes=2 needs engine_process: true"):
        server_config(Path("tiny.pt"), engine_processes=2)
    with pytest.raises(ConfigError, match="engine_processes must be >= 1, got 0"):
        server_config(Path("tiny.pt"), engine_process=True, engine_processes=0)
