"""Loopback load test of nmt-serve: single-sentence Translate calls from 1, 8, 32, 128 concurrent clients.

Starts `nmt-serve` on the checkpoint in a subprocess, decodes the same sentences offline in
length-sorted batches (the throughput ceiling), then for each concurrency level sends every
sentence once, one per call, and stops. Prints throughput (sentences/s), latency percentiles,
errors, served / offline throughput, and where a request's time went on the server (mean wait
for a batch, mean time in decode batches; from its Prometheus metrics). C clients keep at most C
sentences in flight, so each level is also set against offline decoding in batches of at most C
sentences ("vs C"): what the server could reach with the batch sizes its load allows. `--batching
continuous,static` runs the levels against a server of each kind in turn (sentences joining a
running greedy batch, or batches decoded whole), against the same offline figure.

    python benchmarks/load.py --checkpoint runs/multi30k-en-de/best.pt \\
        --corpus /work/shared/data/multi30k/test_2016_flickr.en.gz --json load.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc


def read_sentences(path: Path, limit: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:limit] if limit else lines


def offline_throughput(
    checkpoint: Path, sentences: list[str], beam_size: int, max_batch_tokens: int, batch_sizes: list[int]
) -> tuple[float, dict[int, float]]:
    """Sentences per second of Translator.translate over all sentences at once; and, per batch
    size C, over length-sorted batches of at most C sentences, one call each."""
    from translator.checkpoint import load_checkpoint
    from translator.decoding import DecodeOptions
    from translator.runtime import keep_freed_memory
    from translator.translate import Translator

    keep_freed_memory()  # as nmt-translate and nmt-serve do
    ckpt = load_checkpoint(checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, DecodeOptions(beam_size=beam_size),
                            max_batch_tokens=max_batch_tokens)
    translator.translate(sentences[:8])  # warm-up

    def rate(batches: list[list[str]]) -> float:
        start = time.perf_counter()
        for batch in batches:
            translator.translate(batch)
        return len(sentences) / (time.perf_counter() - start)

    by_length = [sentences[i] for i in sorted(range(len(sentences)), key=lambda i: len(sentences[i].split()))]
    capped = {c: rate([by_length[k : k + c] for k in range(0, len(by_length), c)]) for c in batch_sizes}
    return rate([sentences]), capped


def start_server(args: argparse.Namespace, batching: str) -> tuple[subprocess.Popen, str, str]:
    """The server in a subprocess; its gRPC target and its metrics URL."""
    cmd = [sys.executable, "-m", "translator.serve_cli", "--checkpoint", str(args.checkpoint), "--port", "0",
           "--metrics-port", "0",
           "--threads", str(args.threads), f"batching.workers={args.workers}",
           f"batching.continuous={str(batching == 'continuous').lower()}",
           f"batching.max_batch_tokens={args.max_batch_tokens}",
           f"batching.max_queue_delay_ms={args.max_queue_delay_ms}",
           f"batching.max_queue_sentences={max(256, 2 * max(args.concurrency))}", *args.server_set]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.server_env)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+), metrics on (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, match.group(1), match.group(2)


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus samples, name (with labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
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


def run_level(target: str, sentences: list[str], clients: int, beam_size: int, timeout: float) -> dict:
    """Every sentence once, `clients` calls in flight; returns throughput, latency percentiles, errors."""
    channels = [grpc.insecure_channel(target) for _ in range(min(clients, 8))]
    stubs = [pb_grpc.TranslatorStub(c) for c in channels]
    todo = iter(range(len(sentences)))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    options = pb.DecodingOptions(beam_size=beam_size)
    answered: Counter[int] = Counter()

    def client(k: int) -> None:
        stub = stubs[k % len(stubs)]
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            request = pb.TranslateRequest(texts=[sentences[i]], options=options)
            start = time.perf_counter()
            try:
                stub.Translate(request, timeout=timeout)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                answered[i] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in channels:
        c.close()
    latencies.sort()
    return {
        "clients": clients,
        "sentences": len(sentences),
        "ok": len(latencies),
        "errors": dict(errors),
        "answered_twice": sum(1 for n in answered.values() if n > 1),
        "seconds": round(seconds, 3),
        "sentences_per_s": round(len(latencies) / seconds, 2),
        **{f"p{q}_ms": round(percentile(latencies, q) * 1000, 1) for q in (50, 95, 99)},
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True, help="source sentences, one per line (.gz or plain)")
    p.add_argument("--sentences", type=int, default=0, help="use the first N sentences (0: all)")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client counts")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server decode worker")
    p.add_argument("--workers", type=int, default=1, help="server decode workers (batching.workers)")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--batching", default="continuous",
                   help="comma-separated server kinds to run in turn: continuous, static")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server process only (repeatable)")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="server config override, e.g. batching.max_join_delay_ms=20 (repeatable)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each call, seconds")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    for flag, values in (("--server-env", args.server_env), ("--server-set", args.server_set)):
        if any("=" not in kv for kv in values):
            p.error(f"{flag} takes KEY=VALUE, got {values}")
    kinds = args.batching.split(",")
    if not set(kinds) <= {"continuous", "static"}:
        p.error(f"--batching takes continuous and/or static, got {args.batching!r}")
    sentences = read_sentences(args.corpus, args.sentences)

    import torch

    torch.set_num_threads(args.threads * args.workers)  # offline gets every core the server gets
    offline, capped = offline_throughput(args.checkpoint, sentences, args.beam_size, args.max_batch_tokens,
                                         args.concurrency)
    print(f"offline batched decoding: {offline:.2f} sentences/s "
          f"({len(sentences)} sentences, beam {args.beam_size}); in batches of at most C sentences: "
          + ", ".join(f"C={c} {rate:.2f}" for c, rate in capped.items()))
    header = ("batching", "clients", "sent/s", "p50 ms", "p95 ms", "p99 ms", "errors", "ratio", "vs C",
              "queue ms", "decode ms")
    print(" ".join(f"{h:>10}" for h in header))
    levels = []
    for kind in kinds:
        proc, target, metrics_url = start_server(args, kind)
        try:
            run_level(target, sentences[:8], 4, args.beam_size, args.timeout)  # warm-up
            for clients in args.concurrency:
                before = scrape(metrics_url)
                r = {"batching": kind, **run_level(target, sentences, clients, args.beam_size, args.timeout)}
                r.update(where_time_went(before, scrape(metrics_url)))
                r["ratio_to_offline"] = round(r["sentences_per_s"] / offline, 3)
                r["ratio_to_offline_at_clients"] = round(r["sentences_per_s"] / capped[clients], 3)
                levels.append(r)
                row = (kind, clients, r["sentences_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
                       sum(r["errors"].values()), r["ratio_to_offline"], r["ratio_to_offline_at_clients"],
                       r["mean_queue_ms"], r["mean_decode_ms"])
                print(" ".join(f"{v:>10.3f}" if isinstance(v, float) else f"{v:>10}" for v in row))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    if args.json:
        result = {"checkpoint": str(args.checkpoint), "corpus": str(args.corpus), "beam_size": args.beam_size,
                  "threads": args.threads, "workers": args.workers, "offline_sentences_per_s": round(offline, 2),
                  "offline_sentences_per_s_in_batches_of": {c: round(rate, 2) for c, rate in capped.items()},
                  "server_env": args.server_env, "server_set": args.server_set, "levels": levels}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
