"""Loopback load test of nmt-serve as users see it: closed-loop clients and open-loop Poisson arrivals.

Starts `nmt-serve` on the checkpoint in a subprocess (or uses `--server-target`) after decoding the
same sentences offline: in one batched call (the throughput ceiling), in length-sorted batches of at
most C sentences, and one sentence at a time (batch-1 latency), all at `--beam-size`.

Closed loop (`--concurrency 1,8,32,128`): C clients keep at most C requests in flight and send
every request once. Each level is set against offline decoding ("ratio") and against offline
decoding in batches of at most C sentences ("vs C": what the server could reach with the batch
sizes its load allows). Open loop (`--open-loop 50,100`, in sentences/s): requests arrive as a
seeded Poisson process whatever came back, for at most `--open-loop-seconds` and
`--open-loop-requests`; latency runs from each request's scheduled arrival, so a sender that falls
behind shows in the latency as well as in its own lateness column. `--find-max` searches for the
highest rate whose p99 stays under 1 s with no errors (doubling, then bisection, within
`--find-max-seconds`). A request is 1 sentence, or with `--request-sizes 1-16` a seeded uniform
count of consecutive corpus sentences; latency is per request, throughput in sentences/s.

Every level prints the load generator's own CPU seconds (all its threads) and the server process's
CPU per sentence (from /proc/<pid>/stat) against offline decoding's, so that a generator sharing
the cores with the server can neither hide nor fake a result; the server's peak memory so far
(VmHWM, engine processes included); and where a request's time went on
the server (mean wait for a batch, mean time in decode batches; from its Prometheus metrics, when
it has them). `--repeats R` runs every level R times against the same server; the summary holds
medians and the JSON every run. `--batching continuous,static` runs it all against a server of
each kind in turn.

Hand-written rather than a load tool: a locust user is a closed loop (it waits for its answer
before its next task) running on gevent, which grpcio only tolerates through the experimental
`grpc.experimental.gevent.init_gevent`; ghz is a Go binary, not on PyPI. Calls here are
non-blocking gRPC futures sent from one thread, so the generator costs little CPU.

    python benchmarks/load.py --checkpoint runs/multi30k-en-de/best.pt \\
        --corpus /work/shared/data/multi30k/test_2016_flickr.en.gz --open-loop 25,50,100 --find-max \\
        --repeats 3 --json load.json

Quick check (under a minute with a small checkpoint):

    python benchmarks/load.py --checkpoint CKPT --corpus CORPUS --sentences 40 --concurrency 1,8 \\
        --open-loop 5,20 --open-loop-seconds 5 --request-sizes 1-16
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc

P99_GOAL_S = 1.0  # the open-loop goal: p99 under 1 s with no errors
CHANNELS = 8


def read_sentences(path: Path, limit: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:limit] if limit else lines


def make_requests(sentences: list[str], smallest: int, largest: int, rng: random.Random) -> list[list[str]]:
    """The corpus cut into consecutive runs of uniformly random length smallest..largest, in order."""
    requests, i = [], 0
    while i < len(sentences):
        n = rng.randint(smallest, largest)
        requests.append(sentences[i : i + n])
        i += n
    return requests


def poisson_arrivals(rate: float, seconds: float, limit: int, rng: random.Random) -> list[float]:
    """Arrival times (s from the start) of a Poisson process of `rate` per second: exponential gaps,
    before `seconds` and at most `limit` of them (0: no count limit)."""
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds or (limit and len(arrivals) >= limit):
            return arrivals
        arrivals.append(t)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def cpu_seconds_from_stat(stat: str, clk_tck: int) -> float:
    """utime + stime of a /proc/<pid>/stat line; the command name may hold spaces and parentheses."""
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / clk_tck


def process_tree(pid: int | None) -> dict[int, str] | None:
    """/proc/<pid>/stat of a process and its live descendants (nmt-serve's decoding engines may be
    child processes); None without a pid or without /proc."""
    if pid is None:
        return None
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            stats[int(path.parent.name)] = path.read_text()
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for child, stat in stats.items():
        with contextlib.suppress(ValueError, IndexError):
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(child)
    tree, found = [pid], {}
    while tree:
        p = tree.pop()
        found[p] = stats[p]
        tree += children.get(p, [])
    return found


def tree_total(pid: int | None, value: Callable[[int, str], float]) -> float | None:
    """value(pid, stat) summed over a process and its live descendants; None without a pid or /proc."""
    tree = process_tree(pid)
    if tree is None:
        return None
    total = 0.0
    for p, stat in tree.items():
        with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):  # ended meanwhile, a zombie
            total += value(p, stat)
    return total


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds a process and its live descendants have used, all their threads."""
    return tree_total(pid, lambda _, stat: cpu_seconds_from_stat(stat, os.sysconf("SC_CLK_TCK")))


