"""The server's own edges: what idle long-lived streams and idle metrics connections may not hold
(threads, the drain), and how the metrics endpoint answers requests it does not serve. A real
in-process server on port 0 with the tiny checkpoint of tests/test_server.py and a real client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.test_server import LONG, SENTENCES, log_line, server_config, write_checkpoint
from translator.metrics import Metrics, MetricsEndpoint
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.server import TranslationServer, create_server
from translator.service import LoopMailbox

IDLE_STREAMS = 300  # past the sync server's thread pool (max_queue_sentences + 16 = 80 threads)
IDLE_METRICS_CONNECTIONS = 400
IN_FLIGHT_TOKENS = 200  # greedy steps of the request that is running when the drain begins
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("edges") / "tiny.pt", toy_tokenizer)


@contextlib.contextmanager
def running(checkpoint: Path, **changes) -> Iterator[tuple[TranslationServer, str]]:
    srv, port = create_server(server_config(checkpoint, **changes))
    srv.start()
    try:
        yield srv, f"127.0.0.1:{port}"
    finally:
        srv.stop()


def test_idle_long_lived_streams_do_not_starve_translate_or_health(checkpoint):
    release = threading.Event()

    def one_request_then_idle() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait()

    streams = []
    with running(checkpoint, reflection=True) as (_, target), grpc.insecure_channel(target) as channel:
        try:
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            for i in range(IDLE_STREAMS):
                if i % 3 == 0:
                    call = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
                else:
                    call = reflect.ServerReflectionInfo(one_request_then_idle(), timeout=60)
                next(call)  # the first reply: its handler is running on the server, now idle
                streams.append(call)
            # A few seconds: the deadline these calls would miss if the streams held the server.
            reply = pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=SENTENCES[:1]), timeout=10)
            assert len(reply.translations) == 1 and reply.translations[0].hypotheses[0].text
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        finally:
            release.set()
            for call in streams:
                call.cancel()


def test_an_open_health_watch_does_not_hold_the_drain(checkpoint):
    grace = 10.0
    with running(checkpoint) as (srv, target), grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == SERVING
        stub = pb_grpc.TranslatorStub(channel)
        options = pb.DecodingOptions(max_length=IN_FLIGHT_TOKENS)
        unary = stub.Translate.future(pb.TranslateRequest(texts=SENTENCES[1:2], options=options), timeout=120)
        stream = stub.TranslateStream(pb.TranslateRequest(texts=SENTENCES[:1], options=options), timeout=120)
        first = next(stream)
        while srv.service.batcher.pending < 2:  # both requests are in flight
            time.sleep(0.01)
        start = time.monotonic()
        srv.drain(grace)
        drained_s = time.monotonic() - start
        assert len(unary.result().translations[0].hypotheses[0].text.split()) > 1
        rest = list(stream)
        assert rest[-1].done and stream.code() == grpc.StatusCode.OK
        assert first.text + "".join(m.text for m in rest) == rest[-1].translation.hypotheses[0].text
        statuses = []
        with pytest.raises(grpc.RpcError) as ended:
            statuses.extend(reply.status for reply in watch)
        assert statuses == [NOT_SERVING]
        assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    # The in-flight requests take well under a second; the open Watch used to hold the drain for
    # the whole grace period.
    assert drained_s < grace / 2


def test_idle_metrics_connections_hold_no_thread(checkpoint):
    with running(checkpoint, metrics_port=0) as (srv, _):
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert reply.status == 200
        threads = threading.active_count()
        idle = []
        try:
            for _ in range(IDLE_METRICS_CONNECTIONS):
                idle.append(socket.create_connection(("127.0.0.1", srv.metrics_port), timeout=30))
            # Answered after the idle connections were accepted (the listen queue is first in, first out).
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.status == 200
                assert "nmt_requests_total" in reply.read().decode()
            assert threading.active_count() - threads <= 4
        finally:
            for s in idle:
                s.close()


def http_exchange(port: int, request: bytes) -> bytes:
    """Everything the metrics endpoint sends back for `request`, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        return b"".join(iter(lambda: s.recv(65536), b""))


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    (b"GET /metrics?name=nmt HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # a TLS hello's first bytes
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"400"),
], ids=["ok", "query", "other path", "post", "binary", "http2", "long line", "many headers"])
def test_metrics_endpoint_answers_every_request_with_a_status_and_a_length(checkpoint, request_bytes, status):
    with running(checkpoint, metrics_port=0) as (srv, _):
        reply = http_exchange(srv.metrics_port, request_bytes)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[:2] == [b"HTTP/1.1", status]
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"Traceback" not in reply
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30) as ok:
            assert ok.status == 200


def test_metrics_endpoint_closes_idle_connections():
    async def exchange() -> tuple[bytes, bytes]:
        endpoint = MetricsEndpoint(Metrics(), idle_s=0.2)
        port = await endpoint.bind("127.0.0.1", 0)
        await endpoint.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
            idle = await asyncio.wait_for(reader.read(), 30)  # until the server closes
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            served = await asyncio.wait_for(reader.read(), 30)
            writer.close()
        finally:
            await endpoint.close()
        return idle, served

    idle, served = asyncio.run(exchange())
    assert idle == b""  # closed unanswered
    assert served.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_request_still_running_after_the_grace_is_cancelled(checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="translator.server")
    with running(checkpoint) as (srv, target), grpc.insecure_channel(target) as channel:
        options = pb.DecodingOptions(max_length=LONG, beam_size=4)
        request = pb.TranslateRequest(texts=SENTENCES[:1], options=options, request_id="past-grace")
        stream = pb_grpc.TranslatorStub(channel).TranslateStream(request, timeout=120)
        next(stream)  # in flight, and far from done
        srv.drain(0.2)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    line = log_line(caplog, "past-grace")
    assert line["status"] == "CANCELLED" and line["steps"] < LONG


def test_calls_posted_while_the_loop_is_busy_run_in_order_after_one_wake_up():
    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    busy, ran, failures = threading.Event(), [], []
    loop.set_exception_handler(lambda _loop, context: failures.append(context["exception"]))

    def post_all() -> None:
        for i in range(100):  # from another thread, as the engine does, while the loop is held
            box.post(ran.append, i)
        box.post(int, "not a number")  # a call that fails
        box.post(ran.append, "after the failure")
        busy.set()

    async def main() -> None:
        threading.Thread(target=post_all).start()
        busy.wait(10)  # the loop is held here: nothing posted can run yet
        await asyncio.sleep(0.05)

    loop.run_until_complete(main())
    assert ran == [*range(100), "after the failure"]
    assert box.wakeups == 1 and len(failures) == 1 and isinstance(failures[0], ValueError)
    loop.close()
    box.post(ran.append, "after close")  # dropped, no error
    assert ran[-1] == "after the failure"
