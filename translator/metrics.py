"""Counters and latency histograms, exposed in the Prometheus text format over stdlib HTTP."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
        self.queue_depth = Gauge("nmt_queue_sentences", "Sentences admitted and not yet finished.",
                                 queue_depth)

    def record(self, method: str, code: str, seconds: float, sentences: int, queue_ms: float,
               decode_ms: float) -> None:
        self.requests.inc(method, code)
        self.latency.observe(seconds, method)
        if code == "OK":
            self.sentences.inc(amount=sentences)
        if decode_ms:
            self.queue.observe(queue_ms / 1000.0)
            self.decode.observe(decode_ms / 1000.0)

    def render(self) -> str:
        families = (self.requests, self.sentences, self.latency, self.queue, self.decode, self.queue_depth)
        return "\n".join(line for f in families for line in f.render()) + "\n"


def serve_metrics(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve GET /metrics on host:port (0 picks a free port: see .server_address) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # scrapes are not worth a log line each
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