def process_peak_rss_mb(pid: int | None) -> float | None:
    """The peak resident memory (VmHWM) of a process and its live descendants, summed, MB."""
    def peak_kb(p: int, _: str) -> float:
        status = Path(f"/proc/{p}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))

    total = tree_total(pid, peak_kb)
    return None if total is None else round(total / 1024, 1)


def find_max_rate(passes: Callable[[float], bool], start: float, budget_s: float, steps: int = 4,
                  clock: Callable[[], float] = time.monotonic) -> float | None:
    """The highest rate for which passes(rate) holds: doubling (or halving) from `start` until one
    rate passes and one fails, then `steps` bisections between them. No probe starts that would end
    past `budget_s` if it took as long as the longest so far. None when no probed rate passed."""
    begin, longest = clock(), 0.0
    best = worst = None

    def probe(rate: float) -> bool | None:  # None: no time left
        nonlocal longest
        if clock() - begin + longest > budget_s:
            return None
        t = clock()
        ok = passes(rate)
        longest = max(longest, clock() - t)
        return ok

    rate = start
    for _ in range(10):
        ok = probe(rate)
        if ok is None:
            return best
        best, worst = (rate, worst) if ok else (best, rate)
        if best is not None and worst is not None:
            break
        rate = rate * 2 if ok else rate / 2
    else:
        return best
    for _ in range(steps):
        rate = (best + worst) / 2
        ok = probe(rate)
        if ok is None:
            break
        best, worst = (rate, worst) if ok else (best, rate)
    return best


def offline_figures(checkpoint: Path, sentences: list[str], beam_size: int, max_batch_tokens: int,
                    batch_sizes: list[int], repeats: int) -> dict:
    """Translator.translate on the same sentences at `beam_size`: sentences/s and process CPU seconds
    per sentence in one call over all; sentences/s in length-sorted batches of at most C sentences,
    one call each; ms per sentence one at a time. Medians over `repeats`."""
    from translator.checkpoint import load_checkpoint
    from translator.decoding import DecodeOptions
    from translator.runtime import keep_freed_memory
    from translator.translate import Translator

    keep_freed_memory()  # as nmt-translate and nmt-serve do
    ckpt = load_checkpoint(checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DecodeOptions(beam_size=beam_size),
                            max_batch_tokens=max_batch_tokens)
    translator.translate(sentences[:8])  # warm-up
    by_length = sorted(sentences, key=lambda s: len(s.split()))

    def once() -> dict:
        cpu, start = time.process_time(), time.perf_counter()
        translator.translate(sentences)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        capped = {}
        for c in batch_sizes:
            start = time.perf_counter()
            for k in range(0, len(by_length), c):
                translator.translate(by_length[k : k + c])
            capped[c] = len(sentences) / (time.perf_counter() - start)
        b1 = []
        for s in sentences:
            start = time.perf_counter()
            translator.translate([s])
            b1.append(time.perf_counter() - start)
        return {"sentences_per_s": len(sentences) / seconds, "cpu_s_per_sentence": cpu / len(sentences),
                "in_batches_of": capped, "b1_p50_ms": 1000 * statistics.median(b1),
                "b1_mean_ms": 1000 * statistics.fmean(b1)}

    runs = [once() for _ in range(repeats)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "in_batches_of"}
    median["in_batches_of"] = {c: statistics.median(r["in_batches_of"][c] for r in runs) for c in batch_sizes}
    return {**median, "runs": runs}


@dataclass(frozen=True)
class Server:
    target: str
    metrics_url: str | None
    pid: int | None


@contextlib.contextmanager
def serving(args: argparse.Namespace, batching: str) -> Iterator[Server]:
    """The server under test: `--server-target`, or nmt-serve started in a subprocess and stopped after."""
    if args.server_target:
        yield Server(args.server_target, args.metrics_url, args.server_pid)
        return
    in_flight = max(args.concurrency, default=1) * args.request_sizes[1]
    cmd = [sys.executable, "-m", "translator.serve_cli", "--checkpoint", str(args.checkpoint), "--port", "0",
           "--metrics-port", "0",
           "--threads", str(args.server_threads or args.threads), f"batching.max_batches={args.max_batches}",
           f"batching.continuous={str(batching == 'continuous').lower()}",
           f"batching.max_batch_tokens={args.max_batch_tokens}",
           f"batching.max_queue_delay_ms={args.max_queue_delay_ms}",
           f"batching.max_queue_sentences={max(256, 2 * in_flight)}", *args.server_set]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.server_env)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on ([^\s,]+)(?:, metrics on (\S+))?", line)
        if not match:
            raise SystemExit(f"server did not start: {line!r}")
        yield Server(match.group(1), match.group(2), proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def scrape(url: str | None) -> dict[str, float]:
    """The server's Prometheus samples, name (with labels) -> value; empty when it has none."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8")
    except OSError:
        return {}
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def where_time_went(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean per request, between two scrapes: waiting for a batch, and inside decode batches."""
    out = {}
    for part in ("queue", "decode"):
        n = after.get(f"nmt_{part}_seconds_count", 0) - before.get(f"nmt_{part}_seconds_count", 0)
        total = after.get(f"nmt_{part}_seconds_sum", 0) - before.get(f"nmt_{part}_seconds_sum", 0)
        out[f"mean_{part}_ms"] = round(1000 * total / n, 1) if n else float("nan")
    return out


class Tally:
    """What came back during one level; gRPC's done-callbacks write it from its threads."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.latencies: list[float] = []
        self.ok_sentences = 0
        self.errors: Counter[str] = Counter()
        self.answers: Counter[int] = Counter()
        self.last = 0.0

    def on_done(self, k: int, n_texts: int, t0: float, then: Callable[[], None] | None) -> Callable:
        def done(future: grpc.Future) -> None:
            now = time.perf_counter()
            code = future.code()
            wrong = code == grpc.StatusCode.OK and len(future.result().translations) != n_texts
            with self.cond:
                self.answers[k] += 1
                self.last = now
                if code != grpc.StatusCode.OK or wrong:
                    self.errors["WRONG_COUNT" if wrong else code.name] += 1
                else:
                    self.latencies.append(now - t0)
                    self.ok_sentences += n_texts
                self.cond.notify_all()
            if then:
                then()
        return done

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.answers) >= count, timeout)


def run_level(stubs: list, requests: list[pb.TranslateRequest], timeout: float, *, clients: int = 0,
              arrivals: list[float] | None = None, window: float = 0.0) -> dict:
    """Closed loop (`clients` > 0: each request once, at most `clients` in flight, latency from the
    send) or open loop (request k % len(requests) sent at arrivals[k] whatever came back, latency
    from that scheduled time; rates over at least the schedule's `window` seconds). Non-blocking
    calls from this one thread."""
    slots = threading.Semaphore(clients) if clients else None
    count = len(requests) if arrivals is None else len(arrivals)
    tally, late, calls, sentences = Tally(), [], [], 0
    cpu, start = time.process_time(), time.perf_counter()
    for k in range(count):
        request = requests[k % len(requests)]
        if arrivals is None:
            slots.acquire()
            t0 = time.perf_counter()
        else:
            t0 = start + arrivals[k]
            if (wait := t0 - time.perf_counter()) > 0:
                time.sleep(wait)
            late.append(max(0.0, time.perf_counter() - t0))
        call = stubs[k % len(stubs)].Translate.future(request, timeout=timeout)
        call.add_done_callback(tally.on_done(k, len(request.texts), t0, slots.release if slots else None))
        calls.append(call)
        sentences += len(request.texts)
    sending = max(time.perf_counter() - start, window)
    if not tally.wait(count, timeout + 5):
        for call in calls:
            call.cancel()
        tally.wait(count, 5)
    with tally.cond:
        seconds = max(tally.last, start + sending) - start
        latencies = sorted(tally.latencies)
        errors = Counter(tally.errors)
        errors["UNANSWERED"] += count - len(tally.answers)
        out = {"requests": count, "sentences": sentences, "ok": len(latencies), "ok_sentences": tally.ok_sentences,
               "errors": {k: v for k, v in errors.items() if v},
               "answered_twice": sum(1 for n in tally.answers.values() if n > 1),
               "seconds": round(seconds, 3), "sentences_per_s": round(tally.ok_sentences / seconds, 2),
               **{f"p{q}_ms": round(percentile(latencies, q) * 1000, 1) for q in (50, 95, 99)},
               "generator_cpu_s": round(time.process_time() - cpu, 3)}
    if arrivals is not None:
        late.sort()
        out.update(sent_sentences_per_s=round(sentences / sending, 2),
                   late_p99_ms=round(1000 * percentile(late, 99), 2),
                   late_max_ms=round(1000 * percentile(late, 100), 2))
    return out


def measured(server: Server, offline: dict, level: Callable[[], dict]) -> dict:
    """level() with the server's CPU per sentence and where its time went around it."""
    before, cpu = scrape(server.metrics_url), process_cpu_seconds(server.pid)
    r = level()
    r.update(where_time_went(before, scrape(server.metrics_url)))
    after = process_cpu_seconds(server.pid)
    if cpu is not None and after is not None and r["ok_sentences"]:
        r["server_cpu_s_per_sentence"] = round((after - cpu) / r["ok_sentences"], 5)
        r["server_cpu_vs_offline"] = round(r["server_cpu_s_per_sentence"] / offline["cpu_s_per_sentence"], 3)
    peak = process_peak_rss_mb(server.pid)
    if peak is not None:
        r["server_peak_rss_mb"] = peak  # since the server started
    r["ratio_to_offline"] = round(r["sentences_per_s"] / offline["sentences_per_s"], 3)
    return r


def passes(level: dict) -> bool:
    return not level["errors"] and level["p99_ms"] < 1000 * P99_GOAL_S


def print_row(values: tuple, errors: dict | None = None) -> None:
    print(" ".join(f"{v:>10.3f}" if isinstance(v, float) else f"{v:>10}" for v in values), flush=True)
    if errors:
        print("           errors by status: " + ", ".join(f"{k} {n}" for k, n in errors.items()), flush=True)


def cpu_columns(r: dict) -> tuple:
    return (r["generator_cpu_s"], round(1000 * r.get("server_cpu_s_per_sentence", float("nan")), 2),
            r.get("server_peak_rss_mb", "-"))


def run_all(args: argparse.Namespace, server: Server, kind: str, requests: list[pb.TranslateRequest],
            offline: dict) -> dict:
    """Every closed-loop level, every open-loop level and the max-rate search once; with their summary."""
    channels = [grpc.insecure_channel(server.target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.TranslatorStub(c) for c in channels]
    run_level(stubs, requests[:8], args.timeout, clients=4)  # warm-up
    mean_size = sum(len(r.texts) for r in requests) / len(requests)
    closed, open_loop = [], []

    print_row(("batching", "clients", "sent/s", "p50 ms", "p95 ms", "p99 ms", "errors", "ratio", "vs C",
               "queue ms", "decode ms", "gen cpu s", "srv ms/sent", "srv peak MB", "cpu/off"))
    for clients in args.concurrency:
        r = {"batching": kind, "clients": clients,
             **measured(server, offline, lambda c=clients: run_level(stubs, requests, args.timeout, clients=c))}
        r["ratio_to_offline_at_clients"] = round(r["sentences_per_s"] / offline["in_batches_of"][clients], 3)
        closed.append(r)
        print_row((kind, clients, r["sentences_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
                   sum(r["errors"].values()), r["ratio_to_offline"], r["ratio_to_offline_at_clients"],
                   r["mean_queue_ms"], r["mean_decode_ms"], *cpu_columns(r), r.get("server_cpu_vs_offline", "-")),
                  r["errors"])

    def open_level(rate: float, search: bool = False) -> dict:
        rng = random.Random(f"{args.seed}:{rate}")  # the same schedule for the same rate, run after run
        arrivals = poisson_arrivals(rate / mean_size, args.open_loop_seconds, args.open_loop_requests, rng)
        cut = args.open_loop_requests and len(arrivals) == args.open_loop_requests
        window = arrivals[-1] if cut else args.open_loop_seconds  # how long the schedule is
        r = {"batching": kind, "offered_sentences_per_s": rate, "search": search, **measured(
            server, offline, lambda: run_level(stubs, requests, args.timeout, arrivals=arrivals, window=window))}
        open_loop.append(r)
        print_row((kind, rate, r["sent_sentences_per_s"], r["sentences_per_s"], r["p50_ms"], r["p95_ms"],
                   r["p99_ms"], sum(r["errors"].values()), r["answered_twice"], r["late_p99_ms"],
                   *cpu_columns(r), r.get("server_cpu_vs_offline", "-")), r["errors"])
        return r

    if args.open_loop or args.find_max:
        print_row(("batching", "offered/s", "sent/s", "achieved/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                   "twice", "late p99", "gen cpu s", "srv ms/sent", "srv peak MB", "cpu/off"))
    for rate in args.open_loop:
        open_level(rate)
    if args.find_max:
        known = {r["offered_sentences_per_s"]: passes(r) for r in open_loop}  # not probed again

        def probe(rate: float) -> bool:
            rate = round(rate, 1)
            if rate not in known:
                known[rate] = passes(open_level(rate, search=True))
            return known[rate]

        start = max((rate for rate, ok in known.items() if ok), default=round(offline["sentences_per_s"] / 4, 1))
        find_max_rate(probe, start, args.find_max_seconds)
    for c in channels:
        c.close()
    return {"batching": kind, "levels": closed, "open_loop": open_loop,
            "summary": summarize(closed, open_loop, offline, single=mean_size == 1)}


def summarize(closed: list[dict], open_loop: list[dict], offline: dict, single: bool) -> dict:
    """The headline figures of one run, each only where the run measured it."""
    at = {r["clients"]: r for r in closed}
    out = {}
    if 1 in at:
        out["serve_c1_p50_ms"] = at[1]["p50_ms"]
        if single:  # a request of several sentences is not one offline sentence
            out["serve_c1_latency_vs_offline_b1"] = round(at[1]["p50_ms"] / offline["b1_p50_ms"], 3)
    if 32 in at:
        out["serve_c32_vs_c"] = at[32]["ratio_to_offline_at_clients"]
        out["serve_c32_p99_ms"] = at[32]["p99_ms"]
    if 128 in at:
        out["serve_c128_vs_offline"] = at[128]["ratio_to_offline"]
    if open_loop:
        best = max((r["offered_sentences_per_s"] for r in open_loop if passes(r)), default=0.0)
        out["serve_open_loop_max_rate"] = best
        out["serve_open_loop_vs_offline"] = round(best / offline["sentences_per_s"], 3)
    return out


def medians(summaries: list[dict]) -> dict:
    keys = dict.fromkeys(k for s in summaries for k in s)
    return {k: statistics.median(s[k] for s in summaries if k in s) for k in keys}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="for offline decoding and the server")
    p.add_argument("--corpus", type=Path, required=True, help="source sentences, one per line (.gz or plain)")
    p.add_argument("--sentences", type=int, default=0, help="use the first N sentences (0: all)")
    p.add_argument("--concurrency", default="1,8,32,128", help="closed-loop client counts (empty: none)")
    p.add_argument("--open-loop", default="", metavar="RATES", help="open-loop offered rates, sentences/s")
    p.add_argument("--open-loop-seconds", type=float, default=30.0, help="sending time of each open level")
    p.add_argument("--open-loop-requests", type=int, default=5000, help="at most N requests per open level")
    p.add_argument("--find-max", action="store_true", help="search for the highest rate with p99 < 1 s")
    p.add_argument("--find-max-seconds", type=float, default=300.0, help="time budget of that search")
    p.add_argument("--request-sizes", default="1", help="sentences per request: N or LO-HI (uniform)")
    p.add_argument("--seed", type=int, default=0, help="of request sizes and arrival schedules")
    p.add_argument("--repeats", type=int, default=1, help="run everything R times; the summary is medians")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server's decoding engine")
    p.add_argument("--server-threads", type=int, default=0,
                   help="torch threads of the server alone (default: --threads); offline keeps --threads")
    p.add_argument("--max-batches", type=int, default=4, help="server batches decoding at once (batching.max_batches)")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--batching", default="continuous",
                   help="comma-separated server kinds to run in turn: continuous, static")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server process only (repeatable)")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="server config override, e.g. batching.max_join_delay_ms=20 (repeatable)")
    p.add_argument("--server-target", metavar="HOST:PORT", help="load a running server instead of starting one")
    p.add_argument("--server-pid", type=int, help="that server's pid, for its CPU time")
    p.add_argument("--metrics-url", help="that server's Prometheus URL, for where its time went")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each call, seconds")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.open_loop = [float(r) for r in args.open_loop.split(",") if r]
    for flag, values in (("--server-env", args.server_env), ("--server-set", args.server_set)):
        if any("=" not in kv for kv in values):
            p.error(f"{flag} takes KEY=VALUE, got {values}")
    if not re.fullmatch(r"\d+(-\d+)?", args.request_sizes):
        p.error(f"--request-sizes takes N or LO-HI, got {args.request_sizes!r}")
    lo, _, hi = args.request_sizes.partition("-")
    args.request_sizes = (int(lo), int(hi or lo))
    if not 1 <= args.request_sizes[0] <= args.request_sizes[1]:
        p.error(f"--request-sizes needs 1 <= LO <= HI, got {args.request_sizes}")
    args.batching = ["external"] if args.server_target else args.batching.split(",")
    if not set(args.batching) <= {"continuous", "static", "external"}:
        p.error(f"--batching takes continuous and/or static, got {args.batching}")
    if args.repeats < 1 or any(r <= 0 for r in args.open_loop):
        p.error("--repeats and --open-loop rates must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sentences = read_sentences(args.corpus, args.sentences)
    texts = make_requests(sentences, *args.request_sizes, random.Random(args.seed))
    options = pb.DecodingOptions(beam_size=args.beam_size)
    requests = [pb.TranslateRequest(texts=t, options=options) for t in texts]

    import torch

    torch.set_num_threads(args.threads)  # offline gets every core the server gets
    offline = offline_figures(args.checkpoint, sentences, args.beam_size, args.max_batch_tokens,
                              args.concurrency, args.repeats)
    print(f"offline, beam {args.beam_size}, {len(sentences)} sentences in {len(requests)} requests of "
          f"{args.request_sizes[0]}-{args.request_sizes[1]}: batched {offline['sentences_per_s']:.2f} "
          f"sentences/s, {1000 * offline['cpu_s_per_sentence']:.2f} CPU ms/sentence; in batches of at most C: "
          + ", ".join(f"C={c} {rate:.2f}" for c, rate in offline["in_batches_of"].items())
          + f"; batch 1: p50 {offline['b1_p50_ms']:.1f} ms, mean {offline['b1_mean_ms']:.1f} ms", flush=True)
    runs = []
    for kind in args.batching:
        with serving(args, kind) as server:
            for repeat in range(args.repeats):
                print(f"-- {kind}, run {repeat + 1} of {args.repeats}", flush=True)
                runs.append({"repeat": repeat, **run_all(args, server, kind, requests, offline)})
    summary = {kind: medians([r["summary"] for r in runs if r["batching"] == kind]) for kind in args.batching}
    for kind, figures in summary.items():
        print(f"summary ({kind}, beam {args.beam_size}, median of {args.repeats}):")
        for key, value in figures.items():
            print(f"  {key} = {value}")
    if args.json:
        result = {"checkpoint": str(args.checkpoint), "corpus": str(args.corpus), "beam_size": args.beam_size,
                  "sentences": len(sentences), "request_sizes": list(args.request_sizes), "seed": args.seed,
                  "repeats": args.repeats, "threads": args.threads, "server_threads": args.server_threads or args.threads, "max_batches": args.max_batches,
                  "server_env": args.server_env, "server_set": args.server_set,
                  "server_target": args.server_target, **summary[args.batching[0]],
                  "summary_by_batching": summary, "offline": offline, "runs": runs}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
