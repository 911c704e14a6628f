"""Swapping a model under load, and what a second model costs in memory.

Starts `nmt-serve` in a subprocess serving `--checkpoint` as model "m", with the Admin service on,
and `--clients` closed-loop clients sending one corpus sentence per request (`--beam-size`) without
pause. First `--steady-seconds` of steady state; then `--swaps` ReloadModel calls, alternating
between `--second` (default: a copy of the checkpoint in a temporary folder, so that every swap
reads and verifies a whole file) and the checkpoint, `--gap-seconds` apart. Prints:
- the time to swap a model (the ReloadModel call: read, verify, build, warm up, switch), median;
- request latency p50/p99 in steady state and of requests that overlapped a swap, the same run,
  and p99 during over p99 steady; errors (there should be none);
- the resident memory (VmRSS) of a server serving the checkpoint alone and of one serving it and
  the second, each a fresh process after `--warm-requests` requests to each model.

    python benchmarks/swap.py --checkpoint runs/multi30k-en-de/best.pt \\
        --corpus /work/shared/data/multi30k/test_2016_flickr.en.gz --json swap.json

Quick check (about a minute):

    python benchmarks/swap.py --checkpoint CKPT --corpus CORPUS --steady-seconds 5 --swaps 2 --gap-seconds 2
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import grpc

from translator.client import TranslatorClient
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc

TOKEN = "swap-benchmark"


def read_sentences(path: Path, limit: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line, _ in zip(f, range(limit)) if line.strip()]


@contextlib.contextmanager
def serving(models: list[tuple[str, Path]], workdir: Path, extra: list[str]) -> Iterator[tuple[str, int]]:
    """nmt-serve on a free port serving `models`; yields (target, pid)."""
    token = workdir / "admin.token"
    token.write_text(TOKEN)
    argv = [sys.executable, "-m", "translator.serve_cli", "--port", "0", "--admin-token-file", str(token), *extra]
    for name, path in models:
        argv += ["--model", f"{name}={path}"]
    log = (workdir / "server.log").open("a")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            raise SystemExit(f"nmt-serve did not start: {line!r}; see {workdir / 'server.log'}")
        yield f"{match.group(1)}:{match.group(2)}", proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    """Closed-loop clients; every request's (start, end) and any errors."""

    def __init__(self, target: str, sentences: list[str], clients: int, beam_size: int) -> None:
        self.spans: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target, sentences[k::clients], beam_size))
                         for k in range(clients)]

    def _run(self, target: str, sentences: list[str], beam_size: int) -> None:
        with TranslatorClient(target, timeout=60, retries=0) as client:
            k = 0
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    client.translate([sentences[k % len(sentences)]], model="m", beam_size=beam_size)
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                self.spans.append((start, time.monotonic()))
                k += 1

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def swap_run(args: argparse.Namespace, sentences: list[str], second: Path, workdir: Path) -> dict:
    with serving([("m", args.checkpoint)], workdir, args.server_args) as (target, _):
        admin = pb_grpc.AdminStub(grpc.insecure_channel(target))
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with Load(target, sentences, args.clients, args.beam_size) as load:
            begin = time.monotonic() + 1.0  # the first second warms the clients' channels up
            time.sleep(args.steady_seconds)
            steady_end = time.monotonic()
            windows = []
            for k in range(args.swaps):
                time.sleep(args.gap_seconds)
                path = second if k % 2 == 0 else args.checkpoint
                start = time.monotonic()
                admin.ReloadModel(pb.ReloadModelRequest(name="m", checkpoint=str(path)), timeout=300,
                                  metadata=metadata)
                windows.append((start, time.monotonic()))
            time.sleep(args.gap_seconds)
    steady = [(e - s) * 1000 for s, e in load.spans if begin <= s and e <= steady_end]
    during = [(e - s) * 1000 for s, e in load.spans if any(s < we and e > ws for ws, we in windows)]
    swap_s = [we - ws for ws, we in windows]
    return {
        "model_swap_seconds": round(statistics.median(swap_s), 3), "swap_seconds_each": [round(x, 3) for x in swap_s],
        "steady_requests": len(steady), "during_swap_requests": len(during), "errors": len(load.errors),
        "error_examples": load.errors[:3],
        "steady_p50_ms": round(percentile(steady, 0.5), 1), "steady_p99_ms": round(percentile(steady, 0.99), 1),
        "during_swap_p50_ms": round(percentile(during, 0.5), 1) if during else None,
        "during_swap_p99_ms": round(percentile(during, 0.99), 1) if during else None,
        "model_swap_p99_vs_steady": round(percentile(during, 0.99) / percentile(steady, 0.99), 2) if during else None,
        "requests": len(load.spans),
    }


def memory_run(args: argparse.Namespace, sentences: list[str], second: Path, workdir: Path) -> dict:
    rss = {}
    for label, models in (("one", [("m", args.checkpoint)]), ("two", [("m", args.checkpoint), ("m2", second)])):
        with serving(models, workdir, args.server_args) as (target, pid):
            with TranslatorClient(target, timeout=120) as client:
                for name, _ in models:
                    for k in range(args.warm_requests):
                        client.translate([sentences[k % len(sentences)]], model=name, beam_size=args.beam_size)
            rss[label] = rss_mib(pid)
    return {"rss_one_model_mib": round(rss["one"], 1), "rss_two_models_mib": round(rss["two"], 1),
            "two_models_rss_vs_one": round(rss["two"] / rss["one"], 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--second", type=Path, help="the checkpoint swapped in (default: a copy of --checkpoint)")
    p.add_argument("--corpus", type=Path, default=Path("/work/shared/data/multi30k/test_2016_flickr.en.gz"))
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--steady-seconds", type=float, default=20.0)
    p.add_argument("--swaps", type=int, default=4)
    p.add_argument("--gap-seconds", type=float, default=3.0)
    p.add_argument("--warm-requests", type=int, default=20)
    p.add_argument("--server-args", nargs="*", default=[], help="more nmt-serve arguments, e.g. threads=2")
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sentences = read_sentences(args.corpus, args.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        second = args.second
        if second is None:
            second = workdir / "second.pt"
            shutil.copyfile(args.checkpoint, second)
        figures = {**swap_run(args, sentences, second, workdir), **memory_run(args, sentences, second, workdir)}
    figures["command"] = " ".join(["python", "benchmarks/swap.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
