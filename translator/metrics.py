"""Counters and latency histograms, exposed in the Prometheus text format over HTTP on an asyncio loop."""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Callable

# Seconds; spans a sub-millisecond queue wait to a long beam-search batch.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for labels, v in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, labels)} {v:g}")
        return lines


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help, labels, buckets
        # per label set: counts per bucket (non-cumulative, +Inf last), sum
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, total = self._series.setdefault(labels, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def count(self, *labels: str) -> int:
        series = self._series.get(labels)
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, (counts, total) in sorted(self._series.items()):
                cumulative = 0
                for bound, c in zip([*map(str, self.buckets), "+Inf"], counts):
                    cumulative += c
                    le = _labels(self.label_names, labels, f'le="{bound}"')
                    lines.append(f"{self.name}_bucket{le} {cumulative}")
                lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {total[0]:g}")
                lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}")
        return lines


class Metrics:
    """The server's metrics; every method is thread-safe."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        self.requests = Counter("nmt_requests_total", "Finished RPCs by method and status code.",
                                ("method", "code"))
        self.sentences = Counter("nmt_sentences_total", "Sentences translated successfully.")
        self.latency = Histogram("nmt_request_seconds", "RPC latency from arrival to answer.", ("method",))
        self.queue = Histogram("nmt_queue_seconds", "Time requests waited for their first decode step.")
        self.decode = Histogram("nmt_decode_seconds", "Time requests spent in decode batches.")
        self.model_requests = Counter("nmt_model_requests_total", "Finished RPCs by model, method and status code.",
                                      ("model", "method", "code"))
        self.model_latency = Histogram("nmt_model_request_seconds", "RPC latency by model.", ("model",))
        self.queue_depth = Gauge("nmt_queue_sentences", "Sentences admitted and not yet finished.",
                                 queue_depth)

    def record(self, method: str, code: str, seconds: float, sentences: int, queue_ms: float,
               decode_ms: float, model: str = "") -> None:
        """model: the name of the model that served the call ("" when none did, e.g. a refusal)."""
        self.requests.inc(method, code)
        self.latency.observe(seconds, method)
        if model:
            self.model_requests.inc(model, method, code)
            self.model_latency.observe(seconds, model)
        if code == "OK":
            self.sentences.inc(amount=sentences)
        if decode_ms:
            self.queue.observe(queue_ms / 1000.0)
            self.decode.observe(decode_ms / 1000.0)

    def render(self) -> str:
        families = (self.requests, self.sentences, self.latency, self.queue, self.decode, self.model_requests,
                    self.model_latency, self.queue_depth)
        return "\n".join(line for f in families for line in f.render()) + "\n"


class MetricsEndpoint:
    """GET /metrics (Prometheus text) over HTTP/1.1, served by coroutines on an asyncio loop: an
    open connection costs a socket and a suspended coroutine, never a thread. One response per
    connection; a connection that sends no complete request within idle_s seconds is closed."""

    LINGER_S = 2.0
    MAX_HEAD_LINES = 100

    def __init__(self, metrics: Metrics, idle_s: float = 30.0) -> None:
        self.metrics = metrics
        self.idle_s = idle_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) without answering yet; returns the port."""
        # A deep accept queue: past asyncio's default of 100, a burst of connections waits for
        # the client's SYN retry (a second or more) while the loop is busy.
        self._server = await asyncio.start_server(self._serve, host, port, backlog=1024, start_serving=False)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def start(self) -> None:
        await self._server.start_serving()

    async def close(self) -> None:
        """Stop listening and drop open connections (idle ones would otherwise hold the close)."""
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            try:
                request_line = await asyncio.wait_for(self._read_head(reader), self.idle_s)
            except _BadRequest as e:
                answer = _response(400, "Bad Request", f"{e}\n".encode())
            else:
                if request_line is None:
                    return
                answer = self._answer(request_line)
            writer.write(answer)
            writer.write_eof()
            await writer.drain()
            # Read on until the client closes (for at most LINGER_S): closing a socket with unread
            # input (a request body, the rest of a refused head) resets the connection, and the
            # reset can destroy the answer on its way.
            await asyncio.wait_for(_discard(reader), self.LINGER_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass  # idle too long, or the client went away
        finally:
            self._connections.discard(task)
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line, once the whole head (request line and headers) has arrived; None
        if the client closed the connection first."""
        request_line = None
        for _ in range(self.MAX_HEAD_LINES):
            try:
                line = await reader.readline()
            except ValueError:  # asyncio's LimitOverrunError: a line past the reader's 64 KiB
                raise _BadRequest("request head line too long") from None
            if not line.endswith(b"\n"):
                return None
            if not line.strip():
                if request_line is None:
                    continue  # blank lines before the request line are allowed (RFC 9112 2.2)
                return request_line
            request_line = request_line or line
        raise _BadRequest("request head too long")

    def _answer(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "Bad Request", b"malformed HTTP/1.x request line\n")
        method, target, _ = parts
        if method != "GET":
            return _response(405, "Method Not Allowed", b"only GET is served here\n", "Allow: GET\r\n")
        if target.split("?")[0] != "/metrics":
            return _response(404, "Not Found", b"only /metrics is served here\n")
        return _response(200, "OK", self.metrics.render().encode(),
                         content_type="text/plain; version=0.0.4; charset=utf-8")


class _BadRequest(Exception):
    pass


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _response(status: int, reason: str, body: bytes, extra_headers: str = "",
              content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra_headers}\r\n")
    return head.encode("latin-1") + body
