"""`nmt-serve` as a process: its config file and flags, and draining on SIGTERM."""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_server import SENTENCES, write_checkpoint
from translator.client import TranslatorClient
from translator.config import ConfigError
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.serve_cli import parse_config, serve_main

ROOT = Path(__file__).resolve().parents[1]
IN_FLIGHT_TOKENS = 300  # greedy steps of the request that is running when SIGTERM arrives
# How a stopping server refuses a new call: UNAVAILABLE once its listener is closed, CANCELLED for a
# call that reached the transport in the instant the server began to stop.
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_shipped_config_loads_and_flags_override_it():
    cfg = parse_config(["--config", str(ROOT / "deploy" / "serve.yaml"), "--checkpoint", "model.pt",
                        "--port", "0", "limits.max_sentences=8"])
    assert (cfg.checkpoint, cfg.port, cfg.limits.max_sentences) == ("model.pt", 0, 8)
    assert cfg.decoding.beam_size == 5 and not cfg.tls.enabled


def test_unknown_config_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="limits.max_sentense"):
        parse_config(["--checkpoint", "model.pt", "limits.max_sentense=8"])
    assert serve_main(["--checkpoint", "model.pt", "batching.max_batch_tokens=0"]) == 2
    assert serve_main(["--checkpoint", "model.pt", "batching.workers=0"]) == 2
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        parse_config(["--checkpoint", "model.pt", "--threads", "-1"])


def test_missing_checkpoint_fails_before_listening(tmp_path):
    assert serve_main(["--checkpoint", str(tmp_path / "absent.pt"), "--port", "0"]) == 1


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"server printed nothing in {timeout} s")
    return proc.stdout.readline()


def engine_processes(parent: int) -> list[int]:
    """Pids of the engine processes `parent` started."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE).group(1))
            cmdline = (status.parent / "cmdline").read_bytes()
        except (OSError, AttributeError):
            continue
        if ppid == parent and b"translator.engine_process" in cmdline:
            pids.append(int(status.parent.name))
    return pids


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path, toy_tokenizer, engine_process):
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", toy_tokenizer)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "translator.serve_cli", "--checkpoint", str(checkpoint), "--port", "0",
         "--grace-seconds", "120", f"limits.max_length={IN_FLIGHT_TOKENS}", "decoding.max_len_a=0",
         "decoding.max_len_b=10000", f"engine_process={str(engine_process).lower()}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", read_line(proc, 300)).group(1))
        target = f"127.0.0.1:{port}"
        engines = engine_processes(proc.pid)
        assert len(engines) == int(engine_process)
        with TranslatorClient(target, timeout=120, retries=0) as client:
            options = pb.DecodingOptions(max_length=IN_FLIGHT_TOKENS)
            request = pb.TranslateRequest(texts=SENTENCES[:1], options=options)
            stream = client.stub.TranslateStream(request, timeout=300)
            first = next(stream)  # the request is in flight
            proc.send_signal(signal.SIGTERM)
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                end = time.monotonic() + 120
                while time.monotonic() < end:  # NOT_SERVING, then refused once the listener closes
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # a starved CPU; ask again
                            continue
                        assert e.code() in REFUSED, (e.code(), e.details())
                        break
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    time.sleep(0.01)
                else:
                    raise AssertionError("health never left SERVING after SIGTERM")
            with pytest.raises(grpc.RpcError) as refused:
                client.translate(SENTENCES[1:2])
            assert refused.value.code() in REFUSED, refused.value.code()
            rest = list(stream)
        assert rest[-1].done and stream.code() == grpc.StatusCode.OK
        final = rest[-1].translation.hypotheses[0].text
        assert first.text + "".join(m.text for m in rest) == final
        assert len(final.split()) > 1
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "draining" in (tmp_path / "server.log").read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in engines)  # the engine ended with the server
